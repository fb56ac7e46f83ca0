"""What every stage shares: its run context and the checkpoint-directory contract.

A stage is `run(cfg, parent, ctx) -> Path`: it reads the parent checkpoint directory (model,
tokenizer), writes its own directory under `ctx.out_dir`, and returns it. The directory is the
contract between stages: Hugging Face model files, tokenizer files, `state/`, the checksums of
the model files and `state/` (`checksums.json`), `metrics.jsonl`, `eval.json` and, written last,
`lineage.json`.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ConfigError
from ..train.loop import TrainConfig, resolve_device
from ..train.metrics import default_printer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class StageContext:
    """Where a stage writes, where cached data lives, how it reports progress and where it computes.

    None of these fields changes what the stage computes, so none enters its config hash.
    """

    out_dir: Path
    cache_dir: Path
    printer: Callable[[str], None] = field(default_factory=default_printer)
    device: str = "cpu"
    """Where the stage trains, generates and evaluates: 'cpu', 'cuda' or 'cuda:N' (the pipeline's `--device`,
    one for the whole run). Bookkeeping like the checkpoint cadence: not in the config or lineage hash."""
    inputs: dict[str, Path] = field(default_factory=dict)
    """Output directories of the other stages this one reads (its recipe's `uses`), by stage name."""

    def input_dir(self, stage: str) -> Path:
        """The output directory of a stage this one uses; a clear error when it was not given."""
        if stage not in self.inputs:
            given = ", ".join(sorted(self.inputs)) or "none"
            raise FileNotFoundError(f"{self.out_dir}: needs the output of stage {stage!r} (recipe `uses`); "
                                    f"given: {given}")
        return Path(self.inputs[stage])

    def say(self, msg: str) -> None:
        self.printer(msg)

    def device_for(self, configured: str = "cpu") -> str:
        """The device the stage runs on: this context's. `configured` is a device the stage's own config
        states (the RL stages' and the reward model's `device`, a `train` table's): those fields predate the
        run-wide setting and stay in the configs at their default, "cpu", so that lineage hashes do not
        change; any other value that disagrees with the context would be a second setting silently
        overruled, so it is refused."""
        if configured not in ("cpu", self.device):
            raise ConfigError(f"{self.out_dir}: the stage config asks for device {configured!r} but the run is on "
                              f"{self.device!r}; the device is set for the whole run (qwen3repro pipeline "
                              "--device, or StageContext.device), not in a stage's config")
        return self.device

    @property
    def torch_device(self) -> torch.device:
        """`device` as a torch device (a ConfigError when it names a GPU this machine does not have)."""
        return resolve_device(self.device)

    def on_device(self, cfg: TrainConfig) -> TrainConfig:
        """A stage's training settings on this context's device (`device_for` checks what `cfg` says)."""
        return cfg.replace(device=self.device_for(cfg.device))


# Config fields that say how a run is logged, checkpointed and where it runs, not what it computes.
BOOKKEEPING_FIELDS = ("ckpt_every", "keep_last", "log_every", "device", "description")


def identity_fields(cfg: Any) -> dict[str, Any]:
    """A stage config's fields that change what the run computes (all but `BOOKKEEPING_FIELDS`): what a
    resumed run must match."""
    d = asdict(cfg)
    for k in BOOKKEEPING_FIELDS:
        d.pop(k)
    return d


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Carry the tokenizer files from a parent checkpoint to a child, so every directory is loadable alone."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if not (src / name).exists():
            raise FileNotFoundError(f"{src} has no {name}: not a stage output with a tokenizer")
        shutil.copyfile(src / name, dst / name)
