"""Generation backends: one interface between the chat evaluation suites and whatever runs the model.

A suite hands a backend chats (message lists) and reads back text; it never sees token ids of a
prompt, so the same suite runs on our engine with our tokenizer, or on transformers or vLLM with a
real checkpoint's tokenizer (151k tokens) and the checkpoint's own chat template:

    samples = backend.generate(chats, enable_thinking=True, max_new_tokens=512, n=1,
                               sampling=THINKING_SAMPLING, seed=0, thinking_budget=None)
    samples[i][j].text           # sample j of chat i: the generated text, special tokens kept

The backend renders each chat with a generation prompt (`enable_thinking` goes to the template),
draws `n` samples per chat and returns one list of `Sample`s per chat, in order.

* `EngineBackend` ("ours"): our engine (`qwen3repro.generate`) on a `Qwen3` and our `Tokenizer`,
  prompts by `chat.render`. The tiny suites run through it with exactly the engine calls they made
  before this interface existed (same prompts, seeds, batch size and budget controller), so their
  results are unchanged.
* `TransformersBackend`: `AutoModelForCausalLM` + `AutoTokenizer`, prompts by the checkpoint's chat
  template (`apply_chat_template(..., enable_thinking=...)`).
* `VLLMBackend`: vLLM's offline `LLM`, imported only when chosen.

Sampling follows `SamplingParams` in every backend (presence penalty, temperature, top-k, top-p,
min-p, in that order), but each draws from its own random stream: only greedy decoding gives the same
tokens across backends.

The thinking budget (report §4.3). Our engine forces the stop-thinking text inside its decode loop
(`generate.ThinkingController`). transformers and vLLM have no such hook, so `TokenBackend` reaches
the same text in phases, as Qwen's documented client recipe does: outside a think block a row
generates until it opens one (`<think>` is a stop token there); inside, it generates until it has
thought `budget` tokens; a row still thinking then gets the forced text appended and generates its
answer with `<think>` banned (the controller's rule: a row is forced at most once and thinks no more
afterwards). The count runs over the whole completion, as the controller's does. For greedy decoding
both give the same tokens (the tests check it).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol, Sequence

import torch

from ..chat import EMPTY_THINK, TEMPLATE_STOP_THINKING, render
from ..generate import SamplingParams, ThinkingBudget, generate
from ..generate.budget import thinking_open
from ..models.errors import CheckpointError

__all__ = ["EngineBackend", "GenerationBackend", "Sample", "TokenBackend", "TransformersBackend", "VLLMBackend",
           "count_thinking_tokens", "require"]

Chat = Sequence[Mapping[str, Any]]
# The end of an assistant turn, and the document separator a base model may print instead.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class Sample:
    """One generated completion. `text` is the decoded completion with special tokens kept, up to
    and including the stop token that ended it (if one did); `thinking_tokens` counts the sampled
    (not forced) tokens inside the think block; `budget_hit` says the budget forced its text."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)
    thinking_tokens: int = 0
    budget_hit: bool = False
    forced: list[bool] = field(default_factory=list)


class GenerationBackend(Protocol):
    """What the chat suites need from a backend (see the module docstring)."""

    name: str

    def prompt_ids(self, messages: Chat, enable_thinking: bool = True) -> list[int]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def count_tokens(self, text: str) -> int: ...

    def generate(self, chats: Sequence[Chat], *, enable_thinking: bool = True, max_new_tokens: int, n: int = 1,
                 sampling: SamplingParams, seed: int, thinking_budget: int | None = None,
                 directive: str = TEMPLATE_STOP_THINKING) -> list[list[Sample]]: ...


def think_walk(ids: Sequence[int], forced: Sequence[bool] | None, start_id: int, end_id: int,
               inside: bool = False) -> tuple[bool, int]:
    """(whether the tokens end inside an open think block, how many sampled (not forced) tokens lay inside think
    blocks); `inside`: the prompt ends in an open block."""
    count = 0
    for tok, was_forced in zip(ids, forced or [False] * len(ids)):
        if tok == start_id:
            inside = True
        elif tok == end_id:
            inside = False
        elif inside and not was_forced:
            count += 1
    return inside, count


def count_thinking_tokens(ids: Sequence[int], forced: Sequence[bool] | None, start_id: int, end_id: int,
                          inside: bool = False) -> int:
    """Sampled (not forced) tokens inside think blocks; `inside`: the prompt ends in an open block."""
    return think_walk(ids, forced, start_id, end_id, inside)[1]


def _grouped(flat: list[Sample], n: int) -> list[list[Sample]]:
    return [flat[i:i + n] for i in range(0, len(flat), n)]


# ----------------------------------------------------------------------------- our engine
class EngineBackend:
    """Our engine on a `Qwen3`-like model and our `Tokenizer`; prompts rendered by `chat.render`.

    `max_batch_size` is the number of rows per engine batch: 64 is what the thinking suites always
    used (batching changes padding, and so the numbers, slightly)."""

    name = "ours"

    def __init__(self, model, tokenizer, *, max_batch_size: int = 64) -> None:
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size

    def prompt_ids(self, messages: Chat, enable_thinking: bool = True) -> list[int]:
        return self.tokenizer.encode(render(messages, add_generation_prompt=True, enable_thinking=enable_thinking))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def thinking_budget(self, budget: int, directive: str) -> ThinkingBudget:
        """The controller's setting: `directive` is forced at the budget, the empty block at budget 0."""
        base = ThinkingBudget.from_tokenizer(self.tokenizer, budget)
        return ThinkingBudget(budget=budget, think_start_id=base.think_start_id, think_end_id=base.think_end_id,
                              directive_ids=tuple(self.tokenizer.encode(directive)), empty_ids=base.empty_ids)

    def generate(self, chats: Sequence[Chat], *, enable_thinking: bool = True, max_new_tokens: int, n: int = 1,
                 sampling: SamplingParams, seed: int, thinking_budget: int | None = None,
                 directive: str = TEMPLATE_STOP_THINKING) -> list[list[Sample]]:
        if not chats:
            return []
        tok = self.tokenizer
        prompts = [self.prompt_ids(m, enable_thinking) for m in chats]
        flat = [p for p in prompts for _ in range(n)]
        budget = None if thinking_budget is None else self.thinking_budget(thinking_budget, directive)
        gens = generate(self.model, flat, sampling, max_new_tokens=max_new_tokens, tokenizer=tok, seed=seed,
                        thinking_budget=budget, max_batch_size=self.max_batch_size, pad_token_id=tok.pad_token_id)
        return _grouped([
            Sample(tok.decode(g.token_ids), list(g.token_ids), g.finish_reason,
                   count_thinking_tokens(g.token_ids, g.forced, tok.think_start_id, tok.think_end_id),
                   g.budget_hit, list(g.forced))
            for g in gens], n)


# ----------------------------------------------------------------------------- token backends
@dataclass
class _Row:
    """One sample being generated in phases (the thinking budget without an in-loop controller)."""

    prompt: list[int]
    open_at_start: bool
    ids: list[int] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    finish: str | None = None
    hit: bool = False

    def think_state(self, start_id: int, end_id: int) -> tuple[bool, int]:
        """(inside an open think block, sampled thinking tokens so far over the whole completion)."""
        return think_walk(self.ids, self.forced, start_id, end_id, self.open_at_start)


class TokenBackend:
    """Shared part of the backends that complete token-id prompts (`_complete`) and render chats
    with the checkpoint's own template (`render`): special-token ids, decoding, the sample layout
    and the thinking budget in phases (module docstring)."""

    name = "tokens"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer  # a transformers tokenizer
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>") + STOP_TOKENS}
        unknown = getattr(tokenizer, "unk_token_id", None)
        missing = [t for t, i in ids.items() if i is None or i == unknown]
        if missing:
            raise CheckpointError(f"the checkpoint's tokenizer lacks Qwen3's special tokens {missing}; the chat "
                                  "suites need them (think blocks and the end of a turn)")
        self.think_start_id, self.think_end_id = ids["<think>"], ids["</think>"]
        self.stop_ids = [ids[t] for t in STOP_TOKENS]
        self.pad_id = ids["<|endoftext|>"] if tokenizer.pad_token_id is None else tokenizer.pad_token_id
        if getattr(tokenizer, "chat_template", None) is None:
            raise CheckpointError("the checkpoint's tokenizer has no chat template (tokenizer_config.json "
                                  "chat_template or chat_template.jinja)")

    # -- text
    def render(self, messages: Chat, enable_thinking: bool = True) -> str:
        """The prompt as the checkpoint's chat template renders it, generation prompt included."""
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=enable_thinking)

    def prompt_ids(self, messages: Chat, enable_thinking: bool = True) -> list[int]:
        return self.encode(self.render(messages, enable_thinking))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    # -- generation
    def _complete(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams, seed: int, *,
                  ban_think: bool = False, stop_at_think: bool = False,
                  earlier: list[list[int]] | None = None) -> list[list[int]]:
        """Up to `max_new_tokens` generated ids per prompt, cut just after the first stop token
        (`<think>` too when `stop_at_think`); `ban_think`: `<think>` may not be generated. `earlier`:
        each row's tokens generated in earlier phases (the prompt's tail), which the presence penalty
        counts as generated."""
        raise NotImplementedError

    def _stops(self, stop_at_think: bool) -> list[int]:
        return self.stop_ids + ([self.think_start_id] if stop_at_think else [])

    def _cut(self, ids: Sequence[int], stops: Sequence[int]) -> list[int]:
        ids = list(ids)
        for i, t in enumerate(ids):
            if t in stops:
                return ids[:i + 1]
        return ids

    def generate(self, chats: Sequence[Chat], *, enable_thinking: bool = True, max_new_tokens: int, n: int = 1,
                 sampling: SamplingParams, seed: int, thinking_budget: int | None = None,
                 directive: str = TEMPLATE_STOP_THINKING) -> list[list[Sample]]:
        if not chats:
            return []
        prompts = [self.prompt_ids(m, enable_thinking) for m in chats]
        rows = [_Row(p, thinking_open(p, self.think_start_id, self.think_end_id)) for p in prompts for _ in range(n)]
        if thinking_budget is None:
            self._extend(rows, [max_new_tokens] * len(rows), sampling, seed)
        else:
            self._budgeted(rows, thinking_budget, directive, max_new_tokens, sampling, seed)
        samples = []
        for r in rows:
            finish = r.finish or ("stop" if r.ids and r.ids[-1] in self.stop_ids else "length")
            count = count_thinking_tokens(r.ids, r.forced, self.think_start_id, self.think_end_id, r.open_at_start)
            samples.append(Sample(self.decode(r.ids), r.ids, finish, count, r.hit, r.forced))
        return _grouped(samples, n)

    def _extend(self, rows: list[_Row], limits: list[int], sampling: SamplingParams, seed: int, *,
                ban_think: bool = False, stop_at_think: bool = False) -> None:
        """Generate up to each row's limit after what it has; one call, cut per row."""
        outs = self._complete([r.prompt + r.ids for r in rows], max(limits), sampling, seed, ban_think=ban_think,
                              stop_at_think=stop_at_think, earlier=[r.ids for r in rows])
        for r, out, limit in zip(rows, outs, limits):
            out = out[:limit]
            r.ids += out
            r.forced += [False] * len(out)
            if out and out[-1] in self.stop_ids:
                r.finish = "stop"

    def _budgeted(self, rows: list[_Row], budget: int, directive: str, max_new: int, sampling: SamplingParams,
                  seed: int) -> None:
        """Generate under a thinking budget in phases (module docstring)."""
        forced_ids = self.encode(EMPTY_THINK)[1:] if budget == 0 else self.encode(directive)
        if self.think_end_id not in forced_ids:
            raise ValueError(f"the forced text {directive!r} does not close the think block (no </think> token)")
        # Every phase adds a token to each unfinished row, or forces the text (at most once per row).
        for phase in range(2 * max_new + 2):
            thinking, outside, after_budget = [], [], []
            for r in rows:
                room = max_new - len(r.ids)
                if r.finish is not None:
                    continue
                if room <= 0:
                    r.finish = "length"
                    continue
                inside, count = r.think_state(self.think_start_id, self.think_end_id)
                if r.hit:
                    after_budget.append((r, room))
                elif inside and count >= budget:  # the budget is spent: force the text now
                    r.ids += forced_ids[:room]
                    r.forced += [True] * min(room, len(forced_ids))
                    r.hit = True
                elif inside:
                    thinking.append((r, min(room, budget - count)))
                else:  # until it opens a think block (which ends the phase) or ends its reply
                    outside.append((r, room))
            if all(r.finish is not None for r in rows):
                return
            groups = ((thinking, {}), (outside, {"stop_at_think": True}), (after_budget, {"ban_think": True}))
            for j, (group, how) in enumerate(groups):
                if group:
                    self._extend([r for r, _ in group], [lim for _, lim in group], sampling, seed + 3 * phase + j,
                                 **how)
        raise RuntimeError("thinking-budget phases did not finish")  # unreachable: each phase makes progress


# ----------------------------------------------------------------------------- transformers
class _PresencePenalty:
    """Subtract `penalty` from the logits of every token already generated in the row (vLLM's and
    our engine's presence penalty; transformers has only the multiplicative repetition penalty).
    Prompts are left-padded to `prompt_width`, so the generated tokens are the columns after it, plus
    `earlier` [B, V]: the tokens a row generated in earlier phases (now part of its prompt)."""

    def __init__(self, penalty: float, prompt_width: int, earlier: torch.Tensor) -> None:
        self.penalty, self.prompt_width, self.earlier = penalty, prompt_width, earlier

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen = self.earlier.clone().scatter_(1, input_ids[:, self.prompt_width:], True)
        return scores - self.penalty * seen.to(scores.dtype)


class _VocabLimit:
    """Never sample the embedding's padded rows (151,936 rows for 151,669 tokens in Qwen3), as our
    engine does not."""

    def __init__(self, n_tokens: int) -> None:
        self.n_tokens = n_tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] > self.n_tokens:
            scores = scores.clone()
            scores[:, self.n_tokens:] = float("-inf")
        return scores


def require(package: str, what: str) -> None:
    """A clear error naming how to install an optional package (transformers: the dev / full extras; vLLM: a
    separate GPU install) before a backend that needs it imports it. The backends import them in their
    constructors, so the tiny scale never loads them."""
    if importlib.util.find_spec(package) is None:
        how = "pip install -e '.[full]'" if package in ("transformers", "huggingface_hub") else f"pip install {package}"
        raise ImportError(f"{what} needs {package}, which is not installed ({how})")


class TransformersBackend(TokenBackend):
    """`AutoModelForCausalLM` + `AutoTokenizer` from a checkpoint directory (or hub id); prompts by the
    checkpoint's chat template; `batch_size` rows per `generate` call (left-padded)."""

    name = "transformers"

    def __init__(self, checkpoint: str | os.PathLike, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 16) -> None:
        require("transformers", "the transformers backend")
        import transformers
        from transformers.utils import logging as transformers_logging

        self.transformers = transformers
        transformers_logging.disable_progress_bar()  # one bar per loaded shard would flood an evaluation's log
        tokenizer = self.transformers.AutoTokenizer.from_pretrained(str(checkpoint))
        super().__init__(tokenizer)
        self.model = self.transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype)
        self.model = self.model.to(device).eval()
        self.device, self.batch_size = torch.device(device), batch_size
        self.n_tokens = len(tokenizer)

    def _generation_config(self, max_new_tokens: int, sampling: SamplingParams, stops: list[int], ban_think: bool):
        # Every sampling field is set explicitly: fields left unset would be filled in from the
        # checkpoint's generation_config.json (the released models ship top_k 20, top_p 0.95, ...).
        if sampling.greedy:  # fields greedy search ignores, at transformers' defaults so it does not warn
            fields = dict(do_sample=False, temperature=1.0, top_k=50, top_p=1.0)
        else:
            fields = dict(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                          min_p=sampling.min_p)
        return self.transformers.GenerationConfig(
            max_new_tokens=max_new_tokens, num_beams=1, repetition_penalty=1.0, eos_token_id=stops,
            pad_token_id=self.pad_id, bad_words_ids=[[self.think_start_id]] if ban_think else None, **fields,
        )

    @torch.inference_mode()
    def _complete(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams, seed: int, *,
                  ban_think: bool = False, stop_at_think: bool = False,
                  earlier: list[list[int]] | None = None) -> list[list[int]]:
        if max_new_tokens <= 0:
            return [[] for _ in prompts]
        stops = self._stops(stop_at_think)
        config = self._generation_config(max_new_tokens, sampling, stops, ban_think)
        torch.manual_seed(seed)  # transformers samples from torch's global generator
        outs: list[list[int]] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            processors = self.transformers.LogitsProcessorList([_VocabLimit(self.n_tokens)])
            if sampling.presence_penalty:
                seen = torch.zeros((len(chunk), self.model.config.vocab_size), dtype=torch.bool)
                for i, ids_before in enumerate((earlier or [[]] * len(prompts))[start:start + self.batch_size]):
                    seen[i, ids_before] = True
                processors.insert(0, _PresencePenalty(sampling.presence_penalty, width, seen.to(self.device)))
            seqs = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                       generation_config=config, logits_processor=processors)
            outs.extend(self._cut(row[width:].tolist(), stops) for row in seqs)
        return outs

    @contextlib.contextmanager
    def rope_scaling(self, scaling: Mapping[str, Any] | None, max_position_embeddings: int) -> Iterator[None]:
        """Run the block with the model's RoPE rebuilt for `scaling` (e.g. YaRN), then restore it.

        Only the rotary-embedding module is rebuilt from the changed config (transformers computes
        YaRN's frequencies and attention factor there), so no second copy of the weights is loaded."""
        if scaling is None:
            yield
            return
        inner = getattr(self.model, "model", None)
        rotary = getattr(inner, "rotary_emb", None)
        if rotary is None:
            raise NotImplementedError(f"{type(self.model).__name__} has no model.rotary_emb to rebuild for YaRN")
        config = copy.deepcopy(self.model.config)
        theta = _rope_theta(config)
        if hasattr(config, "rope_parameters"):  # transformers 5 keeps every RoPE setting there
            config.rope_parameters = {**dict(scaling), "rope_theta": theta}
        else:
            config.rope_scaling = dict(scaling)
        config.max_position_embeddings = max(config.max_position_embeddings, max_position_embeddings)
        scaled = type(rotary)(config=config).to(self.device)
        inner.rotary_emb = scaled
        try:
            yield
        finally:
            inner.rotary_emb = rotary

    def greedy_continue(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of raw token prompts (no chat template): the long-context retrieval."""
        return self._complete(prompts, max_new_tokens, SamplingParams(temperature=0.0), 0)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


# ----------------------------------------------------------------------------- vLLM
class VLLMBackend(TokenBackend):
    """vLLM's offline engine (`vllm.LLM`) on the checkpoint; prompts by the checkpoint's chat template
    through vLLM's tokenizer. Each row gets its own seed (seed + row), so `n` samples of one chat differ."""

    name = "vllm"

    def __init__(self, checkpoint: str | os.PathLike, *, dtype: str = "auto", seed: int = 0,
                 max_model_len: int | None = None) -> None:
        require("vllm", "the vLLM backend")
        import vllm

        self.vllm = vllm
        self.llm = self.vllm.LLM(model=str(checkpoint), dtype=dtype, seed=seed, max_model_len=max_model_len)
        super().__init__(self.llm.get_tokenizer())

    def _complete(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams, seed: int, *,
                  ban_think: bool = False, stop_at_think: bool = False,
                  earlier: list[list[int]] | None = None) -> list[list[int]]:
        # vLLM's presence penalty sees only this call's tokens: under a thinking budget, the tokens of
        # earlier phases (`earlier`) escape it. The suites sample thinking without a penalty.
        if max_new_tokens <= 0:
            return [[] for _ in prompts]
        stops = self._stops(stop_at_think)
        params = [self.vllm.SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or -1, min_p=sampling.min_p,
            presence_penalty=sampling.presence_penalty, max_tokens=max_new_tokens, seed=seed + i,
            stop_token_ids=stops, skip_special_tokens=False, detokenize=False,
            bad_words=["<think>"] if ban_think else None,
        ) for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        completions = []
        for o in outs:
            ids, stopped_by = list(o.outputs[0].token_ids), o.outputs[0].stop_reason
            # The token that stopped a row is its stop_reason; keep it in the ids, as the other backends do.
            if isinstance(stopped_by, int) and (not ids or ids[-1] != stopped_by):
                ids.append(stopped_by)
            completions.append(self._cut(ids, stops))
        return completions
