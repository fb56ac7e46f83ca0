"""Training: the loop (optimizer, schedule, accumulation, clipping, precision), the run state it shares
with RL (`TrainingRun`), checkpoints, logs."""
from .checkpoint import CheckpointError, ConfigMismatchError, find_latest, load_checkpoint
from .loop import TrainConfig, TrainingDivergedError, TrainingRun, causal_lm_loss, train
from .schedule import WSDSchedule, wsd_lr

__all__ = [
    "CheckpointError",
    "ConfigMismatchError",
    "TrainConfig",
    "TrainingDivergedError",
    "TrainingRun",
    "WSDSchedule",
    "causal_lm_loss",
    "find_latest",
    "load_checkpoint",
    "train",
    "wsd_lr",
]
