"""Qwen3 mixture-of-experts block: softmax router, top-k, SwiGLU experts, no shared experts.

Router (as transformers' Qwen3MoeTopKRouter): logits = x·W_gᵀ (Linear hidden→E, no bias); probabilities
= softmax over *all* E experts in float32; keep the top-k; if `norm_topk_prob` the k kept weights are
renormalised to sum to 1 (Qwen3-MoE releases set it), otherwise they are the raw probabilities.

Experts are stored stacked like transformers' in-memory layout: `gate_up_proj` [E, 2I, H] (gate rows
first, then up rows) and `down_proj` [E, H, I]; expert e computes down_e(silu(gate_e x) · up_e x).
On disk (hf.py) they are split into the hub's per-expert `experts.{e}.{gate,up,down}_proj.weight`.

Dispatch without per-token Python loops: the T·k (token, expert) assignments are sorted by expert,
the tokens gathered once, each expert that received tokens runs one matmul pair on its contiguous
slice, the results are scaled by the routing weights and scattered back with one `index_add_`.
The block returns the router logits [T, E] so the load-balancing loss can be computed (losses.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


def route(
    router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] in the logits' dtype, expert indices [T, k]) from router logits [T, E]."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), experts


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [T, H], routing weights/indices [T, k] -> Σ_j w_j · expert_{e_j}(x) [T, H]."""
        top_k = experts.shape[1]
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_idx = order // top_k  # which token each sorted assignment belongs to
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # one host sync per layer
        # split/unbind (not slicing or indexing in the loop): their backward concatenates/stacks the
        # pieces instead of zero-filling a full-size gradient per expert.
        x_per_expert = x.index_select(0, token_idx).split(counts)
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        outs = []
        for e, xe in enumerate(x_per_expert):
            if counts[e] == 0:
                continue
            gate, up = F.linear(xe, gate_up[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, down[e]))
        if not outs:  # no tokens at all
            return torch.zeros_like(x)
        y = torch.cat(outs) * weights.reshape(-1, 1).index_select(0, order)
        return torch.zeros_like(x).index_add_(0, token_idx, y.to(x.dtype))


class SparseMoE(nn.Module):
    """Router `gate` + experts. forward(x [B, S, H]) -> (y [B, S, H], router_logits [B·S, E])."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        router_logits = self.gate(x)
        weights, experts = route(router_logits, self.top_k, self.norm_topk_prob)
        return self.experts(x, weights, experts).view(shape), router_logits


__all__ = ["route", "Experts", "SparseMoE"]
