"""Training compute in FLOPs, the x axis of the report's Table 21 comparison (on-policy distillation
against RL, §4.5: "while requiring only 1/10 of the GPU hours").

A forward pass costs 2·N FLOPs per token and a forward plus backward 6·N (Kaplan et al. 2020), with N
the parameters a token passes through (`flop_parameters`). A stage counts four kinds of tokens:

    FLOPs = 6·N_student·trained + 2·N_student·(generated + student_scored) + 2·N_teacher·teacher_scored

* trained: tokens of every forward + backward pass through the student (each optimisation pass counts);
* generated: tokens the student samples (one KV-cached forward each);
* student_scored: tokens the student reads without a gradient (GRPO's old and reference log-probs);
* teacher_scored: tokens the teacher reads to score the student's samples (on-policy distillation).

Attention's own cost (quadratic in the length) is left out as in the 6·N rule: at the lengths of the tiny
runs it is a few percent. Evaluations are not training compute and are not counted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ..config import ModelConfig
from ..models.registry import count_parameters

# FLOPs per parameter per token of a forward pass, and of a forward plus backward pass (Kaplan et al. 2020).
FORWARD_FLOPS_PER_PARAM = 2
TRAIN_FLOPS_PER_PARAM = 6


def flop_parameters(config: ModelConfig) -> int:
    """Parameters one token's forward pass multiplies by: the active parameters without the input
    embedding table (a lookup), with the output projection (a matmul over the vocabulary, tied or not)."""
    vocab_by_hidden = config.vocab_size * config.hidden_size
    # `active` holds the embedding table once, and the output projection again when it is untied:
    # keep one vocab x hidden matrix either way.
    untied_lm_head = 0 if config.tie_word_embeddings else vocab_by_hidden
    return count_parameters(config)["active"] - untied_lm_head


@dataclass
class ComputeLedger:
    """Running token counts of a stage and the FLOPs they cost. Its state goes into the stage's
    checkpoints, so a resumed run keeps counting where the cut one stopped."""

    n_student: int
    n_teacher: int = 0
    trained_tokens: int = 0
    generated_tokens: int = 0
    student_scored_tokens: int = 0
    teacher_scored_tokens: int = 0

    def add(self, *, trained: int = 0, generated: int = 0, student_scored: int = 0, teacher_scored: int = 0) -> None:
        for name, n in (("trained", trained), ("generated", generated), ("student_scored", student_scored),
                        ("teacher_scored", teacher_scored)):
            if n < 0:
                raise ValueError(f"{name} tokens must be >= 0, got {n}")
        self.trained_tokens += int(trained)
        self.generated_tokens += int(generated)
        self.student_scored_tokens += int(student_scored)
        self.teacher_scored_tokens += int(teacher_scored)

    @property
    def flops(self) -> int:
        return (TRAIN_FLOPS_PER_PARAM * self.n_student * self.trained_tokens
                + FORWARD_FLOPS_PER_PARAM * self.n_student * (self.generated_tokens + self.student_scored_tokens)
                + FORWARD_FLOPS_PER_PARAM * self.n_teacher * self.teacher_scored_tokens)

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, int(state[f.name]))

    def summary(self) -> dict[str, Any]:
        """What `compute.json` holds: the counts, the parameter counts and the FLOPs."""
        return {**self.state_dict(), "flops": self.flops,
                "formula": "6*n_student*trained + 2*n_student*(generated + student_scored) + 2*n_teacher*teacher_scored"}


COMPUTE_FILE = "compute.json"
"""Each stage that counts its compute writes its ledger's summary here (read by the Table 21 claim)."""


__all__ = ["COMPUTE_FILE", "ComputeLedger", "FORWARD_FLOPS_PER_PARAM", "TRAIN_FLOPS_PER_PARAM", "flop_parameters"]
