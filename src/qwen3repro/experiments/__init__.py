"""Experiments outside the stage chain: MoE load balancing (`moe_balance`) and the hyper-parameter
scaling-law sweep (`scaling_laws`). Each writes its own result directory and returns a summary the
report can quote."""
from __future__ import annotations

__all__ = ["moe_balance", "scaling_laws"]
