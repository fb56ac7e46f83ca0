"""Query–verifier selection (Qwen3 report §4.2): the four criteria, counted drop reasons (a query
without a verifier included), hardest-first balanced choice, measured pass rates, the table."""
from __future__ import annotations

import json
import random

import pytest
import torch

from qwen3repro.data import tasks
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.models.registry import get_model_config
from qwen3repro.rewards import RewardResult
from qwen3repro.rl import selection as sel
from qwen3repro.data.queries import NO_VERIFIER, Query
from qwen3repro.tokenizer import train_tokenizer


def _train_items(n: int, seed: int = 0, families=("add", "mul")) -> list[tasks.TaskItem]:
    rng = random.Random(seed)
    return [tasks.sample_item(rng, heldout=False, families=families) for _ in range(n)]


def _query(uid: str, domain: str = "add", difficulty: int = 2, verifier: str | None = "task") -> Query:
    return Query(uid, f"question {uid}", domain, difficulty, verifier, {})


def test_screen_counts_every_reason_and_keeps_the_rest():
    items = _train_items(6)
    heldout = tasks.sample_item(random.Random(1), heldout=True)
    candidates = [Query.from_task(it) for it in items]
    candidates += [
        Query.from_task(items[0]),  # duplicate
        Query.from_task(items[1], verifier=None),  # no verifier (checked first)
        Query.from_task(items[2], verifier="no-such-verifier"),  # unknown verifier: also none
        Query.from_task(heldout),  # evaluation partition
    ]
    eligible, reasons, why = sel.screen(candidates, used_uids={items[3].uid})
    assert reasons[NO_VERIFIER] == 2
    assert reasons[sel.USED_IN_COLD_START] == 1
    assert reasons[sel.HELDOUT] == 1
    assert reasons[sel.DUPLICATE] == 1
    assert [q.uid for q in eligible] == [it.uid for i, it in enumerate(items) if i != 3]
    assert why[items[3].uid] == sel.USED_IN_COLD_START and why[heldout.uid] == sel.HELDOUT
    assert sum(reasons.values()) + len(eligible) == len(candidates)


def test_choose_learnable_hardest_first_balanced_over_domains():
    qs = [_query(f"a{i}", "add", difficulty=2 + i) for i in range(6)] + [_query(f"m{i}", "mul") for i in range(2)]
    qs += [_query("easy", "add"), _query("never", "mul"), _query("broken", "mul")]
    rates = {"a0": 0.5, "a1": 0.125, "a2": 0.75, "a3": 0.25, "a4": 0.125, "a5": 0.375,
             "m0": 0.625, "m1": 0.25, "easy": 1.0, "never": 0.0, "broken": None}
    selected, reasons = sel.choose(qs, rates, n_select=5, ceiling=0.9)
    uids = [q.uid for q in selected]
    # Round-robin over domains, hardest first in each (ties: higher difficulty first).
    assert uids == ["a4", "m1", "a1", "m0", "a3"]
    assert reasons[sel.TOO_EASY] == 1 and reasons[sel.UNLEARNABLE] == 1 and reasons[sel.NO_REWARD] == 1
    assert reasons[sel.BELOW_CUT] == 8 - 5
    # Asking for more than exist selects every learnable one.
    selected, reasons = sel.choose(qs, rates, n_select=100, ceiling=0.9)
    assert len(selected) == 8 and reasons[sel.BELOW_CUT] == 0


def test_load_used_uids_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["u1", "u2"]))
    (tmp_path / "b.json").write_text(json.dumps({"uids": ["u3"]}))
    (tmp_path / "c.txt").write_text("u4\n\nu5\n")
    assert sel.load_used_uids(tmp_path / "a.json") == {"u1", "u2"}
    assert sel.load_used_uids(tmp_path / "b.json") == {"u3"}
    assert sel.load_used_uids(tmp_path / "c.txt") == {"u4", "u5"}
    assert sel.load_used_uids(None) == set()
    (tmp_path / "d.json").write_text(json.dumps({"uids": [1, 2]}))
    with pytest.raises(ValueError, match="list of query uids"):
        sel.load_used_uids(tmp_path / "d.json")


@pytest.fixture(scope="module")
def micro_and_tok():
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij0123456789+*=") for _ in range(rng.randint(1, 6))) for _ in range(200)]
    tok = train_tokenizer([" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)], 400)
    torch.manual_seed(0)
    return Qwen3(get_model_config("micro")).eval(), tok


def test_select_queries_measures_pass_rates_with_the_model(micro_and_tok):
    """k samples of the model per candidate; a scripted verifier makes the pass rates known."""
    model, tok = micro_and_tok
    items = _train_items(12, seed=3, families=("add", "mul", "order"))
    candidates = [Query.from_task(it) for it in items] + [Query.from_task(items[0], verifier=None)]
    target = {it.uid: i % 5 for i, it in enumerate(items)}  # correct samples out of k = 4 (4 = always)
    seen: dict[str, int] = {}

    def score(query, text, ids):
        seen[query.uid] = seen.get(query.uid, 0) + 1
        return RewardResult(1.0 if seen[query.uid] <= target[query.uid] else 0.0)

    result = sel.select_queries(candidates, model, tok, n_select=4, k=4, ceiling=1.0, used_uids={items[1].uid},
                                max_new_tokens=2, seed=0, score_fn=score)
    assert result.reasons[NO_VERIFIER] == 1 and result.reasons[sel.USED_IN_COLD_START] == 1
    measured = {u: r for u, r in result.pass_rates.items()}
    assert items[1].uid not in measured and all(seen[u] == 4 for u in measured)
    for uid, rate in measured.items():
        assert rate == min(target[uid], 4) / 4
    assert all(0 < result.pass_rates[q.uid] < 1 for q in result.selected)
    assert len(result.selected) == 4
    assert result.reasons[sel.UNLEARNABLE] == sum(target[u] == 0 for u in measured)
    assert result.reasons[sel.TOO_EASY] == sum(target[u] == 4 for u in measured)
    # Every candidate is accounted for: selected or dropped with a reason.
    assert len(result.selected) + sum(result.reasons.values()) == len(candidates)
    # The table covers every candidate by domain and difficulty and round-trips through JSON.
    assert sum(r["candidates"] for r in result.table) == len(candidates)
    assert sum(r["selected"] for r in result.table) == 4
    again = sel.SelectionResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert [q.uid for q in again.selected] == [q.uid for q in result.selected]
    md = result.to_markdown()
    assert "| domain | difficulty |" in md and "no verifier 1" in md


def test_selection_argument_errors(micro_and_tok):
    model, tok = micro_and_tok
    with pytest.raises(ValueError, match="ceiling"):
        sel.select_queries([], model, tok, n_select=1, ceiling=0.0)
    with pytest.raises(ValueError, match="k and n_select"):
        sel.select_queries([], model, tok, n_select=0)
