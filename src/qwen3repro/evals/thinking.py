"""Thinking-mode evaluations of the fused model (Qwen3 report §4.3, Table 22, Fig. 2).

* **ThinkFollow**: held-out multi-turn chats (2–3 turns, earlier assistant turns filled in with
  their answers) whose flags sit in the system message, in user turns, or conflict (a later flag
  overrides an earlier one: the last one wins). A generated final turn follows the flag when it is
  one closed think block followed by a non-empty answer, with non-empty reasoning in thinking mode
  and an empty block in non-thinking mode; anything malformed (no `</think>`, an empty answer, a
  second `<think>`) does not follow. Report: 88.7 after fusion, 98.9 after general RL (Table 22).
* **Accuracy by mode and difficulty** on held-out task items: thinking mode (the default prompt)
  vs non-thinking mode (`enable_thinking=False`, the template's empty think block), each at the
  report's sampling settings for that mode, tabulated by family, difficulty and relative
  difficulty (easy / medium / hard thirds of each family's training range).
* **Accuracy vs thinking budget**: the same thinking prompt with budgets on a doubling grid from 0
  to beyond the longest reference trace, plus the non-thinking baseline; s1's metrics (Muennighoff
  et al. 2025, "s1: Simple test-time scaling", §3.2) with compute a = mean thinking tokens per run:
  Control = (1/|A|) Σ_a 1[a stays within its budget] (here: every sample's thinking tokens ≤ the
  budget); Scaling = the average slope (f(b) − f(a)) / (b − a) over all pairs of runs a < b
  (s1's definition; also the mean over successive points), in accuracy points per 100 thinking
  tokens; Performance = the best accuracy. A PNG plots accuracy vs budget with the baseline.

Every measurement runs on a generation backend (`evals.backends`): our engine for our models, whose
controller enforces the budget inside the decode loop, or transformers / vLLM on a Hugging Face
checkpoint (`evals.hf_checkpoint`), which reach the same forced text in phases. The forced text
is, by default, the one the fusion set trains ("\\n\\n" + the report's stop-thinking sentence +
"\\n</think>\\n\\n", which is what the chat template can render and the official client recipe
appends); `directive = "report"` forces `chat.STOP_THINKING_DIRECTIVE` verbatim (with the "." after
`</think>`, whose remnant `answer_text` drops before scoring). All sampling settings are pinned and
written into each result. Sizes come from the scale's `[evals.fusion]` and `[evals.thinking_budget]`
tables (`ThinkingEvalConfig` fields).
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .. import plotting
from ..chat import EMPTY_THINK, STOP_THINKING_DIRECTIVE, TEMPLATE_STOP_THINKING, parse, wants_thinking
from ..config import ConfigError, strict_fields
from ..data import tasks
from ..data.synthetic import s2_eval_items
from ..generate import NON_THINKING_SAMPLING, THINKING_SAMPLING, Generation, SamplingParams
from ..rewards import answer_text as reward_answer_text
from .backends import EngineBackend, GenerationBackend, count_thinking_tokens

# The forced text when a budget runs out: "template" = what the fusion set trains and the chat
# template renders; "report" = the directive verbatim as printed in the report.
DIRECTIVES = ("template", "report")
TEMPLATE_DIRECTIVE = TEMPLATE_STOP_THINKING
FOLLOW_KINDS = ("user", "system", "conflict", "inherited")
# Held-out items per (family, difficulty) drawn for the ThinkFollow chats' pool: 48 per cell at the two
# easiest difficulties of 3 families is 288 questions, one per turn for 96 chats of up to 3 turns
# (more chats reuse questions). The held-out partition of mul at difficulty 2 holds fewer than 96.
FOLLOW_POOL_PER_CELL = 48
HARD_FROM = 2 / 3   # relative difficulty >= this is "hard", < 1/3 "easy"


@dataclass(frozen=True)
class ThinkingEvalConfig:
    """Sizes and settings of the thinking evaluations (the scale's [evals.fusion] and
    [evals.thinking_budget] tables; unknown keys are an error)."""

    role: str = ""
    """The role whose fused model is evaluated (empty: the first role with a fusion stage)."""
    # ---- ThinkFollow
    follow_n: int = 48
    """Held-out conversations (balanced over FOLLOW_KINDS and over the expected mode)."""
    follow_families: tuple[str, ...] = ("add", "mul", "order")
    # ---- accuracy by mode
    n_per_cell: int = 3
    """Held-out items per (family, difficulty)."""
    families: tuple[str, ...] = ()
    """Task families (empty: all)."""
    max_new_tokens: int | None = None
    """Default: the longest reference trace of the evaluated items + 64."""
    non_thinking_presence_penalty: float = 0.0
    """The report uses 1.5; here digits are single tokens, so a presence penalty would penalise
    every repeated digit of an answer: it is off unless set."""
    # ---- budget
    budgets: tuple[int, ...] | None = None
    """Default: 0 and a doubling grid from 8 to the first power of two at or beyond the longest trace."""
    directive: str = "template"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "follow_families", tuple(self.follow_families))
        object.__setattr__(self, "families", tuple(self.families))
        if self.budgets is not None:
            object.__setattr__(self, "budgets", tuple(sorted({int(b) for b in self.budgets})))
            if not self.budgets or self.budgets[0] < 0:
                raise ConfigError("evals.thinking: budgets must be a non-empty list of integers >= 0")
        unknown = set(self.follow_families + self.families) - set(tasks.FAMILIES)
        if unknown:
            raise ConfigError(f"evals.thinking: unknown task families {sorted(unknown)}")
        for name in ("follow_n", "n_per_cell"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"evals.thinking: {name} must be an integer >= 1, got {v!r}")
        if self.directive not in DIRECTIVES:
            raise ConfigError(f"evals.thinking: directive must be one of {DIRECTIVES}, got {self.directive!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ThinkingEvalConfig":
        return cls(**strict_fields(cls, d, "evals.thinking"))

    @property
    def thinking_sampling(self) -> SamplingParams:
        return THINKING_SAMPLING

    @property
    def non_thinking_sampling(self) -> SamplingParams:
        return SamplingParams(**{**asdict(NON_THINKING_SAMPLING), "presence_penalty": self.non_thinking_presence_penalty})


# ----------------------------------------------------------------------------- scoring
def _body(text: str) -> str:
    for end in ("<|im_end|>", "<|endoftext|>"):
        text = text.split(end)[0]
    return text


def follows_mode(completion: str, thinking: bool) -> bool:
    """Whether a generated assistant turn follows the requested mode: exactly one think block,
    opened at the start and closed, then a non-empty answer; non-empty reasoning when thinking,
    an empty block when not. Malformed text is "not following"; never raises."""
    if not isinstance(completion, str):
        return False
    body = _body(completion).lstrip("\n")
    if not body.startswith("<think>") or body.count("<think>") != 1 or body.count("</think>") != 1:
        return False
    parsed = parse(body)
    if not answer_text(body):
        return False
    has_reasoning = bool(parsed["reasoning_content"].strip())
    return has_reasoning if thinking else not has_reasoning


def answer_text(completion: str) -> str:
    """The final answer (`rewards.answer_text`: what follows the think block, without the "." the
    report's verbatim directive leaves after `</think>`; "" when the block is never closed)."""
    return reward_answer_text(completion)


def is_correct(item: tasks.TaskItem, completion: str) -> bool:
    answer = answer_text(completion)
    return bool(answer) and tasks.check_answer(item, answer)


def thinking_tokens(gen: Generation, think_start_id: int, think_end_id: int) -> int:
    """Sampled (not forced) tokens inside the thinking part, recounted from the output ids."""
    return count_thinking_tokens(gen.token_ids, gen.forced, think_start_id, think_end_id)


# ----------------------------------------------------------------------------- s1 metrics
def s1_control(runs: Sequence[Mapping[str, Any]]) -> float | None:
    """Share of budgeted runs whose every sample kept its thinking within the run's budget (s1)."""
    runs = [r for r in runs if r.get("budget") is not None]
    if not runs:
        return None
    return sum(r["max_thinking_tokens"] <= r["budget"] for r in runs) / len(runs)


def s1_scaling(points: Sequence[tuple[float, float]], *, per: float = 100.0) -> float | None:
    """s1's Scaling: the mean slope (f(b) − f(a)) / (b − a) over all pairs of (compute, accuracy)
    points with b > a, in accuracy points (%) per `per` units of compute; None with < 2 distinct."""
    pts = sorted(points)
    slopes = [(fb - fa) * 100.0 / (b - a) * per for i, (a, fa) in enumerate(pts) for b, fb in pts[i + 1:] if b > a]
    return sum(slopes) / len(slopes) if slopes else None


def successive_scaling(points: Sequence[tuple[float, float]], *, per: float = 100.0) -> float | None:
    """The mean slope between successive points (in compute order), same units as `s1_scaling`."""
    pts = sorted(points)
    slopes = [(fb - fa) * 100.0 / (b - a) * per for (a, fa), (b, fb) in zip(pts, pts[1:]) if b > a]
    return sum(slopes) / len(slopes) if slopes else None


def doubling_grid(longest: int, start: int = 8) -> list[int]:
    """[0, start, 2·start, ...] up to the first value >= `longest` (beyond the longest trace)."""
    grid, b = [0], start
    while True:
        grid.append(b)
        if b >= longest:
            return grid
        b *= 2


# ----------------------------------------------------------------------------- data
def follow_conversations(n: int, *, seed: int = 0, families: Sequence[str] = ("add", "mul", "order"),
                         instruction: str = "") -> list[dict[str, Any]]:
    """`n` held-out chats, balanced over FOLLOW_KINDS × expected mode. Each is
    {"messages", "kind", "expected": "think" | "no_think", "item"} with the final user turn last.
    `instruction` is appended to every question, before its flag (real models are told how to
    present their answer; the tiny models were trained on the bare questions).

    * user: the final user turn holds the flag (2–3 turns; earlier turns may hold other flags);
    * system: only a system message holds a flag;
    * conflict: the system message says one mode, the final user turn the other;
    * inherited: an earlier user turn holds the flag, the final turn none (follows the earlier one)."""
    fams = tuple(families)
    # Held-out items at each family's easiest difficulties keep the thinking turns short.
    pool = [it for it in s2_eval_items(seed=seed, n_per_cell=max(4, min(n, FOLLOW_POOL_PER_CELL)), families=fams)
            if it.difficulty <= tasks.FAMILIES[it.family].min_difficulty + 1]
    rng = random.Random(f"thinkfollow|{seed}")
    rng.shuffle(pool)
    out = []
    for i in range(n):
        kind = FOLLOW_KINDS[i % len(FOLLOW_KINDS)]
        expected = ("think", "no_think")[(i // len(FOLLOW_KINDS)) % 2]
        want, other = ("/think", "/no_think") if expected == "think" else ("/no_think", "/think")
        n_turns = rng.randint(2, 3)
        items = [pool[(i * 3 + k) % len(pool)] for k in range(n_turns)]
        user_flags: list[str | None] = [None] * n_turns
        system = None
        if kind == "user":
            user_flags = [rng.choice((None, "/think", "/no_think")) for _ in range(n_turns - 1)] + [want]
        elif kind == "system":
            system = want
        elif kind == "conflict":
            system, user_flags[-1] = other, want
        else:  # inherited: the flag in an earlier turn, after an opposite one where there is room
            user_flags[-2] = want
            if n_turns == 3:
                user_flags[0] = other
        messages: list[dict] = [{"role": "system", "content": system}] if system else []
        for k, (it, flag) in enumerate(zip(items, user_flags)):
            question = it.question + instruction
            messages.append({"role": "user", "content": f"{question} {flag}" if flag else question})
            if k < n_turns - 1:  # earlier answers filled in (the template drops their reasoning)
                messages.append({"role": "assistant", "content": it.answer})
        assert (wants_thinking(messages) == (expected == "think")), "follow conversation built wrong"
        out.append({"messages": messages, "kind": kind, "expected": expected, "item": items[-1].to_dict()})
    return out


def eval_items(cfg: ThinkingEvalConfig) -> list[tasks.TaskItem]:
    return s2_eval_items(seed=cfg.seed, n_per_cell=cfg.n_per_cell, families=cfg.families or None)


def relative_difficulty(item: tasks.TaskItem) -> str:
    fam = tasks.FAMILIES[item.family]
    span = max(fam.max_difficulty - fam.min_difficulty, 1)
    r = (item.difficulty - fam.min_difficulty) / span
    return "hard" if r >= HARD_FROM else ("easy" if r < 1 / 3 else "medium")


# ----------------------------------------------------------------------------- running
# Each measurement runs on a `GenerationBackend` (`evals.backends`): our engine for the tiny models,
# or transformers / vLLM on a real checkpoint (`evals.hf_checkpoint`). `think_follow`,
# `accuracy_by_mode` and `budget_curve` are the tiny models' entry points: our engine on a model and
# our tokenizer. The keyword-only settings of the `measure_*` functions default to the tiny protocol;
# a real model gets an instruction on the answer's form, a scorer that reads it, and room to write it.
Score = Callable[[tasks.TaskItem, str], bool]


def _longest_trace(backend: GenerationBackend, items: Sequence[tasks.TaskItem]) -> int:
    return max(backend.count_tokens(tasks.render_trace(it)) for it in items)


def _user_chats(items: Sequence[tasks.TaskItem], instruction: str) -> list[list[dict]]:
    return [[{"role": "user", "content": it.question + instruction}] for it in items]


def measure_think_follow(backend: GenerationBackend, cfg: ThinkingEvalConfig, max_new_tokens: int | None = None, *,
                         instruction: str = "", score: Score = is_correct) -> dict[str, Any]:
    """ThinkFollow on `cfg.follow_n` held-out chats; by kind and expected mode, with examples."""
    convs = follow_conversations(cfg.follow_n, seed=cfg.seed, families=cfg.follow_families, instruction=instruction)
    items = [tasks.TaskItem.from_dict(c["item"]) for c in convs]
    max_new = max_new_tokens or _longest_trace(backend, items) + 64
    results: list[dict[str, Any]] = [{} for _ in convs]
    for mode in ("think", "no_think"):
        idx = [i for i, c in enumerate(convs) if c["expected"] == mode]
        sampling = cfg.thinking_sampling if mode == "think" else cfg.non_thinking_sampling
        samples = backend.generate([convs[i]["messages"] for i in idx], max_new_tokens=max_new, sampling=sampling,
                                   seed=cfg.seed + (1 if mode == "think" else 2))
        for i, (s,) in zip(idx, samples):
            results[i] = {"kind": convs[i]["kind"], "expected": mode,
                          "follows": follows_mode(s.text, mode == "think"), "correct": score(items[i], s.text),
                          "completion": s.text}
    share = lambda rows: sum(r["follows"] for r in rows) / len(rows) if rows else None  # noqa: E731
    return {
        "thinkfollow": share(results), "n": len(results),
        "by_kind": {k: share([r for r in results if r["kind"] == k]) for k in FOLLOW_KINDS},
        "by_expected": {m: share([r for r in results if r["expected"] == m]) for m in ("think", "no_think")},
        "examples": [{**r, "messages": c["messages"]} for r, c in zip(results[:8], convs[:8])],
        "failures": [{**r, "messages": c["messages"]} for r, c in zip(results, convs) if not r["follows"]][:8],
        "max_new_tokens": max_new,
    }


@torch.no_grad()
def think_follow(model, tokenizer, cfg: ThinkingEvalConfig, max_new_tokens: int | None = None) -> dict[str, Any]:
    """ThinkFollow of a model of ours (`measure_think_follow` on our engine)."""
    model.eval()
    return measure_think_follow(EngineBackend(model, tokenizer), cfg, max_new_tokens)


def _accuracy_table(items: Sequence[tasks.TaskItem], correct: Sequence[bool]) -> dict[str, Any]:
    def acc(rows):
        return sum(rows) / len(rows) if rows else None

    by_cell: dict[str, list[bool]] = {}
    by_rel: dict[str, list[bool]] = {}
    for it, c in zip(items, correct):
        by_cell.setdefault(f"{it.family}/{it.difficulty}", []).append(c)
        by_rel.setdefault(relative_difficulty(it), []).append(c)
    return {"accuracy": acc(list(correct)), "n": len(items),
            "by_relative_difficulty": {k: acc(by_rel.get(k, [])) for k in ("easy", "medium", "hard")},
            "n_by_relative_difficulty": {k: len(by_rel.get(k, [])) for k in ("easy", "medium", "hard")},
            "by_family_difficulty": {k: acc(v) for k, v in sorted(by_cell.items())}}


def measure_accuracy_by_mode(backend: GenerationBackend, cfg: ThinkingEvalConfig,
                             items: Sequence[tasks.TaskItem] | None = None, *, instruction: str = "",
                             score: Score = is_correct, answer_tokens: int = 64) -> dict[str, Any]:
    """Held-out accuracy in thinking mode vs non-thinking mode, by difficulty. `answer_tokens` is the
    non-thinking completions' token limit."""
    items = list(items if items is not None else eval_items(cfg))
    max_new = cfg.max_new_tokens or _longest_trace(backend, items) + 64
    chats = _user_chats(items, instruction)
    think = [s for s, in backend.generate(chats, max_new_tokens=max_new, sampling=cfg.thinking_sampling,
                                          seed=cfg.seed + 11)]
    plain = [s for s, in backend.generate(chats, enable_thinking=False, max_new_tokens=answer_tokens,
                                          sampling=cfg.non_thinking_sampling, seed=cfg.seed + 12)]
    think_text = [s.text for s in think]
    plain_text = [EMPTY_THINK + s.text for s in plain]  # the prefilled block
    return {
        "thinking": {**_accuracy_table(items, [score(it, t) for it, t in zip(items, think_text)]),
                     "mean_thinking_tokens": sum(s.thinking_tokens for s in think) / max(len(think), 1),
                     "truncated": sum(s.finish_reason == "length" for s in think)},
        "non_thinking": _accuracy_table(items, [score(it, t) for it, t in zip(items, plain_text)]),
        "max_new_tokens": {"thinking": max_new, "non_thinking": answer_tokens},
        "examples": [{"question": it.question, "answer": it.answer, "thinking": a, "non_thinking": b}
                     for it, a, b in list(zip(items, think_text, plain_text))[:4]],
    }


@torch.no_grad()
def accuracy_by_mode(model, tokenizer, cfg: ThinkingEvalConfig,
                     items: Sequence[tasks.TaskItem] | None = None) -> dict[str, Any]:
    """Accuracy by mode of a model of ours (`measure_accuracy_by_mode` on our engine)."""
    model.eval()
    return measure_accuracy_by_mode(EngineBackend(model, tokenizer), cfg, items)


def measure_budget_curve(backend: GenerationBackend, cfg: ThinkingEvalConfig,
                         items: Sequence[tasks.TaskItem] | None = None, *, instruction: str = "",
                         score: Score = is_correct, answer_tokens: int = 64, answer_room: int = 48) -> dict[str, Any]:
    """Accuracy at each thinking budget, the non-thinking baseline, and s1's Control / Scaling.
    `answer_room` is the room left for the answer after the budget and the forced text;
    `answer_tokens` the non-thinking baseline's token limit."""
    items = list(items if items is not None else eval_items(cfg))
    longest = _longest_trace(backend, items)
    budgets = list(cfg.budgets) if cfg.budgets is not None else doubling_grid(longest)
    directive = TEMPLATE_DIRECTIVE if cfg.directive == "template" else STOP_THINKING_DIRECTIVE
    directive_len = backend.count_tokens(directive)
    chats = _user_chats(items, instruction)
    runs = []
    for b in budgets:
        t0 = time.perf_counter()
        # Room for <think>, the budget, the forced directive and the answer.
        samples = [s for s, in backend.generate(chats, max_new_tokens=b + directive_len + answer_room,
                                                sampling=cfg.thinking_sampling, seed=cfg.seed + 21,
                                                thinking_budget=b, directive=directive)]
        texts = [s.text for s in samples]
        counts = [s.thinking_tokens for s in samples]
        correct = [score(it, t) for it, t in zip(items, texts)]
        runs.append({"budget": b, "accuracy": sum(correct) / len(items),
                     "mean_thinking_tokens": sum(counts) / len(counts), "max_thinking_tokens": max(counts),
                     "within_budget_share": sum(c <= b for c in counts) / len(counts),
                     "budget_hit_share": sum(s.budget_hit for s in samples) / len(samples),
                     "by_relative_difficulty": _accuracy_table(items, correct)["by_relative_difficulty"],
                     "seconds": round(time.perf_counter() - t0, 2), "example": texts[0]})
    plain = backend.generate(chats, enable_thinking=False, max_new_tokens=answer_tokens,
                             sampling=cfg.non_thinking_sampling, seed=cfg.seed + 22)
    baseline = sum(score(it, EMPTY_THINK + s.text) for it, (s,) in zip(items, plain)) / len(items)
    points = [(r["mean_thinking_tokens"], r["accuracy"]) for r in runs]
    accs = [r["accuracy"] for r in runs]
    return {
        "budgets": budgets, "runs": runs, "non_thinking_baseline": baseline, "n": len(items),
        "longest_reference_trace": longest,
        "s1": {"control": s1_control(runs), "scaling": s1_scaling(points),
               "scaling_successive": successive_scaling(points), "performance": max(accs),
               "scaling_unit": "accuracy points per 100 thinking tokens (compute = mean thinking tokens per run)"},
        "monotone_steps": sum(b >= a for a, b in zip(accs, accs[1:])), "steps": len(accs) - 1,
    }


@torch.no_grad()
def budget_curve(model, tokenizer, cfg: ThinkingEvalConfig,
                 items: Sequence[tasks.TaskItem] | None = None) -> dict[str, Any]:
    """The budget curve of a model of ours (`measure_budget_curve` on our engine)."""
    model.eval()
    return measure_budget_curve(EngineBackend(model, tokenizer), cfg, items)


def plot_budget(result: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Accuracy vs thinking budget (budgets as equally spaced ticks) with the non-thinking baseline,
    and thinking tokens used vs budget."""
    runs = result["runs"]
    xs = list(range(len(runs)))
    s1 = result["s1"]
    title = title or (f"accuracy vs thinking budget (n={result['n']}; s1 Control {s1['control']:.2f}, "
                      f"Scaling {s1['scaling'] if s1['scaling'] is not None else float('nan'):.2f})")
    path = Path(path)
    with plotting.figure(path, ncols=2, figsize=(11, 4), title=title) as (fig, axes):
        ax, ax2 = axes[0]
        ax.plot(xs, [100 * r["accuracy"] for r in runs], marker="o", label="thinking, budget-forced")
        ax.axhline(100 * result["non_thinking_baseline"], color="grey", ls="--", label="non-thinking")
        for rel, style in (("hard", ":"), ("easy", "-.")):
            ys = [r["by_relative_difficulty"].get(rel) for r in runs]
            if all(y is not None for y in ys):
                ax.plot(xs, [100 * y for y in ys], ls=style, lw=1, label=f"thinking, {rel} items")
        ax.set_xticks(xs, [str(r["budget"]) for r in runs])
        ax.set_xlabel("thinking budget (tokens)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.legend()
        ax2.plot(xs, [r["mean_thinking_tokens"] for r in runs], marker="o", label="mean thinking tokens")
        ax2.plot(xs, [r["budget"] for r in runs], ls="--", color="grey", label="budget")
        ax2.axhline(result["longest_reference_trace"], color="red", lw=0.8, label="longest reference trace")
        ax2.set_xticks(xs, [str(r["budget"]) for r in runs])
        ax2.set_xlabel("thinking budget (tokens)")
        ax2.set_yscale("symlog", linthresh=8)
        ax2.legend()
    return path


def pinned_settings(cfg: ThinkingEvalConfig) -> dict[str, Any]:
    """The sampling and prompts the thinking evaluations ran with (written next to their results)."""
    return {"thinking_sampling": asdict(cfg.thinking_sampling),
            "non_thinking_sampling": asdict(cfg.non_thinking_sampling),
            "thinking_prompt": "chat template, default (thinking) mode, no flag",
            "non_thinking_prompt": "chat template with enable_thinking=False (empty think block prefilled)",
            "heldout": "data.tasks.is_heldout", "config": asdict(cfg)}


def plot_fusion(follow: Mapping[str, Any], modes: Mapping[str, Any], path: str | Path, *,
                threshold: float | None = None) -> Path:
    """Left: ThinkFollow by case and by requested mode, with the claim's `threshold` when given.
    Right: accuracy in thinking vs non-thinking mode by relative difficulty."""
    path = Path(path)
    with plotting.figure(path, ncols=2, figsize=(11, 4)) as (fig, axes):
        ax, ax2 = axes[0]
        labels = [f"case: {k}" for k in follow["by_kind"]] + [f"asked: {m}" for m in follow["by_expected"]]
        values = [100 * (v or 0.0) for v in list(follow["by_kind"].values()) + list(follow["by_expected"].values())]
        ax.bar(range(len(values)), values, color="tab:blue")
        if threshold is not None:
            ax.axhline(100 * threshold, color="tab:red", ls="--", label=f"claim {threshold:.0%}")
            ax.legend()
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("follows the last flag (%)")
        ax.set_title(f"ThinkFollow {100 * follow['thinkfollow']:.1f}% (n={follow['n']})")
        found = modes["thinking"]["by_relative_difficulty"]
        levels = [lv for lv in ("easy", "medium", "hard") if lv in found] + [lv for lv in found
                                                                              if lv not in ("easy", "medium", "hard")]
        width = 0.38
        for i, mode in enumerate(("thinking", "non_thinking")):
            acc = [100 * (modes[mode]["by_relative_difficulty"][lv] or 0.0) for lv in levels]
            ax2.bar([x + (i - 0.5) * width for x in range(len(levels))], acc, width, label=mode.replace("_", "-"))
        ax2.set_xticks(range(len(levels)), levels)
        ax2.set_ylim(0, 100)
        ax2.set_ylabel("held-out accuracy (%)")
        ax2.set_title("one fused model, two modes")
        ax2.legend()
    return path


__all__ = ["DIRECTIVES", "FOLLOW_KINDS", "TEMPLATE_DIRECTIVE", "ThinkingEvalConfig", "accuracy_by_mode", "answer_text",
           "budget_curve", "doubling_grid", "eval_items", "follow_conversations", "follows_mode", "is_correct",
           "measure_accuracy_by_mode", "measure_budget_curve", "measure_think_follow", "pinned_settings",
           "plot_budget", "plot_fusion", "relative_difficulty", "s1_control", "s1_scaling", "successive_scaling",
           "think_follow", "thinking_tokens"]
