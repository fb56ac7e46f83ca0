"""General RL (Qwen3 report §4.4): prompts in both modes, the scorer (mode gate, malformed-call penalty,
counted no-reward outcomes), tool spans masked out of the batch, the judge over real HTTP (and down), and
the stage end to end with exact resume."""
from __future__ import annotations

import dataclasses
import json
import math
import random
import socket

import pytest
import torch

from qwen3repro.chat import EMPTY_THINK, thinking_flag, wants_thinking
from qwen3repro.config import ConfigError
from qwen3repro.data import general_tasks
from qwen3repro.data.queries import Query
from qwen3repro.data.world import build_world
from qwen3repro.generate import Generation
from qwen3repro.lineage import make_lineage, read_lineage, write_lineage
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.models.registry import get_model_config
from qwen3repro.models.reward import Qwen3RewardModel
from qwen3repro.rewards import REWARDS, RewardResult, register
from qwen3repro.rl.entropy import EntropyController
from qwen3repro.rl.rollout import Group, build_batch
from qwen3repro.stages import grpo
from qwen3repro.stages import general_rl
from qwen3repro.stages.common import StageContext
from qwen3repro.tokenizer import train_tokenizer
from qwen3repro.tools import ToolEnvironment, Trajectory, default_tools, tool_rollouts
from qwen3repro.generate import SamplingParams

ANSWER = "<think>\nThe user asks a question.\n</think>\n\nTamor lives in Belka.<|im_end|>"
NO_THINK_ANSWER = EMPTY_THINK + "Tamor lives in Belka.<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    world = build_world(0)
    texts = [q.question for q in general_tasks.sample_queries(
        {n: 1.0 for n in general_tasks.GENERAL_TASKS if general_tasks.GENERAL_TASKS[n].reward != "reward_model"},
        300, seed=0, heldout=False, world=world)]
    texts += [world.render(lang, world.random_frame(rng)) for lang in world.language_names for _ in range(10)]
    return train_tokenizer(texts + [ANSWER, NO_THINK_ANSWER], 500)


def _cfg(**kw) -> general_rl.GeneralRLConfig:
    base = dict(tasks={"tool_lookup": 1.0, "judge_profile": 1.0, "if_lowercase": 1.0, "format_no_think": 1.0},
                n_queries=16, steps=3, queries_per_step=2, group_size=2, max_new_tokens=24, max_completion_tokens=120,
                max_gen_rounds=1, eval_every=2, eval_per_task=1, ckpt_every=1, judge_max_tokens=6,
                judge_timeout=20.0, lr=1e-3)
    return general_rl.GeneralRLConfig.from_dict({**base, **kw})


def _traj(final_text: str, calls=(), mask=None) -> Trajectory:
    ids = [1, 2, 3]
    return Trajectory(prompt=[0], completion=ids, loss_mask=mask or [1, 1, 1], logprobs=[-1.0] * 3,
                      turns=[final_text], calls=list(calls), responses=[], finish_reason="stop")


# ----------------------------------------------------------------------------- configuration and prompts
def test_config_names_the_problem():
    with pytest.raises(ConfigError, match="unknown tasks"):
        _cfg(tasks={"no_such_task": 1.0})
    with pytest.raises(ConfigError, match="flag shares"):
        _cfg(think_flag_share=0.7, no_think_flag_share=0.5)
    with pytest.raises(ConfigError, match="max_completion_tokens"):
        _cfg(max_completion_tokens=8)
    with pytest.raises(ConfigError, match="unknown key"):
        general_rl.GeneralRLConfig.from_dict({"stepz": 3})
    assert set(general_rl.GeneralRLConfig().task_weights) == set(general_tasks.GENERAL_TASKS)
    assert len(general_rl.GeneralRLConfig().task_weights) >= 20


def test_prompts_ask_for_the_drawn_mode_and_offer_the_query_tools(tok):
    cfg = _cfg(think_flag_share=0.4, no_think_flag_share=0.4, system_flag_share=0.5)
    env = ToolEnvironment(default_tools(build_world(0)))
    rng = random.Random(0)
    modes = []
    for q in general_rl.training_queries(cfg):
        mode, in_system = general_rl.draw_mode(rng, cfg)
        p = general_rl.build_prompt(q, mode, in_system, tok, env)
        modes.append(p.mode)
        assert wants_thinking(list(p.messages)) == p.thinking
        assert tok.decode(list(p.ids)).endswith("<|im_start|>assistant\n")
        if "thinking" in q.reference:  # a format task keeps its own flags and mode
            assert p.thinking == q.reference["thinking"] and p.messages[-1]["content"] == q.question
        elif p.mode == "unflagged":
            assert thinking_flag(list(p.messages)) is None
        assert ("<tools>" in tok.decode(list(p.ids))) == bool(q.tools)
        assert q.domain in cfg.task_weights  # the task's name, for per-task metrics
    assert {"think", "no_think", "unflagged"} <= set(modes)


def test_training_and_heldout_queries_are_disjoint():
    cfg = _cfg(n_queries=64, eval_per_task=8)
    train = {q.uid for q in general_rl.training_queries(cfg)}
    held = general_rl.heldout_queries(cfg)
    assert not train & {q.uid for q in held}
    assert [q.domain for q in held] == [t for t in cfg.task_weights for _ in range(8)]


# ----------------------------------------------------------------------------- the scorer
def _prompt(query: Query, mode: str) -> general_rl.Prompt:
    return general_rl.Prompt(query, ({"role": "user", "content": query.question},), mode, (0,))


def test_the_scorer_gates_on_the_mode_penalises_malformed_calls_and_counts_no_reward():
    q = Query("u1", "Where does Tamor live?", "knowledge_recall", None, "answer_match", {"answer": "Belka",
                                                                                       "match": "contains"})
    scorer = general_rl.Scorer(_cfg())
    assert scorer.score(_prompt(q, "think"), _traj(ANSWER)) == (1.0, True)
    assert scorer.score(_prompt(q, "no_think"), _traj(ANSWER)) == (0.0, False)  # right answer, wrong mode
    assert scorer.counts["mode_gate"] == 1
    malformed = [{"name": None, "arguments": None, "outcome": "invalid_call"}]
    value, _ = scorer.score(_prompt(q, "no_think"), _traj(NO_THINK_ANSWER, malformed))
    assert value == pytest.approx(1.0 - 0.1)
    ran = [{"name": "lookup", "arguments": {}, "outcome": "ok"}]
    failed = [{"name": "lookup", "arguments": {}, "outcome": "tool_error"}]
    with_tools = dataclasses.replace(q, tools=("lookup",))
    assert scorer.score(_prompt(with_tools, "no_think"), _traj(NO_THINK_ANSWER, ran))[0] == pytest.approx(1.2)
    assert scorer.score(_prompt(with_tools, "no_think"), _traj(NO_THINK_ANSWER, failed))[0] == 1.0
    assert scorer.score(_prompt(q, "no_think"), _traj(NO_THINK_ANSWER, ran))[0] == 1.0  # no tools offered
    ungated = general_rl.Scorer(_cfg(format_gate=False))
    assert ungated.score(_prompt(q, "no_think"), _traj(ANSWER)) == (1.0, False)
    # No reward function, a reward that raises, a reward with no score: NaN and a counted reason.
    missing = Query("u2", "x", "t", None, "no_such_reward", {})
    value, _ = scorer.score(_prompt(missing, "think"), _traj(ANSWER))
    assert math.isnan(value) and scorer.counts["no_reward/no reward function 'no_such_reward'"] == 1

    @register("test_raises")
    def raises(completion: str) -> RewardResult:
        raise RuntimeError("bug")

    @register("test_none")
    def none(completion: str) -> RewardResult:
        return RewardResult(None, "judge: timeout: read timed out")

    try:
        for name in ("test_raises", "test_none"):
            value, _ = scorer.score(_prompt(Query("u3", "x", "t", None, name, {}), "think"), _traj(ANSWER))
            assert math.isnan(value)
        assert scorer.counts["no_reward/test_raises/reward error"] == 1
        assert scorer.counts["no_reward/test_none/judge"] == 1
    finally:
        REWARDS.pop("test_raises")
        REWARDS.pop("test_none")


def test_the_format_reward_receives_the_prompt_mode():
    q = Query("u4", "What is Tamor's pet? /no_think", "format_no_think", None, "format", {"thinking": False})
    scorer = general_rl.Scorer(_cfg(format_gate=False))
    assert scorer.score(_prompt(q, "no_think"), _traj(NO_THINK_ANSWER))[0] == 1.0
    assert scorer.score(_prompt(q, "no_think"), _traj(ANSWER))[0] == 0.0


def test_summaries_tabulate_by_task_mode_and_tool_outcome():
    rows = [{"task": "a", "mode": "think", "reward": 1.0, "followed": True, "calls": 1, "ok_calls": 1, "malformed": 0,
             "length": 10, "tools_offered": True},
            {"task": "a", "mode": "no_think", "reward": float("nan"), "followed": False, "calls": 2, "ok_calls": 1,
             "malformed": 1, "length": 20, "tools_offered": True},
            {"task": "b", "mode": "unflagged", "reward": 0.0, "followed": True, "calls": 0, "ok_calls": 0,
             "malformed": 0, "length": 30, "tools_offered": False}]
    s = general_rl.summarize_records(rows, "x/")
    assert s["x/reward"] == 0.5 and s["x/reward/a"] == 1.0 and s["x/reward/b"] == 0.0
    assert s["x/follow"] == pytest.approx(2 / 3) and s["x/follow/no_think"] == 0.0
    assert s["x/tool_success"] == 0.5 and s["x/tool_calls"] == 1.5 and s["x/no_reward_share"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- tool spans leave the loss
def test_tool_response_tokens_are_masked_out_of_the_batch(tok):
    """A trajectory with a tool call becomes a batch row whose completion mask is its loss mask: 0 on the
    tool-response span, 1 on the model's tokens, so neither the policy loss nor the KL reads the tool's text."""
    world = build_world(0)
    env = ToolEnvironment(default_tools(world))
    person = world.people[0]
    prompt = tok.encode(f"<|im_start|>user\nWhere does {person.name} live?<|im_end|>\n<|im_start|>assistant\n")
    call = ('<tool_call>\n{"name": "lookup", "arguments": {"name": "%s", "attribute": "home"}}\n</tool_call>'
            % person.name)
    turns = [EMPTY_THINK + call + "<|im_end|>", NO_THINK_ANSWER]

    def script(model, rows, sampling, *, max_new_tokens, **kwargs):
        out = []
        for row in rows:
            ids = tok.encode(turns[0] if len(row) == len(prompt) else turns[1])
            out.append(Generation(ids, "stop", [-0.5] * len(ids)))
        return out

    trajs = tool_rollouts(None, tok, [prompt, prompt], env, sampling=SamplingParams(), max_new_tokens=300,
                          max_completion_tokens=400, generate_fn=script)
    assert all(t.n_calls == 1 and t.n_ok_calls == 1 for t in trajs)
    group = Group(Query("q", "x", "tool_lookup"), prompt, [t.completion for t in trajs], [t.logprobs for t in trajs],
                  [[m == 0 for m in t.loss_mask] for t in trajs], ["stop", "stop"], [1.0, 0.0])
    batch = build_batch([group], pad_id=tok.pad_token_id)
    for row, t in enumerate(trajs):
        assert batch.completion_mask[row, :len(t.completion)].tolist() == [float(m) for m in t.loss_mask]
        masked = [tid for tid, m in zip(t.completion, t.loss_mask) if m == 0]
        assert "<tool_response>" in tok.decode(masked) and person.attr("home") in tok.decode(masked)
        assert "<tool_response>" not in t.final_text


# ----------------------------------------------------------------------------- the stage
@pytest.fixture()
def parents(tmp_path, tok):
    fusion = tmp_path / "fusion"
    torch.manual_seed(0)
    Qwen3(get_model_config("micro")).save_pretrained(fusion)
    tok.save(fusion)
    write_lineage(fusion, make_lineage("fusion", {"toy": 1}))
    rm = tmp_path / "reward-model"
    torch.manual_seed(1)
    Qwen3RewardModel.from_causal_lm(Qwen3.from_pretrained(fusion)).save_pretrained(rm, pad_token_id=tok.pad_token_id)
    tok.save(rm)
    write_lineage(rm, make_lineage("reward-model", {"toy": 2}, fusion))
    return fusion, rm


def _scripted(tok):
    """A policy that always answers (so the judge and the reward model are asked), in a mode that depends
    on the prompt's length (so groups of one prompt agree and differ between prompts)."""
    def generate_fn(model, rows, sampling, *, max_new_tokens, **kwargs):
        out = []
        for row in rows:
            text = ANSWER if len(row) % 2 else NO_THINK_ANSWER
            ids = tok.encode(text)[:max_new_tokens]
            out.append(Generation(ids, "stop", [-0.3] * len(ids)))
        return out
    return generate_fn


def _records(out):
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")}
            for r in map(json.loads, (out / "metrics.jsonl").open())]


def test_stage_runs_end_to_end_with_a_loopback_judge_and_resumes_exactly(tmp_path, tok, parents, monkeypatch, cut_at_call):
    fusion, rm = parents
    cfg = _cfg()
    quiet = lambda s: None  # noqa: E731
    out = general_rl.run(cfg, fusion, StageContext(tmp_path / "full", tmp_path / "cache", quiet,
                                                   inputs={"reward-model": rm}))
    for name in ("model.safetensors", "tokenizer.json", "eval.json", "lineage.json", "metrics.jsonl"):
        assert (out / name).exists(), name
    records = _records(out)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert [r["step"] for r in records if "eval/reward" in r] == [0, 2, 3]
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["before"]) == set(ev["after"]) and "reward/judge_profile" in ev["after"]
    assert sum(ev["judge"].values()) > 0  # the judge was asked over HTTP and every answer counted
    lineage = read_lineage(out)
    assert lineage.uses == {"reward-model": read_lineage(rm).hash}
    # A cut after the step-2 checkpoint resumes to the same metrics.
    cut = tmp_path / "cut"
    with cut_at_call(general_rl, "collect", 3):
        general_rl.run(cfg, fusion, StageContext(cut, tmp_path / "cache", quiet, inputs={"reward-model": rm}))
    general_rl.run(cfg, fusion, StageContext(cut, tmp_path / "cache", quiet, inputs={"reward-model": rm}))
    assert _records(cut) == records


def test_a_judge_that_is_down_gives_counted_no_reward_and_the_run_goes_on(tmp_path, tok, parents, monkeypatch):
    fusion, rm = parents
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(tasks={"judge_profile": 1.0, "write_person": 1.0}, steps=1, eval_every=1, format_gate=False,
               judge_base_url=f"http://127.0.0.1:{port}/v1", judge_retries=0, judge_timeout=2.0)
    script = _scripted(tok)
    monkeypatch.setattr(general_rl, "tool_rollouts",
                        lambda *a, **k: tool_rollouts(*a, **{**k, "generate_fn": script}))
    out = general_rl.run(cfg, fusion, StageContext(tmp_path / "down", tmp_path / "cache", lambda s: None,
                                                   inputs={"reward-model": rm}))
    ev = json.loads((out / "eval.json").read_text())
    assert ev["judge"]["connection_error"] > 0 and ev["judge"]["scored"] == 0
    assert any(k.startswith("no_reward/judge/judge") for k in ev["counts"])
    assert ev["after"]["reward/judge_profile"] is None  # no reward, never a silent 0
    assert 0.0 < ev["after"]["reward/write_person"] < 1.0  # the reward model scored (sigmoid of its score)
    assert (out / "lineage.json").exists()


def test_the_stage_needs_its_reward_model(tmp_path, parents):
    fusion, _ = parents
    with pytest.raises(FileNotFoundError, match="reward-model"):
        general_rl.run(_cfg(), fusion, StageContext(tmp_path / "x", tmp_path / "cache", lambda s: None))


def test_a_task_without_a_reward_function_is_left_out_and_reported(monkeypatch):
    monkeypatch.delitem(REWARDS, "reward_model")
    cfg = _cfg(tasks={"write_person": 1.0, "if_lowercase": 1.0})
    assert cfg.unscored_tasks == {"write_person": "no reward function 'reward_model' registered"}
    assert set(cfg.task_weights) == {"if_lowercase"}
    assert {q.domain for q in general_rl.training_queries(cfg)} == {"if_lowercase"}


def test_tool_outcomes_are_counted_by_name():
    rows = [{"task": "t", "mode": "think", "reward": 0.0, "followed": True, "calls": 3, "ok_calls": 1,
             "malformed": 1, "length": 5, "tools_offered": True,
             "outcomes": ["ok", "invalid_call", "unknown_tool"]},
            {"task": "t", "mode": "think", "reward": 1.0, "followed": True, "calls": 1, "ok_calls": 0,
             "malformed": 0, "length": 5, "tools_offered": True, "outcomes": ["tool_error"]}]
    s = general_rl.summarize_records(rows)
    assert {k: v for k, v in s.items() if k.startswith("calls/")} == {
        "calls/invalid_call": 1.0, "calls/ok": 1.0, "calls/tool_error": 1.0, "calls/unknown_tool": 1.0}


def test_bucketed_update_equals_the_whole_batch_update(tok):
    """Tool and non-tool rollouts are padded as two batches; the accumulated, weighted gradient equals the
    gradient of the reasoning stage's update over one batch of all the rows (dapo and grpo aggregation, and
    advantages scaled by the whole batch's reward std, not a bucket's)."""
    torch.manual_seed(0)
    model = Qwen3(get_model_config("micro"))
    reference = Qwen3(get_model_config("micro")).eval()
    g = torch.Generator().manual_seed(0)
    groups = []
    for i, (tools, prompt_len) in enumerate([((), 7), (("lookup",), 40), ((), 9)]):
        comps = [torch.randint(0, 400, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(3)]
        forced = [[bool(k % 4 == 3) for k in range(len(c))] for c in comps]  # some tool-span tokens
        groups.append(Group(Query(f"q{i}", "x", "t", tools=tools), list(range(1, prompt_len + 1)), comps,
                            [[-1.0] * len(c) for c in comps], forced, ["stop"] * 3,
                            [[0.0, 1.0, 0.5], [0.0, 0.2, 0.1], [1.2, -0.05, 0.0]][i]))
    for loss_type, scale in (("dapo", "group"), ("grpo", "group"), ("dapo", "batch")):
        cfg = _cfg(loss_type=loss_type, mu=1, entropy_control="bonus", entropy_coef=0.01, scale_rewards=scale)
        controller = EntropyController("bonus", 0.01)
        cut = general_rl.bucket_groups(groups)
        buckets = [general_rl.Bucket.of(b, model, reference, cfg, tok.pad_token_id, "cpu", a)
                   for b, a in zip(cut, general_rl.step_advantages(groups, cut, scale))]
        assert len(buckets) >= 2
        frozen = torch.optim.SGD(model.parameters(), lr=0.0)
        general_rl.optimisation_passes(model, frozen, buckets, cfg, controller, 1.0, lambda k: 0.0)
        bucketed = [p.grad.clone() for p in model.parameters()]
        whole = build_batch(groups, pad_id=tok.pad_token_id, scale_rewards=scale)
        with torch.no_grad():
            old, _ = general_rl.policy_logprobs(model, whole, cfg.temperature)
        grpo_cfg = grpo.GRPOConfig(loss_type=loss_type, mu=1, mini_batches=1, max_new_tokens=cfg.max_completion_tokens)
        grpo.optimisation_passes(model, frozen, whole, old, None, grpo_cfg, controller, 1.0, torch.Generator(),
                                 lambda k: 0.0)
        for a, b in zip(bucketed, (p.grad for p in model.parameters())):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_buckets_cover_every_group_once_and_cut_the_padding():
    def group(prompt_len: int, completion_len: int, tag: str) -> Group:
        return Group(Query(tag, "x", "t"), [1] * prompt_len, [[2] * completion_len] * 2, [[0.0] * completion_len] * 2,
                     [[False] * completion_len] * 2, ["stop"] * 2, [0.0, 1.0])
    groups = [group(600, 100, "a"), group(40, 20, "b"), group(620, 90, "c"), group(300, 30, "d"), group(50, 10, "e")]
    buckets = general_rl.bucket_groups(groups)
    assert sorted(g.query.uid for b in buckets for g in b) == list("abcde")
    assert len(buckets) <= general_rl.MAX_BUCKETS
    assert [sorted(g.query.uid for g in b) for b in buckets] == [["b", "e"], ["d"], ["a", "c"]]
    assert sum(general_rl._padded_cells(b) for b in buckets) < 0.6 * general_rl._padded_cells(groups)
    assert general_rl.bucket_groups(groups, max_buckets=1) == [sorted(groups, key=lambda g: len(g.prompt))]
