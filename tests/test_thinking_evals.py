"""Thinking-mode evaluations: ThinkFollow scoring, s1's Control/Scaling, the held-out chats, and the
claim functions on a micro model."""
from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qwen3repro.chat import STOP_THINKING_DIRECTIVE, thinking_flag, wants_thinking
from qwen3repro.config import ConfigError
from qwen3repro.data import tasks
from qwen3repro.evals import thinking as th
from qwen3repro.generate import Generation
from qwen3repro.lineage import make_lineage, write_lineage
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.models.registry import get_model_config
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


def test_clearly_above_needs_more_than_noise():
    assert th.clearly_above(0.6, 100, 0.3, 100)
    assert not th.clearly_above(0.037, 27, 0.0, 27)      # one right answer in 27 is not a win
    assert not th.clearly_above(0.3, 100, 0.6, 100)
    assert not th.clearly_above(0.5, 0, 0.1, 10)
    assert th.clearly_above(1.0, 10, 0.0, 10) and not th.clearly_above(0.0, 10, 0.0, 10)


def test_filtering_verdict_needs_both_differences_beyond_noise():
    from qwen3repro.evals.posttrain import filtering_verdict

    def model(acc, defect, n):
        return {"accuracy": acc, "any_defect_rate": defect, "n": n}

    ok, parts = filtering_verdict(model(0.20, 0.80, 250), model(0.08, 0.92, 250))
    assert ok and parts == []
    # One right answer in 84 against none: higher, but within noise (the tiny run of this session).
    ok, parts = filtering_verdict(model(1 / 84, 83 / 84, 84), model(0.0, 1.0, 84))
    assert not ok and len(parts) == 2 and "2 standard errors" in parts[0]
    # More accurate but not less defective (e.g. more repetition) fails on the second half alone.
    ok, parts = filtering_verdict(model(0.20, 0.95, 250), model(0.08, 0.95, 250))
    assert not ok and parts == ["its outputs are not less defective by more than 2 standard errors"]


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


# ----------------------------------------------------------------------------- on a micro model
@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    texts = [tasks.render_trace(it) + " " + it.question for it in
             (tasks.sample_item(rng, heldout=False) for _ in range(100))]
    return train_tokenizer(texts, 400)


@pytest.fixture(scope="module")
def plan(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("run")
    out = root / "flagship" / "fusion"
    out.mkdir(parents=True)
    tok.save(out)
    torch.manual_seed(0)
    Qwen3(get_model_config("micro").replace(eos_token_id=tok.endoftext_id, bos_token_id=None)).save_pretrained(out)
    write_lineage(out, make_lineage("fusion", {"test": 1}))
    evals = {"fusion": {"follow_n": 8, "n_per_cell": 1, "families": ["add", "order"], "max_new_tokens": 24},
             "thinking_budget": {"n_per_cell": 1, "families": ["add"], "budgets": [0, 8, 16]}}

    def node(key):
        if key != "flagship/fusion":
            raise KeyError(key)
        return SimpleNamespace(out_dir=out)

    return SimpleNamespace(root=root, scale_config={"evals": evals}, node=node)


def test_claims_run_on_a_micro_model_and_pin_their_settings(plan):
    torch.set_num_threads(1)
    said = []
    rows = th.claim_fusion(plan, said.append)
    assert [r.name for r in rows] == ["thinkfollow", "thinking_vs_non_thinking"]
    res = json.loads((Path(plan.root) / "claims" / "fusion.json").read_text())
    assert res["settings"]["thinking_sampling"] == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0,
                                                    "presence_penalty": 0.0}
    assert res["settings"]["non_thinking_sampling"]["temperature"] == 0.7
    tf = res["thinkfollow"]
    assert tf["n"] == 8 and 0.0 <= tf["thinkfollow"] <= 1.0
    # A random micro model does not follow flags: the claim is measured and not reproduced.
    assert rows[0].reproduced is (tf["thinkfollow"] >= 0.9)
    assert res["accuracy_by_mode"]["thinking"]["n"] == len(th.eval_items(th.ThinkingEvalConfig(
        n_per_cell=1, families=("add", "order"))))

    rows = th.claim_budget(plan, said.append)
    res = json.loads((Path(plan.root) / "claims" / "thinking_budget.json").read_text())
    assert [r["budget"] for r in res["runs"]] == [0, 8, 16]
    # The controller enforces every budget, so s1's Control is 1 and no sample thinks past its budget.
    assert res["s1"]["control"] == 1.0
    assert all(r["max_thinking_tokens"] <= r["budget"] for r in res["runs"])
    assert res["settings"]["forced_text"] == th.TEMPLATE_DIRECTIVE
    assert Path(rows[0].plots[0]).exists() and Path(rows[0].plots[0]).stat().st_size > 1000


def test_claims_without_a_fusion_checkpoint_are_not_measured(tmp_path):
    def node(key):
        raise KeyError(key)

    plan = SimpleNamespace(root=tmp_path, scale_config={}, node=node)
    rows = th.claim_fusion(plan, print) + th.claim_budget(plan, print)
    assert rows and all(r.reproduced is None and r.measured == "not measured" for r in rows)


def test_follow_conversations_scale_past_the_held_out_cell_size():
    """96 chats (the small scale) need more questions than one held-out cell of mul at difficulty 2
    holds; the pool is capped per cell and every chat is still distinct and balanced."""
    from collections import Counter

    from qwen3repro.evals.thinking import FOLLOW_KINDS, follow_conversations

    chats = follow_conversations(96)
    assert len({str(c["messages"]) for c in chats}) == 96
    assert Counter((c["kind"], c["expected"]) for c in chats) == {
        (k, e): 96 // (2 * len(FOLLOW_KINDS)) for k in FOLLOW_KINDS for e in ("think", "no_think")}
