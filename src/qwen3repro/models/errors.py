"""The error of a checkpoint that cannot be loaded, shared by the model loader (`hf`), its checksums
(`checksums`) and the trainer's checkpoints (`train.checkpoint`)."""
from __future__ import annotations


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the model (or optimizer) it is loaded into.

    The message names the file, tensor or field. Both bases: a loader's callers treat a bad file as a bad
    value (ValueError) and a trainer's treat a checkpoint it cannot resume from as a run-time failure
    (RuntimeError); either `except` catches it.
    """


__all__ = ["CheckpointError"]
