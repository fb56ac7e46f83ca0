"""Off-policy strong-to-weak distillation (Qwen3 report §4.5, phase 1): the student is fine-tuned on the
teacher's responses in both modes, with the loss on assistant tokens only (`stages.sft.fine_tune`, the
trainer of every SFT stage).

    run(DistillConfig.from_dict(recipe ⊕ scale), parent=<the student checkpoint>, ctx) -> <out_dir>

The teacher outputs come from the stage the recipe `uses` (`teacher_outputs`, a teacher-outputs stage).
Before any compute the student is checked against the teacher those outputs came from: one vocabulary
(vocab_size and tokenizer.json), or the stage refuses naming both.

The same stage continues a distilled student for the report's Table 21 control, "compute-matched
continued off-policy SFT": with `match_compute_of` naming a used stage, the step count is the one whose
training FLOPs (6·N·tokens per step, `train.compute`) come closest to that stage's `compute.json`.
Every run writes its own `compute.json`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ..config import ConfigError, ModelConfig
from ..config_fields import checked_fields
from ..files import write_json_atomic
from ..lineage import make_lineage, write_lineage
from ..tokenizer import Tokenizer
from ..train.compute import COMPUTE_FILE, TRAIN_FLOPS_PER_PARAM, ComputeLedger, flop_parameters
from . import sft
from .common import StageContext
from .teacher_outputs import MODES, check_same_vocabulary, load_teacher_outputs, vocabulary_of

DATA_NAME = "teacher-outputs"


@dataclass(frozen=True)
class DistillConfig:
    name: str = "distill"
    teacher_outputs: str = "flagship/teacher-outputs"
    """The `uses` entry of the teacher-outputs stage whose data this stage trains on."""
    modes: tuple[str, ...] = MODES
    """Which of the teacher's modes to train on (the report: both)."""
    match_compute_of: str | None = None
    """A `uses` entry whose compute.json FLOPs this run matches by its step count (the `sft` table's steps
    are then ignored); None: the table's steps."""
    sft: sft.SFTTable = field(default_factory=dict)
    """`stages.sft.SFTConfig` fields except name and data."""
    seed: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "modes", tuple(self.modes))
        if not self.modes or set(self.modes) - set(MODES):
            raise ConfigError(f"{self.name}: modes must be names from {MODES}, got {list(self.modes)}")
        self.sft_config()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "DistillConfig") -> "DistillConfig":
        return cls(**checked_fields(cls, d, where))

    def sft_config(self) -> sft.SFTConfig:
        return sft.SFTConfig.for_stage(self.name, self.sft, data=DATA_NAME, seed=self.seed)


def tokens_per_step(loader: sft.SFTLoader, grad_accum: int = 1) -> float:
    """Mean token positions one optimizer step computes (padding included), over the first epoch's batches."""
    return grad_accum * loader.tokens_per_epoch(0) / loader.batches_per_epoch(0)


def compute_matched_steps(target_flops: float, n_student: int, tokens_per_step: float) -> int:
    """The step count whose training FLOPs, 6·N·tokens_per_step·steps, come closest to `target_flops` (>= 1)."""
    return max(1, round(target_flops / (TRAIN_FLOPS_PER_PARAM * n_student * tokens_per_step)))


def run(cfg: DistillConfig, parent: Path, ctx: StageContext) -> Path:
    """Fine-tune the student checkpoint `parent` on the teacher outputs into `ctx.out_dir`."""
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parent = Path(parent)
    if not (parent / "config.json").exists():
        raise ConfigError(f"{cfg.name}: needs a student checkpoint with a model, got {parent}")
    data_dir = ctx.input_dir(cfg.teacher_outputs)
    conversations, report = load_teacher_outputs(data_dir, cfg.modes)
    check_same_vocabulary(report["teacher"], vocabulary_of(parent), cfg.name)
    if not conversations:
        raise ValueError(f"{cfg.name}: {data_dir} holds no conversation in modes {list(cfg.modes)}")
    student_config = ModelConfig.from_json(str(parent / "config.json"))
    n_student = flop_parameters(student_config)
    sft_cfg = cfg.sft_config()
    matched = None
    if cfg.match_compute_of is not None:
        target = json.loads((ctx.input_dir(cfg.match_compute_of) / COMPUTE_FILE).read_text())["flops"]
        loader = sft.prepare(sft_cfg, Tokenizer.load(parent), conversations).loader
        steps = compute_matched_steps(target, n_student, tokens_per_step(loader, int(sft_cfg.train.get("grad_accum", 1))))
        sft_cfg = replace(sft_cfg, steps=steps, epochs=None)
        matched = {"stage": cfg.match_compute_of, "flops": target, "steps": steps}
        ctx.say(f"{cfg.name}: {steps} steps to match the {target:.3g} FLOPs of {cfg.match_compute_of}")
    data_hash = sft.fine_tune(sft_cfg, parent, ctx, conversations)
    tokens = int(json.loads((out / "eval.json").read_text())["tokens_seen"])
    ledger = ComputeLedger(n_student=n_student)
    ledger.add(trained=tokens)
    write_json_atomic(out / COMPUTE_FILE, {**ledger.summary(), "matched": matched,
                                           "teacher_generation_flops": report.get("generation_flops")})
    uses = {cfg.teacher_outputs: data_dir}
    if cfg.match_compute_of is not None:
        uses[cfg.match_compute_of] = ctx.input_dir(cfg.match_compute_of)
    write_lineage(out, make_lineage(cfg.name, cfg, parent, data_hashes={"conversations": data_hash}, uses=uses))
    return out


__all__ = ["DistillConfig", "compute_matched_steps", "run", "tokens_per_step"]
