"""The reward-model stage: its preference set (labels are the checkers' verdicts, lengths balanced, held-out
prompts and templates kept apart), the evaluation's baselines and best-of-N reranking, and the stage end to
end on a micro model with exact resume."""
from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3repro.config import ConfigError
from qwen3repro.data import tasks
from qwen3repro.data.preferences import (BEST_OF, FILLERS, INSTRUCTIONS, PREFERENCE_DOMAINS, SPLITS, TEMPLATES,
                                         PreferencePair, best_of_k_sets, build_preferences, fact_reward,
                                         near_misses, response_passes, with_filler)
from qwen3repro.data.queries import Query
from qwen3repro.evals import reward_model as rm_eval
from qwen3repro.lineage import make_lineage, write_lineage
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.models.registry import get_model_config
from qwen3repro.rewards import answer_text, get_reward
from qwen3repro.rewards.reward_model import RewardModelScorer, scored_text
from qwen3repro.rl.rollout import Group
from qwen3repro.stages import reward_model as stage
from qwen3repro.stages.common import StageContext
from qwen3repro.tokenizer import train_tokenizer

N = 48  # pairs per split: 12 per domain


@pytest.fixture(scope="module")
def pairs():
    return {split: build_preferences(N, seed=3, split=split) for split in SPLITS}


def _independent_verdict(pair_domain: str, response: str, reference) -> bool:
    """The checker of each domain called through the reward registry (or the fact checker), not through
    the module's own dispatch."""
    if pair_domain == "math":
        return get_reward("task")(response, **reference).score == 1.0
    if pair_domain == "instruction":
        return get_reward("ifeval")(response, **reference, binary=True).score == 1.0
    if pair_domain == "format":
        return get_reward("think_format")(response).score == 1.0
    return fact_reward(response, **reference).score == 1.0


# ----------------------------------------------------------------------------- the preference set
def test_every_label_is_the_checkers_verdict(pairs):
    for split, rows in pairs.items():
        assert Counter(p.domain for p in rows) == {d: N // 4 for d in PREFERENCE_DOMAINS}, split
        for p in rows:
            assert p.split == split
            assert _independent_verdict(p.domain, p.chosen, p.reference), (p.template, p.chosen)
            assert not _independent_verdict(p.domain, p.rejected, p.reference), (p.template, p.rejected)


def test_every_ifeval_instruction_is_used_and_both_sides_answer():
    rows = build_preferences(120, seed=1, split="train", domains=("instruction",))
    used = {p.reference["instruction_id_list"][0] for p in rows}
    assert used == {i.iid for i in INSTRUCTIONS}
    assert all(answer_text(p.chosen) and answer_text(p.rejected) for p in rows)


def test_lengths_are_balanced_per_domain(pairs):
    for split, rows in pairs.items():
        by_domain = defaultdict(list)
        for p in rows:
            assert len(p.chosen) != len(p.rejected)
            by_domain[p.domain].append(len(p.chosen) > len(p.rejected))
        for domain, longer in by_domain.items():
            assert sum(longer) == len(longer) // 2, (split, domain)  # 12 pairs: exactly 6 chosen-longer
    odd = build_preferences(7, seed=0, split="train", domains=("fact",))
    assert sum(len(p.chosen) > len(p.rejected) for p in odd) in (3, 4)


def test_only_the_decisive_span_and_neutral_fillers_differ(pairs):
    """Without filler and blank lines, the two responses differ only in lines that hold the decisive span:
    the answer (and, for math, the think block's result line)."""

    def lines(text: str) -> list[str]:
        return [line for line in text.split("\n") if line and line not in FILLERS]

    for p in pairs["train"] + pairs["heldout_templates"]:
        chosen, rejected = lines(p.chosen), lines(p.rejected)
        if p.domain == "format":
            continue  # a malformed response differs in its structure by design
        assert len(chosen) == len(rejected), p
        differ = [i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r]
        assert differ and differ[-1] == len(chosen) - 1, p
        if p.domain == "math":
            answer, wrong = tasks.TaskItem.from_dict(p.reference["item"]).answer, answer_text(p.rejected)
            assert all(chosen[i].endswith(answer) and rejected[i].endswith(wrong) for i in differ), p
        else:
            assert differ == [len(chosen) - 1], p


def test_heldout_templates_are_never_trained_and_prompts_are_partitioned(pairs):
    heldout = {t.name for ts in TEMPLATES.values() for t in ts if t.heldout}
    assert {t.split(":")[0] for t in heldout} == set(PREFERENCE_DOMAINS)  # every domain reserves one
    assert {p.template for p in pairs["heldout_templates"]} <= heldout
    for split in ("train", "heldout_prompts"):
        assert not {p.template for p in pairs[split]} & heldout
    train = build_preferences(400, seed=11, split="train")
    assert not {p.template for p in train} & heldout
    for split, rows in pairs.items():
        assert all(tasks.is_heldout(p.uid) == (split == "heldout_prompts") for p in rows), split
    for p in pairs["heldout_prompts"] + pairs["train"]:
        if p.domain == "math":
            assert p.uid == tasks.TaskItem.from_dict(p.reference["item"]).uid
        if p.domain == "fact":
            assert p.uid == tasks.item_uid("fact", f"{p.reference['person']}|{p.reference['attribute']}")


def test_best_of_k_sets_have_distinct_rejected_responses_that_all_fail():
    sets = best_of_k_sets(12, seed=2, split="heldout_prompts")
    assert Counter(s.domain for s in sets) == {d: 3 for d in PREFERENCE_DOMAINS}
    for s in sets:
        assert len(s.rejected) == BEST_OF - 1 and len(set(s.rejected)) == BEST_OF - 1
        assert response_passes(s.domain, s.chosen, s.reference)
        assert not any(response_passes(s.domain, r, s.reference) for r in s.rejected)
        assert tasks.is_heldout(s.uid)


def test_the_set_is_a_function_of_its_arguments():
    a = build_preferences(8, seed=4, split="train")
    assert a == build_preferences(8, seed=4, split="train")
    assert a != build_preferences(8, seed=5, split="train")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        build_preferences(4, seed=0, split="test")
    with pytest.raises(ValueError, match="domains"):
        build_preferences(4, seed=0, split="train", domains=("poetry",))


@settings(max_examples=200, deadline=None)
@given(value=st.integers(-10**6, 10**7), seed=st.integers(0, 2**16))
def test_near_misses_are_wrong_and_distinct(value, seed):
    wrong = near_misses(str(value), random.Random(seed))
    assert len(wrong) >= 3 and len(set(wrong)) == len(wrong)
    assert all(not tasks.check_answer(str(value), w) for w in wrong)
    assert int(wrong[0]) != value


def test_a_filler_changes_the_length_but_no_verdict():
    item = tasks.generate("add", 0, 3)
    for response in ("<think>\n\n</think>\n\n5", f"<think>\nx\n</think>\n\n{item.answer}", "<think>\nx\n\n5", "5"):
        filled = with_filler(response, FILLERS[0])
        assert len(filled) > len(response)
        if response.startswith("<think>"):  # the filler joins the reasoning; the answer stays as it was
            assert answer_text(filled) == answer_text(response)
        assert get_reward("think_format")(filled).score == get_reward("think_format")(response).score
    assert with_filler("<think>\n\n</think>\n\n5", "F") == "<think>\nF\n</think>\n\n5"


# ----------------------------------------------------------------------------- baselines and reranking
def _toy_pairs(n: int, seed: int) -> list[PreferencePair]:
    """Pairs told apart by one word ("good" in the chosen, "bad" in the rejected), lengths balanced."""
    rng = random.Random(seed)
    words = ["tree", "stone", "river", "lamp", "door", "cup"]
    out = []
    for i in range(n):
        filler = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
        good, bad = f"{filler} good", f"{filler} bad"
        if i % 2:
            good += " ok"
        else:
            bad += " ok ok"
        out.append(PreferencePair("q", good, bad, "toy", "toy", "train"))
    return out


def test_bag_of_words_learns_a_separable_set_and_length_does_not():
    tok = train_tokenizer([p.chosen + " " + p.rejected for p in _toy_pairs(200, 0)], 300)
    train, test = _toy_pairs(60, 1), _toy_pairs(40, 2)
    bow = rm_eval.BagOfWordsBaseline.fit(tok, train)
    assert rm_eval.pairwise_accuracy(bow.score_many, test)["accuracy"] == 1.0
    untrained = rm_eval.BagOfWordsBaseline(tok)  # all-zero weights: every pair a tie, i.e. chance
    assert rm_eval.pairwise_accuracy(untrained.score_many, test)["accuracy"] == 0.5
    length = rm_eval.LengthBaseline.fit(train)
    assert rm_eval.pairwise_accuracy(length.score_many, test)["accuracy"] == pytest.approx(0.5, abs=0.05)
    shorter = [PreferencePair("q", "a", "bbb", "toy", "toy", "train")] * 3
    assert rm_eval.LengthBaseline.fit(shorter).sign == -1


def test_ties_score_chance_and_accuracy_is_split_by_domain():
    sets = best_of_k_sets(8, seed=0, split="train")
    constant = lambda items: [0.0] * len(items)  # noqa: E731
    assert rm_eval.best_of_k_accuracy(constant, sets)["accuracy"] == pytest.approx(1 / BEST_OF)
    # an oracle that reads the checker ranks every set right
    reference = {(s.prompt, r): s for s in sets for r in (s.chosen, *s.rejected)}
    oracle = lambda items: [float(response_passes(reference[i].domain, i[1], reference[i].reference))  # noqa: E731
                            for i in items]
    result = rm_eval.by_domain(rm_eval.best_of_k_accuracy, oracle, sets)
    assert set(result) == {"all", *PREFERENCE_DOMAINS} and all(r["accuracy"] == 1.0 for r in result.values())


def test_best_of_n_rerank_picks_by_the_scorer_and_skips_missing_rewards(monkeypatch):
    queries = [Query(f"u{i}", f"q{i}", "add", 1, "task") for i in range(3)]
    rewards = {"q0": [0.0, 1.0, 0.0], "q1": [1.0, 0.0, math.nan], "q2": [math.nan] * 3}

    def fake_groups(policy, tokenizer, qs, n, **kwargs):
        return [Group(q, [1], [[i] for i in range(n)], [[0.0]] * n, [[False]] * n, ["stop"] * n, rewards[q.question])
                for q in qs]

    class Decoder:
        def decode(self, ids):
            return f"sample {ids[0]}"

    class PreferLast:  # scores sample j as j: picks the last sample with a reward
        def score_many(self, items):
            return [float(text.split()[-1]) for _, text in items]

    monkeypatch.setattr(rm_eval, "sample_groups", fake_groups)
    policy = torch.nn.Linear(1, 1)
    result = rm_eval.best_of_n_rerank(policy, Decoder(), PreferLast(), queries, 3, max_new_tokens=4, seed=0)
    assert result["queries_without_reward"] == 1
    assert result["random"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert result["reward_model"] == pytest.approx((0.0 + 0.0) / 2)  # q0 -> sample 2 (0.0), q1 -> sample 1 (0.0)
    assert result["oracle"] == 1.0 and result["gain"] == pytest.approx(result["reward_model"] - result["random"])


def _fake_sampler(rewards: dict[str, list[float]], texts: dict[str, list[str]]):
    def fake_groups(policy, tokenizer, qs, n, **kwargs):
        return [Group(q, [1], [[q.question, j] for j in range(n)], [[0.0]] * n, [[False]] * n, ["stop"] * n,
                      rewards[q.question]) for q in qs]

    class Decoder:
        def decode(self, ids):
            return texts[ids[0]][ids[1]]

    return fake_groups, Decoder()


def test_policy_pairs_pair_distinct_right_and_wrong_samples_of_one_query(monkeypatch):
    queries = [Query(f"u{i}", f"q{i}", "add", 1, "task", {"item": {"x": i}}) for i in range(3)]
    rewards = {"q0": [1.0, 0.0, 1.0, 0.0, 0.0, math.nan], "q1": [1.0] * 6, "q2": [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]}
    texts = {"q0": ["r", "w1", "r", "w2", "w3", "x"], "q1": ["a", "b", "c", "d", "e", "f"],
             "q2": ["w", "r1", "r2", "w", "w", "w"]}
    fake_groups, decoder = _fake_sampler(rewards, texts)
    monkeypatch.setattr(rm_eval, "sample_groups", fake_groups)
    pairs, counts = rm_eval.policy_pairs(torch.nn.Linear(1, 1), decoder, queries, 6, max_new_tokens=4, seed=0,
                                         pairs_per_query=2)
    # q0: one distinct right text against w1; q1: no wrong sample; q2: r1, r2 against the one distinct wrong text.
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("q0", "r", "w1"), ("q2", "r1", "w")]
    assert all(p.domain == "policy" and p.split == "train" for p in pairs)
    assert pairs[0].uid == "u0" and pairs[0].reference == {"item": {"x": 0}}
    assert counts["queries_with_right_and_wrong"] == 2 and counts["pairs"] == 2
    pairs, _ = rm_eval.policy_pairs(torch.nn.Linear(1, 1), decoder, queries, 6, max_new_tokens=4, seed=0,
                                    pairs_per_query=1)
    assert len(pairs) == 2


# ----------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def tok():
    texts = [scored_text(p.prompt, r) for p in build_preferences(120, seed=9, split="train")
             for r in (p.chosen, p.rejected)]
    return train_tokenizer(texts, 500)


@pytest.fixture()
def parent_dir(tmp_path, tok):
    d = tmp_path / "fusion"
    torch.manual_seed(0)
    Qwen3(get_model_config("micro")).save_pretrained(d)
    tok.save(d)
    write_lineage(d, make_lineage("fusion", {"toy": 1}))
    return d


STAGE = dict(n_train_pairs=16, n_eval_pairs=8, steps=4, batch_size=4, lr=1e-3, warmup_steps=1, eval_every=2,
             ckpt_every=2, bon_n=2, bon_queries=2, bon_max_new_tokens=4, max_len=256, center_coefficient=0.01)


def _records(out):
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")}
            for r in map(json.loads, (out / "metrics.jsonl").open())]


def test_stage_runs_end_to_end_and_resumes_exactly(tmp_path, tok, parent_dir, monkeypatch, cut_at_call):
    transformers = pytest.importorskip("transformers")
    cfg = stage.RewardModelConfig.from_dict(STAGE)
    quiet = lambda s: None  # noqa: E731
    full = stage.run(cfg, parent_dir, StageContext(tmp_path / "full", tmp_path / "cache", quiet))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "eval.json", "lineage.json",
                 "metrics.jsonl", stage.PLOT_FILE, "state/trainer.json"):
        assert (full / name).exists(), name
    records = _records(full)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all({"loss", "accuracy", "margin"} <= set(r) for r in records)
    assert [r["step"] for r in records if "eval/accuracy/heldout_prompts" in r] == [2, 4]

    ev = json.loads((full / "eval.json").read_text())
    for measure in ("pairwise", "best_of_k"):
        assert set(ev[measure]) == {"reward_model", "length", "bag_of_words"}
        for splits in ev[measure].values():
            assert set(splits) == set(stage.EVAL_SPLITS)
            for split in splits.values():
                assert set(split) == {"all", *PREFERENCE_DOMAINS}
                assert all(0.0 <= v["accuracy"] <= 1.0 for v in split.values())
    assert set(ev["best_of_n"]) >= {"random", "reward_model", "oracle", "gain", "n"} and ev["best_of_n"]["n"] == 2
    assert ev["chance"] == {"pairwise": 0.5, "best_of_k": 0.25}
    assert all(d["chosen_longer_share"] == 0.5 for d in ev["data"]["by_domain"].values())
    assert "best_of_n/gain" in ev["headline"] and "pairwise/reward_model/heldout_templates" in ev["headline"]

    # The directory is a transformers sequence classifier scoring what our scorer scores.
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(full, attn_implementation="eager").eval()
    assert type(hf).__name__ == "Qwen3ForSequenceClassification" and hf.config.pad_token_id == tok.pad_token_id
    scorer = RewardModelScorer.load(full, max_len=256)
    pair = build_preferences(4, seed=0, split="heldout_prompts")[0]
    ids = torch.tensor([scorer.encode(pair.prompt, pair.chosen)])
    with torch.no_grad():
        assert hf(input_ids=ids).logits[0, 0].item() == pytest.approx(scorer.score(pair.prompt, pair.chosen), abs=1e-4)

    # Cut the run during step 3 (after the step-2 checkpoint), then resume: the same metrics.
    cut = tmp_path / "cut"
    with cut_at_call(stage, "pair_loss", 3):
        stage.run(cfg, parent_dir, StageContext(cut, tmp_path / "cache", quiet))
    assert [r["step"] for r in _records(cut)] == [1, 2] and not (cut / "lineage.json").exists()
    said = []
    stage.run(cfg, parent_dir, StageContext(cut, tmp_path / "cache", said.append))
    assert any("resumed" in s for s in said)
    assert _records(cut) == records
    resumed = json.loads((cut / "eval.json").read_text())
    assert resumed["pairwise"] == ev["pairwise"] and resumed["best_of_n"] == ev["best_of_n"]


def test_policy_pairs_join_the_training_pairs_and_are_kept_for_a_resumed_run(tmp_path, tok, parent_dir, monkeypatch):
    question = rm_eval.rule_task_queries(1, 0, split="train")[0].question
    fake_groups, decoder = _fake_sampler({question: [1.0, 0.0]}, {question: ["<think>\n\n</think>\n\n1", "2"]})
    monkeypatch.setattr(rm_eval, "sample_groups", fake_groups)
    monkeypatch.setattr(stage, "rule_task_queries",
                        lambda n, seed, split: rm_eval.rule_task_queries(1, 0, split="train"))
    cfg = stage.RewardModelConfig.from_dict({**STAGE, "policy_queries": 1, "policy_samples": 2})
    out = tmp_path / "rm"
    out.mkdir()
    ctx = StageContext(out, tmp_path / "cache", lambda s: None)
    pairs, counts = stage.policy_training_pairs(cfg, parent_dir, torch.nn.Linear(1, 1), decoder, out, ctx)
    assert [(p.chosen, p.rejected, p.domain) for p in pairs] == [("<think>\n\n</think>\n\n1", "2", "policy")]
    assert (out / stage.POLICY_PAIRS_FILE).exists()

    def no_sampling(*a, **k):
        raise AssertionError("sampled again")

    monkeypatch.setattr(rm_eval, "sample_groups", no_sampling)
    assert stage.policy_training_pairs(cfg, parent_dir, torch.nn.Linear(1, 1), decoder, out, ctx) == (pairs, counts)
    other = stage.RewardModelConfig.from_dict({**STAGE, "policy_queries": 1, "policy_samples": 3})
    with pytest.raises(AssertionError, match="sampled again"):  # other settings: the kept pairs do not fit
        stage.policy_training_pairs(other, parent_dir, torch.nn.Linear(1, 1), decoder, out, ctx)
    off = stage.RewardModelConfig.from_dict(STAGE)
    assert stage.policy_training_pairs(off, parent_dir, torch.nn.Linear(1, 1), decoder, out, ctx) == ([], {"queries": 0, "pairs": 0})


def test_config_is_checked():
    with pytest.raises(ConfigError, match="domains"):
        stage.RewardModelConfig(domains=("math", "poetry"))
    with pytest.raises(ConfigError, match="best_of"):
        stage.RewardModelConfig(best_of=5)
    with pytest.raises(ConfigError, match="unknown key"):
        stage.RewardModelConfig.from_dict({"steps": 3, "epochs": 2})
    with pytest.raises(ConfigError, match="margin"):
        stage.RewardModelConfig.from_dict({"margin": "big"})
    assert stage.RewardModelConfig.from_dict({"margin": 0.5}).margin == 0.5
