"""Thinking-mode fusion (Qwen3 report §4.3): the third post-training stage.

    run(FusionConfig.from_dict(recipe ⊕ scale), parent=<reasoning-RL checkpoint>, ctx) -> <out_dir>

Continual SFT of the reasoning-RL model on one set that mixes thinking and non-thinking data, so
one model does both and switches on `/think` and `/no_think`. What one run does:

1. **Thinking data by rejection sampling the parent model itself** (§4.3: "the thinking data is
   generated via rejection sampling on Stage 1 queries using the Stage 2 model itself"): cold-start
   style queries (task items of the training partition, `data.tasks`), `samples_per_query` samples
   each in thinking mode at the report's thinking sampling settings; a sample is kept only when it
   is well formed (a non-empty think block, closed, a non-empty answer, ended by `<|im_end|>`) and
   verified correct by the query's verifier; at most `keep_per_query` per query. The acceptance
   rate is reported. When fewer than `min_thinking` samples pass (a weak parent, e.g. a micro
   wiring run), the set is topped up with reference traces (`data.tasks`, verified step by step),
   counted separately so the report shows how much of the thinking data the model wrote itself.
2. **Non-thinking data**: direct answers with the empty think block (`<think>\\n\\n</think>\\n\\n`,
   Table 9) across task kinds (the task families, translation, facts about the world's people) and
   languages, with translation up-weighted for the rarest language (§4.3: "translation tasks are
   up-weighted"; `data.world`'s last language is the rare one).
3. **Flags**: `/think` and `/no_think` in the user turn or in a system message; some thinking
   samples carry no flag (thinking is the default); multi-turn chats (2–3 turns) with flags
   inserted at random, each assistant turn following the last flag seen before it
   (`chat.wants_thinking`). Earlier turns are context only (`"train": False`): the template drops
   their reasoning, and training on a bare answer after a fresh query would teach the model to
   skip the think block.
4. **Budget examples** (a share `budget_share` of the thinking samples): the think block cut after
   a random number of its tokens, then the report's stop-thinking sentence
   (`chat.STOP_THINKING_DIRECTIVE`), `</think>` and the answer. Without such data nothing teaches
   the model to answer from a cut trace, so a budget can only help where the whole trace fits in
   it; trained on the reference answer, the model learns its best guess from a partial trace (the
   digits already worked out, the rest estimated as in non-thinking mode).
   The chat template renders `</think>` followed by "\\n\\n" (it cannot express the "." the report
   prints after `</think>`), which is also the official client recipe's form of the directive
   (the Qwen docs page "Thinking budget", docs/source/getting_started/thinking_budget.md in
   QwenLM/Qwen3); `evals.thinking` forces the same text.
5. `fusion_data.jsonl` ({"messages", "category", "meta"} per line) and `fusion_report.json`
   (counts per category, acceptance rate, language shares) are written before training; a rerun
   with the same data settings and parent reuses them.
6. **Training**: `stages.sft.fine_tune` — the same trainer and assistant-only loss as the cold
   start — from the parent checkpoint; the stage writes its `lineage.json`
   last with this config's hash so the pipeline sees a complete fusion stage.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Sequence

import torch

from ..chat import (BUDGET_SENTENCE, EMPTY_THINK, TEMPLATE_STOP_THINKING, parse, render, tokenize_conversation,
                    tools_system_content,
                    wants_thinking)
from ..config import ConfigError, config_hash
from ..config_fields import AtLeast, NonNegative, Positive, checked_fields
from ..data import general_tasks, tasks
from ..data.judging import judging_conversations
from ..data.synthetic import frame_uid
from ..data.world import PERSON_ATTRIBUTES, RARE_LANGUAGE, World, build_world
from ..generate import SamplingParams, generate
from ..lineage import make_lineage, read_lineage, write_lineage
from ..models.qwen3 import Qwen3
from ..rewards import REWARDS
from ..tokenizer import Tokenizer
from ..files import write_json_atomic
from .common import StageContext
from .sft import SFTConfig, SFTTable, fine_tune

DATA_FILE = "fusion_data.jsonl"
REPORT_FILE = "fusion_report.json"

# The soft switches a user or system message carries (Qwen3 TR §4.3, Table 9).
THINK, NO_THINK = "/think", "/no_think"

# Conversation categories of the fusion set (fusion_report.json counts each).
CATEGORIES = ("think_user_flag", "think_system_flag", "think_unflagged", "no_think_user_flag",
              "no_think_system_flag", "multi_turn", "budget", "general", "judging")
NON_THINKING_KINDS = ("task", "translation", "fact")
TOPUPS = ("reference", "none")

# Table 9 of the report (the fusion SFT formats): a thinking turn is "<think>\n{thinking}\n</think>\n\n
# {response}", a non-thinking turn "<think>\n\n</think>\n\n{response}" (= chat.EMPTY_THINK + response).


@dataclass(frozen=True)
class FusionConfig:
    """One fusion run: data sizes and mix (recipes/fusion.toml ⊕ the scale's [stages.fusion])."""

    name: str = "fusion"
    # ---- thinking data: rejection sampling of the parent (reasoning-RL) model
    families: tuple[str, ...] = ()
    """Task families of the queries (empty: all)."""
    n_queries: Positive = 128
    """Training-partition queries sampled from."""
    samples_per_query: Positive = 4
    keep_per_query: Positive = 1
    """Verified responses kept per query (distinct texts)."""
    max_new_tokens: Positive = 320
    """Longest sampled response (the longest reference trace of the families is ~260 tokens)."""
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: NonNegative = 20
    """Sampling of the thinking data: the report's thinking-mode settings (T 0.6, top-p 0.95, top-k 20)."""
    min_thinking: NonNegative = 0
    """Top up to this many thinking samples when rejection sampling gives fewer (see `topup`)."""
    topup: str = "reference"
    """'reference' (verified reference traces of `data.tasks`) or 'none'."""
    # ---- non-thinking data
    n_non_thinking: NonNegative = 128
    non_thinking_mix: Mapping[str, float] = field(
        default_factory=lambda: {"task": 0.5, "translation": 0.3, "fact": 0.2})
    """Shares of the non-thinking kinds (task families / translation / facts)."""
    rare_translation_share: float = 0.4
    """Share of translation pairs with the rare language on one side (its pre-training weight is 5%)."""
    n_general: NonNegative = 0
    """Reference conversations of the general tasks (`data.general_tasks.demonstrations`: instruction
    following, formats, tool use, retrieval, ...), besides the `n_non_thinking` samples."""
    general_weights: Mapping[str, float] = field(default_factory=dict)
    """Their task weights (empty: every task's default weight)."""
    general_thinking_share: float = 0.0
    """Share of them answered in thinking mode (`general_tasks.thinking_demonstration`), flagged as the
    thinking samples are (`/think` in the user or system turn, or no flag); the rest answer with `/no_think`.
    General RL asks for thinking on most of its prompts, and the report's fusion data holds both modes of
    the general tasks; without thinking examples its mode gate zeroes most thinking-mode rewards."""
    n_judging: NonNegative = 0
    """Grading conversations (`data.judging`): the judge's prompt, a right or wrong response, the verdict
    with its `Score:` line, so that this checkpoint can serve as the judge of general RL at CPU scales."""
    # ---- flags and formats
    unflagged_share: float = 0.3
    """Single-turn thinking samples without any flag (thinking is the default)."""
    system_flag_share: float = 0.4
    """Flagged single-turn samples whose flag is in a system message rather than the user turn."""
    multi_turn_share: float = 0.5
    """Multi-turn chats, as a share of the single-turn conversations."""
    max_turns: Annotated[int, AtLeast(2)] = 3
    """Multi-turn chats have 2..max_turns user turns."""
    flag_rate: float = 0.6
    """Probability that a multi-turn user turn carries a flag (else it inherits the last one)."""
    budget_share: float = 0.2
    """Budget examples, as a share of the thinking samples."""
    budget_keep: tuple[float, float] = (0.1, 0.9)
    """Share of the think block's tokens kept in a budget example (uniform in this range)."""
    # ---- training
    sft: SFTTable = field(default_factory=dict)
    """`stages.sft.SFTConfig` fields except name and data (seq_len, batch_size, steps or epochs, ...)."""
    seed: int = 0
    world_seed: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "families", tuple(self.families))
        object.__setattr__(self, "budget_keep", tuple(float(x) for x in self.budget_keep))
        unknown = set(self.families) - set(tasks.FAMILIES)
        if unknown:
            raise ConfigError(f"{self.name}: unknown task families {sorted(unknown)}; known: {list(tasks.FAMILIES)}")
        for name in ("n_queries", "samples_per_query", "keep_per_query", "max_new_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{self.name}: {name} must be an integer >= 1, got {v!r}")
        for name in ("n_non_thinking", "min_thinking"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{self.name}: {name} must be an integer >= 0, got {v!r}")
        if not isinstance(self.max_turns, int) or self.max_turns < 2:
            raise ConfigError(f"{self.name}: max_turns must be an integer >= 2")
        unknown_tasks = sorted(set(self.general_weights) - set(general_tasks.GENERAL_TASKS))
        if unknown_tasks:
            raise ConfigError(f"{self.name}: unknown general_weights tasks {unknown_tasks}")
        for name in ("rare_translation_share", "unflagged_share", "system_flag_share", "flag_rate",
                     "budget_share", "general_thinking_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{self.name}: {name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.multi_turn_share < 0:
            raise ConfigError(f"{self.name}: multi_turn_share must be >= 0")
        lo, hi = self.budget_keep if len(self.budget_keep) == 2 else (-1.0, -1.0)
        if not 0.0 < lo <= hi < 1.0:
            raise ConfigError(f"{self.name}: budget_keep must be [lo, hi] with 0 < lo <= hi < 1")
        if self.topup not in TOPUPS:
            raise ConfigError(f"{self.name}: topup must be one of {TOPUPS}, got {self.topup!r}")
        mix = dict(self.non_thinking_mix)
        if set(mix) - set(NON_THINKING_KINDS) or any(v < 0 for v in mix.values()) or not sum(mix.values()) > 0:
            raise ConfigError(f"{self.name}: non_thinking_mix needs non-negative shares of {NON_THINKING_KINDS}")
        if self.temperature <= 0:
            raise ConfigError(f"{self.name}: temperature must be > 0 (rejection sampling needs diverse samples)")
        SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        self.sft_config()  # validate the training table now, naming unknown keys

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "FusionConfig") -> "FusionConfig":
        return cls(**checked_fields(cls, d, where))

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    def sft_config(self) -> SFTConfig:
        return SFTConfig.for_stage(self.name, self.sft, data=DATA_FILE, seed=self.seed)

    def data_key(self) -> dict[str, Any]:
        """The fields that decide the data set (everything but the training table and description)."""
        d = asdict(self)
        for k in ("sft", "description", "name"):
            d.pop(k)
        return d


# ----------------------------------------------------------------------------- thinking samples
@dataclass(frozen=True)
class ThinkingSample:
    """A verified thinking response to a task item: its reasoning and final answer."""

    item: tasks.TaskItem
    reasoning: str
    answer: str
    source: str
    """'model' (rejection-sampled from the parent) or 'reference' (the item's reference trace)."""

    @property
    def content(self) -> str:
        return f"<think>\n{self.reasoning}\n</think>\n\n{self.answer}"


def accept(item: tasks.TaskItem, text: str, finish_reason: str = "stop",
           score_fn: Callable[[tasks.TaskItem, str], float] | None = None) -> tuple[bool, str]:
    """Whether a sampled response is kept as thinking data, and why not.

    Kept: ended by the stop token, exactly one closed think block with non-empty reasoning, a
    non-empty answer, and a correct answer by the item's verifier (the "task" reward)."""
    if finish_reason != "stop":
        return False, "cut_by_length"
    body = text.split("<|im_end|>")[0]
    if not body.startswith("<think>") or body.count("<think>") != 1 or body.count("</think>") != 1:
        return False, "malformed_think_block"
    parsed = parse(body)
    if not parsed["reasoning_content"].strip():
        return False, "empty_reasoning"
    if not parsed["content"].strip():
        return False, "empty_answer"
    score = score_fn(item, body) if score_fn is not None else REWARDS["task"](body, item=item).score
    if not score or score < 0.5:
        return False, "wrong_answer"
    return True, "accepted"


def sample_queries(cfg: FusionConfig) -> list[tasks.TaskItem]:
    """`n_queries` distinct training-partition items (cold-start-style queries), seeded."""
    rng = random.Random(f"fusion-queries|{cfg.seed}")
    families = cfg.families or tuple(tasks.FAMILIES)
    seen: set[str] = set()
    out: list[tasks.TaskItem] = []
    for _ in range(100 * cfg.n_queries):
        if len(out) == cfg.n_queries:
            break
        item = tasks.sample_item(rng, heldout=False, families=families)
        if item.uid not in seen:
            seen.add(item.uid)
            out.append(item)
    return out


@torch.no_grad()
def rejection_sample(model: Qwen3, tokenizer: Tokenizer, items: Sequence[tasks.TaskItem], *, k: int, keep: int,
                     max_new_tokens: int, sampling: SamplingParams, seed: int,
                     score_fn: Callable[[tasks.TaskItem, str], float] | None = None,
                     batch_size: int = 64) -> tuple[list[ThinkingSample], dict[str, Any]]:
    """k thinking-mode samples per item from `model`; returns the accepted samples (at most `keep`
    distinct ones per item) and counts: samples, accepted, rejected by reason, acceptance rate."""
    model.eval()
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(int(seed))
    prompts = [tokenizer.encode(render([{"role": "user", "content": it.question}], add_generation_prompt=True))
               for it in items]
    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(k)]
    reasons: dict[str, int] = {}
    per_item: dict[int, list[ThinkingSample]] = {}
    texts_seen: dict[int, set[str]] = {}
    n_accepted = 0
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        gens = generate(model, [p for _, p in chunk], sampling, max_new_tokens=max_new_tokens, tokenizer=tokenizer,
                        generator=generator, pad_token_id=tokenizer.pad_token_id)
        for (i, _), g in zip(chunk, gens):
            text = tokenizer.decode(g.token_ids)
            ok, why = accept(items[i], text, g.finish_reason, score_fn)
            reasons[why] = reasons.get(why, 0) + 1
            if not ok:
                continue
            n_accepted += 1
            parsed = parse(text)
            sample = ThinkingSample(items[i], parsed["reasoning_content"], parsed["content"].strip(), "model")
            if sample.content not in texts_seen.setdefault(i, set()) and len(per_item.get(i, [])) < keep:
                texts_seen[i].add(sample.content)
                per_item.setdefault(i, []).append(sample)
    kept = [s for i in sorted(per_item) for s in per_item[i]]
    n = len(flat)
    stats = {"queries": len(items), "samples": n, "accepted": n_accepted,
             "acceptance_rate": n_accepted / n if n else None,
             "queries_with_a_correct_sample": len(per_item), "kept": len(kept),
             "rejected_by": {k_: v for k_, v in sorted(reasons.items()) if k_ != "accepted"}}
    return kept, stats


def reference_samples(items: Sequence[tasks.TaskItem]) -> list[ThinkingSample]:
    """Thinking samples from reference traces, each checked step by step (`tasks.verify_trace`)."""
    return [ThinkingSample(it, tasks.render_trace(it), it.answer, "reference") for it in items if tasks.verify_trace(it)]


# ----------------------------------------------------------------------------- non-thinking samples
@dataclass(frozen=True)
class DirectSample:
    """A question with its direct answer (non-thinking), and what kind of data it is."""

    question: str
    answer: str
    kind: str
    """'task' | 'translation' | 'fact'."""
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def content(self) -> str:
        return EMPTY_THINK + self.answer


def _translation(world: World, rng: random.Random, rare_share: float) -> DirectSample:
    """A training-partition translation pair; with probability `rare_share` the rare language is
    one side (source or target at random), else two other languages drawn by their weights."""
    others = [l for l in world.languages if l.name != RARE_LANGUAGE]
    weights = [l.weight for l in others]
    if rng.random() < rare_share:
        other = rng.choices(others, weights=weights)[0].name
        src, tgt = (RARE_LANGUAGE, other) if rng.random() < 0.5 else (other, RARE_LANGUAGE)
    else:
        src = rng.choices(others, weights=weights)[0].name
        rest = [l for l in others if l.name != src]
        tgt = rng.choices(rest, weights=[l.weight for l in rest])[0].name
    while True:  # meanings of the evaluation partition are never trained on
        frame = world.random_frame(rng)
        if not tasks.is_heldout(frame_uid(frame)):
            break
    return DirectSample(f"Translate from {src} to {tgt}: {world.render(src, frame)}", world.render(tgt, frame),
                        "translation", {"src": src, "tgt": tgt})


def _fact(world: World, rng: random.Random) -> DirectSample:
    lang = rng.choices(world.languages, weights=world.language_weights)[0].name
    person = rng.choice(world.people)
    attr = rng.choice(PERSON_ATTRIBUTES)
    return DirectSample(f"In {lang}, state the {attr} of {person.name}.", world.render_fact(lang, person, attr),
                        "fact", {"lang": lang})


def direct_samples(cfg: FusionConfig, n: int, rng: random.Random) -> list[DirectSample]:
    """`n` non-thinking samples drawn by `non_thinking_mix`."""
    world = build_world(cfg.world_seed)
    kinds = [k for k in NON_THINKING_KINDS if cfg.non_thinking_mix.get(k, 0) > 0]
    weights = [cfg.non_thinking_mix[k] for k in kinds]
    families = cfg.families or tuple(tasks.FAMILIES)
    out = []
    for _ in range(n):
        kind = rng.choices(kinds, weights=weights)[0]
        if kind == "task":
            it = tasks.sample_item(rng, heldout=False, families=families)
            out.append(DirectSample(it.question, it.answer, "task", {"family": it.family,
                                                                     "difficulty": it.difficulty, "uid": it.uid}))
        elif kind == "translation":
            out.append(_translation(world, rng, cfg.rare_translation_share))
        else:
            out.append(_fact(world, rng))
    return out


def general_records(cfg: FusionConfig, n: int) -> list[dict[str, Any]]:
    """`n` reference conversations of the general tasks (training partition) and `cfg.n_judging` grading
    conversations (`data.judging`), as fusion records. A tool-use conversation opens with the system turn
    that offers its tools (`chat.tools_system_content`), so the SFT data renders exactly as the chat the
    general-RL stage prompts with."""
    if n == 0 and cfg.n_judging == 0:
        return []
    world = build_world(cfg.world_seed)
    env = general_tasks.tool_environment(world)  # the environment the demonstrations' tool results come from
    weights = dict(cfg.general_weights) or general_tasks.default_weights()
    rng = random.Random(f"fusion-general-modes|{cfg.seed}")
    records = []
    for name, query, messages in general_tasks.demonstrations(weights, n, seed=cfg.seed, world=world):
        system, mode = None, "no_think"
        if "thinking" not in query.reference and rng.random() < cfg.general_thinking_share:
            messages = general_tasks.thinking_demonstration(query, messages)
            mode = "unflagged"
            if rng.random() >= cfg.unflagged_share:
                if rng.random() < cfg.system_flag_share:
                    system, mode = THINK, "think_system_flag"
                else:
                    messages = [{**messages[0], "content": _flagged(messages[0]["content"], THINK)}, *messages[1:]]
                    mode = "think_user_flag"
        if query.tools:
            system = tools_system_content(env.schemas(list(query.tools)), system=system)
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        records.append({"messages": messages, "category": "general",
                        "meta": {"kind": "general", "task": name, "mode": mode}})
    records += [{**r, "category": "judging"} for r in judging_conversations(cfg.n_judging, seed=cfg.seed, world=world)]
    return records


# ----------------------------------------------------------------------------- conversations
def _flagged(question: str, flag: str) -> str:
    return f"{question} {flag}"


def _single_turn(question: str, content: str, flag: str | None, in_system: bool) -> list[dict]:
    if flag is None:
        return [{"role": "user", "content": question}, {"role": "assistant", "content": content}]
    if in_system:
        return [{"role": "system", "content": flag}, {"role": "user", "content": question},
                {"role": "assistant", "content": content}]
    return [{"role": "user", "content": _flagged(question, flag)}, {"role": "assistant", "content": content}]


def fusion_conversation(messages: Sequence[Mapping[str, Any]], mode: str, rng: random.Random, *,
                        unflagged_share: float, system_flag_share: float) -> tuple[list[dict], str]:
    """One conversation of the fusion set in `mode` ("think" or "no_think"), flagged as this stage flags its
    single-turn samples; returns (messages, category).

    A thinking conversation carries no flag with probability `unflagged_share` (thinking is the default), else
    `/think`; a non-thinking one always `/no_think`. The flag goes in a system message with probability
    `system_flag_share` (at the end of the chat's own system message when it opens with one), else at the end of
    the last user query. Non-thinking assistant turns get the empty think block (Table 9) when they have none.
    Assistant turns before the last user query are context only (`"train": False`, as in `multi_turn`: the
    template drops their reasoning). The full-scale SFT shards (`nanotron.sft_data`) flag real conversations
    with it, so both scales build fusion data alike."""
    if mode not in ("think", "no_think"):
        raise ValueError(f"mode must be 'think' or 'no_think', got {mode!r}")
    messages = [dict(m) for m in messages]
    last_query = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        if i < last_query:
            m["train"] = False
        if mode == "no_think" and "</think>" not in (m.get("content") or ""):
            m["content"] = EMPTY_THINK + (m.get("content") or "")
    if mode == "think" and rng.random() < unflagged_share:
        return messages, "think_unflagged"
    flag = THINK if mode == "think" else NO_THINK
    in_system = rng.random() < system_flag_share
    if in_system and messages and messages[0].get("role") == "system":
        messages[0]["content"] = _flagged(messages[0].get("content") or "", flag)
    elif in_system:
        messages.insert(0, {"role": "system", "content": flag})
    elif last_query >= 0:
        messages[last_query]["content"] = _flagged(messages[last_query].get("content") or "", flag)
    else:
        raise ValueError("a fusion conversation needs a user message to carry its flag")
    return messages, f"{mode}_{'system' if in_system else 'user'}_flag"


def budget_content(sample: ThinkingSample, tokenizer: Tokenizer, rng: random.Random,
                   keep: tuple[float, float]) -> tuple[str, int, int]:
    """A budget example's assistant turn: the first j tokens of the reasoning (j a random share
    in `keep` of its n tokens), the stop-thinking sentence, `</think>`, the answer. Returns
    (content, j, n)."""
    ids = tokenizer.encode(sample.reasoning)
    n = len(ids)
    j = max(1, min(n - 1, round(rng.uniform(*keep) * n)))
    partial = tokenizer.decode(ids[:j]).rstrip("\n")
    return f"<think>\n{partial}{TEMPLATE_STOP_THINKING}{sample.answer}", j, n


def multi_turn(rng: random.Random, thinking: Sequence[ThinkingSample], direct: Sequence[DirectSample],
               max_turns: int, flag_rate: float, system_flag_share: float) -> tuple[list[dict], dict[str, Any]]:
    """A 2..max_turns chat with flags inserted at random (an optional system flag, each user turn
    flagged with probability `flag_rate`); every assistant turn follows the last flag seen before
    it, thinking by default. Earlier assistant turns are context only ("train": False)."""
    messages: list[dict] = []
    flags: list[str] = []
    if rng.random() < system_flag_share:
        flag = rng.choice((THINK, NO_THINK))
        messages.append({"role": "system", "content": flag})
        flags.append(f"system:{flag}")
    n_turns = rng.randint(2, max_turns)
    modes: list[str] = []
    asked: set[str] = set()
    for turn in range(n_turns):
        flag = rng.choice((THINK, NO_THINK)) if rng.random() < flag_rate else None
        thinks = wants_thinking(messages + [{"role": "user", "content": flag or ""}])
        if thinks and not thinking:  # no thinking data at all: make this turn a flagged non-thinking one
            flag, thinks = NO_THINK, False
        flags.append(f"user:{flag or '-'}")
        for _ in range(8):  # a fresh question for every turn (when the pools allow it)
            if thinks:
                s = rng.choice(thinking)
                question, content = s.item.question, s.content
            else:
                d = rng.choice(direct)
                question, content = d.question, d.content
            if question not in asked:
                break
        asked.add(question)
        messages.append({"role": "user", "content": _flagged(question, flag) if flag else question})
        assistant = {"role": "assistant", "content": content}
        if turn < n_turns - 1:
            assistant["train"] = False
        messages.append(assistant)
        modes.append("think" if thinks else "no_think")
    return messages, {"flags": flags, "modes": modes}


def build_conversations(cfg: FusionConfig, thinking: Sequence[ThinkingSample], direct: Sequence[DirectSample],
                        tokenizer: Tokenizer, rng: random.Random,
                        general: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """The fusion set as records {"messages", "category", "meta"}, shuffled (seeded); `general` are records
    of `general_records`, added as they are."""
    records: list[dict[str, Any]] = []
    shares = {"unflagged_share": cfg.unflagged_share, "system_flag_share": cfg.system_flag_share}
    for s in thinking:
        meta = {"source": s.source, "family": s.item.family, "difficulty": s.item.difficulty, "uid": s.item.uid}
        messages, category = fusion_conversation(_single_turn(s.item.question, s.content, None, False), "think",
                                                 rng, **shares)
        records.append({"messages": messages, "category": category, "meta": meta})
    for d in direct:
        messages, category = fusion_conversation(_single_turn(d.question, d.content, None, False), "no_think",
                                                 rng, **shares)
        records.append({"messages": messages, "category": category, "meta": {"kind": d.kind, **d.meta}})
    n_budget = round(cfg.budget_share * len(thinking))
    for s in rng.sample(list(thinking), min(n_budget, len(thinking))):
        if len(tokenizer.encode(s.reasoning)) < 2:
            continue
        content, j, n = budget_content(s, tokenizer, rng, cfg.budget_keep)
        flag = None if rng.random() < cfg.unflagged_share else THINK
        records.append({"messages": _single_turn(s.item.question, content, flag, False), "category": "budget",
                        "meta": {"source": s.source, "family": s.item.family, "kept_tokens": j,
                                 "trace_tokens": n, "uid": s.item.uid}})
    n_single = len(records)
    if direct:
        for _ in range(round(cfg.multi_turn_share * n_single)):
            messages, meta = multi_turn(rng, thinking, direct, cfg.max_turns, cfg.flag_rate, cfg.system_flag_share)
            records.append({"messages": messages, "category": "multi_turn", "meta": meta})
    records += general
    rng.shuffle(records)
    return records


def data_report(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer | None = None,
                seq_len: int | None = None) -> dict[str, Any]:
    """Counts per category, non-thinking kinds, translation language shares (rare vs pre-training)."""
    by_cat = {c: 0 for c in CATEGORIES}
    kinds = {k: 0 for k in NON_THINKING_KINDS}
    n_translation = n_rare = 0
    turns_think = turns_no_think = 0
    for r in records:
        by_cat[r["category"]] += 1
        if r["category"].startswith("no_think"):
            kinds[r["meta"]["kind"]] += 1
            if r["meta"]["kind"] == "translation":
                n_translation += 1
                n_rare += RARE_LANGUAGE in (r["meta"]["src"], r["meta"]["tgt"])
        for m in r["messages"]:
            if m["role"] == "assistant":
                if parse(m["content"])["reasoning_content"].strip():
                    turns_think += 1
                else:
                    turns_no_think += 1
    world = build_world(0)
    out: dict[str, Any] = {
        "conversations": len(records), "by_category": by_cat, "non_thinking_kinds": kinds,
        "assistant_turns": {"thinking": turns_think, "non_thinking": turns_no_think},
        "translation": {"n": n_translation, "rare_language": RARE_LANGUAGE,
                        "rare_share": n_rare / n_translation if n_translation else None,
                        "rare_pretraining_weight": dict(zip(world.language_names, world.language_weights))[RARE_LANGUAGE]},
    }
    if tokenizer is not None and seq_len is not None:
        lengths = [len(tokenize_conversation(tokenizer, r["messages"])[0]) for r in records]
        out["tokens"] = {"max": max(lengths, default=0), "mean": sum(lengths) / max(len(lengths), 1),
                         "longer_than_seq_len": sum(n > seq_len + 1 for n in lengths), "seq_len": seq_len}
    return out


def write_records(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_records(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- the stage
def build_fusion_data(cfg: FusionConfig, model: Qwen3, tokenizer: Tokenizer, *, ctx: StageContext | None = None,
                      score_fn: Callable[[tasks.TaskItem, str], float] | None = None
                      ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rejection sampling, top-up, non-thinking data, flags and budget examples; (records, report)."""
    t0 = time.perf_counter()
    items = sample_queries(cfg)
    thinking, rs_stats = rejection_sample(model, tokenizer, items, k=cfg.samples_per_query, keep=cfg.keep_per_query,
                                          max_new_tokens=cfg.max_new_tokens, sampling=cfg.sampling,
                                          seed=cfg.seed, score_fn=score_fn)
    t_sample = time.perf_counter() - t0
    n_topup = 0
    if len(thinking) < cfg.min_thinking and cfg.topup == "reference":
        have = {s.item.uid for s in thinking}
        rng_top = random.Random(f"fusion-topup|{cfg.seed}")
        pool = [it for it in items if it.uid not in have]
        while len(pool) < cfg.min_thinking - len(thinking):
            it = tasks.sample_item(rng_top, heldout=False, families=cfg.families or tuple(tasks.FAMILIES))
            if it.uid not in have and all(it.uid != p.uid for p in pool):
                pool.append(it)
        extra = reference_samples(pool)[: cfg.min_thinking - len(thinking)]
        n_topup = len(extra)
        thinking = thinking + extra
    rng = random.Random(f"fusion-data|{cfg.seed}")
    direct = direct_samples(cfg, cfg.n_non_thinking, rng)
    records = build_conversations(cfg, thinking, direct, tokenizer, rng, general_records(cfg, cfg.n_general))
    sft_cfg = cfg.sft_config()
    report = {
        "section": "Qwen3 report §4.3 thinking-mode fusion",
        "rejection_sampling": {**rs_stats, "k": cfg.samples_per_query, "keep_per_query": cfg.keep_per_query,
                               "sampling": asdict(cfg.sampling), "max_new_tokens": cfg.max_new_tokens,
                               "seconds": round(t_sample, 2)},
        "thinking_samples": {"model": sum(s.source == "model" for s in thinking), "reference_topup": n_topup,
                             "min_thinking": cfg.min_thinking},
        **data_report(records, tokenizer, sft_cfg.seq_len),
        "config": cfg.data_key(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if ctx is not None:
        rs = report["rejection_sampling"]
        ctx.say(f"{cfg.name}: rejection sampling {rs['accepted']}/{rs['samples']} accepted "
                f"({(rs['acceptance_rate'] or 0):.1%}), {rs['kept']} kept from {rs['queries_with_a_correct_sample']}/"
                f"{rs['queries']} queries, {n_topup} reference top-ups; {len(records)} conversations "
                f"{report['by_category']} in {report['seconds']:.1f}s")
    return records, report


def run(cfg: FusionConfig, parent: Path, ctx: StageContext, *,
        score_fn: Callable[[tasks.TaskItem, str], float] | None = None) -> Path:
    """Build the fusion set from the reasoning-RL checkpoint `parent` and fine-tune it into
    `ctx.out_dir` (the data is reused, and training resumed, when a cut run is rerun)."""
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parent = Path(parent)
    if not (parent / "config.json").exists():
        raise ConfigError(f"{cfg.name}: needs a parent checkpoint with a model, got {parent}")
    parent_lineage = read_lineage(parent)
    key = config_hash({"data": cfg.data_key(), "parent": parent_lineage.hash if parent_lineage else str(parent)})
    data_path, report_path = out / DATA_FILE, out / REPORT_FILE
    records = None
    if data_path.exists() and report_path.exists():
        saved = json.loads(report_path.read_text())
        if saved.get("key") == key:
            records = read_records(data_path)
            ctx.say(f"{cfg.name}: reusing {len(records)} conversations from {data_path.name}")
    if records is None:
        tokenizer = Tokenizer.load(parent)
        model = Qwen3.from_pretrained(parent, device=ctx.torch_device)  # rejection sampling on the run's device
        records, report = build_fusion_data(cfg, model, tokenizer, ctx=ctx, score_fn=score_fn)
        del model
        write_records(data_path, records)
        write_json_atomic(report_path, {"key": key, **report})
    data_hash = fine_tune(cfg.sft_config(), parent, ctx, [r["messages"] for r in records])
    write_lineage(out, make_lineage(cfg.name, cfg, parent, data_hashes={"conversations": data_hash}))
    return out


__all__ = ["BUDGET_SENTENCE", "CATEGORIES", "DATA_FILE", "DirectSample", "FusionConfig", "NON_THINKING_KINDS",
           "REPORT_FILE", "ThinkingSample", "accept", "budget_content", "build_conversations", "build_fusion_data",
           "data_report", "direct_samples", "fusion_conversation", "multi_turn", "read_records", "reference_samples", "rejection_sample",
           "run", "sample_queries"]
