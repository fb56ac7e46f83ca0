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


# ----------------------------------------------------------------------------- GRPO
# Group-relative policy optimisation (DeepSeekMath; Qwen3 report §4.2), with the conventions of
# TRL's `GRPOTrainer` (v1.16), which the peer tests compare against value for value and gradient
# for gradient.
#
# Advantages. Rewards come in groups of G completions of one prompt, laid out group after group
# ([n_groups·G]). A_i = r_i − mean_g; with scale="group" A_i /= (std_g + 1e-4), with "batch"
# A_i /= (std_batch + 1e-4), with "none" no division (Dr. GRPO). std applies Bessel's correction.
# A NaN reward ("no reward": a verifier's infrastructure failure) is left out of the means and
# stds and gets advantage 0.
#
# Per-token objective, with ρ_t = exp(logπθ − logπ_old):
#     L_t = −min(ρ_t·A, clip(ρ_t, 1 − ε_low, 1 + ε_high)·A) + β·k3_t·ρ_t
#     k3_t = exp(Δ) − Δ − 1,  Δ = logπ_ref − logπθ
# (the ·ρ_t on the KL term is TRL's default bias correction: unbiased reverse-KL gradient
# off-policy, no change in value on-policy). Aggregation over the completion mask M:
#     grpo     mean_i [Σ_t M·L / Σ_t M]                 (per-sequence mean: length-biased)
#     bnpo     Σ M·L / Σ M                              (token mean over this batch)
#     dr_grpo  Σ M·L / (B · max_completion_length)      (a constant normaliser)
#     dapo     Σ M·L / num_items                        (token mean; num_items = active tokens of the
#                                                        whole batch the step is built from, default Σ M)
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
ADVANTAGE_SCALES = ("group", "batch", "none")
ADVANTAGE_EPS = 1e-4


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (n − 1)."""
    keep = dim is not None
    mean = torch.nanmean(x, dim=dim, keepdim=True) if keep else torch.nanmean(x)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=keep) if keep else torch.nanmean((x - mean) ** 2)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=keep) if keep else (~torch.isnan(x)).sum()
    return torch.sqrt(var * count / (count - 1))


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Group-relative advantages: rewards [n_groups·group_size] → advantages of the same shape.

    `scale` is "group" (divide by the group's std + 1e-4, the default), "batch" (by the whole
    batch's std + 1e-4) or "none" (Dr. GRPO: centring only). A group of size 1 has std 0. NaN
    rewards are ignored in the statistics and get advantage 0; a group whose rewards are all equal
    gets all-zero advantages (no learning signal: dynamic sampling drops such groups).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-D with a multiple of group_size={group_size} entries, got shape {tuple(rewards.shape)}"
        )
    rewards = rewards.float() if not rewards.is_floating_point() else rewards
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    advantages = rewards - mean
    if scale == "group":
        std = _nanstd(grouped, dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
        advantages = advantages / (std + ADVANTAGE_EPS)
    elif scale == "batch":
        std = _nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = advantages / (std + ADVANTAGE_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
    kl_bias_correction: bool = True,
) -> torch.Tensor:
    """The clipped GRPO surrogate (+ β·KL) over one batch, as a scalar.

    logps [B, T]: log-probs of the sampled tokens under the policy being trained (differentiable);
    old_logps [B, T]: under the policy that sampled them (None = `logps.detach()`, on-policy: ρ ≡ 1
    in value); advantages [B] (or [B, T]); mask [B, T] (1 = completion token that counts);
    ref_logps [B, T]: reference-model log-probs, needed when beta != 0. `max_completion_length`
    is dr_grpo's constant (default T); `num_items` is dapo's normaliser (default the mask's sum;
    pass the active-token count of the whole generation batch when it is split into micro-batches).
    Gradient-accumulation scaling is the caller's.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    if logps.dim() != 2 or mask.shape != logps.shape:
        raise ValueError(f"logps and mask must both be [B, T]; got {tuple(logps.shape)} and {tuple(mask.shape)}")
    if old_logps is None:
        old_logps = logps.detach()
    mask = mask.to(logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    advantages = advantages.to(logps.dtype)

    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if kl_bias_correction:
            kl = kl * ratio
        per_token = per_token + beta * kl

    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        length = logps.shape[1] if max_completion_length is None else max_completion_length
        return masked.sum() / (logps.shape[0] * length)
    normaliser = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=logps.dtype)
    return masked.sum() / normaliser.clamp(min=1.0)


__all__ += ["group_advantages", "grpo_loss", "GRPO_LOSS_TYPES", "ADVANTAGE_SCALES"]
