"""The engine: `generate` completes a list of prompts in batches, with one KV cache per batch, and
returns a `Generation` per prompt.

How a batch is decoded
----------------------
* Prompts are left-padded to a common length; an attention mask and per-row position ids
  (0, 1, ... from each row's first real token) make a padded row compute exactly what it would
  alone. One KV cache of `prompt + max_new_tokens` slots is allocated up front; the prompt is
  prefilled (all its positions at once), then each step feeds one token per row and reads the last
  logits. Nothing is ever recomputed.
* The forward passes run in a decode step object with three methods: `prefill`, a step
  (`__call__`) and `reorder` (drop or reorder rows). A dense full-precision `Qwen3` gets the fast
  `DenseDecodeStep` (dense.py); every other model (MoE, dual chunk attention, half precision) gets
  `ModelForwardStep`, which calls `model.forward` with a `KVCache`.
* Each step's token is drawn by `sampling.sample`; with a thinking budget, the budget's
  `ThinkingController` (budget.py) draws it instead, forcing the stop-thinking directive where due.
* Each row stops on its own at a stop token (kept as the last generated token) or at
  `max_new_tokens`; finished rows are dropped from the batch (and from the KV cache) once they
  make up half of it. The engine counts finished rows itself, so a step without a stop token needs
  no check of the whole batch.
* `return_logprobs=True` gives, for every generated token, log softmax(logits / T) of that token
  over the whole vocabulary: the model's own distribution at the sampling temperature T (1 for
  greedy), before penalties, filters and masks (forced tokens get theirs too). This is the
  convention of TRL's GRPO (the temperature divides the logits before the log-softmax), so rollout
  log-probs can serve as π_old directly; the tests check them against a full forward of
  prompt + completion.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..devices import same_device
from ..models.qwen3 import Qwen3
from .budget import ThinkingBudget, ThinkingController
from .dense import DenseDecodeStep
from .sampling import SamplingParams, sample

__all__ = ["Generation", "ModelForwardStep", "generate"]


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


class ModelForwardStep:
    """Prefill and decode steps through `model.forward` and the model's `KVCache`: the path for every
    model `DenseDecodeStep` does not serve (and any object speaking the `Qwen3` interface:
    `new_kv_cache` and `forward(input_ids, position_ids=, attention_mask=, kv_cache=).logits`)."""

    def __init__(self, model, batch_size: int, max_len: int) -> None:
        self.model = model
        self.cache = model.new_kv_cache(batch_size, max_len)

    def prefill(self, input_ids: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor | None):
        """The prompt's forward into the cache; returns the last position's logits [B, V] (float32).

        A `Qwen3` computes only what the last position's logits need (`logits_to_keep=1`): no LM head
        over every prompt token, and in the last layer no queries, attention or MLP for the others (a
        quarter of a 4-layer model's prefill)."""
        kwargs = {"logits_to_keep": 1} if isinstance(self.model, Qwen3) else {}
        out = self.model(input_ids, position_ids=positions, attention_mask=attention_mask, kv_cache=self.cache,
                         **kwargs)
        return out.logits[:, -1].float()

    def __call__(self, token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """token, positions [B] -> last logits [B, V]; stores the token's keys/values in the cache."""
        return self.model(token[:, None], position_ids=positions[:, None], kv_cache=self.cache).logits[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/reorder batch rows (in the cache)."""
        self.cache.reorder(index)


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
    elif not same_device(generator.device, device):
        # The draws (`sampling.sample`) fill noise tensors on the logits' device from this generator, which
        # PyTorch refuses across devices; say so here rather than at the first sampled token.
        raise ValueError(f"the generator is on {generator.device} but the model on {device}: make it with "
                         f"torch.Generator(device=<the model's device>)")

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


def _resolve_params(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    params = params or SamplingParams()
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(params, **given) if given else params


def _left_padded(prompts: list[list[int]], pad_id: int, device):
    """The prompts as one left-padded batch: input ids, attention mask (True = real token) and per-row
    position ids (0 at each row's first real token) [B, S], on `device`."""
    n, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.bool)
    for r, p in enumerate(prompts):
        input_ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attention_mask[r, width - len(p):] = True
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def _generate_batch(
    model, prompts, params: SamplingParams, max_new: int, stop_ids: list[int], return_logprobs: bool,
    budget: ThinkingBudget | None, generator, pad_id: int, vocab_limit: int | None, device,
) -> list[Generation]:
    n = len(prompts)
    lengths = [len(p) for p in prompts]
    if max_new == 0:
        return [Generation([], "length", [] if return_logprobs else None, [], 0, False, len(p)) for p in prompts]

    input_ids, attention_mask, position_ids = _left_padded(prompts, pad_id, device)
    padded = not bool(attention_mask.all())
    decode = (DenseDecodeStep if DenseDecodeStep.supports(model) else ModelForwardStep)(
        model, n, input_ids.shape[1] + max_new
    )
    logits = decode.prefill(input_ids, position_ids, attention_mask if padded else None)
    next_pos = torch.tensor(lengths, dtype=torch.long, device=device)

    vocab = logits.shape[-1]
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    rows = torch.arange(n, device=device)  # batch slot -> original row
    out_tokens = torch.full((n, max_new), pad_id, dtype=torch.long, device=device)
    out_logps = torch.zeros((n, max_new), dtype=torch.float32, device=device) if return_logprobs else None
    out_len = torch.full((n,), max_new, dtype=torch.long, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)  # by original row
    done = torch.zeros(n, dtype=torch.bool, device=device)  # by batch slot
    n_done = 0  # finished rows still in the batch (counted here, so no step needs to sync to know)
    seen = torch.zeros((n, vocab), dtype=torch.bool, device=device) if params.presence_penalty else None
    lp_temperature = params.temperature if params.temperature > 0 else 1.0
    vocab_mask = None  # the model's padded embedding rows, which the tokenizer never produces
    if vocab_limit is not None and vocab_limit < vocab:
        vocab_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        vocab_mask[vocab_limit:] = True
    thinking = ThinkingController(budget, prompts, max_new, device) if budget is not None else None

    for t in range(max_new):
        raw = logits  # the model's own logits: the log-probs are read from these
        if vocab_mask is not None:
            logits = logits.masked_fill(vocab_mask, float("-inf"))
        if thinking is None:
            token, forcing = sample(logits, params, seen, generator), None
        else:
            token, forcing = thinking.step(logits, lambda x: sample(x, params, seen, generator), live=~done)
        out_tokens[rows, t] = token
        if return_logprobs:
            lp = torch.log_softmax(raw / lp_temperature, dim=-1).gather(-1, token[:, None])[:, 0]
            out_logps[rows, t] = lp
        if seen is not None:
            seen.scatter_(1, token[:, None], True)

        if stop_ids:
            hit_stop = torch.isin(token, stop) & ~done
            if forcing is not None:  # a forced directive that contains a stop token does not end the row
                hit_stop &= ~forcing
            if bool(hit_stop.any()):
                out_len[rows[hit_stop]] = t + 1
                stopped[rows[hit_stop]] = True
                done |= hit_stop
                n_done = int(done.sum())
        n_slots = done.shape[0]
        if t == max_new - 1 or n_done == n_slots:
            break

        # Drop finished rows once they are half of the batch (cache included).
        if n_slots - n_done <= n_slots // 2 and n_slots >= 4:
            keep = (~done).nonzero()[:, 0]
            decode.reorder(keep)
            rows, token, next_pos, done, n_done = rows[keep], token[keep], next_pos[keep], done[keep], 0
            if seen is not None:
                seen = seen[keep]
            if thinking is not None:
                thinking.keep(keep)

        logits = decode(token, next_pos)
        next_pos += 1

    return _generations(out_tokens, out_len, stopped, out_logps, thinking, lengths)


def _generations(out_tokens, out_len, stopped, out_logps, thinking: ThinkingController | None,
                 lengths: list[int]) -> list[Generation]:
    """One `Generation` per row from the batch's output buffers (read back from the device once)."""
    tokens_cpu = out_tokens.cpu()
    len_cpu = out_len.cpu().tolist()
    logps_cpu = out_logps.cpu() if out_logps is not None else None
    stopped_cpu = stopped.cpu().tolist()
    n = len(lengths)
    forced_cpu = thinking.forced.cpu() if thinking is not None else None
    think_cpu = thinking.thinking_tokens.cpu().tolist() if thinking is not None else [0] * n
    hit_cpu = thinking.budget_hit.cpu().tolist() if thinking is not None else [False] * n
    results = []
    for r in range(n):
        k = len_cpu[r]
        results.append(
            Generation(
                token_ids=tokens_cpu[r, :k].tolist(),
                finish_reason="stop" if stopped_cpu[r] else "length",
                logprobs=logps_cpu[r, :k].tolist() if logps_cpu is not None else None,
                forced=forced_cpu[r, :k].tolist() if forced_cpu is not None else [False] * k,
                thinking_tokens=int(think_cpu[r]),
                budget_hit=bool(hit_cpu[r]),
                prompt_length=lengths[r],
            )
        )
    return results
