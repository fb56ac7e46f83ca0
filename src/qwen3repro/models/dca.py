"""Dual Chunk Attention (DCA): training-free context extension by remapping relative positions.

DCA (An et al. 2024, "Training-Free Long-Context Scaling of Large Language Models"; used by
Qwen2.5-1M and named as Qwen3's long-context method) splits the sequence into chunks and gives every
query up to three *different* rotary positions, so that no query-key relative distance ever exceeds
what the model saw in training. Positions follow ChunkLlama and vLLM's `DualChunkRotaryEmbedding`
exactly, with `chunk_size` = C and `local_size` = W from `dual_chunk_attention_config`:

    n          = C - W                      chunk length; chunk of absolute position p is p // n
    key        = p % n
    q_intra    = p % n                      keys in the query's own chunk (causal)
    q_succ     = min(p % n + n, C)          keys in the previous chunk
    q_inter    = min(2n - 1, C)             keys two or more chunks back (= C whenever n > W)

Relative distances therefore stay below n inside a chunk and lie in [1, C] across chunks: C is the
largest distance the model is ever asked to resolve.

Mapping to the paper (s = chunk size, c = pre-training length, w = local window):
  * n = s, and C = c - 1 (the paper's inter position c - 1);
  * the paper's P_q^Succ = [s, s+1, ..., s+w-1, c-1, ..., c-1] equals min(p % s + s, c - 1) when
    w = c - s, which is the setting the paper recommends and the only one ChunkLlama/vLLM implement;
    in that case local_size W = c - 1 - s = w - 1.
  * Worked example (paper Fig. 2): s = 6, c = 10, w = 4 gives C = 9, W = 3 and
    P_q^Succ = [6, 7, 8, 9, 9, 9] (see `dca_position_tables`).

Computation. `dual_chunk_attention` processes the queries chunk by chunk. For a block of queries in
chunk i it computes up to four partial attentions, each with its own log-sum-exp (LSE):
intra (keys of chunk i before the block, all visible), intra (the square causal part), successive
(chunk i-1) and inter (chunks <= i-2); then it merges them exactly into one softmax:
out = sum_j exp(lse_j - logsumexp(lse)) * out_j. Keys are rotated once (their position does not
depend on the query); each query block is rotated three times. No Sq x Sk score matrix ever exists,
so peak memory is linear in the sequence length for a fixed chunk size.

Backends for a partial attention, chosen per call (`impl="auto"`):
  * CPU: `aten._scaled_dot_product_flash_attention_for_cpu`, which returns the LSE;
  * CUDA: `aten._scaled_dot_product_flash_attention` (fp16/bf16) or
    `aten._scaled_dot_product_efficient_attention` (fp32), which return the LSE;
  * otherwise (another device, a fused op that failed once for this (device, dtype), or gradients
    needed): an explicit computation in float32 (float64 stays float64), key block by key block,
    so a score tile never exceeds (queries of one chunk) x max(chunk length, `_KEY_BLOCK`) keys.
    With gradients each query block is checkpointed, so the backward pass keeps linear memory too,
    and the LSE-weighted merge is differentiated exactly (the fused kernels give no LSE gradient).

Dynamic temperature (vLLM `dual_chunk_flash_attn.py`). When `original_max_position_embeddings` is
given (the config key of that name), logits are multiplied by f^2 with
f = max(1, 0.1 ln(L / original_max_position_embeddings) + 1), L the current sequence length
(last key position + 1). vLLM multiplies the keys by f and, in the same call, also the softmax scale
(prefill) or the queries (decode) by f, hence f^2; this is the same convention as YaRN's attention
factor, which multiplies both q and k. We apply f(L) of the current call to every key (our cache
holds unscaled keys), so a decode step uses the current length for all keys; vLLM keeps the factor
each key was written with. As a consequence, with the temperature on, incremental decoding is not
bit-for-bit the full forward (as in vLLM). Absent key: no temperature.

Limitations: all batch rows share the same positions (no padding mask); queries are the last Sq
positions of the Sk keys, which are consecutive.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.utils.checkpoint import checkpoint

from .rope import apply_rope, rope_cos_sin, rotate_half

# Keys per block in the explicit (non-fused) partial attention: scores never exceed
# (queries of one chunk) x max(chunk length, _KEY_BLOCK).
_KEY_BLOCK = 1024

# (device type, dtype) pairs whose fused op failed once; they use the explicit path from then on.
_FUSED_BROKEN: set[tuple[str, torch.dtype]] = set()

IMPLS = ("auto", "fused", "explicit")


# ----------------------------------------------------------------------------- positions
def dca_chunk_len(chunk_size: int, local_size: int) -> int:
    """n = chunk_size - local_size, after checking 0 <= local_size < chunk_size."""
    if not (isinstance(chunk_size, int) and isinstance(local_size, int) and 0 <= local_size < chunk_size):
        raise ValueError(f"DCA needs integers 0 <= local_size < chunk_size, got {chunk_size=}, {local_size=}")
    return chunk_size - local_size


def dca_inter_position(chunk_size: int, local_size: int) -> int:
    """The single query position used against chunks two or more back: q_succ at n - 1."""
    n = dca_chunk_len(chunk_size, local_size)
    return min(2 * n - 1, chunk_size)


@dataclass(frozen=True)
class DCAPositions:
    """Per absolute position p: chunk index and the four rotary positions DCA uses."""

    chunk: torch.Tensor  # p // n
    key: torch.Tensor  # p % n
    intra: torch.Tensor  # p % n
    succ: torch.Tensor  # min(p % n + n, C)
    inter: torch.Tensor  # min(2n - 1, C), broadcast to p's shape


def dca_position_tables(positions: torch.Tensor | int, chunk_size: int, local_size: int) -> DCAPositions:
    """DCA rotary positions for absolute `positions` (a tensor, or an int L meaning 0 .. L-1)."""
    n = dca_chunk_len(chunk_size, local_size)
    if isinstance(positions, int):
        positions = torch.arange(positions)
    positions = positions.long()
    r = positions % n
    return DCAPositions(
        chunk=positions // n,
        key=r,
        intra=r,
        succ=(r + n).clamp(max=chunk_size),
        inter=torch.full_like(positions, dca_inter_position(chunk_size, local_size)),
    )


def dca_query_position_matrix(
    q_positions: torch.Tensor, k_positions: torch.Tensor, chunk_size: int, local_size: int
) -> torch.Tensor:
    """[Sq, Sk] rotary position of query i when it looks at key j (intra / succ / inter by chunk gap).

    Entries for future keys (k > q) are the intra position; callers mask them.
    """
    tq = dca_position_tables(q_positions, chunk_size, local_size)
    tk = dca_position_tables(k_positions, chunk_size, local_size)
    gap = tq.chunk[:, None] - tk.chunk[None, :]
    shape = (tq.chunk.numel(), tk.chunk.numel())
    return torch.where(
        gap <= 0,
        tq.intra[:, None].expand(shape),
        torch.where(gap == 1, tq.succ[:, None].expand(shape), tq.inter[:, None].expand(shape)),
    )


def dca_relative_positions(
    q_positions: torch.Tensor, k_positions: torch.Tensor, chunk_size: int, local_size: int
) -> torch.Tensor:
    """[Sq, Sk] relative distance P_q[i, j] - P_k[j] the rotary embedding sees (paper's M)."""
    tk = dca_position_tables(k_positions, chunk_size, local_size)
    return dca_query_position_matrix(q_positions, k_positions, chunk_size, local_size) - tk.key[None, :]


def dynamic_key_temperature(seq_len: int, original_max_position_embeddings: int | None) -> float:
    """vLLM's f = max(1, 0.1 ln(L / original) + 1); 1 when `original_max_position_embeddings` is None/0."""
    if not original_max_position_embeddings:
        return 1.0
    return max(1.0, 0.1 * math.log(seq_len / original_max_position_embeddings) + 1.0)


def dca_kwargs(dual_chunk_attention_config: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of `dual_chunk_attention` from `ModelConfig.dual_chunk_attention_config`."""
    cfg = dict(dual_chunk_attention_config)
    return {
        "chunk_size": int(cfg["chunk_size"]),
        "local_size": int(cfg["local_size"]),
        "original_max_position_embeddings": cfg.get("original_max_position_embeddings"),
    }


# ----------------------------------------------------------------------------- partial attentions
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Partial outputs and LSEs are merged in float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _merge(acc: tuple[torch.Tensor, torch.Tensor] | None, new: tuple[torch.Tensor, torch.Tensor]):
    """Exact merge of two softmax-normalised partial attentions (out [..., m, D], lse [..., m])."""
    if acc is None:
        return new
    (o1, l1), (o2, l2) = acc, new
    lse = torch.logaddexp(l1, l2)
    return o1 * torch.exp(l1 - lse).unsqueeze(-1) + o2 * torch.exp(l2 - lse).unsqueeze(-1), lse


def _merge_all(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over the union of the partials' keys: out = sum_j exp(lse_j - lse) out_j."""
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts])  # [P, ..., m]
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - lse).unsqueeze(-1)
    return (torch.stack([out for out, _ in parts]) * weights).sum(0), lse


def _explicit_partial(q, k, v, scale: float, causal: bool):
    """Attention of q [B,Hq,m,D] over k, v [B,Hkv,s,D] in (at least) float32, key block by key block."""
    B, Hq, m, D = q.shape
    Hkv, s = k.shape[1], k.shape[2]
    g = Hq // Hkv
    acc_dtype = _acc_dtype(q.dtype)
    # The g query heads sharing a K/V head are stacked along the rows: plain batched matmuls, no K/V copy.
    qf = q.to(acc_dtype).reshape(B, Hkv, g * m, D) * scale
    acc = None
    step = m if causal else max(_KEY_BLOCK, m)  # causal blocks are square (m == s <= chunk length)
    for s0 in range(0, s, step):
        kb = k[:, :, s0 : s0 + step].to(acc_dtype)
        vb = v[:, :, s0 : s0 + step].to(acc_dtype)
        sc = torch.matmul(qf, kb.transpose(-1, -2))  # [B, Hkv, g*m, keys]
        if causal:
            future = torch.ones(m, s, dtype=torch.bool, device=q.device).triu(1)
            sc = sc.view(B, Hkv, g, m, s).masked_fill(future, float("-inf")).view(B, Hkv, g * m, s)
        lse = torch.logsumexp(sc, dim=-1)
        out = torch.matmul(torch.exp(sc - lse.unsqueeze(-1)), vb)
        acc = _merge(acc, (out, lse))
    out, lse = acc
    return out.reshape(B, Hq, m, -1), lse.reshape(B, Hq, m)


def _fused_partial(q, k, v, scale: float, causal: bool):
    """The same through an aten SDPA kernel that returns the LSE; raises if none applies."""
    B, Hq, m, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    if g > 1:
        if causal:  # the causal mask depends on the row: give every query head its own K/V (s <= n)
            k = k.repeat_interleave(g, dim=1)
            v = v.repeat_interleave(g, dim=1)
        else:  # stack the query heads of a group along the sequence: no K/V copy
            q = q.reshape(B, Hkv, g * m, D)
    dev = q.device.type
    if dev == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    elif dev == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16):
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        else:
            res = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, True, 0.0, causal, scale=scale
            )
        out, lse = res[0], res[1]
        lse = lse[..., : q.shape[2]]  # the memory-efficient kernel may pad the LSE to a multiple of 32
    else:
        raise NotImplementedError(f"no fused attention-with-LSE kernel for device {dev!r}")
    if out.shape != q.shape[:-1] + (v.shape[-1],) or lse.shape != q.shape[:-1]:
        raise RuntimeError(f"unexpected fused attention shapes {tuple(out.shape)}, {tuple(lse.shape)}")
    acc_dtype = _acc_dtype(q.dtype)
    return out.to(acc_dtype).reshape(B, Hq, m, -1), lse.to(acc_dtype).reshape(B, Hq, m)


def _partial(q, k, v, scale: float, causal: bool, impl: str):
    key = (q.device.type, q.dtype)
    if impl == "explicit" or (impl == "auto" and key in _FUSED_BROKEN):
        return _explicit_partial(q, k, v, scale, causal)
    try:
        return _fused_partial(q, k, v, scale, causal)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError, AttributeError):
        if impl == "fused":
            raise
        _FUSED_BROKEN.add(key)
        return _explicit_partial(q, k, v, scale, causal)


# ----------------------------------------------------------------------------- DCA
def _check_positions(
    q: torch.Tensor,
    k: torch.Tensor,
    q_positions: torch.Tensor | int | None,
    k_positions: torch.Tensor | int | None,
) -> tuple[int, int]:
    """(first query position, first key position) as ints, checking the positions are consecutive."""
    Sq, Sk = q.shape[-2], k.shape[-2]

    def first(pos, length, what):
        if pos is None:
            return None
        if isinstance(pos, int):
            return pos
        if pos.dim() != 1 or pos.numel() != length:
            raise ValueError(f"{what} must be a 1-D tensor of length {length}, got shape {tuple(pos.shape)}")
        lo = int(pos[0])
        if not torch.equal(pos.long(), torch.arange(lo, lo + length, device=pos.device)):
            raise ValueError(f"{what} must be consecutive integers, got {pos.tolist()[:8]}...")
        return lo

    q0 = first(q_positions, Sq, "q_positions")
    k0 = first(k_positions, Sk, "k_positions")
    if q0 is None and k0 is None:
        k0 = 0
    if k0 is None:
        k0 = q0 - (Sk - Sq)
    if q0 is None:
        q0 = k0 + Sk - Sq
    if q0 + Sq != k0 + Sk:
        raise ValueError(f"queries must be the last {Sq} of the {Sk} keys (q from {q0}, k from {k0})")
    if k0 < 0:
        raise ValueError(f"positions must be >= 0, keys start at {k0}")
    return q0, k0


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq, attention_factor: float) -> torch.Tensor:
    cos, sin = rope_cos_sin(inv_freq, positions, attention_factor, dtype=x.dtype)
    return apply_rope(x, cos, sin)


def _query_block(qb, k_rot, v, tables, *, a: int, k0: int, n: int, scale: float, impl: str) -> torch.Tensor:
    """DCA output for queries qb at absolute positions a .. a+m-1, all inside one chunk.

    `tables` holds cos/sin of the block's intra, successive and inter query positions.
    """
    cos_intra, sin_intra, cos_succ, sin_succ, cos_inter, sin_inter = tables
    b = a + qb.shape[-2]  # exclusive
    start = (a // n) * n  # first position of the query chunk
    qb_half = rotate_half(qb)  # shared by the three rotations: q * cos + rotate_half(q) * sin

    def attend(q_rot, lo, hi, causal=False):  # keys at absolute positions lo .. hi-1
        return _partial(q_rot, k_rot[:, :, lo - k0 : hi - k0], v[:, :, lo - k0 : hi - k0], scale, causal, impl)

    q_intra = qb * cos_intra + qb_half * sin_intra
    parts = [attend(q_intra, a, b, causal=True)]  # the square causal part of the own chunk
    if max(start, k0) < a:  # earlier keys of the own chunk: all visible
        parts.append(attend(q_intra, max(start, k0), a))
    if max(start - n, k0) < start:  # previous chunk
        parts.append(attend(qb * cos_succ + qb_half * sin_succ, max(start - n, k0), start))
    if k0 < start - n:  # chunks two or more back
        parts.append(attend(qb * cos_inter + qb_half * sin_inter, k0, start - n))
    return _merge_all(parts)[0]


def dual_chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    inv_freq: torch.Tensor,
    chunk_size: int,
    local_size: int,
    q_positions: torch.Tensor | int | None = None,
    k_positions: torch.Tensor | int | None = None,
    attention_factor: float = 1.0,
    scale: float | None = None,
    original_max_position_embeddings: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Causal Dual Chunk Attention of pre-RoPE queries over pre-RoPE keys.

    Args:
        q: [B, Hq, Sq, D] queries after QK-norm, before RoPE.
        k: [B, Hkv, Sk, D] keys after QK-norm, before RoPE (Hq a multiple of Hkv: GQA); for decoding,
            the whole cache of pre-RoPE keys followed by the new ones.
        v: [B, Hkv, Sk, Dv] values.
        inv_freq: [D/2] rotary inverse frequencies. Any (YaRN's compose exactly); the model passes
            `rope_parameters(config)[0]`, the base frequencies under DCA, as vLLM does.
        chunk_size, local_size: C and W of `dual_chunk_attention_config`.
        q_positions: absolute positions of the queries, 1-D consecutive tensor of length Sq or the int
            of the first one. The queries are the last Sq of the keys. Default: from `k_positions`.
        k_positions: absolute positions of the keys (tensor or first int). Default: from
            `q_positions`, or 0 .. Sk-1 when neither is given.
        attention_factor: multiplies cos and sin of q and k as in `rope_cos_sin` (YaRN's factor when
            composing by hand; the model passes 1 and uses the dynamic temperature instead).
        scale: softmax scale, default D ** -0.5.
        original_max_position_embeddings: turns on vLLM's dynamic temperature (module docstring).
        impl: "auto" (fused kernel with LSE when available and no gradient is needed, else explicit),
            "fused" (error if no fused kernel), "explicit" (float32 reference path, differentiable).

    Returns:
        [B, Hq, Sq, Dv] in q's dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [batch, heads, seq, head_dim]")
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if Hq % Hkv or v.shape[:3] != k.shape[:3] or k.shape[0] != B or k.shape[-1] != D:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Sq > Sk:
        raise ValueError(f"more queries ({Sq}) than keys ({Sk}): queries must be the last keys")
    n = dca_chunk_len(chunk_size, local_size)
    q0, k0 = _check_positions(q, k, q_positions, k_positions)
    if Sq == 0:
        return q.new_zeros(B, Hq, 0, v.shape[-1])
    scale = D**-0.5 if scale is None else float(scale)
    scale *= dynamic_key_temperature(k0 + Sk, original_max_position_embeddings) ** 2
    inv_freq = inv_freq.to(q.device)

    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad and impl == "fused":
        raise ValueError("impl='fused' cannot differentiate through the LSE; use 'auto' or 'explicit'")
    block_impl = "explicit" if needs_grad else impl

    key_pos = torch.arange(k0, k0 + Sk, device=k.device) % n
    k_rot = _rotate(k, key_pos, inv_freq, attention_factor)
    # cos/sin of every query's three DCA positions, computed once ([Sq, D] each, inter [1, D]).
    t = dca_position_tables(torch.arange(q0, q0 + Sq, device=q.device), chunk_size, local_size)
    rope = [rope_cos_sin(inv_freq, pos, attention_factor, dtype=q.dtype) for pos in (t.intra, t.succ, t.inter[:1])]
    (cos_i, sin_i), (cos_s, sin_s), inter = rope

    outs = []
    a = q0
    while a < q0 + Sq:
        b = min((a // n + 1) * n, q0 + Sq)
        rows = slice(a - q0, b - q0)
        tables = (cos_i[rows], sin_i[rows], cos_s[rows], sin_s[rows], *inter)
        kwargs = dict(a=a, k0=k0, n=n, scale=scale, impl=block_impl)
        if needs_grad:
            # Recompute the block in backward: saved activations stay linear in the sequence length.
            def block(qb_, k_rot_, v_, tables_=tables, kwargs_=kwargs):
                return _query_block(qb_, k_rot_, v_, tables_, **kwargs_)

            outs.append(checkpoint(block, q[:, :, rows], k_rot, v, use_reentrant=False))
        else:
            outs.append(_query_block(q[:, :, rows], k_rot, v, tables, **kwargs))
        a = b
    return torch.cat(outs, dim=2).to(q.dtype)


def naive_dual_chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    inv_freq: torch.Tensor,
    chunk_size: int,
    local_size: int,
    q_positions: torch.Tensor | int | None = None,
    k_positions: torch.Tensor | int | None = None,
    attention_factor: float = 1.0,
    scale: float | None = None,
    original_max_position_embeddings: int | None = None,
) -> torch.Tensor:
    """Test reference: for every pair (i, j) rotate q_i at its DCA position for key j and k_j at its
    key position, build the full [Sq, Sk] score matrix, mask the future, one softmax. Memory
    O(B·Hq·Sq·Sk·D): small inputs only."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    q0, k0 = _check_positions(q, k, q_positions, k_positions)
    scale = D**-0.5 if scale is None else float(scale)
    scale *= dynamic_key_temperature(k0 + Sk, original_max_position_embeddings) ** 2
    qpos = torch.arange(q0, q0 + Sq, device=q.device)
    kpos = torch.arange(k0, k0 + Sk, device=q.device)
    pq = dca_query_position_matrix(qpos, kpos, chunk_size, local_size)  # [Sq, Sk]
    pk = dca_position_tables(kpos, chunk_size, local_size).key  # [Sk]
    cos_q, sin_q = rope_cos_sin(inv_freq, pq, attention_factor, dtype=q.dtype)  # [Sq, Sk, D]
    q_pair = q.unsqueeze(3) * cos_q + rotate_half(q).unsqueeze(3) * sin_q  # [B, Hq, Sq, Sk, D]
    cos_k, sin_k = rope_cos_sin(inv_freq, pk, attention_factor, dtype=k.dtype)
    k_rot = apply_rope(k, cos_k, sin_k).repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, Sk, D]
    scores = (q_pair * k_rot.unsqueeze(2)).sum(-1) * scale  # [B, Hq, Sq, Sk]
    future = kpos[None, :] > qpos[:, None]
    scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores.to(_acc_dtype(scores.dtype)), dim=-1).to(v.dtype)
    return probs @ v.repeat_interleave(Hq // Hkv, dim=1)


__all__ = [
    "DCAPositions",
    "dca_chunk_len",
    "dca_inter_position",
    "dca_kwargs",
    "dca_position_tables",
    "dca_query_position_matrix",
    "dca_relative_positions",
    "dual_chunk_attention",
    "dynamic_key_temperature",
    "naive_dual_chunk_attention",
]
