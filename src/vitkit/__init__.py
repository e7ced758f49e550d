"""vitkit: Vision Transformers (Dosovitskiy et al., 2021) to build, load, train, inspect and ship."""

from .config import Preprocessing, ViTConfig
from .errors import CheckpointError, VitkitError
from .model import VisionTransformer, count_flops, count_parameters, resample_pos_embed
from .pretrained import create_model, load_pretrained, save_pretrained
from .variants import list_models
from . import conv_stem as _conv_stem  # noqa: F401  (registers the small-image models)
from . import hybrid as _hybrid  # noqa: F401  (registers the R50+ViT hybrids and their converter hooks)
from . import distill as _distill  # noqa: F401  (registers DeiT's named models)

__version__ = "0.1.0"

__all__ = [
    "ViTConfig", "Preprocessing", "VisionTransformer", "create_model", "load_pretrained", "save_pretrained",
    "list_models", "count_parameters", "count_flops", "resample_pos_embed", "VitkitError", "CheckpointError",
]
