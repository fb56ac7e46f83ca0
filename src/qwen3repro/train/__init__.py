"""Training: the loop (optimizer, schedule, accumulation, clipping, precision), checkpoints, logs."""
from .checkpoint import CheckpointError, ConfigMismatchError, find_latest, load_checkpoint
from .loop import TrainConfig, TrainingDivergedError, causal_lm_loss, train
from .schedule import WSDSchedule, wsd_lr

__all__ = [
    "CheckpointError",
    "ConfigMismatchError",
    "TrainConfig",
    "TrainingDivergedError",
    "WSDSchedule",
    "causal_lm_loss",
    "find_latest",
    "load_checkpoint",
    "train",
    "wsd_lr",
]
