"""The experiment's settings: the `[experiments.moe]` table of a scale file, and the claim it tests."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ...config import ConfigError
from ...losses import LBL_LAYERS, LBL_SCOPES
from ...train.loop import TrainConfig

CLAIM = ("Global-batch LBL: lower global expert-load imbalance than micro-batch LBL at equal or lower "
         "loss, and higher expert specialisation by data domain (Qiu et al. 2025, used for Qwen3-MoE).")
MODES = LBL_SCOPES
"""The two arms: the load-balancing loss's two scopes, ("micro", "global")."""


@dataclass(frozen=True)
class MoEExperimentSettings:
    """The `[experiments.moe]` table of a scale file (unknown keys are an error)."""

    seq_len: int
    """Row length (S1's at the scale), also the length the S1 corpus is generated for."""
    model: str = "tiny-moe"
    tokens: int = 300_000
    """Training tokens per run; steps = tokens // (seq_len · micro_batch_size · micro_batches_per_step)."""
    micro_batch_size: int = 2
    """Sequences per micro-batch, all of one domain (the micro-batch loss balances each on its own)."""
    micro_batches_per_step: int = 8
    """Micro-batches accumulated per optimizer step (the global batch the global loss balances)."""
    router_aux_loss_coef: float = 0.01
    """The same for both arms."""
    lbl_layers: str = "per_layer"
    """'per_layer': each MoE layer's LBL over its own experts, averaged over layers (Switch, Megatron,
    Qiu et al.); 'pooled': one f and P over all layers' rows (transformers' `load_balancing_loss_func`)."""
    lr: float = 3e-3
    warmup_steps: int = 10
    corpus: str = "s1"
    n_docs: int = 6000
    """Training documents (each domain's packing loops over its documents if needed)."""
    seed: int = 0
    """Data seed: the corpus and the held-out documents (the same for every run)."""
    seeds: tuple[int, ...] = (0, 1)
    """Run seeds: initial weights and batch order; each seed trains both arms."""
    eval_docs_per_domain: int = 32
    """Held-out documents per document kind for the routing and loss measurements."""
    loss_tolerance: float = 0.01
    """'Equal loss' margin in nats: global may be up to this much worse and still count as equal."""
    log_every: int = 1
    """Metrics rows per step (1: every step, which the training-time imbalance curves use)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(x) for x in self.seeds))
        if not self.seeds:
            raise ConfigError("experiments.moe.seeds: at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"experiments.moe.seeds: repeated seed in {self.seeds}")
        for name in ("tokens", "seq_len", "micro_batch_size", "micro_batches_per_step", "n_docs",
                     "eval_docs_per_domain", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"experiments.moe.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.lbl_layers not in LBL_LAYERS:
            raise ConfigError(f"experiments.moe.lbl_layers must be one of {LBL_LAYERS}, got {self.lbl_layers!r}")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "MoEExperimentSettings":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"experiments.moe: unknown key(s) {sorted(unknown)}; valid keys: {sorted(names)}")
        return cls(**dict(d))

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch_size * self.micro_batches_per_step

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.tokens_per_step)

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig.from_dict({"lr": self.lr, "warmup_steps": min(self.warmup_steps, self.steps - 1),
                                      "steps": self.steps, "log_every": self.log_every, "ckpt_every": 0,
                                      "seed": seed})

    def run_identity(self, mode: str, seed: int) -> dict[str, Any]:
        """Everything that defines one run; the two arms of a seed differ only in `mode`."""
        keep = {k: v for k, v in asdict(self).items() if k not in ("seeds", "eval_docs_per_domain", "loss_tolerance",
                                                                     "log_every")}
        return {**keep, "load_balancing": mode, "run_seed": seed}


__all__ = ["CLAIM", "MODES", "LBL_LAYERS", "MoEExperimentSettings"]
