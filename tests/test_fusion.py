"""Thinking-mode fusion (Qwen3 report §4.3): the fusion set's properties and the stage end to end."""
from __future__ import annotations

import json
import random
import time
from collections import Counter

import pytest
import torch

from qwen3repro.chat import (EMPTY_THINK, parse, render, thinking_flag, tokenize_conversation, tools_system_content,
                             wants_thinking)
from qwen3repro.config import ConfigError
from qwen3repro.data import general_tasks, tasks
from qwen3repro.data.judging import corrupt, judging_conversations
from qwen3repro.rewards.judge import judge_prompt, parse_score
from qwen3repro.tools import ToolEnvironment, default_tools
from qwen3repro.data.world import RARE_LANGUAGE, build_world
from qwen3repro.generate import Generation
from qwen3repro.lineage import make_lineage, read_lineage, write_lineage
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.models.registry import get_model_config
from qwen3repro.rewards import get_reward
from qwen3repro.stages import fusion
from qwen3repro.stages.common import StageContext
from qwen3repro.tokenizer import train_tokenizer

QUIET = dict(printer=lambda line: None)
SFT = {"seq_len": 512, "batch_size": 4, "steps": 3, "n_eval": 4, "batching": "pack",
       "train": {"lr": 1e-3, "log_every": 1, "ckpt_every": 100}}


def config(**kw) -> fusion.FusionConfig:
    return fusion.FusionConfig.from_dict({"n_queries": 12, "samples_per_query": 2, "n_non_thinking": 40,
                                          "min_thinking": 12, "max_new_tokens": 16, "sft": SFT, **kw})


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    world = build_world(0)
    texts = [tasks.render_trace(it) + " " + it.question for it in
             (tasks.sample_item(rng, heldout=False) for _ in range(120))]
    texts += [world.render(lang, world.random_frame(rng)) for lang in world.language_names for _ in range(20)]
    return train_tokenizer(texts, 400)


@pytest.fixture(scope="module")
def records(tok):
    cfg = config(n_judging=10)
    thinking = fusion.reference_samples(fusion.sample_queries(config(n_queries=60)))
    rng = random.Random(0)
    direct = fusion.direct_samples(cfg, 120, rng)
    return fusion.build_conversations(cfg, thinking, direct, tok, rng, fusion.general_records(cfg, 30))


def assistant_turns(messages):
    return [(i, m) for i, m in enumerate(messages) if m["role"] == "assistant"]


# ----------------------------------------------------------------------------- data properties
def test_every_category_is_present_and_counted(records):
    report = fusion.data_report(records)
    assert all(report["by_category"][c] > 0 for c in fusion.CATEGORIES), report["by_category"]
    assert sum(report["by_category"].values()) == len(records)


def test_every_non_thinking_turn_has_the_empty_think_block(records, tok):
    n = 0
    for r in records:
        for i, m in assistant_turns(r["messages"]):
            if not wants_thinking(r["messages"][:i]):
                n += 1
                assert m["content"].startswith(EMPTY_THINK)
                assert m["content"][len(EMPTY_THINK):].strip() or m.get("tool_calls")  # an answer or a tool call
        if r["category"].startswith("no_think"):
            text = render(r["messages"])
            assert text.endswith("<|im_start|>assistant\n" + r["messages"][-1]["content"] + "<|im_end|>\n")
            assert "<|im_start|>assistant\n<think>\n\n</think>\n\n" in text
    assert n > 50


def test_multi_turn_assistant_turns_follow_the_last_flag(records):
    multi = [r for r in records if r["category"] == "multi_turn"]
    assert len(multi) > 10
    conflicting = both_modes = 0
    finals = set()
    for r in multi:
        msgs = r["messages"]
        turns = assistant_turns(msgs)
        assert 2 <= len(turns) <= 3
        modes = []
        for k, (i, m) in enumerate(turns):
            thinks = wants_thinking(msgs[:i])
            has_reasoning = bool(parse(m["content"])["reasoning_content"].strip())
            assert has_reasoning == thinks, (msgs[:i + 1], thinks)
            # Earlier turns are context only; the final one is trained.
            assert m.get("train", True) is (k == len(turns) - 1)
            modes.append(thinks)
        finals.add(modes[-1])
        both_modes += len(set(modes)) == 2
        flags = [f for f in r["meta"]["flags"] if not f.endswith(":-")]
        conflicting += len({f.split(":")[1] for f in flags}) == 2
    assert finals == {True, False} and both_modes > 0 and conflicting > 0


def test_context_only_turns_get_no_loss(records, tok):
    r = next(r for r in records if r["category"] == "multi_turn")
    ids, mask = tokenize_conversation(tok, r["messages"])
    text = tok.decode([t for t, m in zip(ids, mask) if m])
    final = r["messages"][-1]
    assert parse(text)["content"].strip().endswith(parse(final["content"])["content"].strip())
    # Only the final turn is trained: exactly one <|im_end|> carries loss.
    assert sum(m for t, m in zip(ids, mask) if t == tok.eos_token_id) == 1
    no_flag = [dict(m, train=True) if m["role"] == "assistant" else m for m in r["messages"]]
    assert sum(tokenize_conversation(tok, no_flag)[1]) > sum(mask)


def test_rare_language_translation_is_up_weighted(tok):
    world = build_world(0)
    weight = dict(zip(world.language_names, world.language_weights))[RARE_LANGUAGE]

    def share(rare):
        cfg = config(non_thinking_mix={"translation": 1.0}, rare_translation_share=rare)
        samples = fusion.direct_samples(cfg, 400, random.Random(1))
        assert all(s.kind == "translation" for s in samples)
        return sum(RARE_LANGUAGE in (s.meta["src"], s.meta["tgt"]) for s in samples) / len(samples)

    assert share(0.4) > 2 * weight
    assert abs(share(0.4) - 0.4) < 0.08
    assert share(0.0) == 0.0
    report = fusion.data_report([{"messages": [], "category": "no_think_user_flag",
                                  "meta": {"kind": "translation", "src": RARE_LANGUAGE, "tgt": "Dorsk"}}])
    assert report["translation"]["rare_share"] == 1.0 and report["translation"]["rare_pretraining_weight"] == weight


def test_thinking_samples_are_verified_correct(records):
    task = get_reward("task")
    n = 0
    for r in records:
        if r["category"].startswith("think") or r["category"] == "budget":
            uid = r["meta"]["uid"]
            content = r["messages"][-1]["content"]
            # The answer after the think block verifies against the item the record names.
            question = next(m["content"] for m in r["messages"] if m["role"] == "user")
            item = _ITEMS[uid]
            assert question.startswith(item.question)
            assert task(content, item=item).score == 1.0
            n += 1
    assert n > 40


_ITEMS = {it.uid: it for it in fusion.sample_queries(config(n_queries=60))}


def test_accept_keeps_only_well_formed_correct_answers():
    item = tasks.generate("add", 3, 2)
    good = f"<think>\n{tasks.render_trace(item)}\n</think>\n\n{item.answer}<|im_end|>"
    assert fusion.accept(item, good) == (True, "accepted")
    wrong = good.replace(f"\n\n{item.answer}<", f"\n\n{int(item.answer) + 1}<")
    assert fusion.accept(item, wrong) == (False, "wrong_answer")
    assert fusion.accept(item, good, "length") == (False, "cut_by_length")
    assert fusion.accept(item, f"<think>\n{tasks.render_trace(item)}\n{item.answer}")[1] == "malformed_think_block"
    assert fusion.accept(item, f"<think>\n\n</think>\n\n{item.answer}<|im_end|>")[1] == "empty_reasoning"
    assert fusion.accept(item, f"<think>\nx\n</think>\n\n<|im_end|>")[1] == "empty_answer"
    assert fusion.accept(item, f"{item.answer}<|im_end|>")[1] == "malformed_think_block"
    assert fusion.accept(item, "<think>\na\n</think>\n<think>\nb\n</think>\n\n" + item.answer)[1] == \
        "malformed_think_block"


def test_rejection_sampling_counts_and_keeps_verified_samples(tok, monkeypatch):
    """With a stand-in sampler (every other sample right), exactly the right ones are kept, at most
    `keep` distinct ones per query, and the counts add up."""
    items = [tasks.generate("add", s, 2) for s in range(5)]
    calls = {"n": 0}

    def fake_generate(model, prompts, params, **kw):
        out = []
        for p in prompts:
            q = tok.decode(p).split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
            it = next(i for i in items if i.question == q)
            calls["n"] += 1
            answer = it.answer if calls["n"] % 2 else str(int(it.answer) + 1)
            text = f"<think>\nstep {calls['n']}\n</think>\n\n{answer}<|im_end|>"
            out.append(Generation(tok.encode(text), "stop"))
        return out

    monkeypatch.setattr(fusion, "generate", fake_generate)
    kept, stats = fusion.rejection_sample(torch.nn.Linear(1, 1), tok, items, k=4, keep=1, max_new_tokens=8,
                                          sampling=config().sampling, seed=0)
    assert stats["samples"] == 20 and stats["accepted"] == 10 and stats["acceptance_rate"] == 0.5
    assert stats["rejected_by"] == {"wrong_answer": 10}
    assert len(kept) == 5 and {s.item.uid for s in kept} == {it.uid for it in items}
    assert all(s.source == "model" and tasks.check_answer(s.item, s.answer) for s in kept)


def test_records_round_trip_through_the_chat_template(records):
    for r in records:
        text = render(r["messages"])
        final = text.rsplit("<|im_start|>assistant\n", 1)[1]
        got, want = parse(final), parse(r["messages"][-1]["content"])
        assert got["reasoning_content"] == want["reasoning_content"]
        assert got["content"] == want["content"] and got["content"]
        assert thinking_flag(r["messages"]) in (None, "think", "no_think")


def test_budget_examples_cut_the_trace_and_end_with_the_directive(records, tok):
    budget = [r for r in records if r["category"] == "budget"]
    assert budget
    for r in budget:
        reasoning = parse(r["messages"][-1]["content"])["reasoning_content"]
        assert reasoning.endswith(fusion.BUDGET_SENTENCE)
        partial = reasoning[: -len(fusion.BUDGET_SENTENCE)].rstrip("\n")
        full = tasks.render_trace(_ITEMS[r["meta"]["uid"]])
        assert full.startswith(partial) and len(partial) < len(full)
        assert 0 < r["meta"]["kept_tokens"] < r["meta"]["trace_tokens"]
        assert render(r["messages"]).endswith(f"{fusion.BUDGET_SENTENCE}\n</think>\n\n"
                                              f"{_ITEMS[r['meta']['uid']].answer}<|im_end|>\n")


def test_config_is_strict():
    with pytest.raises(ConfigError, match="unknown key"):
        fusion.FusionConfig.from_dict({"n_querys": 3})
    with pytest.raises(ConfigError, match="unknown key"):
        fusion.FusionConfig.from_dict({"sft": {"seq_len": 64, "batch_size": 2, "steps": 1, "lr": 1}})
    with pytest.raises(ConfigError, match="data"):
        fusion.FusionConfig.from_dict({"sft": {**SFT, "data": "x.jsonl"}})
    with pytest.raises(ConfigError):
        fusion.FusionConfig.from_dict({"sft": SFT, "budget_keep": [0.5, 1.2]})
    with pytest.raises(ConfigError):
        fusion.FusionConfig.from_dict({"sft": SFT, "non_thinking_mix": {"poetry": 1.0}})


# ----------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def parent(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("rl-parent")
    tok.save(d)
    torch.manual_seed(0)
    Qwen3(get_model_config("micro").replace(eos_token_id=tok.endoftext_id, bos_token_id=None)).save_pretrained(d)
    write_lineage(d, make_lineage("reasoning-rl", {"test": 1}))
    return d


def test_stage_runs_end_to_end_on_a_micro_model(tmp_path, parent):
    torch.set_num_threads(1)
    cfg = config()
    t0 = time.perf_counter()
    out = fusion.run(cfg, parent, StageContext(tmp_path / "fusion", tmp_path / "cache", **QUIET))
    seconds = time.perf_counter() - t0
    assert seconds < 20, seconds
    report = json.loads((out / fusion.REPORT_FILE).read_text())
    rs = report["rejection_sampling"]
    assert rs["samples"] == 24 and rs["accepted"] + sum(rs["rejected_by"].values()) == rs["samples"]
    # A random micro model writes nothing verifiable: the thinking data is all reference top-up.
    assert report["thinking_samples"] == {"model": rs["kept"], "reference_topup": 12 - rs["kept"], "min_thinking": 12}
    lines = [json.loads(x) for x in (out / fusion.DATA_FILE).read_text().splitlines()]
    assert len(lines) == report["conversations"] == sum(report["by_category"].values())
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n_train"] + ev["n_eval"] + ev["dropped_too_long"] == len(lines)
    lineage = read_lineage(out)
    assert lineage.stage == "fusion" and lineage.complete
    from qwen3repro.config import config_hash
    assert lineage.config_hash == config_hash(cfg) and lineage.parent_hash == read_lineage(parent).hash
    # A rerun with the same data settings reuses the data set (same file, same key).
    said = []
    fusion.run(cfg, parent, StageContext(tmp_path / "fusion", tmp_path / "cache", printer=said.append))
    assert any("reusing" in s for s in said)


def test_general_records_are_demonstrations_that_render_as_the_rl_prompts(tok):
    """The general-task conversations of the fusion set (their rewards are checked in test_general_tasks.py):
    a tool-use conversation renders exactly as the same chat rendered with its tools, as general RL prompts it."""
    cfg = config(n_general=60)
    records = fusion.general_records(cfg, cfg.n_general)
    assert len(records) == 60 and all(r["category"] == "general" for r in records)
    env = ToolEnvironment(default_tools(build_world(0)))
    with_tools = [r for r in records if general_tasks.GENERAL_TASKS[r["meta"]["task"]].tools]
    assert with_tools
    for r in with_tools:
        task = general_tasks.GENERAL_TASKS[r["meta"]["task"]]
        system, *rest = r["messages"]
        assert render(r["messages"]) == render(rest, tools=env.schemas(list(task.tools)))
        assert any(m["role"] == "tool" for m in rest)
    assert len({r["meta"]["task"] for r in records}) > 10
    with pytest.raises(ConfigError, match="unknown general_weights"):
        config(general_weights={"no_such_task": 1.0})


def test_general_records_answer_in_both_modes_by_their_share(tok):
    """`general_thinking_share` of the general conversations answer in thinking mode, flagged as the thinking
    samples are; each assistant turn follows the mode its flags ask for; tool conversations keep their tools."""
    cfg = config(n_general=200, general_thinking_share=0.6)
    records = fusion.general_records(cfg, cfg.n_general)
    modes = Counter(r["meta"]["mode"] for r in records)
    format_tasks = sum(general_tasks.GENERAL_TASKS[r["meta"]["task"]].domain == "format" for r in records)
    assert set(modes) == {"no_think", "unflagged", "think_user_flag", "think_system_flag"}
    thinking = sum(modes.values()) - modes["no_think"]
    assert 0.45 < thinking / (len(records) - format_tasks) < 0.75
    env = ToolEnvironment(default_tools(build_world(0)))
    for r in records:
        task = general_tasks.GENERAL_TASKS[r["meta"]["task"]]
        messages = r["messages"]
        if task.tools:
            system = fusion.THINK if r["meta"]["mode"] == "think_system_flag" else None
            assert messages[0] == {"role": "system",
                                   "content": tools_system_content(env.schemas(list(task.tools)), system=system)}
        if task.domain == "format":
            continue
        thinks = r["meta"]["mode"] != "no_think"
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                assert wants_thinking(messages[:i]) == thinks
                assert bool(parse(m["content"])["reasoning_content"].strip()) == thinks
    assert fusion.general_records(config(n_general=40), 40)[0]["meta"]["mode"] in ("no_think",)
    with pytest.raises(ConfigError, match="general_thinking_share"):
        config(general_thinking_share=1.5)


def test_grading_conversations_teach_the_judge_format_with_true_verdicts():
    """Each grading conversation is the judge client's own prompt and a verdict whose last `Score:` the
    judge parser reads as 1 for the reference answer and 0 for a response with one fact changed."""
    world = build_world(0)
    records = judging_conversations(40, seed=3, world=world)
    assert len(records) == 40 and 10 < sum(r["meta"]["agrees"] for r in records) < 30
    for r in records:
        user, assistant = r["messages"]
        assert user["content"].startswith(judge_prompt("", "", "x").split("[Problem]")[0])
        assert assistant["content"].startswith(EMPTY_THINK)
        score, _ = parse_score(assistant["content"])
        assert score == (1.0 if r["meta"]["agrees"] else 0.0)
        response = user["content"].split("[Response]\n", 1)[1].split("\n\n", 1)[0]
        reference = user["content"].split("[Reference answer]\n", 1)[1].split("\n\n", 1)[0]
        assert (response == reference) == r["meta"]["agrees"]
    rng = random.Random(0)
    text = "Tamor lives in Belka. Tamor is 31 years old."
    for _ in range(20):
        changed = corrupt(text, world, rng)
        assert changed is not None and changed != text and len(changed.split()) == len(text.split())
    assert corrupt("no facts here", world, rng) is None
