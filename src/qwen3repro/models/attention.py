"""Grouped-query attention with per-head QK-RMSNorm, RoPE, SDPA and a KV cache.

Qwen3 attention, step by step (shapes: B batch, S new tokens, T keys, H query heads, Hk key/value
heads, D head_dim):

1. q, k, v = x·W_q, x·W_k, x·W_v, no biases; q: [B, H, S, D], k, v: [B, Hk, S, D]. `head_dim` is
   explicit (H·D need not equal hidden_size).
2. q, k = RMSNorm_D(q), RMSNorm_D(k): one norm of size D per projection, shared across heads, applied
   after the projection and *before* RoPE (Qwen3's QK-norm).
3. RoPE rotates q and k by their positions (`cos`/`sin` are computed once per forward by the model).
4. With a `KVCache`, the new k, v are written after the cached ones; attention runs over all T keys.
5. `attend(q, k, v, q_positions, k_positions, mask)` = softmax(q·kᵀ/√D + mask)·v, through
   `torch.nn.functional.scaled_dot_product_attention` with `enable_gqa` (no K/V repetition). This is
   the one swappable step: dual chunk attention replaces it (see below).
6. Output projection W_o.

Masks are described by an `AttentionMask`, built once per forward (not per layer) by
`build_attention_mask`: causal (by slot order in the cache), optional padding `attention_mask`
[B, T] (1 = real token; left padding for batched generation, with explicit `position_ids`), and
optional `segment_ids` [B, S] for packed documents (block-diagonal causal: a token never attends
across a document boundary). With no padding, no segments and no past, SDPA's `is_causal=True` fast
path is used and no mask tensor is materialised.

Dual chunk attention (DCA) hook: when `config.dual_chunk_attention_config` is set, RoPE is *not*
applied here; the cache stores pre-RoPE keys, and the whole "rotate + scores + softmax + values" step
is delegated to `qwen3repro.models.dca.dual_chunk_attention`, which receives the pre-RoPE, QK-normed
q [B, H, S, D] and k, v [B, Hk, T, D] (cache + new), the RoPE frequencies and attention factor (under
DCA the base frequencies and 1, whatever `rope_scaling` says, as in vLLM: see `rope.rope_parameters`), and
the query positions (shared by all rows; DCA supports no padding or segments). DCA needs pre-RoPE
tensors because it rotates each query at several remapped positions (intra-chunk, successive-chunk,
inter-chunk).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import dca


class _RMSNormFull(torch.autograd.Function):
    """Full-precision (fp32/fp64) RMSNorm with a hand-written backward: about half the memory passes
    of autograd's through the decomposed ops, with the same forward arithmetic as `F.rms_norm`.

    y = x·r·w with r = (mean(x²) + eps)^-½, x̂ = x·r;
    dL/dx = r·(g·w − x̂·mean(g·w·x̂)),  dL/dw = Σ_rows g·x̂.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        return x_hat * weight

    @staticmethod
    def backward(ctx, grad):
        x_hat, rstd, weight = ctx.saved_tensors
        gw = grad * weight
        dot = (gw * x_hat).mean(-1, keepdim=True)
        grad_x = (gw - x_hat * dot) * rstd
        grad_w = (grad * x_hat).reshape(-1, x_hat.shape[-1]).sum(0)
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps), normalised in float32 like transformers' Qwen3RMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.float64):
            return _RMSNormFull.apply(x, self.weight, self.eps)
        # Lower precision: normalise in fp32, cast back, then scale (transformers' order of operations).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From rope_cos_sin's cos/sin [B|1, S, D] to the tables `rotate` uses, [B|1, S, 1, D].

    The sign of rotate_half is folded into sin: rotate_half(x)·sin = swap_halves(x)·[-sin₁, sin₂]
    (exactly, since only signs move), which saves a negation per rotation in every layer.
    """
    half = cos.shape[-1] // 2
    sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return cos[:, :, None], sin[:, :, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE ("rotate half") of x [B, S, heads, D] with tables from `rope_tables`."""
    d = x.shape[-1]
    swapped = x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
    return x * cos + swapped * sin


# ---------------------------------------------------------------------------------------- KV cache
class KVCache:
    """Pre-allocated keys/values for incremental decoding.

    Buffers are [num_layers, B, Hk, max_len, D]. `length` counts the slots filled so far; each
    forward writes its S new keys/values at slots [length, length + S) in every layer, then the model
    calls `advance(S)`. The cache also remembers, per slot, the token's position id and whether it is
    a real token (padding mask), so decode steps only need to pass the new tokens' `position_ids`.
    Keys are stored after RoPE (or before it when dual chunk attention is on: it rotates them itself).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.has_padding = False
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hk, S, D] after the cached slots; return all keys/values [B, Hk, length+S, D]."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer_idx, :, :, start:end] = k
        self.v[layer_idx, :, :, start:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def record(self, positions: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Remember position ids [B|1, S] and (optionally) real-token flags [B, S] of the new slots."""
        start, end = self.length, self.length + positions.shape[-1]
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: {end} tokens do not fit in max_len={self.max_len}")
        self.positions[:, start:end] = positions
        if valid is not None:
            self.valid[:, start:end] = valid
            if not bool(valid.all()):
                self.has_padding = True

    def advance(self, n: int) -> None:
        self.length += n

    def crop(self, length: int) -> None:
        """Forget every slot from `length` on (e.g. to rewind rejected draft tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.length = length
        self.valid[:, length:] = True
        self.has_padding = not bool(self.valid[:, :length].all())

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/reorder batch rows (beam search, dropping finished sequences)."""
        self.k = self.k[:, index]
        self.v = self.v[:, index]
        self.positions = self.positions[index]
        self.valid = self.valid[index]


# ------------------------------------------------------------------------------------------ masks
@dataclass
class AttentionMask:
    """How queries may see keys, shared by every layer of one forward.

    `mask` is None (then `is_causal` says whether SDPA's causal fast path applies) or a boolean tensor
    [B, 1, S, T] (True = may attend) that already contains causality, padding and segments.
    """

    mask: torch.Tensor | None
    is_causal: bool
    causal_only: bool = True  # False when padding or segments are part of `mask`

    def last_queries(self, n: int, total: int, device: torch.device | None = None) -> "AttentionMask":
        """The mask of the last `n` of this mask's queries, over the same `total` keys."""
        if self.mask is not None:
            return AttentionMask(self.mask[:, :, -n:], is_causal=False, causal_only=self.causal_only)
        if not self.is_causal or n == 1:
            return AttentionMask(None, is_causal=False)  # the last query sees every key
        # SDPA's is_causal aligns the first query with the first key; these queries are the last keys.
        q_slots = torch.arange(total - n, total, device=device)
        allowed = (torch.arange(total, device=device)[None, :] <= q_slots[:, None])[None, None]
        return AttentionMask(allowed, is_causal=False)


def build_attention_mask(
    batch_size: int,
    seq_len: int,
    past_len: int,
    *,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> AttentionMask:
    """Combine causality (slot order), padding [B, past+S] and segments [B, S] into one mask.

    Each query may always attend to its own slot, so a padding query (all of whose keys are padding)
    still has a finite softmax: its output is meaningless but not NaN, and it is masked for everyone.
    """
    total = past_len + seq_len
    if attention_mask is None and segment_ids is None:
        if past_len == 0:
            return AttentionMask(None, is_causal=seq_len > 1)
        if seq_len == 1:
            return AttentionMask(None, is_causal=False)  # one new query sees every cached key
    q_slots = torch.arange(past_len, total, device=device)
    k_slots = torch.arange(total, device=device)
    allowed = (k_slots[None, :] <= q_slots[:, None])[None, None]  # [1, 1, S, T]
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    if segment_ids is not None:
        if past_len:
            raise ValueError("segment_ids (packed documents) cannot be combined with a non-empty KV cache")
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        allowed = allowed & same[:, None]
    if attention_mask is not None:
        allowed = allowed | (k_slots[None, :] == q_slots[:, None])[None, None]
    allowed = allowed.expand(batch_size, 1, seq_len, total)
    return AttentionMask(allowed, is_causal=False, causal_only=attention_mask is None and segment_ids is None)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor | None,
    k_positions: torch.Tensor | None,
    mask: AttentionMask,
) -> torch.Tensor:
    """softmax(q kᵀ / √D + mask) v for post-RoPE q [B, H, S, D], k/v [B, Hk, T, D] (GQA inside SDPA).

    Positions are unused here (RoPE is already applied and the mask is precomputed); they are part of
    the signature so that position-aware replacements (dual chunk attention) plug in unchanged.
    """
    enable_gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask.mask, is_causal=mask.is_causal, enable_gqa=enable_gqa
    )


# -------------------------------------------------------------------------------------- attention
class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)  # size head_dim, shared across heads
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.dca_config = config.dual_chunk_attention_config
        self.config = config

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask,
        kv_cache: KVCache | None = None,
        q_positions: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, float] | None = None,
        keep_last: int = 0,
    ) -> torch.Tensor:
        """x [B, S, hidden]; cos/sin [B|1, S, 1, D] (see `rope_tables`); returns [B, S, hidden].

        keep_last > 0: the output of the last `keep_last` positions only, [B, keep_last, hidden]; the keys
        and values of all S positions are still computed (and cached)."""
        b, s, _ = x.shape
        h, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        sq = keep_last if 0 < keep_last < s else s
        # Pre-RoPE, QK-normed q, k: [B, S, heads, D].
        q = self.q_norm(self.q_proj(x[:, s - sq:]).view(b, sq, h, d))
        k = self.k_norm(self.k_proj(x).view(b, s, hk, d))
        v = self.v_proj(x).view(b, s, hk, d).transpose(1, 2)
        if sq != s:
            past = kv_cache.length if kv_cache is not None else 0
            mask = mask.last_queries(sq, past + s, x.device)
            q_positions = q_positions[:, s - sq:] if q_positions is not None else None

        if self.dca_config is None:
            q = rotate(q, cos[:, s - sq:], sin[:, s - sq:]).transpose(1, 2)
            k = rotate(k, cos, sin).transpose(1, 2)
            if kv_cache is not None:
                k, v = kv_cache.update(self.layer_idx, k, v)
            out = attend(q, k, v, None, None, mask)
        else:
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # pre-RoPE: DCA rotates at remapped positions
            out = self._dual_chunk_attend(q, k, v, mask, kv_cache, q_positions, rope)
        return self.o_proj(out.transpose(1, 2).reshape(b, sq, h * d))

    def _dual_chunk_attend(self, q, k, v, mask, kv_cache, q_positions, rope):
        """Pre-RoPE q [B, H, S, D], k/v [B, Hk, S, D] -> DCA output [B, H, S, D] (models/dca.py)."""
        if not mask.causal_only:
            raise ValueError("dual chunk attention supports neither padding (attention_mask) nor segment_ids")
        if q_positions is None:
            raise ValueError("dual chunk attention needs the query positions")
        positions = q_positions[0]
        if q_positions.shape[0] > 1 and not bool((q_positions == positions).all()):
            raise ValueError("dual chunk attention needs the same positions in every batch row")
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # the cache holds pre-RoPE keys on this path
        inv_freq, attention_factor = rope
        return dca.dual_chunk_attention(
            q, k, v,
            inv_freq=inv_freq,
            attention_factor=attention_factor,
            q_positions=positions,
            **dca.dca_kwargs(self.dca_config),
        )


__all__ = [
    "RMSNorm", "KVCache", "AttentionMask", "build_attention_mask", "Attention", "attend", "rope_tables", "rotate",
]
