"""Building models by name, and weights in and out: `create_model`, `load_pretrained`, `save_pretrained`.

`load_pretrained` recognises the format itself:
  vitkit directory     config.json {"format": "vitkit", ...} + model.safetensors
  training run         RUN/best (or RUN/last) holding a vitkit directory
  HF transformers      directory with config.json {"model_type": "vit", ...}, or `hf-hub:ORG/NAME`
  timm state dict      .safetensors / .pth / .bin with timm's parameter names
  timm Hub directory   config.json {"architecture": ..., "pretrained_cfg": ...} + weights, or `hf-hub:timm/NAME`
  JAX .npz             google-research/vision_transformer or big_vision layout
The foreign formats live in vitkit.convert, one module each.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import Preprocessing, ViTConfig
from .errors import CheckpointError, VitkitError, first_line
from .model import VisionTransformer, resample_pos_embed
from .variants import preprocessing_fields, resolve
from .weights import atomic_write, read_state_dict

FORMAT_NAME = "vitkit"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# Overrides that change how a loaded model is used, not the shape of any weight it holds.
_ADAPTABLE = {"num_classes", "img_size"}


def create_model(name: str | ViTConfig, **overrides: Any) -> VisionTransformer:
    """Build a randomly initialised ViT by variant name (`"ViT-B/16"`, `"vit_base_patch16_224"`,
    `"base"`) or from a ViTConfig, with any ViTConfig field overridden (`num_classes=10`)."""
    config = name if isinstance(name, ViTConfig) else resolve(name)
    if overrides.get("class_token") is False and "global_pool" not in overrides and config.global_pool == "token":
        overrides["global_pool"] = "avg"  # without a [class] token the only pooling left is the patches' mean
    if overrides:
        config = config.replace(**overrides)
    model = VisionTransformer(config)
    published = preprocessing_fields(name) if isinstance(name, str) else {}
    if published:
        model.preprocessing = Preprocessing.for_size(config.img_size, **published)
    return model


def names_weights(source: str) -> bool:
    """Whether a command-line SOURCE means weights to load (a file, a directory, an hf-hub: id)
    rather than a variant name. A path wins over a name: a run folder called "tiny" is the user's model."""
    return Path(source).exists() or source.startswith("hf-hub:")


def load_or_create(source: str, *, model: str | None = None) -> VisionTransformer:
    """What the command line means by SOURCE (see `names_weights`): weights load through
    `load_pretrained`; otherwise a variant name builds a fresh model. `model` names the variant
    for weight files."""
    if names_weights(source):
        loaded = load_pretrained(source, model=model)
        if model is not None:
            check_named_model(loaded.config, model, source)
        return loaded
    try:
        resolve(source)
    except ValueError as error:
        raise VitkitError(f"{source!r} is neither a file, a directory nor a model name: {error}") from None
    return create_model(source)


def check_named_model(config: ViTConfig, model: str, source: str, *, overrides: dict[str, Any] | None = None) -> None:
    """--model (with its ViTConfig `overrides`) beside a file that says its own architecture must
    agree with it: silently using the file's would answer another question than the one asked."""
    named = resolve(model).replace(**(overrides or {}))
    fields = ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size")
    differ = [f"{k}={getattr(config, k)} (not {getattr(named, k)})" for k in fields if getattr(config, k) != getattr(named, k)]
    if differ:
        raise VitkitError(f"--model {model}: {source} holds another architecture: {', '.join(differ)}")


def save_pretrained(model: VisionTransformer, directory: str | Path) -> Path:
    """Write `model` as a vitkit directory: model.safetensors plus config.json holding the
    architecture, class names and preprocessing: everything needed to rebuild and use it.
    Each file is written atomically, so a crash never leaves a half-written checkpoint."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    text = config_json(model)
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return directory


def config_json(model: VisionTransformer) -> str:
    """The text of a vitkit directory's config.json: the architecture, class names and
    preprocessing. Exports carry it too (`vitkit.export`), so a served model says how to feed it."""
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "class_names": model.class_names,
        "preprocessing": model.preprocessing.to_dict(),
    }
    return json.dumps(meta, indent=2)


def load_pretrained(source: str | Path, model: str | ViTConfig | None = None, **overrides: Any) -> VisionTransformer:
    """Load a ready model from any supported `source` (see the module docstring), on the CPU, in
    eval mode.

    model: a variant name or ViTConfig, for files that cannot say the whole architecture
        (a timm state dict does not record the number of heads).
    overrides: ViTConfig fields. A different `num_classes` gives a freshly initialised head (with a
        warning); a different `img_size` resamples the position embeddings in 2-D. Fields that would
        change a weight's shape (width, depth, ...) are refused.
    """
    try:
        base = None if model is None else (model if isinstance(model, ViTConfig) else resolve(model))
    except ValueError as error:
        raise VitkitError(f"--model {model}: {error}") from None
    config, state, extras = read_checkpoint(source, base=base)
    published = preprocessing_fields(model) if isinstance(model, str) else {}
    if extras.get("preprocessing") is None and published:
        # The file does not say how its images were normalised; the named model's weights do.
        extras = {**extras, "preprocessing": Preprocessing.for_size(config.img_size, **published)}
    return build_from_checkpoint(config, state, extras, source=str(source), overrides=overrides)


def read_checkpoint(source: str | Path, *, base: ViTConfig | None = None) -> tuple[ViTConfig, dict[str, Tensor], dict[str, Any]]:
    """Read `source` into (config, vitkit state dict, extras), detecting the format.
    extras may hold "class_names" and "preprocessing"."""
    text = str(source)
    if text.startswith("hf-hub:"):
        from .convert.hf import download_hf_hub

        source = download_hf_hub(text.removeprefix("hf-hub:"))
    path = Path(source)
    if path.is_dir():
        # A training run directory holds its own config.json (the run's settings) beside best/ and last/.
        best = next((path / sub for sub in ("best", "last") if (path / sub / CONFIG_FILE).is_file()), None)
        if best is not None and not _is_model_config(path / CONFIG_FILE):
            path = best
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            raise CheckpointError(path, f"a directory without {CONFIG_FILE}: not a vitkit, HuggingFace or run directory")
        meta = _read_json(config_file)
        if meta.get("format") == FORMAT_NAME:
            return _read_vitkit_dir(path, meta)
        if meta.get("model_type") in ("vit", "deit"):
            from .convert.hf import read_hf_dir

            return read_hf_dir(path, meta)
        if "architecture" in meta and "pretrained_cfg" in meta:
            from .convert.timm import read_timm_hub_dir

            with _shape_errors_name(path):
                return read_timm_hub_dir(path, meta, base=base)
        if best is None and "epochs" in meta and "model" in meta:  # a run's settings (vitkit.train.TrainConfig)
            raise CheckpointError(path, "a training run with no checkpoint yet (no best/ or last/ inside)")
        raise CheckpointError(config_file, "neither a vitkit config (format: vitkit), a HuggingFace ViT config "
                                           f"(model_type: vit) nor a timm one (architecture); found keys {sorted(meta)[:8]}")
    if not path.exists():
        raise CheckpointError(path, "no such file or directory")
    from .convert.jax_npz import read_npz_checkpoint
    from .convert.timm import read_timm_state_dict

    with _shape_errors_name(path):
        if path.suffix.lower() == ".npz":
            return read_npz_checkpoint(path, base=base)
        return read_timm_state_dict(read_state_dict(path), base=base, source=str(path))


@contextmanager
def _shape_errors_name(path: Path):
    """An array of a rank or size no ViT has fails deep in a reader: one line naming the file."""
    try:
        yield
    except (IndexError, ValueError, RuntimeError) as error:
        raise CheckpointError(path, f"a weight of an unexpected shape ({type(error).__name__}: {first_line(error)})") from None


def _is_model_config(config_file: Path) -> bool:
    if not config_file.is_file():
        return False
    try:
        meta = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and (meta.get("format") == FORMAT_NAME or meta.get("model_type") in ("vit", "deit"))


def _read_vitkit_dir(path: Path, meta: dict[str, Any]) -> tuple[ViTConfig, dict[str, Tensor], dict[str, Any]]:
    config_file = path / CONFIG_FILE
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(config_file, f"unsupported format_version {meta.get('format_version')!r} "
                                           f"(this vitkit reads {FORMAT_VERSION})")
    unknown = sorted(set(meta) - {"format", "format_version", "model", "class_names", "preprocessing"})
    if unknown:
        raise CheckpointError(config_file, f"unknown keys {unknown}")
    try:
        config = ViTConfig.from_dict(meta.get("model"), source="model")
        preprocessing = Preprocessing.from_dict(meta.get("preprocessing"), source="preprocessing")
    except ValueError as error:
        raise CheckpointError(config_file, str(error)) from None
    class_names = meta.get("class_names")
    if class_names is not None and (not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names)):
        raise CheckpointError(config_file, "class_names must be a list of strings or null")
    if class_names is not None and len(class_names) != config.num_classes:
        raise CheckpointError(config_file, f"{len(class_names)} class names for a model of {config.num_classes} classes")
    state = read_state_dict(path / WEIGHTS_FILE)
    return config, state, {"class_names": class_names, "preprocessing": preprocessing}


def build_from_checkpoint(config: ViTConfig, state: dict[str, Tensor], extras: dict[str, Any], *,
                          source: str, overrides: dict[str, Any] | None = None) -> VisionTransformer:
    """Build the model `config` describes, load `state` into it strictly, then apply overrides."""
    overrides = dict(overrides or {})
    fixed = {k: v for k, v in overrides.items() if k not in _ADAPTABLE}
    current = config.to_dict()
    for key, value in fixed.items():
        if key not in current:
            raise VitkitError(f"{source}: unknown model option {key!r}")
    build_config = config.replace(**fixed) if fixed else config
    shape_changes = [k for k in ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size", "in_chans",
                                 "class_token", "reg_tokens", "representation_size", "qkv_bias", "qk_norm",
                                 "distill_token", "hybrid_stem")
                     if getattr(build_config, k) != getattr(config, k)]
    if shape_changes:
        raise VitkitError(f"{source}: the checkpoint's {', '.join(shape_changes)} cannot be overridden "
                          f"(it was trained with {', '.join(f'{k}={getattr(config, k)!r}' for k in shape_changes)})")
    try:
        model = VisionTransformer(build_config)
    except ValueError as error:  # what the config alone cannot check, such as hybrid_stem's contents
        raise CheckpointError(source, str(error)) from None
    load_state(model, state, source=source)
    if extras.get("preprocessing") is not None:
        model.preprocessing = extras["preprocessing"]
    model.class_names = extras.get("class_names")
    if "num_classes" in overrides and overrides["num_classes"] != config.num_classes:
        warnings.warn(f"{source}: the head was trained for {config.num_classes} classes; it is replaced by a "
                      f"freshly initialised head for {overrides['num_classes']} classes", stacklevel=2)
        model.reset_classifier(overrides["num_classes"])
    if "img_size" in overrides:
        set_img_size(model, overrides["img_size"])
    return model.eval()


def load_state(model: VisionTransformer, state: dict[str, Tensor], *, source: str) -> None:
    """Copy `state` into `model`, requiring the exact same keys and shapes; the error names them."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {_clip(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_clip(unexpected)}")
    if wrong_shape:
        problems.append(f"shapes that do not fit the model (file vs model) {_clip(wrong_shape)}")
    if problems:
        raise CheckpointError(source, "does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def set_img_size(model: VisionTransformer, img_size: int | tuple[int, int]) -> None:
    """Rebuild `model` for another input resolution, resampling its position embeddings in 2-D
    (paper Sec. 3.2) with the config's interpolation mode."""
    old = model.config
    new = old.replace(img_size=img_size)
    if new.img_size == old.img_size:
        return
    resampled = resample_pos_embed(model.pos_embed.data, old_grid=old.grid_size, new_grid=new.grid_size,
                                   num_prefix=old.num_prefix_tokens if old.prefix_pos_embed else 0,
                                   mode=old.pos_embed_interpolation)
    model.pos_embed = torch.nn.Parameter(resampled)
    model.config = new
    old_pre = model.preprocessing
    model.preprocessing = Preprocessing.for_size(new.img_size, interpolation=old_pre.interpolation, mean=old_pre.mean,
                                                 std=old_pre.std, resize_mode=old_pre.resize_mode)
    if old_pre.resize_mode == "stretch":  # keep the stretch's proportion to the crop
        model.preprocessing.resize = round(old_pre.resize * min(new.img_size) / min(old_pre.crop))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(path, f"not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "must hold a JSON object")
    return data


def _clip(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"
