"""Losses as pure tensor functions (shared by the tiny and the full path).

MoE load balancing
------------------
For E experts, top-k routing, router probabilities p_t = softmax(logits_t) and a set of T routed
tokens (all sparse layers pooled, as transformers does):

    f_i = (1/T) Σ_t 1[i ∈ TopK(p_t)]        (selection frequency; sums to k, not 1)
    P_i = (1/T) Σ_t p_{t,i}                  (mean router probability)
    LBL = E · Σ_i f_i · P_i                  (uniform routing gives k)

`load_balancing_loss` is this over one micro-batch (Switch Transformer style), numerically equal to
transformers' `load_balancing_loss_func`. `GlobalBatchLoadBalancer` computes the global-batch variant
used for Qwen3-MoE (Qiu et al. 2025, "Demons in the Detail"): f̄ is counted over every micro-batch of
the optimizer step and every data-parallel rank, while P stays local and differentiable.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _as_layers(router_logits: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(router_logits, torch.Tensor):
        return [router_logits] if router_logits.dim() == 2 else list(router_logits.unbind(0))
    return list(router_logits)


def _flat_mask(attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    return attention_mask.reshape(-1).to(device=device, dtype=torch.float32)


def router_statistics(
    router_logits: torch.Tensor | Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
    *,
    with_counts: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(selection counts [E] (no grad), probability sums [E] (differentiable), number of rows).

    Rows of every layer are pooled; rows whose `attention_mask` entry is 0 (padding) are left out.
    `attention_mask` is [B, S] (or anything with B·S entries) matching each layer's [B·S, E] logits.
    """
    layers = _as_layers(router_logits)
    device = layers[0].device
    mask = _flat_mask(attention_mask, device)
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device) if with_counts else None
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for logits in layers:
        probs = torch.softmax(logits.float(), dim=-1)
        if with_counts:
            with torch.no_grad():
                selected = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
                weight = (
                    torch.ones_like(selected, dtype=torch.float32)
                    if mask is None
                    else mask.repeat_interleave(top_k)
                )
                counts.scatter_add_(0, selected, weight)
        if mask is None:
            prob_sum = prob_sum + probs.sum(0)
            rows = rows + probs.shape[0]
        else:
            prob_sum = prob_sum + (probs * mask[:, None]).sum(0)
            rows = rows + mask.sum()
    return counts, prob_sum, rows


def load_balancing_loss(
    router_logits: torch.Tensor | Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Micro-batch LBL = E · Σ_i f_i P_i over the pooled rows of all layers (transformers' convention).

    router_logits: per-layer logits [tokens, E] (tuple/list, or a stacked [L, tokens, E] tensor).
    """
    counts, prob_sum, rows = router_statistics(router_logits, num_experts, top_k, attention_mask)
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))


class GlobalBatchLoadBalancer:
    """Global-batch load-balancing loss (Qiu et al. 2025), as used to train Qwen3-MoE.

    Math. Let one optimizer step see micro-batches j = 1..k on each of R data-parallel ranks, with
    c_i the number of times expert i is in a token's top-k over *all* of them (all layers pooled) and
    N the number of routed rows over all of them. Then f̄_i = c_i / N is a constant for the step
    (detached), and the loss is

        LBL_global = E · Σ_i f̄_i · P̄_i,      P̄_i = mean router probability of expert i,

    where P̄ is local to each rank and differentiable. Each micro-batch j contributes

        term_j = E · Σ_i f̄_i · (Σ_{t∈j} p_{t,i}) / N_local,

    with N_local the rows of this rank's k micro-batches. So Σ_j term_j = E · Σ_i f̄_i · P̄_i(rank),
    i.e. for k equal-size micro-batches it equals `load_balancing_loss` on their concatenation (when
    f̄ is global), and averaging over ranks (what DDP does to gradients) gives the global-batch loss.
    With one micro-batch and one rank it is exactly `load_balancing_loss`. Because each term already
    carries its 1/k share, a trainer that divides its CE loss by k should add the terms undivided.

    Why it helps: the micro-batch loss pushes every micro-batch (often a handful of sequences from
    one domain) to be balanced, which fights expert specialisation; the global count only asks the
    whole corpus-level batch to be balanced.

    Use in a trainer (f̄ must be known before the first backward, so counts come first):

        balancer = GlobalBatchLoadBalancer(E, k)
        balancer.reset()
        with torch.no_grad():                       # phase 1: counts only
            for mb in micro_batches:
                out = model(mb.input_ids, attention_mask=mb.mask, output_router_logits=True)
                balancer.accumulate(out.router_logits, mb.mask)
        balancer.finalize()                         # all-reduce counts over data-parallel ranks
        for mb in micro_batches:                    # phase 2: the usual forward/backward
            out = model(mb.input_ids, attention_mask=mb.mask, output_router_logits=True)
            loss = ce(out.logits, mb) / len(micro_batches)
            loss = loss + coef * balancer.loss(out.router_logits, mb.mask)
            loss.backward()

    Phase 1 costs a forward without autograd per micro-batch (about a third of a training step). A
    trainer that can keep the k graphs alive may instead call `accumulate` on the phase-2 outputs,
    `finalize`, and then sum `loss(...)` of every micro-batch and backward once. Calling `loss`
    before `finalize` raises, so the step can never silently use partial counts.
    """

    def __init__(self, num_experts: int, top_k: int, process_group=None) -> None:
        self.num_experts = num_experts
        self.top_k = top_k
        self.process_group = process_group
        self.reset()

    def reset(self) -> None:
        """Start a new optimizer step."""
        self.counts: torch.Tensor | None = None  # [E] selection counts (local, then global)
        self.rows: torch.Tensor | None = None  # routed rows (local, then global)
        self.local_rows: torch.Tensor | None = None
        self.finalized = False

    @torch.no_grad()
    def accumulate(
        self, router_logits: torch.Tensor | Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None
    ) -> None:
        """Add one micro-batch's top-k selection counts (no gradient)."""
        if self.finalized:
            raise RuntimeError("accumulate() after finalize(): call reset() to start a new step")
        counts, _, rows = router_statistics(
            [lg.detach() for lg in _as_layers(router_logits)], self.num_experts, self.top_k, attention_mask
        )
        if self.counts is None:
            self.counts, self.rows = counts, rows
        else:
            self.counts, self.rows = self.counts + counts, self.rows + rows

    def finalize(self) -> torch.Tensor:
        """Sum counts over data-parallel ranks (when torch.distributed is initialised); return f̄ [E]."""
        if self.counts is None:
            raise RuntimeError("finalize() before any accumulate()")
        self.local_rows = self.rows.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            buf = torch.cat([self.counts, self.rows.reshape(1)])
            torch.distributed.all_reduce(buf, group=self.process_group)
            self.counts, self.rows = buf[:-1], buf[-1]
        self.finalized = True
        return self.frequencies

    @property
    def frequencies(self) -> torch.Tensor:
        """f̄_i = global selection count / global rows (detached)."""
        if not self.finalized:
            raise RuntimeError("frequencies are known only after finalize()")
        return (self.counts / self.rows).detach()

    def loss(
        self, router_logits: torch.Tensor | Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """This micro-batch's term E · Σ_i f̄_i · (Σ_t p_{t,i}) / N_local (gradient through p only)."""
        if not self.finalized:
            raise RuntimeError("loss() needs the step's counts: call accumulate() per micro-batch, then finalize()")
        _, prob_sum, _ = router_statistics(
            router_logits, self.num_experts, self.top_k, attention_mask, with_counts=False
        )
        f_bar = self.frequencies.to(prob_sum.device)
        return self.num_experts * torch.sum(f_bar * prob_sum) / self.local_rows.to(prob_sum.device)


__all__ = ["router_statistics", "load_balancing_loss", "GlobalBatchLoadBalancer"]


# ----------------------------------------------------------------------------- language modelling
def masked_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions that count, computed in float32.

    logits [..., V] and labels [...] are already aligned: `labels[..., t]` is the target of
    `logits[..., t]` (no shift inside; the packing loader and the SFT collator shift). A position
    counts iff its label is not `ignore_index` and, when `mask` is given (bool or 0/1, shape of
    labels), `mask` is true there. With no position counting the result is 0 (still connected to
    the graph, so backward works). The number of counted positions, which a trainer needs to weight
    micro-batches by tokens, is `((labels != ignore_index) & mask).sum()`.
    """
    targets = labels
    if mask is not None:
        targets = labels.masked_fill(~mask.to(torch.bool), ignore_index)
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_targets = targets.reshape(-1).to(torch.long)
    total = torch.nn.functional.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="sum")
    count = (flat_targets != ignore_index).sum()
    return total / count.clamp(min=1).to(total.dtype)


__all__.append("masked_cross_entropy")
