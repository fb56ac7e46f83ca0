"""Warmup-stable-decay (WSD) learning-rate schedule, as pure functions of the step.

    multiplier
      1 ┤      ┌───────────────┐
        │     /                 \\            shape: linear | cosine | 1-sqrt
        │    /                   \\
    min ┤   /                     └──────     (held at min_lr_ratio after decay_end)
        └──┴──────────────────────┴──────┴─►  step
           0   warmup   decay_start  decay_end  total_steps

`lr(step) = base_lr * multiplier(step)` for the optimizer step `step` (0-based, the step about to
be taken). The schedule is evaluated at `t = step + 1` ("optimizer steps done once this one is
taken"), so that

* warmup is linear, `t / warmup_steps`, and reaches exactly 1 at step `warmup_steps - 1`;
* decay runs linearly in `t` from `decay_start` to `decay_end` (default: `total_steps`), so the
  last step of the run (`total_steps - 1`) uses exactly `min_lr_ratio * base_lr`;
* a zero-length decay window (`decay_fraction=0`) means no decay within it: the multiplier drops to
  `min_lr_ratio` only after `decay_end` (never, when that is the end of the run);
* the multiplier is `min(warmup(t), decay(t))`: continuous everywhere, and well defined when the
  decay window overlaps the warmup.

The decay window is either given explicitly (`decay_start`, `decay_end`, in steps) or, by default,
the last `decay_fraction` of the run. The Qwen3 report's S2 "accelerated learning rate decay"
(§3.2) is a config choice: start the decay earlier (`decay_start`, or a larger
`decay_fraction`) and/or end it before the end of the stage (`decay_end < total_steps`, then held at
the minimum), e.g. `decay_start=warmup_steps, decay_end=total_steps // 2`.

Nothing here holds state: a resumed run recomputes `lr(step)` from the step alone, so resume is
exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ConfigError

DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def decay_curve(progress: float, shape: str) -> float:
    """The decay shape on [0, 1]: 1 at progress 0, 0 at progress 1, non-increasing in between."""
    p = min(1.0, max(0.0, progress))
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(p)
    raise ConfigError(f"decay_shape must be one of {DECAY_SHAPES}, got {shape!r}")


@dataclass(frozen=True)
class WSDSchedule:
    """Warmup-stable-decay schedule. All step counts are optimizer steps."""

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    decay_fraction: float = 0.2
    decay_start: int | None = None
    decay_end: int | None = None
    min_lr_ratio: float = 0.1
    decay_shape: str = "linear"

    def __post_init__(self) -> None:
        if not isinstance(self.total_steps, int) or self.total_steps <= 0:
            raise ConfigError(f"total_steps must be a positive integer, got {self.total_steps!r}")
        if self.base_lr < 0 or not math.isfinite(self.base_lr):
            raise ConfigError(f"lr must be a finite number >= 0, got {self.base_lr!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction must be in [0, 1], got {self.decay_fraction!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ConfigError(f"decay_shape must be one of {DECAY_SHAPES}, got {self.decay_shape!r}")
        start, end = self.decay_window
        if not 0 <= start <= end:
            raise ConfigError(
                f"decay window must satisfy 0 <= decay_start <= decay_end, got decay_start={start}, "
                f"decay_end={end} (total_steps={self.total_steps})"
            )

    @property
    def decay_window(self) -> tuple[int, int]:
        """(decay_start, decay_end) in steps-done units: the multiplier is 1 at t <= start, min at t >= end."""
        end = self.total_steps if self.decay_end is None else int(self.decay_end)
        if self.decay_start is not None:
            return int(self.decay_start), end
        return max(end - int(round(self.decay_fraction * self.total_steps)), 0), end

    def multiplier_at(self, t: float) -> float:
        """The schedule as a continuous function of t = steps done (real-valued; see module doc)."""
        warm = 1.0 if self.warmup_steps == 0 else min(1.0, max(0.0, t) / self.warmup_steps)
        start, end = self.decay_window
        if end == start:  # zero-length decay: a step down just after `end` (decay_fraction=0: no decay)
            progress = 1.0 if t > end else 0.0
        else:
            progress = (t - start) / (end - start)
        r = self.min_lr_ratio
        decay = r + (1.0 - r) * decay_curve(progress, self.decay_shape)
        return min(warm, decay)

    def multiplier(self, step: int) -> float:
        """LR multiplier for optimizer step `step` (0-based)."""
        return self.multiplier_at(step + 1)

    def lr(self, step: int) -> float:
        return self.base_lr * self.multiplier(step)

    def __call__(self, step: int) -> float:
        return self.lr(step)


def wsd_lr(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    decay_fraction: float = 0.2,
    decay_start: int | None = None,
    decay_end: int | None = None,
    min_lr_ratio: float = 0.1,
    decay_shape: str = "linear",
) -> float:
    """Functional form of `WSDSchedule(...).lr(step)`."""
    return WSDSchedule(
        base_lr, total_steps, warmup_steps, decay_fraction, decay_start, decay_end, min_lr_ratio, decay_shape
    ).lr(step)


__all__ = ["DECAY_SHAPES", "WSDSchedule", "decay_curve", "wsd_lr"]
