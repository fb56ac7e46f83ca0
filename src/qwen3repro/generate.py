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
  prefilled in one forward, then each step feeds one token per row and reads the last logits.
  Nothing is ever recomputed.
* Sampling is vectorised over the batch, in this order (the one vLLM uses for these knobs):
  presence penalty (subtract `presence_penalty` from every token already generated in this row),
  temperature, top-k, top-p (nucleus: the smallest set of most likely tokens whose probability
  reaches p), min-p (drop tokens whose probability is below min_p × the top token's). The draw is
  an exponential race (argmax of p / E, E ~ Exp(1)), which equals sampling from p, with an explicit
  `torch.Generator` so a seed reproduces a run. Temperature 0 is greedy (argmax).
* Each row stops on its own at a stop token (kept as the last generated token) or at
  `max_new_tokens`; finished rows are dropped from the batch (and from the KV cache) once they
  make up half of it.
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
from dataclasses import dataclass, field
from typing import Sequence

import torch

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


def _race(logits: torch.Tensor, generator) -> torch.Tensor:
    """One draw per row from softmax(logits): argmax of p / E with E ~ Exp(1) (the exponential race)."""
    probs = torch.softmax(logits, dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)


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
    values, index = torch.topk(x, k, dim=-1)  # sorted, descending
    if params.temperature != 1.0:
        values = values / params.temperature
    if params.top_p < 1.0:
        values = _top_p_sorted(values, params.top_p)
    values = apply_min_p(values, params.min_p)
    return index.gather(-1, _race(values, generator)[:, None])[:, 0]


# ------------------------------------------------------------------------ fast decode step
class _DenseDecodeStep:
    """One decode step (one new token per row) of a dense `Qwen3`, written for speed.

    The same arithmetic as `Qwen3.forward` with a KV cache, layer by layer (RMSNorm → q/k/v → QK-norm
    → RoPE → cache write → attention → o_proj; RMSNorm → SwiGLU), with less dispatch per token: the
    q/k/v and gate/up projections are fused into one matmul each (weights concatenated once per
    `generate` call), RMSNorm is `F.rms_norm` (one kernel; the q and k heads share one call), RoPE
    rotates q and k together, activations stay [B, hidden], and grouped-query attention runs as one SDPA
    call per layer with each KV head's G query heads as its G queries (all at the same position, so
    no causal mask; padding is an additive bias built once per step and shared by the layers). The
    prompt prefill and every other model (MoE layers, dual chunk attention, bf16/fp16 weights, stub
    models) use `model.forward`; the tests check that log-probs still equal a full forward.
    """

    def __init__(self, model) -> None:
        from .models.attention import rope_tables, rotate
        from .models.rope import rope_cos_sin

        self._rope_cos_sin, self._rope_tables, self._rotate = rope_cos_sin, rope_tables, rotate
        c = model.config
        self.model = model
        self.h, self.hk, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            # QK-norm of the q and k heads in one rms_norm: the per-head weights side by side.
            qk_weight = torch.cat([a.q_norm.weight.expand(self.h, -1), a.k_norm.weight.expand(self.hk, -1)])
            self.layers.append((  # matmul weights transposed once to [in, out], contiguous
                layer.input_layernorm.weight, layer.input_layernorm.eps,
                torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).t().contiguous(),
                qk_weight, a.q_norm.eps, a.o_proj.weight.t().contiguous(),
                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps,
                torch.cat([m.gate_proj.weight, m.up_proj.weight]).t().contiguous(),
                m.down_proj.weight.t().contiguous(), m.gate_proj.weight.shape[0],
            ))
        self.lm_head = model.lm_head.weight.t().contiguous()

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

    def __call__(self, token: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """token, positions [B] -> last logits [B, V]; writes the token's keys/values at the next slot."""
        import torch.nn.functional as F

        model, b, h, hk, d = self.model, token.shape[0], self.h, self.hk, self.d
        slot = cache.length
        cache.record(positions[:, None], None)
        bias = None
        if cache.has_padding:
            bias = torch.zeros(b, 1, 1, slot + 1, dtype=cache.k.dtype, device=token.device)
            bias.masked_fill_(~cache.valid[:, None, None, : slot + 1], float("-inf"))
        x = model.model.embed_tokens(token)
        cos, sin = self._rope_tables(*self._rope_cos_sin(
            model.inv_freq, positions[:, None], model.attention_factor, dtype=x.dtype
        ))
        qd, kd = h * d, hk * d
        hidden = x.shape[-1]
        for i, (w1, eps1, w_qkv, w_qk, eps_qk, w_o, w2, eps2, w_gu, w_down, inter) in enumerate(self.layers):
            qkv = torch.mm(F.rms_norm(x, (hidden,), w1, eps1), w_qkv)
            qk = F.rms_norm(qkv[:, : qd + kd].view(b, 1, h + hk, d), (d,), None, eps_qk) * w_qk
            qk = self._rotate(qk, cos, sin)  # [B, 1, H + Hk, D]
            cache.k[i, :, :, slot] = qk[:, 0, h:]
            cache.v[i, :, :, slot] = qkv[:, qd + kd:].view(b, hk, d)
            keys, values = cache.k[i, :, :, : slot + 1], cache.v[i, :, :, : slot + 1]
            out = F.scaled_dot_product_attention(qk[:, 0, :h].reshape(b, hk, h // hk, d), keys, values, attn_mask=bias)
            x = torch.addmm(x, out.reshape(b, qd), w_o)
            gu = torch.mm(F.rms_norm(x, (hidden,), w2, eps2), w_gu)
            x = torch.addmm(x, F.silu(gu[:, :inter]) * gu[:, inter:], w_down)
        cache.advance(1)
        norm = model.model.norm
        return torch.mm(F.rms_norm(x, (hidden,), norm.weight, norm.eps), self.lm_head).float()


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

    cache = model.new_kv_cache(n, width + max_new)
    logits = _prefill(model, input_ids, position_ids, attention_mask if padded else None, cache)
    next_pos = torch.tensor(lengths, dtype=torch.long, device=device)

    fast_step = _DenseDecodeStep(model) if _DenseDecodeStep.supports(model) else None
    vocab = logits.shape[-1]
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    rows = torch.arange(n, device=device)  # batch slot -> original row
    out_tokens = torch.full((n, max_new), pad_id, dtype=torch.long, device=device)
    out_logps = torch.zeros((n, max_new), dtype=torch.float32, device=device) if return_logprobs else None
    out_forced = torch.zeros((n, max_new), dtype=torch.bool, device=device)
    out_len = torch.full((n,), max_new, dtype=torch.long, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)  # by original row
    done = torch.zeros(n, dtype=torch.bool, device=device)  # by batch slot
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

        hit_stop = torch.isin(token, stop) & ~done
        if forcing is not None:
            hit_stop &= ~forcing
        if bool(hit_stop.any()):
            out_len[rows[hit_stop]] = t + 1
            stopped[rows[hit_stop]] = True
            done |= hit_stop
        if budget is not None:
            live = ~done | hit_stop
            out_think[rows[live]] = think_count[live]
            out_hit[rows[live]] = budget_used[live]
        if t == max_new - 1 or bool(done.all()):
            break

        # Drop finished rows once they are half of the batch (cache included).
        active = ~done
        n_active = int(active.sum())
        if n_active <= done.numel() // 2 and done.numel() >= 4:
            keep = active.nonzero()[:, 0]
            cache.reorder(keep)
            rows, token, next_pos, done = rows[keep], token[keep], next_pos[keep], done[keep]
            if seen is not None:
                seen = seen[keep]
            if budget is not None:
                in_think, think_count, budget_used, forced_pos = (
                    in_think[keep], think_count[keep], budget_used[keep], forced_pos[keep]
                )

        if fast_step is not None:
            logits = fast_step(token, next_pos, cache)
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
