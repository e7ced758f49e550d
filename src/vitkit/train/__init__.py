"""`vitkit train`: config -> run directory -> data -> model -> optimiser -> (resume) -> epochs -> summary.

Modules: config (TrainConfig, filled in from a recipe and checked), run_dir (new or resumed run
directory, metrics log, plots), distributed (torchrun processes and full states for checkpoints),
setup (the model from --init or a name, its EMA, the DeiT/DDP/FSDP wrappers, the teacher), loop
(the step and the epochs).
"""

from .config import TrainConfig, absolute_if_local, resolve_config
from .loop import TrainingDiverged, compute_loss, evaluate, soft_cross_entropy, train
from .run_dir import METRICS_FILE, read_metrics, write_metrics

__all__ = ["TrainConfig", "train", "resolve_config", "evaluate", "compute_loss", "soft_cross_entropy",
           "read_metrics", "write_metrics", "TrainingDiverged", "absolute_if_local", "METRICS_FILE"]
