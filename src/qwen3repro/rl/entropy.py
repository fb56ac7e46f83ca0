"""Entropy of the policy and how the GRPO stage keeps it from collapsing.

The Qwen3 report (§4.2) kept the policy's entropy "steadily increasing or stable" during reasoning
RL. Without control it tends to collapse (DAPO, arXiv 2503.14476, calls this entropy collapse), and
the share of groups with mixed rewards (the only ones that teach anything) falls with it; at small
scale an adaptive bonus capped at 0.01 still let it drift to 0.37 of its start in 120 steps
(docs/LOG.md).

Entropy here is the per-token entropy of the policy *at the sampling temperature* T,
H_t = −Σ_v p_v log p_v with p = softmax(logits / T), averaged over the completion tokens — the
distribution the rollouts are actually drawn from (TRL's `entropy_from_logits` convention).

Four controls, combinable with clip-higher (`GRPOConfig.entropy_control` and `epsilon_high`):

* ``"none"`` — nothing beyond the clipping.
* ``"bonus"`` — a fixed entropy bonus: loss −= coef · mean token entropy (TRL `entropy_coef`).
* ``"adaptive"`` — Skywork-OR1's adaptive coefficient: after every generation step the
  coefficient moves by ±delta towards holding entropy at the target (up when entropy is below it,
  down when above), bounded to [0, coef_max], and the bonus applies only while entropy is at or
  below the target. Unlike Skywork-OR1's fixed target (0.2 nats), our target is a ratio of the
  entropy measured at the first step (`target_ratio` × H_0), because the right absolute level
  depends on the task and the model; "targets the starting entropy" is ratio 1.
* ``"proportional"`` — a proportional controller: coef = min(coef_max, gain × max(0, 1 − H̄/target)),
  where H̄ is the mean entropy of the last `window` steps and the target is `target_ratio` × the
  mean of the first `window` steps. The bonus grows smoothly with the shortfall and vanishes at
  the target. Why: the adaptive coefficient is an integral controller gated by one noisy batch. A
  small coef_max cannot stop a slow drift. A large one winds up to its maximum while entropy sits
  below target, and switches fully on and off as single batches cross it. At small scale that
  doubled entropy within a few steps and made rollouts loop to the length cap. Smoothing over
  `window` steps (default `ENTROPY_WINDOW`) matches how the GRPO claim reads entropy.
* clip-higher (DAPO) — ε_high > ε_low lets low-probability tokens grow faster than they can
  shrink, which counteracts collapse without any loss term; set by the clipping parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

ENTROPY_CONTROLS = ("none", "bonus", "adaptive", "proportional")

# Skywork-OR1 (and TRL's `use_adaptive_entropy`) defaults: step 0.005 per update, coefficient in [0, 1].
SKYWORK_COEF_DELTA = 0.005
SKYWORK_COEF_MAX = 1.0
# Entropy is read as a mean over this many consecutive steps, by the proportional controller (its
# target and its reading) and in the GRPO stage's eval.json, which the GRPO claim reads
# (`stages.grpo`, `evals.claims.grpo`). One step's entropy is the mean over one batch of rollouts,
# and batches differ in which queries (families, difficulties) they hold and how many rollouts run
# to the length cap, so it swings by a third from step to step (a tiny-scale run: 0.021 to 0.037
# within ten steps). "Never collapsing" is about the trend; the minimum of single steps mostly
# measures the noise.
ENTROPY_WINDOW = 5


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position entropy (nats) of softmax(logits / T): logits [..., V] → [...] (float32)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for an entropy, got {temperature}")
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is 1 (0 when none count)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


@dataclass
class EntropyController:
    """The entropy-bonus coefficient of one run, and how it moves (see the module docstring).

    `coef` is the current coefficient. `target` is `target_ratio` × the first observed entropy
    (adaptive), or × the mean of the first `window` entropies (proportional; it follows the running
    mean until then). `state_dict`/`load_state_dict` carry it through checkpoints so a resumed run
    continues with the same coefficient.
    """

    mode: str = "none"
    coef: float = 0.0
    coef_delta: float = SKYWORK_COEF_DELTA
    coef_max: float = SKYWORK_COEF_MAX
    target_ratio: float = 1.0
    target: float | None = None
    gain: float = 0.0
    """Proportional mode: coefficient per unit of relative shortfall (1 − H̄/target)."""
    window: int = ENTROPY_WINDOW
    history: list[float] = field(default_factory=list)
    """Proportional mode: the last `window` entropies (fewer during the first `window` steps)."""

    def __post_init__(self) -> None:
        if self.mode not in ENTROPY_CONTROLS:
            raise ValueError(f"entropy control must be one of {ENTROPY_CONTROLS}, got {self.mode!r}")
        if self.coef < 0 or self.coef_delta < 0 or self.coef_max < 0:
            raise ValueError("entropy coefficients must be >= 0")
        if self.gain < 0 or self.window < 1:
            raise ValueError("entropy gain must be >= 0 and window >= 1")

    def active_coef(self, entropy: float) -> float:
        """The coefficient the loss uses now, given the batch's mean entropy (0 = no bonus)."""
        if self.mode == "none":
            return 0.0
        if self.mode in ("bonus", "proportional"):
            return self.coef
        if self.target is not None and entropy > self.target:
            return 0.0  # above target: no bonus (Skywork-OR1 applies it only at or below the target)
        return self.coef

    def update(self, entropy: float) -> float:
        """Record one generation step's mean entropy; move the adaptive coefficient. Returns coef."""
        if not math.isfinite(entropy):
            return self.coef
        if self.mode == "proportional":
            return self._update_proportional(entropy)
        if self.target is None:
            self.target = self.target_ratio * entropy
        if self.mode == "adaptive":
            step = self.coef_delta if entropy < self.target else -self.coef_delta
            self.coef = min(self.coef_max, max(0.0, self.coef + step))
        return self.coef

    def _update_proportional(self, entropy: float) -> float:
        in_first_window = len(self.history) < self.window  # the history fills up once, then slides
        self.history = (self.history + [entropy])[-self.window:]
        recent = sum(self.history) / len(self.history)
        if in_first_window:  # the target follows the running mean of the first `window` steps
            self.target = self.target_ratio * recent
        shortfall = max(0.0, 1.0 - recent / self.target) if self.target and self.target > 0 else 0.0
        self.coef = min(self.coef_max, self.gain * shortfall)
        return self.coef

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "target": self.target, "history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.coef = float(state["coef"])
        self.target = None if state.get("target") is None else float(state["target"])
        self.history = [float(h) for h in state.get("history", [])]


__all__ = ["ENTROPY_CONTROLS", "ENTROPY_WINDOW", "EntropyController", "masked_mean", "token_entropy"]
