"""The fast decode path for a dense full-precision `Qwen3`: `DenseDecodeStep` runs the prompt's
prefill and each decode step of the generation engine with the model's weights rearranged for speed.

At rollout sizes a decode step is mostly per-operation overhead and memory traffic, so everything
that does not change between steps is prepared once: fused and norm-folded weights and a RoPE table
(RoPE as one complex multiplication), kept across calls while the model's parameters are unchanged;
per call the padding bias and a workspace; keys are kept transposed for the attention matmuls,
which replace SDPA (slow on CPU for one query per row). On a CPU in float32 the whole step is one
call of a compiled kernel (`decode_step.c`: each thread runs its share of the rows through every
layer alone, its small matrix products included); where that is not faster, each layer's QK-norm,
RoPE, cache writes and attention are one call, and so are each RMSNorm and SwiGLU
(`qwen3repro.kernels`, built at first use with the system's C compiler, and each used where measured
faster than the PyTorch operations here on this machine); without them, or with
`QWEN3REPRO_KERNELS=0`, the PyTorch operations run, with the same results up to rounding. They are
the reference the kernels are tested against (tests/test_kernels.py), and `Qwen3.forward` is the
reference for both (tests/test_generate.py compares log-probs with a full forward).

Other models (MoE layers, dual chunk attention, half precision) are not served here
(`DenseDecodeStep.supports`); the engine runs them through `model.forward`.
"""
from __future__ import annotations

import types
import weakref

import torch
import torch.nn.functional as F

from .. import kernels
from ..models.attention import build_attention_mask
from ..models.qwen3 import Qwen3
from ..models.rope import rope_cos_sin

__all__ = ["DenseDecodeStep"]


class _DenseWeights:
    """A dense `Qwen3`'s weights rearranged for `DenseDecodeStep` (see its docstring), built from the
    model as it is when built, and a RoPE table grown on demand."""

    def __init__(self, model) -> None:
        c = model.config
        h, hk, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        g = h // hk
        self.h, self.hk, self.d, self.g, self.n_qk, self.hidden = h, hk, d, g, hk * (g + 1), c.hidden_size
        w = model.lm_head.weight
        # Head dimension order (0, D/2, 1, D/2 + 1, ...): RoPE's pairs side by side.
        pairs = torch.arange(d, device=w.device).view(2, d // 2).t().reshape(-1)
        self.embed = model.model.embed_tokens.weight

        def eps(value: float) -> torch.Tensor:  # as a tensor: the mean's matmul adds it (addmm)
            return torch.tensor(value, dtype=w.dtype, device=w.device)

        self.layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            q_w = a.q_proj.weight.view(hk, g, d, -1)[:, :, pairs]
            k_w = a.k_proj.weight.view(hk, 1, d, -1)[:, :, pairs]
            qk_w = torch.cat([q_w, k_w], dim=1).flatten(0, 2)  # [Hk·(G+1)·D, hidden], grouped by KV head
            qk_norm = torch.cat([  # per-head QK-norm weights in the same order; q's also carry 1/√D
                (a.q_norm.weight[pairs] * d ** -0.5).expand(hk, g, d), a.k_norm.weight[pairs].expand(hk, 1, d)
            ], dim=1).reshape(hk * (g + 1), d)
            self.layers.append((
                eps(ln1.eps), (torch.cat([qk_w, a.v_proj.weight]) * ln1.weight).t().contiguous(),
                eps(a.q_norm.eps), qk_norm,
                a.o_proj.weight.t().contiguous(),
                eps(ln2.eps), (torch.cat([m.gate_proj.weight, m.up_proj.weight]) * ln2.weight).t().contiguous(),
                m.down_proj.weight.t().contiguous(), m.gate_proj.weight.shape[0],
            ))
        self.qk_eps = [float(layer.self_attn.q_norm.eps) for layer in model.model.layers]
        norm = model.model.norm
        self.final_eps = eps(norm.eps)
        # Every RMSNorm's eps in the order a step applies them (two per layer, then the final norm), as the
        # tensors the PyTorch path adds and as the floats the compiled one takes.
        self.norm_eps = [e for layer in self.layers for e in (layer[0], layer[5])] + [self.final_eps]
        self.mean_h = torch.full((self.hidden, 1), 1 / self.hidden, dtype=w.dtype, device=w.device)
        self.mean_d = torch.full((d, 1), 1 / d, dtype=w.dtype, device=w.device)
        self.lm_head = (w * norm.weight).t().contiguous()
        self._rope_args = (model.inv_freq, model.attention_factor, w.dtype, w.device)
        self.rope: torch.Tensor | None = None

    def rope_table(self, length: int) -> torch.Tensor:
        """RoPE as complex numbers, [P, 1, D/2] with P >= length: position p rotates the pair
        x_i + j·x_{i+D/2} by multiplying it with rope[p, 0, i] = cos θ_i + j·sin θ_i."""
        if self.rope is None or self.rope.shape[0] < length:
            inv_freq, factor, dtype, device = self._rope_args
            n = max(length, 2 * self.rope.shape[0] if self.rope is not None else 0)  # grow geometrically
            cos, sin = rope_cos_sin(inv_freq.to(device), torch.arange(n, device=device), factor, dtype=dtype)
            self.rope = torch.complex(cos[:, : self.d // 2], sin[:, : self.d // 2])[:, None]
        return self.rope


# Prepared weights per model, reused by later calls while the model is unchanged (an eval sweep
# calls `generate` many times on the same weights; preparing them costs about 2% of a rollout batch).
# The entry holds the parameters themselves, so "unchanged" can be checked by identity (a replaced
# parameter), storage (`.data` reassigned) and version counter (every in-place update, e.g. an
# optimizer step or `load_state_dict`, bumps it): RL trains between calls and must be decoded as it
# is now. (Writes through `.data`, e.g. `p.data.copy_(x)`, bypass the version counter: they are not
# seen.) Keyed weakly: a model that is dropped drops its entry.
_PREPARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _dense_weights(model) -> _DenseWeights:
    """The prepared weights of `model` as it is now (see `_PREPARED`)."""
    try:
        state = [(p, p.data_ptr(), p._version) for p in model.parameters()]
    except RuntimeError:  # inference tensors have no version counter: nothing tells us they are unchanged
        return _DenseWeights(model)
    state.append((model.inv_freq, model.attention_factor))  # the RoPE table's inputs (plain attributes)
    entry = _PREPARED.get(model)
    if entry is not None and len(entry[0]) == len(state) and all(
        a[0] is b[0] and a[1:] == b[1:] for a, b in zip(entry[0], state)
    ):
        return entry[1]
    weights = _DenseWeights(model)
    _PREPARED[model] = (state, weights)
    return weights


class DenseDecodeStep:
    """Prefill and decode steps of a dense `Qwen3`, written for speed.

    The same arithmetic as `Qwen3.forward` with a KV cache, layer by layer (RMSNorm → q/k/v → QK-norm
    → RoPE → cache write → attention → o_proj; RMSNorm → SwiGLU), up to float rounding, with far
    fewer operator calls per token: at these sizes a step costs mostly per-call overhead and memory
    traffic. Everything that does not depend on the step is prepared once (`_DenseWeights`) and
    reused by later `generate` calls for as long as no parameter has changed (`_dense_weights`; a
    model trained between calls is decoded as it is now):

    * one matmul gives q, k and v, one gives gate and up (weights concatenated, transposed to [in, out]);
      each RMSNorm's weight is folded into the matmul that follows it (x̂·w·W = x̂·(diag(w)·W)), so a
      norm only scales rows by (mean(x²) + eps)^-½, the mean taken by a matmul with a column of 1/n
      that also adds eps;
    * the q/k heads come out of that matmul grouped by KV head, [G q heads, its k head] for each, and
      each head's dimensions interleaved as RoPE's (i, i + D/2) pairs. A permutation of the head
      dimensions applied to both q and k leaves q·k unchanged; in this order RoPE is one complex
      multiplication by a table entry of the position, and a decode step's [B·Hk, G, D] queries are a
      view of the rotated tensor;
    * the attention scale 1/√D is folded into the q heads' QK-norm weight;
    * the step owns the KV cache: keys transposed to [B·Hk, D, T] (the layout that batched matmuls read
      fastest for q·kᵀ), values [B·Hk, T, D], one buffer of each for all layers, left uninitialised
      (every slot is written before it is read: the prefill writes all prompt slots, padding
      included). A decode step's attention is two batched matmuls and a softmax over [B·Hk, G, T]
      (one query position, so no causal mask), much cheaper than SDPA's CPU kernel for one query
      per row; padding is an additive bias built once (reordered with the rows) and sliced per step;
    * a decode step writes every intermediate into a preallocated workspace whose views (q, k, v,
      gate, up, ...) are made once per batch size (`_bind`), not at every step and layer;
    * on a CPU in float32, the whole step can be one compiled call instead (`kernels.StepKernel`, used
      where measured faster than the step above: `_step_is_faster`): the rows of a decode step are
      independent until sampling, so each thread takes its share of them through every layer with no
      barrier, and the small matrix products run in registers, where a library call per product
      keeps one core busy and the other waiting;
    * the prompt prefill runs the same layers over the prompt tokens of a few rows at a time, with
      SDPA (causal, and the padding mask of `build_attention_mask`) as its attention; its last layer
      computes attention output and MLP for the last position only, the only one whose logits are read.

    Other models (MoE layers, dual chunk attention, bf16/fp16 weights, stub models) run through
    `model.forward` and a `KVCache` (the engine's `ModelForwardStep`); the tests check that log-probs
    equal a full forward on both paths.
    """

    # The prefill runs this many prompt tokens (a few rows) at a time: the activations stay in cache,
    # and a large batch of prompts needs no large temporary buffers.
    _PREFILL_TOKENS = 256

    # No gradients: the prepared weights are derived from parameters, and the measurements below run
    # steps, which write into buffers with `out=` (a step may be built outside `generate`'s inference mode).
    @torch.no_grad()
    def __init__(self, model, batch_size: int, max_len: int) -> None:
        w = self.w = _dense_weights(model)
        self.rope = w.rope_table(max_len)
        self.max_len, self.length = max_len, 0
        proto = w.lm_head
        # On a CPU in float32, a whole decode step is one compiled call (`step_kernel`), or else each
        # layer's attention is one (`kernel`); None: PyTorch operations.
        self.kernel = self.step_kernel = None
        if proto.device.type == "cpu" and proto.dtype == torch.float32:
            self.kernel = kernels.attention_kernel(w.d, w.g)
            self.step_kernel = kernels.step_kernel(w.d, w.g)
        # The kernels read keys a vector (16 slots) at a time: the buffers' length is rounded up to that.
        lanes = kernels.LANES if self.kernel is not None or self.step_kernel is not None else 1
        self.capacity = -(-max_len // lanes) * lanes
        n_layers = len(w.layers)
        self.keys = proto.new_empty(n_layers, batch_size * w.hk, w.d, self.capacity)
        self.values = proto.new_empty(n_layers, batch_size * w.hk, self.capacity, w.d)
        self.bias = None  # [B·Hk, 1, capacity]: 0 for real tokens, -inf for padding
        self.elementwise = None  # RMSNorm scaling and SwiGLU: the compiled kernel, or None (PyTorch ops)
        self._bind()
        if self.kernel is not None and kernels.mode() == "auto" and not self._kernel_is_faster():
            self.kernel = None
        if proto.device.type == "cpu" and proto.dtype == torch.float32:
            self.elementwise = kernels.elementwise_kernel()
        if self.elementwise is not None and kernels.mode() == "auto" and not self._elementwise_is_faster():
            self.elementwise = None
        self._bind_elementwise()
        # Last, the whole-step kernel against the per-operation step as chosen above.
        if self.step_kernel is not None and kernels.mode() == "auto" and not self._step_is_faster():
            self.step_kernel = None

    @staticmethod
    def supports(model) -> bool:
        if not isinstance(model, Qwen3):
            return False
        c = model.config
        full_precision = model.lm_head.weight.dtype in (torch.float32, torch.float64)  # RMSNorm casts differ below
        return full_precision and c.dual_chunk_attention_config is None and not any(
            c.is_sparse_layer(i) for i in range(c.num_hidden_layers)
        )

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/reorder batch rows (in the key and value buffers and the padding bias)."""
        hk = self.w.hk
        self.keys = self.keys.unflatten(1, (-1, hk))[:, index].flatten(1, 2)
        self.values = self.values.unflatten(1, (-1, hk))[:, index].flatten(1, 2)
        if self.bias is not None:
            self.bias = self.bias.unflatten(0, (-1, hk))[index].flatten(0, 1)
        self._bind()

    def _bind(self) -> None:
        """Per-layer views of the key and value buffers, and the decode step's workspace for this batch
        size: every intermediate of a step has a preallocated buffer, and the views a step reads (q, k,
        v, gate, up, ...) are made once here, not at every step and layer (a view or a slice costs
        about as much as a small kernel). Redone when `reorder` changes the batch."""
        w = self.w
        hk, d, g, n_qk, t = w.hk, w.d, w.g, w.n_qk, self.capacity
        b = self.keys.shape[1] // hk
        self.buffers = [(k, v.view(b, hk, t, d), v) for k, v in zip(self.keys, self.values)]
        new = w.lm_head.new_empty
        ws = self.ws = types.SimpleNamespace()
        ws.sq, ws.r, ws.xn = new(b, w.hidden), new(b, 1), new(b, w.hidden)  # RMSNorm: x², its scale, x̂
        ws.qkv = new(b, (n_qk + hk) * d)
        ws.qk, ws.v = ws.qkv[:, : n_qk * d].view(b, n_qk, d), ws.qkv[:, n_qk * d:].view(b, hk, d)
        ws.qk_sq = new(b * n_qk, d)  # the squares, and (per head) the scale of QK-norm
        ws.qk_sq_3d = ws.qk_sq.view(b, n_qk, d)
        ws.qk_r = new(b * n_qk, 1)
        ws.qk_r_3d = ws.qk_r.view(b, n_qk, 1)
        ws.qk_normed = new(b, n_qk, d)
        ws.qk_normed_c = torch.view_as_complex(ws.qk_normed.view(b, n_qk, d // 2, 2))
        rotated = new(b * hk, g + 1, d)  # per KV head: its G rotated queries, then its rotated key
        ws.rotated_c = torch.view_as_complex(rotated.view(b, n_qk, d // 2, 2))
        ws.q, ws.k = rotated[:, :g], rotated[:, g]
        ws.att = new(b * hk, g, d)  # attention output, heads in order
        ws.att_2d = ws.att.view(b, w.h * d)
        inter = w.layers[0][-1]
        ws.gu = new(b, 2 * inter)
        ws.gate, ws.up = ws.gu[:, :inter], ws.gu[:, inter:]
        ws.act = new(b, inter)  # silu(gate) · up
        ws.x = new(b, w.hidden)  # the residual stream, updated in place
        ws.scores = None  # the compiled attention's weights [B·Hk, G, T], made by the first binding that needs them
        self._attend = None  # the kernel's per-layer calls, bound to these buffers at the next step
        self._step = None  # the whole-step kernel, bound to these buffers at the next step
        self._bind_elementwise()

    def _bind_elementwise(self) -> None:
        """The step's RMSNorms (ws.x -> ws.xn; two per layer, then the final one) and SwiGLU
        (ws.gu -> ws.act) as calls taking the thread count: compiled ones bound to the workspace, or the
        same arithmetic as PyTorch operations."""
        w, ws, ek = self.w, self.ws, self.elementwise
        if ek is not None:
            self._norms = [ek.bind_rms(ws.x, ws.xn, float(e)) for e in w.norm_eps]
            self._swiglu = ek.bind_swiglu(ws.gu, ws.act)
            return

        def norm(eps):  # x · (mean(x²) + eps)^-½, the mean as a matmul with a column of 1/n that adds eps
            def call(threads: int) -> None:
                r = torch.addmm(eps, torch.mul(ws.x, ws.x, out=ws.sq), w.mean_h, out=ws.r).rsqrt_()
                torch.mul(ws.x, r, out=ws.xn)
            return call

        self._norms = [norm(e) for e in w.norm_eps]
        self._swiglu = lambda threads: torch.mul(F.silu(ws.gate), ws.up, out=ws.act)

    def prefill(self, input_ids: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor | None):
        """input_ids, positions, attention_mask (True = real token; None = no padding) [B, S] -> the last
        position's logits [B, V]; stores the prompt's keys/values at slots [0, S)."""
        (b, s), t, hk = input_ids.shape, self.capacity, self.w.hk
        if self.length:
            raise RuntimeError("prefill needs an empty cache")
        allowed = None  # [B, 1, S, S]: causal and padding, the model's own mask
        if attention_mask is not None:
            device = attention_mask.device
            allowed = build_attention_mask(b, s, 0, attention_mask=attention_mask, device=device).mask
            valid = torch.ones(b, hk, 1, t, dtype=torch.bool, device=device)
            valid[..., :s] = attention_mask[:, None, None, :]
            bias = torch.zeros(valid.shape, dtype=self.keys.dtype, device=device)
            self.bias = bias.masked_fill_(~valid, float("-inf")).flatten(0, 1)
            self._attend = self._step = None  # the kernels' calls, rebound with the bias at the first step
        rows = max(1, self._PREFILL_TOKENS // s)
        logits = [
            self._prefill_rows(r, input_ids[r: r + rows], positions[r: r + rows],
                               None if allowed is None else allowed[r: r + rows])
            for r in range(0, b, rows)
        ]
        self.length = s
        return torch.cat(logits) if len(logits) > 1 else logits[0]

    def _prefill_rows(self, r0: int, input_ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor | None):
        """`prefill` of the batch rows [r0, r0 + b). Attention is SDPA's (memory-efficient for long prompts)."""
        w, (b, s) = self.w, input_ids.shape
        hk, d, g, n_qk = w.hk, w.d, w.g, w.n_qk
        mean_h, mean_d, qk_end, hd = w.mean_h, w.mean_d, n_qk * d, w.h * d
        rope = self.rope.index_select(0, positions.flatten())  # [b·S, 1, D/2]
        x = F.embedding(input_ids.flatten(), w.embed)  # [b·S, hidden]
        last = len(w.layers) - 1
        for i, (eps1, w_qkv, eps_qk, w_qk, w_o, eps2, w_gu, w_down, inter) in enumerate(w.layers):
            qkv = torch.mm(x * torch.addmm(eps1, x * x, mean_h).rsqrt_(), w_qkv)
            qk = qkv[:, :qk_end].view(b * s, n_qk, d)
            qk = qk * torch.addmm(eps_qk, (qk * qk).view(-1, d), mean_d).rsqrt_().view(b * s, n_qk, 1) * w_qk
            qk = torch.view_as_real(torch.view_as_complex(qk.view(b * s, n_qk, d // 2, 2)) * rope)
            qk = qk.view(b, s, hk, g + 1, d)
            k, v = qk[:, :, :, g].transpose(1, 2), qkv[:, qk_end:].view(b, s, hk, d).transpose(1, 2)  # [b, Hk, S, D]
            self.keys[i].unflatten(0, (-1, hk))[r0: r0 + b, :, :, :s] = k.transpose(2, 3)
            self.values[i].unflatten(0, (-1, hk))[r0: r0 + b, :, :s] = v
            sq = 1 if i == last else s  # the last layer: the last query position only
            q = qk[:, s - sq:, :, :g].reshape(b, sq, -1, d).transpose(1, 2)  # [b, H, sq, D], heads in order
            mask = None if allowed is None else allowed[:, :, s - sq:]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and sq > 1,
                                                 scale=1.0, enable_gqa=True)  # 1/√D is in q's norm weight
            if sq != s:
                x = x.view(b, s, -1)[:, -1]
            x = torch.addmm(x, out.transpose(1, 2).reshape(b * sq, hd), w_o)
            gu = torch.mm(x * torch.addmm(eps2, x * x, mean_h).rsqrt_(), w_gu)
            x = torch.addmm(x, F.silu(gu[:, :inter]).mul_(gu[:, inter:]), w_down)
        x = x * torch.addmm(w.final_eps, x * x, mean_h).rsqrt_()
        return torch.mm(x, w.lm_head).float()

    def __call__(self, token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """token, positions [B] -> last logits [B, V]; stores the token's keys/values at the next slot."""
        slot = self.length
        t = slot + 1
        if t > self.max_len:
            raise ValueError(f"cache overflow: {t} tokens do not fit in max_len={self.max_len}")
        if self.step_kernel is not None:
            if self._step is None:
                self._step = self._bind_step()
            logits = self.ws.x.new_empty(self.ws.x.shape[0], self.w.lm_head.shape[1])
            self._step(token.contiguous(), positions.contiguous(), logits, slot, torch.get_num_threads())
        else:
            logits = self._operations_step(token, positions, slot)
        self.length = t
        return logits

    def _operations_step(self, token: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        """A decode step as PyTorch operations per layer (with the attention, norm and SwiGLU kernels
        where they were measured faster): what the whole-step kernel does in one call."""
        w, ws, t = self.w, self.ws, slot + 1
        if self.kernel is not None:
            attend = self._attention_calls()
            ws.positions.copy_(positions)
        else:
            attend = [None] * len(w.layers)
            bias = self.bias.narrow(2, 0, t) if self.bias is not None else None
            rope = self.rope.index_select(0, positions)  # [B, 1, D/2]
        threads = torch.get_num_threads()
        torch.index_select(w.embed, 0, token, out=ws.x)
        norms = iter(self._norms)
        # Every line below uses as few tensor operations as it can (each costs microseconds of overhead);
        # an RMSNorm's weight is in the matmul after it, so a norm only scales rows (`_bind_elementwise`).
        for (_, w_qkv, eps_qk, w_qk, w_o, _, w_gu, w_down, _), buffers, kernel_call in zip(
            w.layers, self.buffers, attend
        ):
            next(norms)(threads)
            torch.mm(ws.xn, w_qkv, out=ws.qkv)
            if kernel_call is not None:
                # Everything down to the attention output, in one compiled call (kernels/decode_attention.c).
                kernel_call(slot, threads)
            else:
                self._torch_attention(eps_qk, w_qk, buffers, slot, rope, bias)
            ws.x.addmm_(ws.att_2d, w_o)
            next(norms)(threads)
            torch.mm(ws.xn, w_gu, out=ws.gu)
            self._swiglu(threads)
            ws.x.addmm_(ws.act, w_down)
        next(norms)(threads)
        return torch.mm(ws.xn, w.lm_head).float()

    def _torch_attention(self, eps_qk, w_qk, buffers, slot: int, rope, bias) -> None:
        """One layer's attention for a decode step as PyTorch operations, from `ws.qkv` into `ws.att`:
        what the compiled kernel does in one call. rope [B, 1, D/2] (the rows' positions); bias
        [B·Hk, 1, ≥ slot + 1] or None."""
        ws, (keys, values_4d, values), t = self.ws, buffers, slot + 1
        # QK-norm per head (q's weight carries 1/√D), then RoPE as one complex multiplication.
        torch.mul(ws.qk, ws.qk, out=ws.qk_sq_3d)
        torch.addmm(eps_qk, ws.qk_sq, self.w.mean_d, out=ws.qk_r).rsqrt_()
        torch.mul(ws.qk, ws.qk_r_3d, out=ws.qk_normed).mul_(w_qk)
        torch.mul(ws.qk_normed_c, rope, out=ws.rotated_c)
        keys.select(2, slot).copy_(ws.k)
        values_4d.select(2, slot).copy_(ws.v)
        if bias is None:
            scores = torch.bmm(ws.q, keys.narrow(2, 0, t))
        else:
            scores = torch.baddbmm(bias, ws.q, keys.narrow(2, 0, t))
        torch.bmm(torch.softmax(scores, dim=-1), values.narrow(1, 0, t), out=ws.att)

    def _kernel_is_faster(self) -> bool:
        """Whether the compiled attention beats `_torch_attention` at this step's shapes on this machine
        (`kernels.faster`: measured once per machine and shape bucket, then read from its cache).

        Timed on this step's own workspace and first layer's buffers, at a cache half full, before the
        prefill: whatever the timing writes there is overwritten before it is read."""
        w, ws = self.w, self.ws
        b, threads = self.keys.shape[1] // w.hk, torch.get_num_threads()
        key = (f"decode-attention {self.kernel.name} kv_heads={w.hk} batch={kernels.bucket(b)} "
               f"length={kernels.bucket(self.max_len)} threads={threads}")
        slot = self.max_len // 2

        def candidates():
            ws.qkv.normal_()
            self.keys[0].narrow(2, 0, slot + 1).zero_()
            self.values[0].narrow(1, 0, slot + 1).zero_()
            eps_qk, w_qk = w.layers[0][2], w.layers[0][3]
            positions = torch.full((b,), slot, dtype=torch.long, device=ws.qkv.device)
            call, calls = self._attention_calls()[0], 4  # per timing: a few layers' worth

            def compiled():
                for _ in range(calls):
                    ws.positions.copy_(positions)
                    call(slot, threads)

            def pytorch():
                for _ in range(calls):
                    rope = self.rope.index_select(0, positions)
                    self._torch_attention(eps_qk, w_qk, self.buffers[0], slot, rope, None)

            return {"kernel": compiled, "torch": pytorch}

        choice = kernels.faster(key, candidates)
        self._attend = None  # bound without the padding bias: rebind at the first step
        return choice == "kernel"

    def _elementwise_is_faster(self) -> bool:
        """Whether the compiled RMSNorm scaling and SwiGLU beat their PyTorch operations at this step's
        shapes on this machine (`kernels.faster`, as `_kernel_is_faster`), timed on this step's workspace."""
        w, ws, ek = self.w, self.ws, self.elementwise
        b, threads = ws.x.shape[0], torch.get_num_threads()
        key = (f"decode-norm-swiglu {ek.name} hidden={w.hidden} intermediate={ws.act.shape[1]} "
               f"batch={kernels.bucket(b)} threads={threads}")

        def candidates():
            ws.x.normal_()
            ws.gu.normal_()
            timed = {}
            for name, chosen in (("kernel", ek), ("torch", None)):
                self.elementwise = chosen
                self._bind_elementwise()
                (norm, *_), swiglu, layers = self._norms, self._swiglu, 4  # per timing: a few layers' worth

                def run(norm=norm, swiglu=swiglu):
                    for _ in range(layers):
                        norm(threads)
                        norm(threads)
                        swiglu(threads)

                timed[name] = run
            self.elementwise = ek
            return timed

        return kernels.faster(key, candidates) == "kernel"

    def _step_is_faster(self) -> bool:
        """Whether the whole-step kernel beats the per-operation step (`_operations_step`, with the kernels
        chosen for it) at this batch's shapes on this machine (`kernels.faster`, as `_kernel_is_faster`).

        Timed as whole steps on this step's own workspace and buffers at a cache half full, before the
        prefill: whatever the timing writes there is overwritten before it is read."""
        w, ws = self.w, self.ws
        b, threads = ws.x.shape[0], torch.get_num_threads()
        key = (f"decode-step {self.step_kernel.name} layers={len(w.layers)} hidden={w.hidden} "
               f"intermediate={ws.act.shape[1]} heads={w.h} kv_heads={w.hk} vocab={w.lm_head.shape[1]} "
               f"batch={kernels.bucket(b)} length={kernels.bucket(self.max_len)} threads={threads}")
        slot = self.max_len // 2

        def candidates():
            self.keys[..., : slot + 1].zero_()
            self.values[:, :, : slot + 1].zero_()
            tokens = torch.zeros(b, dtype=torch.long, device=ws.x.device)
            positions = torch.full((b,), slot, dtype=torch.long, device=ws.x.device)
            logits = ws.x.new_empty(b, w.lm_head.shape[1])
            step = self._bind_step()
            return {"kernel": lambda: step(tokens, positions, logits, slot, threads),
                    "operations": lambda: self._operations_step(tokens, positions, slot)}

        choice = kernels.faster(key, candidates)
        self._step = self._attend = None  # bound without the padding bias: rebind at the first step
        return choice == "kernel"

    def _bind_step(self):
        """The whole-step kernel bound to this batch's weights, cache, padding bias and workspace."""
        w, ws = self.w, self.ws
        layers = [
            dict(w_qkv=w_qkv, qk_norm=w_qk, w_o=w_o, w_gu=w_gu, w_down=w_down, keys=keys, values=values,
                 attn_norm_eps=float(eps1), qk_norm_eps=qk_eps, mlp_norm_eps=float(eps2))
            for (eps1, w_qkv, _, w_qk, w_o, eps2, w_gu, w_down, _), qk_eps, (keys, _, values)
            in zip(w.layers, w.qk_eps, self.buffers)
        ]
        workspace = dict(x=ws.x, xn=ws.xn, qkv=ws.qkv, scores=self._scores(), att=ws.att_2d, gu=ws.gu, act=ws.act)
        return self.step_kernel.bind(embed=w.embed, lm_head=w.lm_head, layers=layers, rope=torch.view_as_real(self.rope),
                                     bias=self.bias, final_eps=float(w.final_eps), workspace=workspace, kv_heads=w.hk)

    def _scores(self) -> torch.Tensor:
        """The compiled attention's weights [B·Hk, G, T] (both kernels' workspace), made at first use: the
        PyTorch path never needs them (a layer's keys times G/D: large for a large batch and cache)."""
        ws = self.ws
        if ws.scores is None:
            ws.scores = ws.qkv.new_empty(self.keys.shape[1], self.w.g, self.capacity)
        return ws.scores

    def _attention_calls(self) -> list:
        """The compiled attention (QK-norm, RoPE, cache writes, q·kᵀ, softmax, p·v) of each layer, bound
        to the current buffers (made at the first step after `_bind`; see `kernels.AttentionKernel`)."""
        if self._attend is None:
            w, ws = self.w, self.ws
            ws.positions = torch.empty(ws.qkv.shape[0], dtype=torch.long)
            rope_pairs = torch.view_as_real(self.rope)  # [P, 1, D/2, 2]: (cos, sin) per frequency
            self._attend = [
                self.kernel.bind(ws.qkv, w_qk, qk_eps, rope_pairs, ws.positions, keys, values, self.bias,
                                 self._scores(), ws.att, w.hk)
                for (_, _, _, w_qk, *_), qk_eps, (keys, _, values) in zip(w.layers, w.qk_eps, self.buffers)
            ]
        return self._attend
