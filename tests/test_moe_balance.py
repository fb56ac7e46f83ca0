"""MoE load-balancing experiment (micro- vs global-batch LBL): the routing measures, the domain-pure
batching, the step loss against the loss functions it stands for, the verdict, and a smoke run of
the micro-scale experiment."""
from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3repro.config import ModelConfig
from qwen3repro.experiments import moe_balance as mb
from qwen3repro.models.qwen3 import Qwen3

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- routing measures
def test_uniform_routing_is_balanced_and_unspecialised():
    d, layers, e, k = 4, 3, 16, 4
    counts = np.full((d, layers, e), 10.0)
    gi = mb.global_imbalance(counts)
    assert gi["max_over_mean"] == pytest.approx(1.0) and gi["cv"] == pytest.approx(0.0)
    assert mb.micro_imbalance(counts)["max_over_mean"] == pytest.approx(1.0)
    spec = mb.domain_specialisation(counts, k)
    assert spec["top_k_share"] == pytest.approx(k / e) == pytest.approx(spec["top_k_share_floor"])
    assert spec["mutual_information"] == pytest.approx(0.0, abs=1e-12)
    assert spec["domain_concentration"] == pytest.approx(0.0, abs=1e-12)


def test_one_expert_group_per_domain_is_maximally_specialised_and_globally_balanced():
    d, layers, e, k = 4, 2, 16, 4  # each domain routes only to its own k experts; domains cover all E
    counts = np.zeros((d, layers, e))
    for i in range(d):
        counts[i, :, i * k:(i + 1) * k] = 25.0
    spec = mb.domain_specialisation(counts, k, ["a", "b", "c", "d"])
    assert spec["top_k_share"] == pytest.approx(1.0)
    assert spec["mutual_information"] == pytest.approx(math.log(d)) == pytest.approx(spec["mutual_information_max"])
    assert set(spec["kl_per_domain"]) == {"a", "b", "c", "d"}
    assert mb.global_imbalance(counts)["max_over_mean"] == pytest.approx(1.0)
    # ... while every domain alone is as unbalanced as k-of-E routing allows: max/mean = E/k.
    assert mb.micro_imbalance(counts)["max_over_mean"] == pytest.approx(e / k)


def test_global_collapse_is_imbalanced_but_not_specialised():
    """All domains on the same 2 of 8 experts: the top-k share is maximal, yet no domain routes
    differently from the others, so the mutual information is 0 (the confound it avoids)."""
    counts = np.zeros((3, 2, 8))
    counts[..., :2] = 50.0
    assert mb.global_imbalance(counts)["max_over_mean"] == pytest.approx(4.0)
    spec = mb.domain_specialisation(counts, 2)
    assert spec["top_k_share"] == pytest.approx(1.0)
    assert spec["mutual_information"] == pytest.approx(0.0, abs=1e-12)


def test_global_load_uses_the_training_mixture():
    counts = np.zeros((2, 1, 4))
    counts[0, 0, :2] = 10.0     # domain a: experts 0, 1
    counts[1, 0, 2:] = 1000.0   # domain b: experts 2, 3 (many more held-out tokens)
    # At equal corpus shares the mixture is balanced, whatever the held-out token counts.
    assert mb.global_imbalance(counts, [0.5, 0.5])["max_over_mean"] == pytest.approx(1.0)
    # At 90/10 the load is 0.45, 0.45, 0.05, 0.05 of mean 0.25.
    assert mb.global_imbalance(counts, [0.9, 0.1])["max_over_mean"] == pytest.approx(1.8)
    assert mb.mixture_load(counts, [0.9, 0.1])[0].tolist() == pytest.approx([0.45, 0.45, 0.05, 0.05])


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 5), st.integers(1, 3), st.integers(2, 9), st.integers(0, 2**16))
def test_mutual_information_is_domain_minus_global_concentration(d, layers, e, seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 50, size=(d, layers, e)).astype(float)
    w = rng.random(d) + 0.05
    spec = mb.domain_specialisation(counts, 1, weights=w)
    assert spec["mutual_information"] == pytest.approx(spec["domain_concentration"] - spec["global_concentration"],
                                                       abs=1e-10)
    assert -1e-12 <= spec["mutual_information"] <= math.log(d) + 1e-12
    # MI from the joint table directly, per layer.
    for layer in range(layers):
        p_e_d = counts[:, layer] / counts[:, layer].sum(-1, keepdims=True)
        joint = (w / w.sum())[:, None] * p_e_d
        indep = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
        mi = float((joint * np.log(joint / indep)).sum())
        assert spec["mutual_information_per_layer"][layer] == pytest.approx(mi, abs=1e-10)


# ----------------------------------------------------------------------------- domain-pure batches
def _domain_loader(shares, m=5, b=2, seq=8, steps=12, seed=0):
    # domain d's documents use only the token ids d*100 .. d*100+49, so every row says its domain
    rng = np.random.default_rng(7)
    docs = [[rng.integers(d * 100, d * 100 + 50, size=rng.integers(3, 20)).tolist() for _ in range(40)]
            for d in range(len(shares))]
    return mb.DomainBatchLoader(docs, shares, seq_len=seq, micro_batch_size=b, micro_batches_per_step=m,
                                steps=steps, eot_id=999, pad_id=998, seed=seed)


def test_micro_batches_are_domain_pure_and_steps_follow_the_mixture():
    shares = [0.5, 0.3, 0.2]
    loader = _domain_loader(shares)
    batches = list(loader)
    assert len(batches) == loader.steps == 12
    seen = np.zeros(3)
    for batch in batches:
        m = batch["domain"].shape[0]
        rows = batch["input_ids"].view(m, -1)
        for j, d in enumerate(batch["domain"].tolist()):
            toks = rows[j][rows[j] < 998]
            assert ((toks >= d * 100) & (toks < d * 100 + 50)).all(), "a micro-batch mixes domains"
        counts = np.bincount(batch["domain"].numpy(), minlength=3)
        expected = np.asarray(shares) * m  # systematic sampling: floor or ceil of M * share
        assert (counts >= np.floor(expected)).all() and (counts <= np.ceil(expected)).all()
        seen += counts
    assert np.abs(seen - 60 * np.asarray(shares)).max() <= 3  # 12 steps x 5 micro-batches, in proportion


def test_domain_loader_is_deterministic_and_seeded():
    a = [b["input_ids"] for b in _domain_loader([0.6, 0.4])]
    again = [b["input_ids"] for b in _domain_loader([0.6, 0.4])]
    other = [b["input_ids"] for b in _domain_loader([0.6, 0.4], seed=1)]
    assert all(torch.equal(x, y) for x, y in zip(a, again))
    assert not all(torch.equal(x, y) for x, y in zip(a, other))


# ----------------------------------------------------------------------------- the step loss
MOE = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                  norm_topk_prob=True, router_aux_loss_coef=0.01, max_position_embeddings=64)


def _lbl(group, e, k):
    """E·Σ_i f_i P_i over the rows of every layer in `group` (one f and P for them all)."""
    probs = torch.cat([lg.float().softmax(-1) for lg in group])
    f = torch.nn.functional.one_hot(probs.topk(k, dim=-1).indices, e).sum(1).float().mean(0)
    return e * (f * probs.mean(0)).sum()


def _skewed_batch(m=3, b=2, s=6, seed=0):
    # each micro-batch repeats one token range, so its routing is skewed in its own way
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randint(j * 20, j * 20 + 3, (b, s), generator=g) for j in range(m)])
    return {"input_ids": x, "labels": torch.roll(x, -1, 1), "domain": torch.arange(m)}


@pytest.mark.parametrize("lbl_layers", mb.LBL_LAYERS)
def test_step_loss_matches_micro_and_global_definitions(lbl_layers):
    torch.manual_seed(0)
    model = Qwen3(MOE)
    batch = _skewed_batch()
    m, e, k = 3, MOE.num_experts, MOE.num_experts_per_tok
    _, mets_micro = mb.step_loss(model, batch, mode="micro", lbl_layers=lbl_layers)
    loss_g, mets_glob = mb.step_loss(model, batch, mode="global", lbl_layers=lbl_layers)
    logits = model(batch["input_ids"], output_router_logits=True).router_logits
    rows = logits[0].shape[0] // m
    groups = [[r] for r in logits] if lbl_layers == "per_layer" else [list(logits)]
    # global = the micro-batch formula on the whole step (f over all micro-batches); micro = mean over micro-batches
    glob = np.mean([_lbl(gr, e, k).item() for gr in groups])
    micro = np.mean([np.mean([_lbl([r[j * rows:(j + 1) * rows] for r in gr], e, k).item() for j in range(m)])
                     for gr in groups])
    assert float(mets_glob["lbl"]) == pytest.approx(glob, rel=1e-5)
    assert float(mets_micro["lbl"]) == pytest.approx(micro, rel=1e-5)
    # both arms log both losses, identically for the same weights and batch
    assert float(mets_micro["lbl_global"]) == pytest.approx(glob, rel=1e-5)
    assert float(mets_glob["lbl_micro"]) == pytest.approx(micro, rel=1e-5)
    assert loss_g.item() == pytest.approx(float(mets_glob["ce"]) + MOE.router_aux_loss_coef * glob, rel=1e-6)
    # skewed micro-batches are each less balanced than their union
    assert mets_micro["imb_micro"] >= mets_micro["imb_global"]


def test_step_loss_gradients_differ_only_through_the_balancing_term():
    torch.manual_seed(0)
    model = Qwen3(MOE)
    batch = _skewed_batch(seed=1)
    grads = {}
    for mode in mb.MODES:
        model.zero_grad()
        loss, _ = mb.step_loss(model, batch, mode=mode)
        loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    same = {n for n in grads["micro"] if torch.equal(grads["micro"][n], grads["global"][n])}
    # the LM head, the final norm and the last layer's experts are downstream of every router: untouched
    assert {"lm_head.weight", "model.norm.weight", "model.layers.1.mlp.experts.down_proj"} <= same
    # the routers get different balancing gradients
    assert "model.layers.1.mlp.gate.weight" not in same and "model.layers.0.mlp.gate.weight" not in same
    # with one micro-batch the two losses coincide
    one = {**batch, "domain": torch.zeros(1, dtype=torch.long)}
    a = mb.step_loss(model, one, mode="micro")[1]["lbl"]
    b = mb.step_loss(model, one, mode="global")[1]["lbl"]
    assert float(a) == pytest.approx(float(b), rel=1e-6)


# ----------------------------------------------------------------------------- verdict and settings
def _summary(gi, loss, mi):
    return {"global_imbalance": gi, "heldout_loss": loss, "mutual_information": mi, "top_k_share": 0.5}


def test_judge_names_each_part_and_seed_disagreement():
    ok, parts, text = mb.judge(_summary(1.5, 3.0, 0.1), _summary(1.3, 3.005, 0.2), loss_tolerance=0.01)
    assert ok and all(parts.values()) and "not reproduced" not in text
    ok, parts, text = mb.judge(_summary(1.5, 3.0, 0.2), _summary(1.6, 3.1, 0.1), loss_tolerance=0.01)
    assert not ok and not any(parts.values()) and "not reproduced" in text
    per_seed = {0: {p: True for p in mb.PART_NAMES}, 1: {**{p: True for p in mb.PART_NAMES}, "equal_or_lower_loss": False}}
    _, _, text = mb.judge(_summary(1.5, 3.0, 0.1), _summary(1.3, 3.0, 0.2), 0.01, per_seed)
    assert "seeds disagree on equal_or_lower_loss" in text


def test_settings():
    with pytest.raises(Exception, match="unknown key"):
        mb.MoEExperimentSettings.from_mapping({"model": "micro-moe", "seq_len": 64, "epochs": 3})
    with pytest.raises(Exception, match="seed"):
        mb.MoEExperimentSettings.from_mapping({"seq_len": 64, "seeds": [1, 1]})
    with pytest.raises(TypeError, match="seq_len"):  # the scale states the row length
        mb.MoEExperimentSettings.from_mapping({"tokens": 10_000})
    s = mb.MoEExperimentSettings.from_mapping({"tokens": 10_000, "seq_len": 32, "micro_batch_size": 2,
                                               "micro_batches_per_step": 4, "seeds": [3, 4]})
    assert s.steps == 10_000 // (32 * 2 * 4) and s.seeds == (3, 4)
    micro, glob = s.run_identity("micro", 3), s.run_identity("global", 3)
    assert {k for k in micro if micro[k] != glob[k]} == {"load_balancing"}
    for path in ("tiny/tiny.toml", "tiny/micro.toml"):  # the scale files' tables are valid and multi-seed
        table = tomllib.loads((ROOT / path).read_text())["experiments"]["moe"]
        assert len(mb.MoEExperimentSettings.from_mapping(table).seeds) >= 2


# ----------------------------------------------------------------------------- smoke run (micro scale)
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from qwen3repro.stages import tokenizer as tokenizer_stage
    from qwen3repro.stages.common import StageContext

    out = tmp_path_factory.mktemp("tok")
    tokenizer_stage.run(tokenizer_stage.TokenizerConfig(vocab_size=512, seq_len=256, n_docs=300), None,
                        StageContext(out, out / "cache", printer=lambda _m: None))
    return out


def test_moe_experiment_micro_scale(tokenizer_dir, tmp_path, monkeypatch):
    table = tomllib.loads((ROOT / "tiny" / "micro.toml").read_text())["experiments"]["moe"]
    result = mb.run_moe_experiment(table, tokenizer_dir, tmp_path / "moe", tmp_path / "cache", printer=lambda _m: None)
    s = mb.MoEExperimentSettings.from_mapping(table)
    assert set(result) >= {"claim", "micro", "global", "per_seed", "reproduced", "parts", "parts_per_seed", "diagnosis"}
    assert isinstance(result["reproduced"], bool)
    assert result["reproduced"] == all(result["parts"].values())
    for mode in mb.MODES:
        assert set(result["per_seed"][mode]) == set(s.seeds)
        for row in result["per_seed"][mode].values():
            assert math.isfinite(row["heldout_loss"]) and row["global_imbalance"] >= 1.0
            assert 0.0 <= row["mutual_information"] <= math.log(len(result["domains"])) + 1e-9
        # the reported mean is the mean of the seeds
        vals = [r["heldout_loss"] for r in result["per_seed"][mode].values()]
        assert result[mode]["heldout_loss"] == pytest.approx(float(np.mean(vals)))
    # the two arms of a seed start from the same weights on the same batch: identical first-step CE
    out = tmp_path / "moe"
    for seed in s.seeds:
        first = {}
        for mode in mb.MODES:
            (run,) = out.glob(f"{mode}-seed{seed}-*")
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert len(rows) == s.steps and rows[0]["step"] == 1
            first[mode] = rows[0]
        assert first["micro"]["ce"] == first["global"]["ce"]
        assert first["micro"]["lbl_global"] == pytest.approx(first["global"]["lbl_global"], rel=1e-6)
    written = json.loads((out / "moe_balance.json").read_text())
    assert written["steps"] == s.steps and written["settings"]["seeds"] == list(s.seeds)
    assert sum(written["domains"].values()) == pytest.approx(1.0) and len(written["domains"]) >= 5
    for name in result["files"]:
        assert (out / name).stat().st_size > 0
    # Run again on the same directory: every finished arm is resumed, not trained a step further (the
    # step loss must not be called), and the measurements and verdict come out the same.
    trained = {run.name: (run / "metrics.jsonl").read_bytes() for run in out.glob("*-seed*")}

    def no_training(*_args, **_kwargs):
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr(mb.training, "step_loss", no_training)
    again = mb.run_moe_experiment(table, tokenizer_dir, out, tmp_path / "cache", printer=lambda _m: None)
    assert {run.name: (run / "metrics.jsonl").read_bytes() for run in out.glob("*-seed*")} == trained
    assert again["per_seed"] == result["per_seed"] and again["reproduced"] == result["reproduced"]
