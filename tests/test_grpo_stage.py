"""Reasoning RL with GRPO (Qwen3 report §4.2): rollouts, dynamic sampling, the first pass on-policy,
the entropy controller, a toy task that learns, and the stage end to end with exact resume."""
from __future__ import annotations

import json
import math
from collections import Counter
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from qwen3repro.config import ConfigError
from qwen3repro.data.queries import Query
from qwen3repro.lineage import make_lineage, write_lineage
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.models.registry import get_model_config
from qwen3repro.rewards import RewardResult
from qwen3repro.rl.entropy import EntropyController, masked_mean, token_entropy
from qwen3repro.rl.selection import BELOW_CUT, UNLEARNABLE, SelectionResult
from qwen3repro.rl.rollout import (
    QueryStream, build_batch, collect_rollouts, policy_logprobs, prompt_ids, sample_groups,
)
from qwen3repro.stages import grpo
from qwen3repro.stages.common import StageContext
from qwen3repro.tokenizer import train_tokenizer
from qwen3repro.train.loop import build_optimizer


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 6))) for _ in range(200)]
    return train_tokenizer([" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)], 400)


def _micro(seed: int = 0) -> Qwen3:
    torch.manual_seed(seed)
    return Qwen3(get_model_config("micro"))


def _queries(n: int) -> list[Query]:
    return [Query(f"q{i:03d}", f"question number {i} abc", "toy", 1 + i % 3, "task") for i in range(n)]


def first_token_reward(query, text, ids) -> RewardResult:
    """The toy task: the answer is right when the first generated token is in a fixed quarter of the
    vocabulary (about 25% of a random model's samples, so most groups are mixed at the start)."""
    return RewardResult(1.0 if ids and ids[0] % 4 == 0 else 0.0)


# ----------------------------------------------------------------------------- rollouts
def test_rollout_shapes_and_logprobs_match_a_recomputed_forward(tok):
    model = _micro().eval()
    qs = _queries(3)
    gen = torch.Generator().manual_seed(0)
    groups = sample_groups(model, tok, qs, 4, max_new_tokens=6, temperature=0.7, generator=gen,
                           score_fn=first_token_reward)
    assert [len(g.completions) for g in groups] == [4, 4, 4]
    assert groups[0].prompt == prompt_ids(tok, qs[0])
    assert tok.decode(groups[0].prompt).endswith("<|im_start|>assistant\n")  # thinking mode: no empty think block
    batch = build_batch(groups, pad_id=tok.pad_token_id)
    n, t = 12, max(len(c) for g in groups for c in g.completions)
    assert batch.input_ids.shape == (n, batch.prompt_width + t) and batch.completion_mask.shape == (n, t)
    assert batch.completion_mask.sum() == sum(len(c) for g in groups for c in g.completions)
    with torch.no_grad():
        logps, entropy = policy_logprobs(model, batch, 0.7)
    mask = batch.completion_mask.bool()
    assert torch.allclose(logps[mask], batch.sampler_logps[mask], atol=1e-4)
    assert entropy.shape == (n, t) and bool((entropy[mask] > 0).all())
    # Advantages are group-normalised: zero mean within every group.
    assert torch.allclose(batch.advantages.view(3, 4).sum(1), torch.zeros(3), atol=1e-5)


def test_all_equal_groups_are_dropped_and_the_batch_refilled(tok):
    model = _micro().eval()
    qs = _queries(40)
    calls: dict[str, int] = {}

    def score(query, text, ids):  # even queries: always right (no signal); odd: one right sample in four
        calls[query.uid] = calls.get(query.uid, 0) + 1
        if int(query.uid[1:]) % 2 == 0:
            return RewardResult(1.0)
        return RewardResult(1.0 if calls[query.uid] % 4 == 1 else 0.0)

    stream = QueryStream(qs, seed=0)
    kept, stats = collect_rollouts(model, tok, stream, n_groups=4, group_size=4, max_new_tokens=2,
                                   generator=torch.Generator().manual_seed(0), dynamic_sampling=True,
                                   max_rounds=10, score_fn=score)
    assert len(kept) == 4 and all(g.mixed for g in kept)
    assert all(int(g.query.uid[1:]) % 2 == 1 for g in kept)
    assert stats.rounds > 1 and stats.groups_generated == 4 + stats.groups_zero_variance
    assert 0 < stats.zero_variance_share < 1
    # Without dynamic sampling: one round, every group kept (the equal ones with zero advantages).
    kept, stats = collect_rollouts(model, tok, QueryStream(qs, seed=0), n_groups=4, group_size=4, max_new_tokens=2,
                                   generator=torch.Generator().manual_seed(0), dynamic_sampling=False,
                                   score_fn=score)
    assert len(kept) == 4 and stats.rounds == 1
    # "No reward" (None) is ignored, never scored as 0: a group with one valid sample has no signal.
    none_groups, stats = collect_rollouts(model, tok, QueryStream(qs, 0), n_groups=2, group_size=4, max_new_tokens=2,
                                          generator=torch.Generator().manual_seed(0), max_rounds=2,
                                          score_fn=lambda q, t, i: RewardResult(None, "sandbox down"))
    assert none_groups == [] and stats.groups_no_reward == stats.groups_generated == 4
    assert math.isnan(stats.mean_reward)


def test_query_stream_resumes_exactly():
    qs = _queries(5)
    a = QueryStream(qs, seed=3)
    first = [q.uid for q in a.take(7)]
    b = QueryStream(qs, seed=3)
    b.load_state_dict(a.state_dict())
    assert [q.uid for q in a.take(6)] == [q.uid for q in b.take(6)]
    assert sorted(first[:5]) == sorted(q.uid for q in qs)  # each epoch is a permutation


# ----------------------------------------------------------------------------- updates
def test_first_pass_is_on_policy_ratio_one_and_no_clipping(tok):
    model = _micro()
    cfg = grpo.GRPOConfig(steps=1, queries_per_step=4, group_size=4, max_new_tokens=3, lr=1e-2, mu=3,
                          mini_batches=2, entropy_control="none")
    gen = torch.Generator().manual_seed(0)
    groups, _ = collect_rollouts(model, tok, QueryStream(_queries(8), 0), n_groups=4, group_size=4,
                                 max_new_tokens=3, generator=gen, score_fn=first_token_reward)
    batch = build_batch(groups, pad_id=tok.pad_token_id)
    with torch.no_grad():
        old, _ = policy_logprobs(model, batch)
    opt = build_optimizer(model, cfg.train_config())
    records = grpo.optimisation_passes(model, opt, batch, old, old.clone(), cfg, EntropyController("none"), 0.0,
                                       gen, lambda k: cfg.lr)
    assert len(records) == cfg.mu * cfg.mini_batches
    assert records[0]["clip_fraction"] == 0.0
    assert abs(records[0]["ratio_max"] - 1.0) < 1e-5 and abs(records[0]["ratio_mean"] - 1.0) < 1e-6
    assert records[0]["kl"] < 1e-6  # reference = the policy before any update
    assert max(abs(r["ratio_mean"] - 1.0) for r in records[1:]) > 1e-4  # later mini-batches are off-policy
    assert records[-1]["kl"] > records[0]["kl"]


def test_entropy_controller_moves_towards_its_target():
    uniform = torch.zeros(2, 3, 50)
    assert torch.allclose(token_entropy(uniform), torch.full((2, 3), math.log(50)))
    peaked = torch.tensor([[4.0, 0.0, 0.0]])
    assert float(token_entropy(peaked, 2.0)) > float(token_entropy(peaked, 1.0))  # T flattens
    assert float(masked_mean(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 0.0]))) == 1.0

    c = EntropyController("adaptive", coef=0.0, coef_delta=0.01, coef_max=0.02)
    c.update(1.0)  # first entropy sets the target (ratio 1)
    assert c.target == 1.0 and c.coef == 0.0  # at target: moves down, clamped at 0
    assert c.update(0.8) == pytest.approx(0.01) and c.active_coef(0.8) == pytest.approx(0.01)
    assert c.update(0.7) == pytest.approx(0.02)
    assert c.update(0.6) == pytest.approx(0.02)  # clamped at coef_max
    assert c.active_coef(1.2) == 0.0  # above target: no bonus
    assert c.update(1.2) == pytest.approx(0.01)  # above target: coefficient falls
    saved = c.state_dict()
    d = EntropyController("adaptive", coef_delta=0.01, coef_max=0.02)
    d.load_state_dict(saved)
    assert (d.coef, d.target) == (c.coef, c.target)
    assert EntropyController("bonus", coef=0.05).active_coef(9.9) == 0.05
    assert EntropyController("none", coef=0.05).active_coef(0.0) == 0.0
    with pytest.raises(ValueError):
        EntropyController("sometimes")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.01, 5.0), min_size=1, max_size=30), st.floats(0.0, 2.0), st.floats(0.0, 1.0),
       st.floats(0.3, 1.5), st.integers(1, 6))
def test_proportional_controller_follows_its_definition(entropies, gain, coef_max, ratio, window):
    """coef = min(max, gain * max(0, 1 - mean(last window)/target)), target = ratio * mean(first window)."""
    c = EntropyController("proportional", coef_max=coef_max, target_ratio=ratio, gain=gain, window=window)
    for i, h in enumerate(entropies):
        coef = c.update(h)
        recent = entropies[max(0, i + 1 - window):i + 1]
        target = ratio * sum(entropies[:min(i + 1, window)]) / min(i + 1, window)
        want = min(coef_max, gain * max(0.0, 1.0 - (sum(recent) / len(recent)) / target))
        assert coef == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert c.active_coef(99.0) == coef  # smoothed: one batch's entropy does not gate it
        assert 0.0 <= coef <= coef_max
    resumed = EntropyController("proportional", coef_max=coef_max, target_ratio=ratio, gain=gain, window=window)
    resumed.load_state_dict(c.state_dict())
    assert resumed.update(0.5) == c.update(0.5)  # a resumed run continues with the same coefficient


def test_proportional_controller_grows_with_the_shortfall():
    c = EntropyController("proportional", coef_max=0.1, gain=0.2, window=2)
    assert c.update(1.0) == 0.0 and c.update(1.0) == 0.0  # at the target: no bonus
    assert c.target == 1.0
    assert c.update(0.6) == pytest.approx(0.2 * 0.2)  # mean(1.0, 0.6) = 0.8: 20% short
    assert c.update(0.6) == pytest.approx(0.2 * 0.4)  # mean 0.6: 40% short
    assert c.update(0.1) == pytest.approx(0.1)  # capped at coef_max
    assert c.target == 1.0  # fixed after the first window


def test_entropy_bonus_raises_entropy_relative_to_no_bonus(tok):
    """The same updates with a large bonus end with a higher policy entropy than without it."""
    ends = {}
    for mode in ("none", "bonus"):
        model = _micro()
        cfg = grpo.GRPOConfig(steps=1, queries_per_step=4, group_size=4, max_new_tokens=2, lr=1e-2, mu=2,
                              entropy_control=mode, entropy_coef=0.5)
        opt = build_optimizer(model, cfg.train_config())
        stream = QueryStream(_queries(16), 0)
        ctl = EntropyController(mode, coef=0.5)
        for step in range(4):
            gen = torch.Generator().manual_seed(step)
            groups, _ = collect_rollouts(model, tok, stream, n_groups=4, group_size=4, max_new_tokens=2,
                                         generator=gen, score_fn=first_token_reward, max_rounds=3)
            batch = build_batch(groups, pad_id=tok.pad_token_id)
            with torch.no_grad():
                old, ent = policy_logprobs(model, batch)
            grpo.optimisation_passes(model, opt, batch, old, None, cfg, ctl, float(masked_mean(ent, batch.completion_mask)),
                                     gen, lambda k: cfg.lr)
        with torch.no_grad():
            _, ent = policy_logprobs(model, batch)
        ends[mode] = float(masked_mean(ent, batch.completion_mask))
    assert ends["bonus"] > ends["none"]


def test_grpo_learns_a_toy_task(tok):
    """A random micro model learns to start its answer with a token of the rewarded quarter."""
    model = _micro()
    cfg = grpo.GRPOConfig(steps=1, queries_per_step=4, group_size=8, max_new_tokens=2, lr=1e-2, mu=2,
                          entropy_control="none")
    opt = build_optimizer(model, cfg.train_config())
    stream = QueryStream(_queries(16), 0)
    rewards = []
    for step in range(20):
        gen = torch.Generator().manual_seed(step)
        groups, stats = collect_rollouts(model, tok, stream, n_groups=4, group_size=8, max_new_tokens=2,
                                         generator=gen, score_fn=first_token_reward, max_rounds=4)
        rewards.append(stats.mean_reward)
        if groups:
            batch = build_batch(groups, pad_id=tok.pad_token_id)
            with torch.no_grad():
                old, _ = policy_logprobs(model, batch)
            grpo.optimisation_passes(model, opt, batch, old, None, cfg, EntropyController("none"), 0.0, gen,
                                     lambda k: cfg.lr)
    assert sum(rewards[:3]) / 3 < 0.45
    assert sum(rewards[-3:]) / 3 > 0.85


# ----------------------------------------------------------------------------- the stage
def test_config_is_strict():
    with pytest.raises(ConfigError, match="unknown key"):
        grpo.GRPOConfig.from_dict({"group_sizee": 8})
    with pytest.raises(ConfigError, match="loss_type"):
        grpo.GRPOConfig(loss_type="ppo")
    with pytest.raises(ConfigError, match="families"):
        grpo.GRPOConfig(families=("poetry",))
    with pytest.raises(ConfigError, match="group_size"):
        grpo.GRPOConfig(group_size=1)


@pytest.fixture()
def parent_dir(tmp_path, tok):
    d = tmp_path / "coldstart"
    model = _micro()
    model.save_pretrained(d)
    tok.save(d)
    write_lineage(d, make_lineage("coldstart", {"toy": 1}))
    return d


STAGE = dict(families=["add", "mul"], n_candidates=12, n_queries=6, selection_k=4, pass_rate_ceiling=1.0,
             steps=4, queries_per_step=2, group_size=4, max_new_tokens=2, lr=1e-2, mu=2, eval_every=2,
             eval_items=4, eval_k=4, ckpt_every=2, entropy_control="proportional", entropy_gain=2.0,
             entropy_target_ratio=1.5)  # a target above the start: the bonus is on from step 2


def _records(out):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in map(json.loads, (out / "metrics.jsonl").open())]


def test_stage_runs_and_resumes_exactly(tmp_path, parent_dir, monkeypatch, cut_at_call):
    cfg = grpo.GRPOConfig.from_dict(STAGE)
    quiet = lambda s: None  # noqa: E731
    full = grpo.run(cfg, parent_dir, StageContext(tmp_path / "full", tmp_path / "cache", quiet),
                    score_fn=first_token_reward)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "eval.json", "lineage.json",
                 "selection.json", "state/trainer.json"):
        assert (full / name).exists(), name
    records = _records(full)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    for key in ("reward", "entropy", "response_length", "clip_fraction", "kl", "zero_variance_share"):
        assert all(key in r for r in records[1:]), key
    assert all(r["first_pass_clip_fraction"] == 0.0 for r in records[1:])
    assert [r["step"] for r in records if "eval/pass@1" in r] == [0, 2, 4]
    ev = json.loads((full / "eval.json").read_text())
    assert ev["eval_settings"]["samples_per_item"] == 4 and ev["pass@1_before"] is not None
    assert ev["selection"]["n_selected"] > 0
    assert "claim" not in ev and "report" not in ev  # the stage knows nothing of the claims

    # Cut the run during step 3 (after the step-2 checkpoint), then resume.
    cut = tmp_path / "cut"
    with cut_at_call(grpo, "collect_rollouts", 3):
        grpo.run(cfg, parent_dir, StageContext(cut, tmp_path / "cache", quiet), score_fn=first_token_reward)
    assert [r["step"] for r in _records(cut)] == [0, 1, 2]
    said = []
    grpo.run(cfg, parent_dir, StageContext(cut, tmp_path / "cache", said.append), score_fn=first_token_reward)
    assert any("resumed" in s for s in said)
    assert _records(cut) == records


def test_stage_reads_cold_start_uids_and_refuses_an_unlearnable_set(tmp_path, parent_dir):
    """The cold start's `used_queries.json` is honoured; with nothing learnable the stage stops with
    the counted reasons, unless `fallback_to_screened` (a wiring run) is set."""
    small = {**STAGE, "steps": 1, "eval_every": 1, "eval_items": 2, "eval_k": 2, "ckpt_every": 0}
    cfg = grpo.GRPOConfig.from_dict(small)
    used = [q.uid for q in grpo.candidate_queries(cfg)[:3]]
    (parent_dir / grpo.USED_QUERIES_FILE).write_text(json.dumps(used))
    never = lambda q, t, i: RewardResult(0.0)  # noqa: E731
    quiet = lambda s: None  # noqa: E731
    with pytest.raises(RuntimeError, match="no learnable queries"):
        grpo.run(cfg, parent_dir, StageContext(tmp_path / "a", tmp_path / "cache", quiet), score_fn=never)
    saved = json.loads((tmp_path / "a" / grpo.SELECTION_FILE).read_text())
    assert saved["dropped"]["used in cold start"] == 3
    assert saved["dropped"]["unlearnable (pass rate 0)"] == cfg.n_candidates - 3 - saved["dropped"]["held-out evaluation item"]
    cfg = grpo.GRPOConfig.from_dict({**small, "fallback_to_screened": True})
    out = grpo.run(cfg, parent_dir, StageContext(tmp_path / "b", tmp_path / "cache", quiet), score_fn=never)
    rec = _records(out)[-1]
    assert rec["zero_variance_share"] == 1.0 and rec["groups_kept"] == 0
    assert json.loads((out / "eval.json").read_text())["pass@1_after"] == 0.0
    # skip_if_nothing_learnable: the cold-start model is published unchanged, with the reason
    cfg = grpo.GRPOConfig.from_dict({**small, "skip_if_nothing_learnable": True})
    out = grpo.run(cfg, parent_dir, StageContext(tmp_path / "c", tmp_path / "cache", quiet), score_fn=never)
    ev = json.loads((out / "eval.json").read_text())
    assert "no learnable queries" in ev["skipped"] and ev["steps"] == 0 and ev["pass@1_before"] == 0.0
    before, after = Qwen3.from_pretrained(parent_dir).state_dict(), Qwen3.from_pretrained(out).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (out / "lineage.json").exists() and not (out / "metrics.jsonl").exists()


def test_recipe_resolves_strictly_with_a_scale_table():
    from qwen3repro.recipes import deep_merge, load_recipe, split_recipe

    recipe = split_recipe(load_recipe("reasoning-rl"))[1]
    scale = {"steps": 60, "n_queries": 96, "lr": 5e-5, "max_new_tokens": 160, "eval_items": 96}
    cfg = grpo.GRPOConfig.from_dict({**deep_merge(recipe, scale), "name": "reasoning-rl"})
    assert (cfg.epsilon_low, cfg.epsilon_high, cfg.loss_type, cfg.mu) == (0.2, 0.28, "dapo", 2)
    assert cfg.betas == (0.9, 0.99) and (cfg.entropy_control, cfg.entropy_gain, cfg.entropy_coef_max) == ("proportional", 0.3, 0.1) and cfg.steps == 60


def test_eval_json_reads_the_same_selection_when_resumed_from_selection_json():
    """A cut RL run reads its query selection back from selection.json; its eval.json must read as the
    uncut run's, a drop reason counted zero times included."""
    fresh = SelectionResult([], Counter({UNLEARNABLE: 12, BELOW_CUT: 0}), n_candidates=12, k=2, ceiling=0.9)
    resumed = SelectionResult.from_dict(json.loads(json.dumps(fresh.to_dict())))
    cfg = grpo.GRPOConfig(families=("add",))
    assert grpo.summarize(cfg, [], resumed) == grpo.summarize(cfg, [], fresh)
