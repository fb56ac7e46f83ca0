"""Where a pipeline run computes: one device for every stage, evaluation, claim and experiment of the run.

`pipeline_device` checks the device a run asks for (`qwen3repro pipeline SCALE --device cuda`,
`make tiny-pipeline DEVICE=cuda`) before anything runs, so a GPU run on a machine without one stops at
once with the reason instead of deep inside the first stage. The device is bookkeeping, like the
checkpoint cadence: it is not part of any stage's config or lineage hash (a stage trained on a GPU
and the same stage trained on the CPU have the same identity; their floating-point results differ as
those of two CPUs do), and every stage's `timing.json` and the run's `pipeline.json` record it.

`model_device` is how code that receives a model finds where to put the tensors it feeds it: the
model's parameters decide, never a default, so the same function runs on the CPU and on a GPU.
"""
from __future__ import annotations

import re

import torch

from .config import ConfigError

DEVICE_CHOICES = ("cpu", "cuda", "cuda:N", "auto")
"""What a run may ask for: the CPU, the current GPU, GPU number N, or a GPU when there is one."""
_CUDA = re.compile(r"cuda(?::(\d+))?")


def pipeline_device(name: str) -> str:
    """The device a run computes on: `name` checked against this machine ("auto" resolved to "cuda" or
    "cpu"). A ConfigError saying why when the machine cannot run it."""
    requested = str(name).strip().lower()
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    match = _CUDA.fullmatch(requested)
    if match is None:
        raise ConfigError(f"device {name!r}: use one of {', '.join(DEVICE_CHOICES)}")
    if not torch.cuda.is_available():
        why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
               else "PyTorch sees no GPU (driver, CUDA_VISIBLE_DEVICES)")
        raise ConfigError(f"device {name!r}: CUDA is not available on this machine ({why}; torch "
                          f"{torch.__version__}); run on the CPU with --device cpu (make ... DEVICE=cpu)")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                          f"numbered from 0")
    return requested


def model_device(model) -> torch.device:
    """The device of `model`'s parameters; the CPU for a model without any (a callable standing in for one)."""
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same place: "cuda" (the current GPU) and "cuda:0" are when GPU 0 is current."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


__all__ = ["DEVICE_CHOICES", "model_device", "pipeline_device", "same_device"]
