"""Thinking-mode evaluations: ThinkFollow scoring, s1's Control/Scaling, the held-out chats, and
ThinkFollow, accuracy by mode and the budget curve on scripted models whose answers are known (the
claims judging them: test_claims.py)."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qwen3repro.chat import STOP_THINKING_DIRECTIVE, render, thinking_flag, wants_thinking
from qwen3repro.config import ConfigError
from qwen3repro.data import tasks
from qwen3repro.evals import thinking as th
from qwen3repro.generate import Generation
from qwen3repro.tokenizer import train_tokenizer


# ----------------------------------------------------------------------------- ThinkFollow scoring
@pytest.mark.parametrize("text, thinking, expected", [
    ("<think>\nsome steps\n</think>\n\n42<|im_end|>", True, True),
    ("<think>\n\n</think>\n\n42<|im_end|>", False, True),
    ("<think>\nsome steps\n</think>\n\n42<|im_end|>", False, False),      # thought when told not to
    ("<think>\n\n</think>\n\n42<|im_end|>", True, False),                 # did not think when told to
    ("<think>\nsome steps that never end", True, False),                  # no </think>
    ("<think>\n\n", False, False),                                        # cut inside the block
    ("<think>\nsteps\n</think>\n\n<|im_end|>", True, False),              # empty answer
    ("<think>\n\n</think>\n\n   \n<|im_end|>", False, False),             # blank answer
    ("42<|im_end|>", False, False),                                       # no think block at all
    ("42<|im_end|>", True, False),
    ("<think>\na\n</think>\n<think>\nb\n</think>\n\n42", True, False),     # two blocks
    ("</think>\n\n42", False, False),                                     # closed but never opened
    ("", True, False),
    ("<think>\n\n</think>\n\n42<|im_end|><think>\nx\n</think>", False, True),  # text after the end is ignored
])
def test_follows_mode_on_hand_made_completions(text, thinking, expected):
    assert th.follows_mode(text, thinking) is expected


def test_follows_mode_never_crashes_on_odd_input():
    for odd in (None, 3, b"<think>", "<think><think></think>", "<|im_end|>", "</think></think>x"):
        assert th.follows_mode(odd, True) is False
        assert th.follows_mode(odd, False) is False


def test_answer_text_drops_the_report_directive_remnant():
    item = tasks.generate("add", 0, 2)
    forced = f"<think>\nhalf a trace{STOP_THINKING_DIRECTIVE}{item.answer}<|im_end|>"
    assert th.answer_text(forced) == item.answer and th.is_correct(item, forced)
    templ = f"<think>\nhalf a trace{th.TEMPLATE_DIRECTIVE}{item.answer}<|im_end|>"
    assert th.is_correct(item, templ)
    assert th.answer_text(f"<think>\nx\n</think>\n\n.5") == ".5"   # a real leading "." stays
    assert th.answer_text(f"<think>\n{item.answer}") == ""          # never closed: no answer
    assert not th.is_correct(item, f"<think>\nx\n</think>\n\n<|im_end|>")
    assert not th.is_correct(item, f"<think>\nx\n</think>\n\n{int(item.answer) + 1}")


def test_thinking_tokens_are_recounted_without_forced_tokens():
    s, e = 7, 8
    gen = Generation([s, 1, 2, 3, 9, 9, e, 5, 0], "stop", forced=[False, False, False, False, True, True, True,
                                                                  False, False])
    assert th.thinking_tokens(gen, s, e) == 3
    assert th.thinking_tokens(Generation([s, e, 5], "stop", forced=[False] * 3), s, e) == 0
    assert th.thinking_tokens(Generation([5, 6], "stop", forced=[False] * 2), s, e) == 0


# ----------------------------------------------------------------------------- s1 metrics
def test_s1_control_counts_runs_within_their_budget():
    runs = [{"budget": 0, "max_thinking_tokens": 0}, {"budget": 8, "max_thinking_tokens": 8},
            {"budget": 16, "max_thinking_tokens": 17}, {"budget": 32, "max_thinking_tokens": 20}]
    assert th.s1_control(runs) == 0.75
    assert th.s1_control(runs[:2]) == 1.0
    assert th.s1_control([]) is None


def test_s1_scaling_on_hand_made_curves():
    # A straight line: +10 points per 100 tokens, whatever the pairs.
    line = [(0, 0.1), (100, 0.2), (200, 0.3), (400, 0.5)]
    assert th.s1_scaling(line) == pytest.approx(10.0)
    assert th.successive_scaling(line) == pytest.approx(10.0)
    # Flat and falling curves.
    assert th.s1_scaling([(0, 0.4), (50, 0.4), (90, 0.4)]) == 0.0
    assert th.s1_scaling([(0, 0.5), (100, 0.3)]) == pytest.approx(-20.0)
    # A staircase: s1's all-pairs mean and the successive mean differ.
    stairs = [(0, 0.0), (100, 0.0), (200, 0.5), (400, 0.5)]
    pairs = [0.0, 25.0, 12.5, 50.0, 50.0 / 3, 0.0]  # 0-100, 0-200, 0-400, 100-200, 100-400, 200-400
    assert th.s1_scaling(stairs) == pytest.approx(sum(pairs) / 6)
    assert th.successive_scaling(stairs) == pytest.approx((0 + 50 + 0) / 3)
    # Equal compute gives no slope; fewer than two distinct points: None.
    assert th.s1_scaling([(10, 0.2), (10, 0.9)]) is None
    assert th.s1_scaling([(10, 0.2)]) is None
    assert th.s1_scaling([(10, 0.2), (10, 0.9), (20, 0.4)]) == pytest.approx((200 - 500) / 2)  # per 100 tokens over 10-token gaps


def test_doubling_grid_goes_beyond_the_longest_trace():
    assert th.doubling_grid(100) == [0, 8, 16, 32, 64, 128]
    assert th.doubling_grid(128) == [0, 8, 16, 32, 64, 128]
    assert th.doubling_grid(5) == [0, 8]


# ----------------------------------------------------------------------------- held-out chats
def test_follow_conversations_are_balanced_held_out_and_last_flag_wins():
    convs = th.follow_conversations(32, seed=0)
    assert len(convs) == 32
    for kind in th.FOLLOW_KINDS:
        of = [c for c in convs if c["kind"] == kind]
        assert len(of) == 8 and {c["expected"] for c in of} == {"think", "no_think"}
    for c in convs:
        msgs = c["messages"]
        assert wants_thinking(msgs) == (c["expected"] == "think")
        assert msgs[-1]["role"] == "user" and 2 <= sum(m["role"] == "user" for m in msgs) <= 3
        assert all(m["content"] for m in msgs if m["role"] == "assistant")   # earlier turns filled in
        assert tasks.is_heldout(tasks.TaskItem.from_dict(c["item"]).uid)
        if c["kind"] == "conflict":
            assert msgs[0]["role"] == "system" and thinking_flag(msgs[:1]) != thinking_flag(msgs)
        if c["kind"] == "system":
            assert thinking_flag([m for m in msgs if m["role"] == "user"]) is None
        if c["kind"] == "inherited":
            assert thinking_flag(msgs[-1:]) is None and thinking_flag(msgs) is not None


def test_eval_config_is_strict():
    with pytest.raises(ConfigError, match="unknown key"):
        th.ThinkingEvalConfig.from_dict({"folow_n": 3})
    with pytest.raises(ConfigError):
        th.ThinkingEvalConfig.from_dict({"directive": "other"})
    assert th.ThinkingEvalConfig.from_dict({"budgets": [16, 0, 8, 8]}).budgets == (0, 8, 16)


# ----------------------------------------------------------------------------- on scripted models
@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    texts = [tasks.render_trace(it) + " " + it.question for it in
             (tasks.sample_item(rng, heldout=False) for _ in range(100))]
    return train_tokenizer(texts, 400)


class _Rows:
    """The scripted model's "KV cache": each row's completion and the step reached."""

    def __init__(self):
        self.completions, self.step = None, 0

    def reorder(self, keep):
        self.completions = [self.completions[i] for i in keep.tolist()]


class ScriptedLM(nn.Module):
    """Writes `script(prompt ids)` (a completion's text) for every prompt, whatever the sampling: its
    token's logit is far above every other, so top-k / top-p / temperature all pick it."""

    def __init__(self, tokenizer, script):
        super().__init__()
        self.tok, self.script = tokenizer, script
        self.anchor = nn.Parameter(torch.zeros(1))  # the engine reads the device from a parameter

    def new_kv_cache(self, batch_size, max_len, **_):
        return _Rows()

    def forward(self, input_ids, *, position_ids=None, attention_mask=None, kv_cache=None):
        if kv_cache.completions is None:
            keep = attention_mask if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            kv_cache.completions = [self.tok.encode(self.script(tuple(ids[m].tolist())))
                                    for ids, m in zip(input_ids, keep)]
        step = kv_cache.step
        kv_cache.step += 1
        logits = torch.zeros(*input_ids.shape, len(self.tok))
        for i, ids in enumerate(kv_cache.completions):
            logits[i, -1, ids[step] if step < len(ids) else self.tok.endoftext_id] = 100.0
        return SimpleNamespace(logits=logits)


THINKS = "<think>\nsome steps\n</think>\n\n{answer}<|im_end|>"
DOES_NOT_THINK = "<think>\n\n</think>\n\n{answer}<|im_end|>"
FOLLOW_CFG = th.ThinkingEvalConfig(follow_n=16, follow_families=("add",), seed=3)


def _chats(tok, cfg=FOLLOW_CFG):
    """The chats think_follow builds, keyed by their prompt ids."""
    convs = th.follow_conversations(cfg.follow_n, seed=cfg.seed, families=cfg.follow_families)
    return {tuple(tok.encode(render(c["messages"], add_generation_prompt=True))): c for c in convs}


def _follow(tok, choose_thinking):
    """ThinkFollow of a model that thinks when `choose_thinking(chat)` and answers correctly."""
    chats = _chats(tok)

    def script(prompt):
        chat = chats[prompt]
        return (THINKS if choose_thinking(chat) else DOES_NOT_THINK).format(answer=chat["item"]["answer"])

    return th.think_follow(ScriptedLM(tok, script), tok, FOLLOW_CFG, max_new_tokens=24)


def _first_flag(messages):
    for m in messages:
        for word in m["content"].split() if m["role"] in ("user", "system") else ():
            if word in ("/think", "/no_think"):
                return word
    return None


def test_thinkfollow_of_models_whose_behaviour_is_known(tok):
    oracle = _follow(tok, lambda chat: chat["expected"] == "think")
    assert oracle["thinkfollow"] == 1.0 and oracle["n"] == 16 and oracle["failures"] == []
    assert set(oracle["by_kind"].values()) == {1.0} and oracle["by_expected"] == {"think": 1.0, "no_think": 1.0}
    assert all(r["correct"] for r in oracle["examples"])
    always = _follow(tok, lambda chat: True)  # half the chats ask for thinking
    assert always["thinkfollow"] == 0.5 and always["by_expected"] == {"think": 1.0, "no_think": 0.0}
    never = _follow(tok, lambda chat: False)
    assert never["thinkfollow"] == 0.5 and never["by_expected"] == {"think": 0.0, "no_think": 1.0}
    # Following the first flag instead of the last fails every conflict, and exactly the chats whose
    # first flag is not the one that wins.
    first = _follow(tok, lambda chat: _first_flag(chat["messages"]) != "/no_think")
    chats = list(_chats(tok).values())
    expected = sum((_first_flag(c["messages"]) != "/no_think") == (c["expected"] == "think") for c in chats) / 16
    assert first["thinkfollow"] == expected < 1.0 and first["by_kind"]["conflict"] == 0.0
    assert first["by_kind"]["system"] == 1.0  # one flag only: first and last agree


def test_a_think_block_that_never_closes_follows_nothing(tok):
    chats = _chats(tok)
    res = th.think_follow(ScriptedLM(tok, lambda prompt: "<think>\nsteps and more steps"), tok, FOLLOW_CFG,
                          max_new_tokens=8)
    assert res["thinkfollow"] == 0.0 and len(res["failures"]) == 8 and len(chats) == 16


def test_accuracy_by_mode_of_a_model_right_only_when_thinking(tok):
    cfg = th.ThinkingEvalConfig(n_per_cell=2, families=("add", "mul"), max_new_tokens=48)
    items = th.eval_items(cfg)
    answers = {tuple(tok.encode(render([{"role": "user", "content": it.question}], add_generation_prompt=True,
                                       enable_thinking=think))): (it, think) for it in items for think in (True, False)}

    def script(prompt):
        item, think = answers[prompt]
        # Non-thinking prompts end in the prefilled empty block: the model writes only the answer.
        return THINKS.format(answer=item.answer) if think else f"{int(item.answer) + 1}<|im_end|>"

    res = th.accuracy_by_mode(ScriptedLM(tok, script), tok, cfg)
    assert res["thinking"]["accuracy"] == 1.0 and res["non_thinking"]["accuracy"] == 0.0
    assert res["thinking"]["n"] == res["non_thinking"]["n"] == len(items)
    hard = sum(th.relative_difficulty(it) == "hard" for it in items)
    assert res["thinking"]["n_by_relative_difficulty"]["hard"] == hard > 0
    assert res["thinking"]["mean_thinking_tokens"] == len(tok.encode("\nsome steps\n"))


def test_budget_curve_of_a_model_with_a_fixed_trace(tok):
    """A model that always thinks the same n tokens, then answers right: the controller holds every
    run within its budget (s1's Control = 1), and a budget above n leaves the trace whole (n thinking
    tokens, every answer right)."""
    items = th.eval_items(th.ThinkingEvalConfig(n_per_cell=1, families=("add",)))
    by_prompt = {tuple(tok.encode(render([{"role": "user", "content": it.question}], add_generation_prompt=True,
                                         enable_thinking=think))): (it, think) for it in items for think in (True, False)}
    completion = "<think>\n" + " ".join(["7 + 8 = 15"] * 3) + "\n</think>\n\n{answer}<|im_end|>"

    def script(prompt):  # the non-thinking baseline's prompt ends in the prefilled empty block
        item, think = by_prompt[prompt]
        return completion.format(answer=item.answer) if think else f"{item.answer}<|im_end|>"

    ids = tok.encode(completion.format(answer=1))
    n = ids.index(tok.think_end_id) - ids.index(tok.think_start_id) - 1
    cfg = th.ThinkingEvalConfig(n_per_cell=1, families=("add",), budgets=(0, n // 2, n + 1))
    res = th.budget_curve(ScriptedLM(tok, script), tok, cfg, items=items)
    assert [r["budget"] for r in res["runs"]] == [0, n // 2, n + 1]
    assert all(r["max_thinking_tokens"] <= r["budget"] for r in res["runs"]) and res["s1"]["control"] == 1.0
    whole = res["runs"][-1]
    assert whole["accuracy"] == 1.0 and whole["mean_thinking_tokens"] == n and whole["budget_hit_share"] == 0.0
    assert res["runs"][0]["budget_hit_share"] == 1.0 and res["runs"][0]["max_thinking_tokens"] == 0
    assert res["non_thinking_baseline"] == 1.0


def test_follow_conversations_scale_past_the_held_out_cell_size():
    """96 chats (the small scale) need more questions than one held-out cell of mul at difficulty 2
    holds; the pool is capped per cell and every chat is still distinct and balanced."""
    from collections import Counter

    from qwen3repro.evals.thinking import FOLLOW_KINDS, follow_conversations

    chats = follow_conversations(96)
    assert len({str(c["messages"]) for c in chats}) == 96
    assert Counter((c["kind"], c["expected"]) for c in chats) == {
        (k, e): 96 // (2 * len(FOLLOW_KINDS)) for k in FOLLOW_KINDS for e in ("think", "no_think")}
