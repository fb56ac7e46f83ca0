"""The generation engine: one batched, KV-cached sampler for evals, RL rollouts, candidate
generation, distillation and chat.

    gens = generate(model, [prompt_ids, ...], THINKING_SAMPLING, max_new_tokens=256,
                    stop_token_ids=[tok.eos_token_id], tokenizer=tok, thinking_budget=64,
                    return_logprobs=True, seed=0)
    gens[i].token_ids, gens[i].logprobs, gens[i].finish_reason

How a batch is decoded
----------------------
* Prompts are left-padded to a common length; an attention mask and per-row position ids
  (0, 1, ... from each row's first real token) make a padded row compute exactly what it would
  alone. One KV cache of `prompt + max_new_tokens` slots is allocated up front; the prompt is
  prefilled (all its positions at once), then each step feeds one token per row and reads the last
  logits. Nothing is ever recomputed.
* For a dense full-precision `Qwen3` the prefill and the steps run a dedicated engine
  (`_DenseDecodeStep`) instead of `model.forward`: at rollout sizes a step is mostly per-operation
  overhead and memory traffic, so everything that does not change between steps is prepared once:
  fused and norm-folded weights and a RoPE table (RoPE as one complex multiplication), kept across
  calls while the model's parameters are unchanged; per call the padding bias and a workspace; keys
  are kept transposed for the attention matmuls, which replace SDPA (slow on CPU for one query per
  row). On a CPU in float32, each layer's QK-norm, RoPE, cache writes and attention are one call of a
  compiled kernel (`qwen3repro.kernels`, built at first use with the system's C compiler; without one,
  the PyTorch operations run, with the same results up to rounding). Other models (MoE, dual chunk
  attention, half precision) run through `model.forward`.
* Sampling is vectorised over the batch, in this order (the one vLLM uses for these knobs):
  presence penalty (subtract `presence_penalty` from every token already generated in this row),
  temperature, top-k, top-p (nucleus: the smallest set of most likely tokens whose probability
  reaches p), min-p (drop tokens whose probability is below min_p × the top token's). The draw is
  an exponential race (argmax of p / E, E ~ Exp(1)), which equals sampling from p, with an explicit
  `torch.Generator` so a seed reproduces a run. Temperature 0 is greedy (argmax). With top-k on,
  everything after the penalty runs on the k candidates only, found by a two-pass top-k (group
  maxima, then the top k among the best groups' members) that is much cheaper than `torch.topk`
  over a whole vocabulary row. On a CPU, top-k without min-p (the report's settings) is one call of a
  compiled kernel doing the same, from the same noise draws.
* Each row stops on its own at a stop token (kept as the last generated token) or at
  `max_new_tokens`; finished rows are dropped from the batch (and from the KV cache) once they
  make up half of it. The engine counts finished rows itself, so a step without a stop token needs
  no check of the whole batch.
* `return_logprobs=True` gives, for every generated token, log softmax(logits / T) of that token
  over the whole vocabulary — the model's own distribution at the sampling temperature T (1 for
  greedy), before penalties, filters and masks (forced tokens get theirs too). This is the
  convention of TRL's GRPO (the temperature divides the logits before the log-softmax), so rollout
  log-probs can serve as π_old directly; the tests check them against a full forward of
  prompt + completion.

Thinking budget (Qwen3 technical report §4.3, "Thinking budget")
----------------------------------------------------------------
A controller follows every row's state: a generated `<think>` opens the thinking part, `</think>`
closes it. It counts the *sampled* tokens inside the thinking part; when a row's count reaches the
budget B while its thinking is still open, the next tokens are not sampled but forced: the report's
stop-thinking directive (`chat.STOP_THINKING_DIRECTIVE`, "Considering the limited time by the user,
I have to give the solution based on the thinking directly now.\\n</think>.\\n\\n", tokenised once
per call), after which the row samples its answer as usual. A row is forced at most once, and never
when the model closes its thinking by itself first; the count runs over the whole completion (a
think block re-opened after a natural close keeps counting), and after the directive a row may not
open another think block, so a row never thinks more than B sampled tokens in all. Budget 0 forces
"\\n\\n</think>\\n\\n" right after `<think>`, i.e. the empty think block of non-thinking mode.
Forced tokens are part of the output (they count towards `max_new_tokens`) and are flagged in
`Generation.forced`, so an RL loss can mask them out. A prompt that already ends inside an open
think block (an assistant prefill) starts in the thinking state.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import kernels
from .chat import EMPTY_THINK, STOP_THINKING_DIRECTIVE

__all__ = [
    "Generation",
    "SamplingParams",
    "ThinkingBudget",
    "THINKING_SAMPLING",
    "NON_THINKING_SAMPLING",
    "GREEDY",
    "generate",
    "apply_presence_penalty",
    "apply_top_k",
    "apply_top_p",
    "apply_min_p",
    "sampling_logits",
]


# ------------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. top_k 0 and top_p 1 mean "off"; temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# The report's evaluation settings (Qwen3 technical report, "Evaluation settings"; the released
# generation_config.json has min_p 0).
THINKING_SAMPLING = SamplingParams(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
NON_THINKING_SAMPLING = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0, presence_penalty=1.5)
GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class ThinkingBudget:
    """A thinking budget with the token ids the controller needs (see the module docstring)."""

    budget: int
    think_start_id: int
    think_end_id: int
    directive_ids: tuple[int, ...]  # forced when the budget is reached (budget > 0)
    empty_ids: tuple[int, ...]  # forced right after <think> when the budget is 0

    def __post_init__(self) -> None:
        if self.budget < 0:
            raise ValueError(f"thinking budget must be >= 0, got {self.budget}")
        if self.think_end_id not in self.directive_ids or self.think_end_id not in self.empty_ids:
            raise ValueError("the forced token sequences must close the think block (contain </think>)")

    @classmethod
    def from_tokenizer(cls, tokenizer, budget: int) -> "ThinkingBudget":
        start = tokenizer.think_start_id
        empty = tokenizer.encode(EMPTY_THINK)
        if not empty or empty[0] != start:
            raise ValueError("the tokenizer does not encode the empty think block as <think> + ...")
        return cls(
            budget=int(budget),
            think_start_id=start,
            think_end_id=tokenizer.think_end_id,
            directive_ids=tuple(tokenizer.encode(STOP_THINKING_DIRECTIVE)),
            empty_ids=tuple(empty[1:]),
        )

    @property
    def forced_ids(self) -> tuple[int, ...]:
        return self.empty_ids if self.budget == 0 else self.directive_ids


@dataclass
class Generation:
    """One completion. `token_ids` are the generated ids (a stop token, when one ended the row, is the
    last); `logprobs[i]` is log p(token_ids[i]) (see the module docstring), or None when not asked
    for; `forced[i]` marks tokens inserted by the thinking-budget controller; `finish_reason` is
    "stop" (a stop token) or "length" (`max_new_tokens`)."""

    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    forced: list[bool] = field(default_factory=list)
    thinking_tokens: int = 0  # sampled tokens inside the thinking part
    budget_hit: bool = False  # the controller forced the directive
    prompt_length: int = 0

    def __len__(self) -> int:
        return len(self.token_ids)


# ---------------------------------------------------------------------------- sampling filters
# Pure functions on logits [B, V] (float); filtered-out tokens become -inf. The top token is
# never removed, so every row keeps at least one candidate.
def apply_presence_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the logits of the tokens already generated (`seen` [B, V] bool)."""
    if penalty == 0.0:
        return logits
    return logits - penalty * seen.to(logits.dtype)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits of each row (ties broken by `torch.topk`); k <= 0 is off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, torch.topk(logits, k, dim=-1).indices, True)
    return logits.masked_fill(~keep, float("-inf"))


def _top_p_sorted(sorted_logits: torch.Tensor, p: float) -> torch.Tensor:
    """Top-p on logits already sorted in descending order along the last dimension."""
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass strictly before each token
    remove = before >= p
    remove[..., 0] = False
    return sorted_logits.masked_fill(remove, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    filtered = _top_p_sorted(sorted_logits, p)
    return torch.empty_like(logits).scatter_(-1, order, filtered)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p × the row's top probability; 0 is off."""
    if min_p <= 0.0:
        return logits
    log_probs = torch.log_softmax(logits, dim=-1)
    threshold = log_probs.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(min_p, dtype=logits.dtype))
    return logits.masked_fill(log_probs < threshold, float("-inf"))


def sampling_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The logits actually sampled from: penalty, temperature, top-k, top-p, min-p (in that order)."""
    x = logits.float()
    if params.presence_penalty and seen is not None:
        x = apply_presence_penalty(x, seen, params.presence_penalty)
    if params.temperature not in (0.0, 1.0):
        x = x / params.temperature
    x = apply_top_k(x, params.top_k)
    x = apply_top_p(x, params.top_p)
    x = apply_min_p(x, params.min_p)
    return x


def _race(logits: torch.Tensor, generator, keepdim: bool = False) -> torch.Tensor:
    """One draw per row from softmax(logits): argmax of p / E with E ~ Exp(1) (the exponential race)."""
    probs = torch.softmax(logits, dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1, keepdim=keepdim)


def _top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(x, k, dim=-1)` (values sorted in descending order, and their indices) for x [B, V],
    computed in two cheap passes instead of one expensive one (`topk` over a whole vocabulary row
    costs far more than over a few hundred entries).

    The vocabulary is split into V/c groups of c entries (group j holds j, j + V/c, j + 2V/c, ...).
    Every one of the k largest entries lies in a group whose maximum is at least the k-th largest
    value, and at most k groups have such a maximum, so the k groups with the largest maxima hold the
    whole top k: the answer is the top k of their c·k entries. (Ties at the k-th value may resolve to
    other, equal-valued entries than `torch.topk`'s.)
    """
    b, v = x.shape
    c = 1 << max(0, round(math.log2(max(v / max(k, 1), 1)) / 2))  # ≈ √(V/k): both passes about as short
    while c > 1 and v % c:
        c //= 2
    n = v // c
    if c < 4 or n < 2 * k:
        return torch.topk(x, k, dim=-1)
    groups = x.view(b, c, n)
    best = groups.amax(dim=1).topk(k, dim=-1, sorted=False).indices.unsqueeze(1)  # [B, 1, k] group ids
    members = (_group_offsets(v, n, x.device) + best).view(b, c * k)  # vocabulary ids
    values, j = x.gather(1, members).topk(k, dim=-1)
    return values, members.gather(1, j)


@functools.lru_cache(maxsize=16)
def _group_offsets(v: int, n: int, device) -> torch.Tensor:
    """[c, 1]: 0, n, 2n, ... (member r of group j is r·n + j); made once, not at every step."""
    return torch.arange(0, v, n, device=device)[:, None]


def _sample(logits: torch.Tensor, params: SamplingParams, seen, generator) -> torch.Tensor:
    """Next token per row; the same distribution as sampling from `sampling_logits`, computed on the
    top-k candidates only when top-k is on (no sort over the whole vocabulary)."""
    k = params.top_k
    if params.greedy or not 0 < k < logits.shape[-1]:
        x = sampling_logits(logits, params, seen)
        return x.argmax(dim=-1) if params.greedy else _race(x, generator)
    x = logits.float()
    if params.presence_penalty and seen is not None:
        x = apply_presence_penalty(x, seen, params.presence_penalty)
    if params.min_p == 0.0 and x.device.type == "cpu" and k <= kernels.MAX_TOP_K:
        kernel = kernels.sampling_kernel()
        if kernel is not None:  # the code below in one compiled call, with the same noise draws
            noise = torch.empty((x.shape[0], k), dtype=torch.float32).exponential_(generator=generator)
            return kernel(x, k, params.temperature, params.top_p, noise)
    values, index = _top_k(x, k)  # sorted, descending
    if params.temperature != 1.0:
        values = values / params.temperature
    if params.min_p > 0.0:  # filters on the logits, exactly as `sampling_logits` applies them
        if params.top_p < 1.0:
            values = _top_p_sorted(values, params.top_p)
        values = apply_min_p(values, params.min_p)
        return index.gather(-1, _race(values, generator, keepdim=True)).view(-1)
    # Without min-p, top-p can filter probabilities instead of logits, which saves a second softmax:
    # the race needs no renormalisation (argmax of p / E picks the same token for any positive
    # multiple of p). Same arithmetic as `_top_p_sorted`; before[:, 0] is 0 < p, so the top token stays.
    probs = torch.softmax(values, dim=-1)
    if params.top_p < 1.0:
        before = probs.cumsum(dim=-1).sub_(probs)
        probs = probs.masked_fill_(before >= params.top_p, 0.0)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return index.gather(-1, probs.div_(race).argmax(dim=-1, keepdim=True)).view(-1)


# ------------------------------------------------------------------------ fast dense path
class _DenseWeights:
    """A dense `Qwen3`'s weights rearranged for `_DenseDecodeStep` (see its docstring), built from the
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
        self.mean_h = torch.full((self.hidden, 1), 1 / self.hidden, dtype=w.dtype, device=w.device)
        self.mean_d = torch.full((d, 1), 1 / d, dtype=w.dtype, device=w.device)
        self.lm_head = (w * norm.weight).t().contiguous()
        self._rope_args = (model.inv_freq, model.attention_factor, w.dtype, w.device)
        self.rope: torch.Tensor | None = None

    def rope_table(self, length: int) -> torch.Tensor:
        """RoPE as complex numbers, [P, 1, D/2] with P >= length: position p rotates the pair
        x_i + j·x_{i+D/2} by multiplying it with rope[p, 0, i] = cos θ_i + j·sin θ_i."""
        if self.rope is None or self.rope.shape[0] < length:
            from .models.rope import rope_cos_sin

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


class _DenseDecodeStep:
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
    * the prompt prefill runs the same layers over the prompt tokens of a few rows at a time, with
      SDPA (causal, and the padding mask of `build_attention_mask`) as its attention; its last layer
      computes attention output and MLP for the last position only, the only one whose logits are read.

    Other models (MoE layers, dual chunk attention, bf16/fp16 weights, stub models) use
    `model.forward` and a `KVCache`; the tests check that log-probs still equal a full forward.
    """

    def __init__(self, model, batch_size: int, max_len: int) -> None:
        w = self.w = _dense_weights(model)
        self.rope = w.rope_table(max_len)
        self.max_len, self.length = max_len, 0
        proto = w.lm_head
        # On a CPU in float32, a decode step's attention is one compiled call per layer (None: PyTorch ops).
        self.kernel = None
        if proto.device.type == "cpu" and proto.dtype == torch.float32:
            self.kernel = kernels.attention_kernel(w.d, w.g)
        # The kernel reads keys a vector (16 slots) at a time: the buffers' length is rounded up to that.
        lanes = kernels.LANES if self.kernel is not None else 1
        self.capacity = -(-max_len // lanes) * lanes
        n_layers = len(w.layers)
        self.keys = proto.new_empty(n_layers, batch_size * w.hk, w.d, self.capacity)
        self.values = proto.new_empty(n_layers, batch_size * w.hk, self.capacity, w.d)
        self.bias = None  # [B·Hk, 1, capacity]: 0 for real tokens, -inf for padding
        self._bind()

    @staticmethod
    def supports(model) -> bool:
        from .models.qwen3 import Qwen3

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
        self._attend = None  # the kernel's per-layer calls, bound to these buffers at the next step

    def prefill(self, input_ids: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor | None):
        """input_ids, positions, attention_mask (True = real token; None = no padding) [B, S] -> the last
        position's logits [B, V]; stores the prompt's keys/values at slots [0, S)."""
        (b, s), t, hk = input_ids.shape, self.capacity, self.w.hk
        if self.length:
            raise RuntimeError("prefill needs an empty cache")
        allowed = None  # [B, 1, S, S]: causal and padding, the model's own mask
        if attention_mask is not None:
            from .models.attention import build_attention_mask

            device = attention_mask.device
            allowed = build_attention_mask(b, s, 0, attention_mask=attention_mask, device=device).mask
            valid = torch.ones(b, hk, 1, t, dtype=torch.bool, device=device)
            valid[..., :s] = attention_mask[:, None, None, :]
            bias = torch.zeros(valid.shape, dtype=self.keys.dtype, device=device)
            self.bias = bias.masked_fill_(~valid, float("-inf")).flatten(0, 1)
        # A few rows at a time (~256 tokens): the activations stay in cache, and a large batch of prompts
        # needs no large temporary buffers.
        rows = max(1, self._PREFILL_TOKENS // s)
        logits = [
            self._prefill_rows(r, input_ids[r: r + rows], positions[r: r + rows],
                               None if allowed is None else allowed[r: r + rows])
            for r in range(0, b, rows)
        ]
        self.length = s
        return torch.cat(logits) if len(logits) > 1 else logits[0]

    _PREFILL_TOKENS = 256

    def _prefill_rows(self, r0: int, input_ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor | None):
        """`prefill` of the batch rows [r0, r0 + b). Attention is SDPA's (memory-efficient for long prompts)."""
        import torch.nn.functional as F

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
        import torch.nn.functional as F

        w, ws = self.w, self.ws
        mean_h, mean_d, slot = w.mean_h, w.mean_d, self.length
        t = slot + 1
        if t > self.max_len:
            raise ValueError(f"cache overflow: {t} tokens do not fit in max_len={self.max_len}")
        if self.kernel is not None:
            attend, threads = self._attention_calls(), torch.get_num_threads()
            ws.positions.copy_(positions)
        else:
            attend = [None] * len(w.layers)
            bias = self.bias.narrow(2, 0, t) if self.bias is not None else None
            rope = self.rope.index_select(0, positions)  # [B, 1, D/2]
        x = F.embedding(token, w.embed)  # [B, hidden]
        # Every line below uses as few tensor operations as it can (each costs microseconds of overhead).
        # RMSNorm: x · (mean(x²) + eps)^-½, the mean as a matmul with a column of 1/n that also adds eps
        # (cheaper here than `mean` + `add`, or `F.rms_norm`, which runs several operations inside).
        for (eps1, w_qkv, eps_qk, w_qk, w_o, eps2, w_gu, w_down, _), (keys, values_4d, values), kernel_call in zip(
            w.layers, self.buffers, attend
        ):
            torch.addmm(eps1, torch.mul(x, x, out=ws.sq), mean_h, out=ws.r).rsqrt_()
            torch.mm(torch.mul(x, ws.r, out=ws.xn), w_qkv, out=ws.qkv)
            if kernel_call is not None:
                # Everything down to the attention output, in one compiled call (kernels/decode_attention.c).
                kernel_call(slot, threads)
            else:
                # QK-norm per head (q's weight carries 1/√D), then RoPE as one complex multiplication.
                torch.mul(ws.qk, ws.qk, out=ws.qk_sq_3d)
                torch.addmm(eps_qk, ws.qk_sq, mean_d, out=ws.qk_r).rsqrt_()
                torch.mul(ws.qk, ws.qk_r_3d, out=ws.qk_normed).mul_(w_qk)
                torch.mul(ws.qk_normed_c, rope, out=ws.rotated_c)
                keys.select(2, slot).copy_(ws.k)
                values_4d.select(2, slot).copy_(ws.v)
                if bias is None:
                    scores = torch.bmm(ws.q, keys.narrow(2, 0, t))
                else:
                    scores = torch.baddbmm(bias, ws.q, keys.narrow(2, 0, t))
                torch.bmm(torch.softmax(scores, dim=-1), values.narrow(1, 0, t), out=ws.att)
            x = torch.addmm(x, ws.att_2d, w_o)
            torch.addmm(eps2, torch.mul(x, x, out=ws.sq), mean_h, out=ws.r).rsqrt_()
            torch.mm(torch.mul(x, ws.r, out=ws.xn), w_gu, out=ws.gu)
            x = torch.addmm(x, F.silu(ws.gate).mul_(ws.up), w_down)
        self.length = t
        x = x * torch.addmm(w.final_eps, x * x, mean_h).rsqrt_()
        return torch.mm(x, w.lm_head).float()

    def _attention_calls(self) -> list:
        """The compiled attention (QK-norm, RoPE, cache writes, q·kᵀ, softmax, p·v) of each layer, bound
        to the current buffers (made at the first step after `_bind`; see `kernels.AttentionKernel`)."""
        if self._attend is None:
            w, ws = self.w, self.ws
            ws.positions = torch.empty(ws.qkv.shape[0], dtype=torch.long)
            ws.scores = ws.qkv.new_empty(self.keys.shape[1], w.g, self.capacity)  # attention weights
            rope_pairs = torch.view_as_real(self.rope)  # [P, 1, D/2, 2]: (cos, sin) per frequency
            self._attend = [
                self.kernel.bind(ws.qkv, w_qk, qk_eps, rope_pairs, ws.positions, keys, values, self.bias,
                                 ws.scores, ws.att, w.hk)
                for (_, _, _, w_qk, *_), qk_eps, (keys, _, values) in zip(w.layers, w.qk_eps, self.buffers)
            ]
        return self._attend


# ---------------------------------------------------------------------------------- the engine
def _resolve_params(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    params = params or SamplingParams()
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(params, **given) if given else params


def _prefill(model, input_ids, position_ids, attention_mask, cache) -> torch.Tensor:
    """The prompt's forward into the cache; returns the last position's logits [B, V] (float32).

    For a `Qwen3`, a forward hook on the final norm keeps only the last position, so the LM head
    does not compute logits for every prompt token (a [B·S, V] matmul that nothing reads)."""
    from .models.qwen3 import Qwen3

    handle = None
    if isinstance(model, Qwen3):
        handle = model.model.norm.register_forward_hook(lambda module, args, out: out[:, -1:])
    try:
        out = model(input_ids, position_ids=position_ids, attention_mask=attention_mask, kv_cache=cache)
    finally:
        if handle is not None:
            handle.remove()
    return out.logits[:, -1].float()


def _thinking_open(prompt: Sequence[int], start_id: int, end_id: int) -> bool:
    """Whether the prompt ends inside an open think block (its last <think> after its last </think>)."""
    last_start = last_end = -1
    for i, t in enumerate(prompt):
        if t == start_id:
            last_start = i
        elif t == end_id:
            last_end = i
    return last_start > last_end


@torch.inference_mode()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    *,
    max_new_tokens: int = 256,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    presence_penalty: float | None = None,
    stop_token_ids: Sequence[int] | None = None,
    return_logprobs: bool = False,
    thinking_budget: int | ThinkingBudget | None = None,
    tokenizer=None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    max_batch_size: int | None = None,
    pad_token_id: int = 0,
) -> list[Generation]:
    """Complete every prompt (a list of token ids) with `model` (a `Qwen3`); see the module docstring.

    `params` gives the sampling settings (default: plain sampling at T=1); `temperature`, `top_p`,
    `top_k`, `min_p` and `presence_penalty` override single fields. `stop_token_ids` end a row
    (default: the tokenizer's eos `<|im_end|>` and `<|endoftext|>` when a tokenizer is given, else
    none). `thinking_budget` is an int (needs `tokenizer`) or a `ThinkingBudget`. `tokenizer` also
    keeps sampling within its vocabulary when the model's embedding has padded rows. `seed` or
    `generator` make sampling reproducible. `max_batch_size` splits many prompts into batches.
    """
    params = _resolve_params(
        params, dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, presence_penalty=presence_penalty)
    )
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if isinstance(thinking_budget, int) and not isinstance(thinking_budget, bool):
        if tokenizer is None:
            raise ValueError("an int thinking_budget needs the tokenizer (or pass a ThinkingBudget)")
        thinking_budget = ThinkingBudget.from_tokenizer(tokenizer, thinking_budget)
    if stop_token_ids is None:
        stop_token_ids = (tokenizer.eos_token_id, tokenizer.endoftext_id) if tokenizer is not None else ()
    vocab_limit = tokenizer.vocab_size if tokenizer is not None else None

    device = next(model.parameters()).device
    if generator is None:
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(int(seed))
        else:
            generator.seed()

    step = max_batch_size or len(prompts)
    out: list[Generation] = []
    for i in range(0, len(prompts), step):
        out.extend(
            _generate_batch(
                model, prompts[i: i + step], params, max_new_tokens, list(stop_token_ids), return_logprobs,
                thinking_budget, generator, pad_token_id, vocab_limit, device,
            )
        )
    return out


def _generate_batch(
    model, prompts, params: SamplingParams, max_new: int, stop_ids: list[int], return_logprobs: bool,
    budget: ThinkingBudget | None, generator, pad_id: int, vocab_limit: int | None, device,
) -> list[Generation]:
    n = len(prompts)
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    if max_new == 0:
        return [Generation([], "length", [] if return_logprobs else None, [], 0, False, len(p)) for p in prompts]

    # Left-padded prompts, padding mask and per-row positions.
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.bool)
    for r, p in enumerate(prompts):
        input_ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attention_mask[r, width - len(p):] = True
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    padded = not bool(attention_mask.all())

    fast_step = cache = None
    if _DenseDecodeStep.supports(model):
        fast_step = _DenseDecodeStep(model, n, width + max_new)
        logits = fast_step.prefill(input_ids, position_ids, attention_mask if padded else None)
    else:
        cache = model.new_kv_cache(n, width + max_new)
        logits = _prefill(model, input_ids, position_ids, attention_mask if padded else None, cache)
    next_pos = torch.tensor(lengths, dtype=torch.long, device=device)

    vocab = logits.shape[-1]
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    rows = torch.arange(n, device=device)  # batch slot -> original row
    out_tokens = torch.full((n, max_new), pad_id, dtype=torch.long, device=device)
    out_logps = torch.zeros((n, max_new), dtype=torch.float32, device=device) if return_logprobs else None
    out_forced = torch.zeros((n, max_new), dtype=torch.bool, device=device)
    out_len = torch.full((n,), max_new, dtype=torch.long, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)  # by original row
    done = torch.zeros(n, dtype=torch.bool, device=device)  # by batch slot
    n_done = 0  # finished rows still in the batch (counted here, so no step needs to sync to know)
    seen = torch.zeros((n, vocab), dtype=torch.bool, device=device) if params.presence_penalty else None
    lp_temperature = params.temperature if params.temperature > 0 else 1.0
    vocab_mask = None
    if vocab_limit is not None and vocab_limit < vocab:
        vocab_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        vocab_mask[vocab_limit:] = True

    if budget is not None:
        forced_seq = torch.tensor(budget.forced_ids, dtype=torch.long, device=device)
        n_forced = len(budget.forced_ids)
        in_think = torch.tensor(
            [_thinking_open(p, budget.think_start_id, budget.think_end_id) for p in prompts], device=device
        )
        think_count = torch.zeros(n, dtype=torch.long, device=device)
        budget_used = torch.zeros(n, dtype=torch.bool, device=device)
        forced_pos = torch.full((n,), n_forced, dtype=torch.long, device=device)
        out_think = torch.zeros(n, dtype=torch.long, device=device)
        out_hit = torch.zeros(n, dtype=torch.bool, device=device)

    for t in range(max_new):
        raw = logits
        if vocab_mask is not None:
            logits = logits.masked_fill(vocab_mask, float("-inf"))
        if budget is not None and bool(budget_used.any()):
            # Once forced, a row's thinking stays closed: it may not open a second think block.
            start_col = logits[:, budget.think_start_id]
            logits = logits.clone() if logits is raw else logits
            logits[:, budget.think_start_id] = start_col.masked_fill(budget_used, float("-inf"))
        token = _sample(logits, params, seen, generator)
        forcing = None
        if budget is not None:
            trigger = in_think & ~budget_used & (think_count >= budget.budget)
            forced_pos = torch.where(trigger, torch.zeros_like(forced_pos), forced_pos)
            budget_used |= trigger
            forcing = forced_pos < n_forced
            token = torch.where(forcing, forced_seq[forced_pos.clamp(max=n_forced - 1)], token)
            closes = token == budget.think_end_id
            think_count += (in_think & ~closes & ~forcing).long()
            in_think = torch.where(token == budget.think_start_id, True, torch.where(closes, False, in_think))
            forced_pos += forcing.long()
            out_forced[rows, t] = forcing
        out_tokens[rows, t] = token
        if return_logprobs:
            lp = torch.log_softmax(raw / lp_temperature, dim=-1).gather(-1, token[:, None])[:, 0]
            out_logps[rows, t] = lp
        if seen is not None:
            seen.scatter_(1, token[:, None], True)

        hit_stop = None
        if stop_ids:
            hit_stop = torch.isin(token, stop) & ~done
            if forcing is not None:
                hit_stop &= ~forcing
            if bool(hit_stop.any()):
                out_len[rows[hit_stop]] = t + 1
                stopped[rows[hit_stop]] = True
                done |= hit_stop
                n_done = int(done.sum())
        if budget is not None:
            live = ~done if hit_stop is None else ~done | hit_stop
            out_think[rows[live]] = think_count[live]
            out_hit[rows[live]] = budget_used[live]
        n_slots = done.shape[0]
        if t == max_new - 1 or n_done == n_slots:
            break

        # Drop finished rows once they are half of the batch (cache included).
        if n_slots - n_done <= n_slots // 2 and n_slots >= 4:
            keep = (~done).nonzero()[:, 0]
            (fast_step if fast_step is not None else cache).reorder(keep)  # its own buffers, or the cache
            rows, token, next_pos, done, n_done = rows[keep], token[keep], next_pos[keep], done[keep], 0
            if seen is not None:
                seen = seen[keep]
            if budget is not None:
                in_think, think_count, budget_used, forced_pos = (
                    in_think[keep], think_count[keep], budget_used[keep], forced_pos[keep]
                )

        if fast_step is not None:
            logits = fast_step(token, next_pos)
        else:
            logits = model(token[:, None], position_ids=next_pos[:, None], kv_cache=cache).logits[:, -1].float()
        next_pos += 1

    tokens_cpu = out_tokens.cpu()
    len_cpu = out_len.cpu().tolist()
    forced_cpu = out_forced.cpu()
    logps_cpu = out_logps.cpu() if return_logprobs else None
    stopped_cpu = stopped.cpu().tolist()
    think_cpu = out_think.cpu().tolist() if budget is not None else [0] * n
    hit_cpu = out_hit.cpu().tolist() if budget is not None else [False] * n
    results = []
    for r in range(n):
        k = len_cpu[r]
        results.append(
            Generation(
                token_ids=tokens_cpu[r, :k].tolist(),
                finish_reason="stop" if stopped_cpu[r] else "length",
                logprobs=logps_cpu[r, :k].tolist() if return_logprobs else None,
                forced=forced_cpu[r, :k].tolist(),
                thinking_tokens=int(think_cpu[r]),
                budget_hit=bool(hit_cpu[r]),
                prompt_length=lengths[r],
            )
        )
    return results
