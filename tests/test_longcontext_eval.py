"""Long-context evaluation suite: settings, conditions, retrieval grid, loss by position, result file,
plots, CLI, and the claims judging it.

Models are a micro random model, scripted stubs whose answers (or losses) are known, and a tokenizer
trained on a few hundred synthetic texts, at lengths of a few hundred tokens with a "trained length"
of 192, so YaRN/DCA switch on within the test.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from qwen3repro.config import ConfigError
from qwen3repro.data import synthetic
from qwen3repro.evals import longcontext as lc
from qwen3repro.evals.cli import eval_group
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.models.registry import get_model_config
from qwen3repro.tokenizer import train_tokenizer

TRAINED = 192
SETTINGS = lc.LongContextSettings(
    lengths=(160, 384),
    n_per_length=4,
    depth_bins=2,
    trained_length=TRAINED,
    loss_length=384,
    loss_docs=2,
    loss_bucket=64,
    max_batch_tokens=512,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro models are dominated by per-op overhead: one thread avoids spin-waiting on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(list(synthetic.tokenizer_training_texts(seq_len=256, n_docs=300)), 512)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """Random micro models saved as S2 (base 1e4) and S3 (base 1e6, with the tokenizer) checkpoints."""
    root = tmp_path_factory.mktemp("ckpt")
    base = get_model_config("micro")
    paths = {}
    for name, theta in (("S2", 1e4), ("S3", 1e6)):
        torch.manual_seed(0)
        Qwen3(base.replace(rope_theta=theta)).save_pretrained(root / name)
        paths[name] = root / name
    tokenizer.save(paths["S3"])
    return paths


@pytest.fixture(scope="module")
def items(tokenizer):
    return {v: lc.build_items(tokenizer, v, SETTINGS.eval_lengths, SETTINGS.n_per_length, (), 0, 0) for v in lc.VARIANTS}


# ----------------------------------------------------------------------------- settings
def test_suite_file_pins_the_code_defaults_relative_to_the_trained_length():
    assert lc.DEFAULT_SUITE.is_file()
    for trained in (2048, 512):
        pinned = lc.suite_settings(trained)
        assert pinned.resolved() == lc.LongContextSettings(trained_length=trained).resolved()
    s = lc.suite_settings(2048)
    assert s.eval_lengths == (256, 512, 1024, 2048, 4096, 8192) and s.n_per_length == 40
    assert s.dca_sizes == (1536, 128) and s.loss_tokens == 8192 and s.yarn_only_beyond_trained
    s = lc.suite_settings(512)
    assert s.eval_lengths == (64, 128, 256, 512, 1024, 2048) and s.dca_sizes == (384, 32) and s.loss_tokens == 2048


def test_scale_tables_resolve_to_the_lengths_their_claims_measure():
    """The tiny and micro scales' [evals.longcontext] tables (lengths in tokens) with their S3 lengths."""
    from qwen3repro.pipeline import build_plan

    expected = {"tiny": ((512, 2048, 4096, 8192), 40, (1536, 128), 8192, 2),
                "micro": ((128, 512, 2048), 2, (384, 32), 2048, 16)}
    for scale, (lengths, n, dca, loss_length, loss_docs) in expected.items():
        plan = build_plan(scale)
        table = plan.eval_settings("longcontext")
        assert table.pop("role") == "flagship"
        s = lc.suite_settings(plan.node("flagship/s3").config.seq_len, table)
        assert (s.eval_lengths, s.n_per_length, s.dca_sizes, s.loss_tokens, s.loss_docs) == (
            lengths, n, dca, loss_length, loss_docs), scale
        assert s.variants == ("passkey",) and s.conditions == lc.CONDITION_NAMES


def test_suite_rejects_unknown_keys_and_lengths_in_tokens(tmp_path):
    bad = tmp_path / "suite.toml"
    bad.write_text('length_factors = [1]\nn_per_lenght = 40\ncolor = "red"\n')
    with pytest.raises(ConfigError, match=r"n_per_lenght.*|color"):
        lc.load_suite(bad)
    tokens = tmp_path / "tokens.toml"
    tokens.write_text("lengths = [256, 2048]\n")
    with pytest.raises(ConfigError, match=r"\['lengths'\].*length_factors"):
        lc.load_suite(tokens)
    with pytest.raises(ConfigError, match="bogus"):
        lc.suite_settings(512, {"bogus": 1})
    with pytest.raises(ConfigError, match="trained_length must be a positive"):
        lc.LongContextSettings()
    with pytest.raises(ConfigError, match="conditions"):
        lc.LongContextSettings(trained_length=2048, conditions=("S3", "S3+NTK"))
    with pytest.raises(ConfigError, match="DCA"):
        lc.LongContextSettings(trained_length=2048, dca_chunk_size=4096)
    with pytest.raises(ConfigError, match="yarn_only_beyond_trained must be true or false"):
        lc.LongContextSettings.from_dict({"trained_length": 2048, "yarn_only_beyond_trained": "yes"})
    with pytest.raises(ConfigError, match="n_per_length must be an integer"):
        lc.LongContextSettings.from_dict({"trained_length": 2048, "n_per_length": "40"})


# ----------------------------------------------------------------------------- conditions
def test_conditions_build_the_right_configs():
    base = get_model_config("micro").replace(rope_theta=1e6)
    short, long = TRAINED, TRAINED + 1
    for cond in ("S2", "S3"):
        assert lc.condition_config(base, cond, long, SETTINGS) == base
    # YaRN only beyond the trained length (the default); its parameters as pinned.
    assert lc.condition_config(base, "S3+YaRN", short, SETTINGS) == base
    yarn = lc.condition_config(base, "S3+YaRN", long, SETTINGS)
    assert yarn.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED}
    assert yarn.dual_chunk_attention_config is None
    # DCA only for its condition, with ChunkLlama's default sizes (3/4 and 1/16 of the trained length).
    dca_long = lc.condition_config(base, "S3+YaRN+DCA", long, SETTINGS)
    assert dca_long.rope_scaling == yarn.rope_scaling
    # ... and vLLM's dynamic (YaRN-form) key temperature from the trained length.
    assert dca_long.dual_chunk_attention_config == {"chunk_size": 144, "local_size": 12,
                                                    "original_max_position_embeddings": TRAINED}
    dca_short = lc.condition_config(base, "S3+YaRN+DCA", short, SETTINGS)
    assert dca_short.rope_scaling is None and dca_short.dual_chunk_attention_config is not None
    only_long = SETTINGS.replace(dca_only_beyond_trained=True)
    assert lc.condition_config(base, "S3+YaRN+DCA", short, only_long) == base
    # Static YaRN everywhere when the option is off.
    static = SETTINGS.replace(yarn_only_beyond_trained=False)
    assert lc.condition_config(base, "S3+YaRN", short, static).rope_scaling is not None
    with pytest.raises(ConfigError, match="unknown condition"):
        lc.condition_config(base, "S4", long, SETTINGS)


class RecordingSource:
    """A model source that records every configuration it builds (real micro weights)."""

    def __init__(self, path):
        self.inner = lc.CheckpointModels(path)
        self.config = self.inner.config
        self.built = []

    def build(self, config):
        self.built.append(config)
        return self.inner.build(config)


def test_models_are_rebuilt_per_length_regime(checkpoints, tokenizer, items):
    source = RecordingSource(checkpoints["S3"])
    grid = lc.retrieval_grid(source, tokenizer, "S3+YaRN+DCA", settings=SETTINGS, items=items["passkey"])
    assert [c.rope_scaling is not None for c in source.built] == [False, True]  # one build per regime
    assert all(c.dual_chunk_attention_config for c in source.built)
    by_len = grid["model_config_by_length"]
    assert by_len["160"]["rope_scaling"] is None and by_len["384"]["rope_scaling"]["factor"] == 4.0
    # The shared weights are the checkpoint's tensors, not copies.
    built = source.inner.build(source.built[-1])
    assert built.model.embed_tokens.weight.data_ptr() == source.inner.base.model.embed_tokens.weight.data_ptr()


# ----------------------------------------------------------------------------- decoding and grid
def test_batched_greedy_decode_matches_one_by_one(checkpoints):
    model = Qwen3.from_pretrained(checkpoints["S3"]).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 480, (n,), generator=g).tolist() for n in (9, 17, 13)]
    batched = lc.greedy_decode(model, prompts, 5)
    assert batched == [lc.greedy_decode(model, [p], 5)[0] for p in prompts]


class AnswerStub(nn.Module):
    """Answers each prompt with a fixed value: the target ("cheat") or the distractor."""

    def __init__(self, tokenizer, items, pick, vocab_size):
        super().__init__()
        self.answers = {tuple(tokenizer.encode(it["prompt"])): tokenizer.encode(f" {pick(it)}.") for it in items}
        self.pad_id, self.vocab_size = tokenizer.pad_token_id, vocab_size
        self.device_anchor = nn.Parameter(torch.zeros(1))  # the engine reads the device from a parameter

    def new_kv_cache(self, batch_size, max_len, **_):
        return {"rows": None, "step": 0}

    def forward(self, input_ids, *, position_ids=None, attention_mask=None, kv_cache=None):
        if kv_cache["rows"] is None:
            keep = attention_mask if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            kv_cache["rows"] = [self.answers[tuple(ids[m].tolist())] for ids, m in zip(input_ids, keep)]
        step = kv_cache["step"]
        kv_cache["step"] += 1
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab_size)
        for i, answer in enumerate(kv_cache["rows"]):
            logits[i, -1, answer[step] if step < len(answer) else self.pad_id] = 1.0
        return SimpleNamespace(logits=logits)


class StubSource:
    def __init__(self, stub):
        self.stub, self.config = stub, get_model_config("micro")

    def build(self, config):
        return self.stub


def test_cheating_stub_scores_100_and_distractor_is_counted(tokenizer, items):
    for variant in lc.VARIANTS:
        cheat = StubSource(AnswerStub(tokenizer, items[variant], lambda it: it["target"], 512))
        grid = lc.retrieval_grid(cheat, tokenizer, "S3+YaRN", settings=SETTINGS, items=items[variant], variant=variant,
                                 log=None)
        assert grid["accuracy_by_length"] == [1.0, 1.0]
        assert grid["accuracy"] == [[1.0, 1.0], [1.0, 1.0]] and grid["n"] == [[2, 2], [2, 2]]
        assert all(r["correct"] and not r["returned_distractor"] for r in grid["items"])
    wrong = StubSource(AnswerStub(tokenizer, items["order"], lambda it: it["values"][1], 512))
    grid = lc.retrieval_grid(wrong, tokenizer, "S3", settings=SETTINGS, items=items["order"], variant="order", log=None)
    assert grid["accuracy_by_length"] == [0.0, 0.0]
    assert grid["distractor_rate_by_length"] == [1.0, 1.0] and grid["distractor_rate"] == [[1.0, 1.0], [1.0, 1.0]]
    assert all(r["returned_distractor"] and not r["correct"] for r in grid["items"])


def test_depth_bins_place_known_needles(tokenizer, items):
    """A stub that finds a needle only in the first half of the context scores 100% in the first
    depth bin and 0% in the second, at every length; the bins are the equal-width ones."""
    assert [lc.depth_bin(d, 5) for d in (0.0, 0.19, 0.2, 0.5, 0.99, 1.0)] == [0, 0, 1, 2, 4, 4]
    assert lc.depth_bin_edges(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    near = StubSource(AnswerStub(tokenizer, items["passkey"],
                                 lambda it: it["target"] if it["depth"] < 0.5 else "nowhere", 512))
    grid = lc.retrieval_grid(near, tokenizer, "S3", settings=SETTINGS, items=items["passkey"], log=None)
    assert sorted(it["depth"] for it in items["passkey"] if it["length"] == 160) == [0.125, 0.375, 0.625, 0.875]
    assert grid["accuracy"] == [[1.0, 0.0], [1.0, 0.0]] and grid["accuracy_by_length"] == [0.5, 0.5]
    assert grid["depth_bin_edges"] == [0.0, 0.5, 1.0]
    # A grid of hand-made records: cells average their own items only; an empty cell is None.
    records = [{"length": 100, "depth": d, "correct": c, "returned_distractor": False}
               for d, c in ((0.1, True), (0.3, False), (0.35, True), (0.9, True))]
    table = lc.retrieval.tabulate("S3", "passkey", [100], 4, records, {}, 0.0)
    assert table["accuracy"] == [[1.0, 0.5, None, 1.0]] and table["n"] == [[1, 2, 0, 1]]


# ----------------------------------------------------------------------------- loss, suite, plots
def test_bucket_means_on_a_constructed_case():
    """Per-token NLLs 1, 2, ..., predicted at positions 1, 2, ...: buckets of 4 positions average
    positions 1-3, 4-7, 8-..., over every document that reaches them."""
    long, short = torch.arange(1.0, 10.0), torch.full((5,), 7.0)  # predicts positions 1..9 and 1..5
    mean, count = lc.bucket_mean_nll([long, short], 4)
    assert count == [3 + 3, 4 + 2, 2]
    assert mean == pytest.approx([(1 + 2 + 3 + 3 * 7) / 6, (4 + 5 + 6 + 7 + 2 * 7) / 6, (8 + 9) / 2])


class UniformLM(nn.Module):
    """Equal logits over the vocabulary: the next-token NLL is ln(vocab) at every position."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size))


def test_loss_by_position_of_a_uniform_model(tokenizer):
    docs = [list(range(1, 300)), list(range(1, 130))]  # 298 and 128 predicted positions
    res = lc.loss_by_position(StubSource(UniformLM(512)), tokenizer, "S3+YaRN+DCA", settings=SETTINGS, length=384,
                              documents=docs, log=None)
    assert res["bucket_start"] == [0, 64, 128, 192, 256]
    assert res["count"] == [63 + 63, 64 + 64, 64 + 1, 64, 43]
    assert res["mean_nll"] == pytest.approx([math.log(512)] * 5)
    assert res["model_config"]["rope_scaling"]["factor"] == 4.0  # 384 > trained length: YaRN on


def test_loss_by_position_builds_its_documents(checkpoints, tokenizer):
    res = lc.loss_by_position(checkpoints["S3"], tokenizer, "S3", settings=SETTINGS.replace(loss_docs=2), log=None)
    assert res["length"] == 384 and res["n_docs"] == 2 and res["count"][0] == 2 * 63
    assert res["model_config"]["rope_scaling"] is None  # plain S3
    # A random model predicts about uniformly: every bucket's mean is near ln(vocab).
    assert all(abs(m - math.log(512)) < 0.5 for m in res["mean_nll"] if m is not None)


def test_run_writes_pinned_results_and_plots(checkpoints, tmp_path):
    out = tmp_path / "eval"
    settings = SETTINGS.replace(n_per_length=2, variants=("order",))
    res = lc.run_longcontext_eval(checkpoints, out, settings, log=None)
    saved = json.loads((out / lc.RESULT_FILE).read_text())
    assert saved["complete"] and saved["summary"] == res["summary"]
    pinned = saved["settings"]
    assert pinned["lengths"] == [160, 384] and pinned["n_per_length"] == 2 and pinned["seed"] == 0
    assert pinned["decoding"]["strategy"] == "greedy"
    assert pinned["condition_overrides"]["S3+YaRN"]["within_trained"]["rope_scaling"] is None
    assert pinned["condition_overrides"]["S3+YaRN+DCA"]["beyond_trained"]["dual_chunk_attention_config"] == {
        "chunk_size": 144, "local_size": 12, "original_max_position_embeddings": TRAINED}
    assert any("only to inputs longer than the trained length" in n for n in saved["notes"])
    assert set(saved["retrieval"]["order"]) == set(lc.CONDITION_NAMES) == set(saved["loss_by_position"])
    for name in saved["plots"]:
        assert (out / name).stat().st_size > 1000
    assert {"accuracy_vs_length_order.png", "loss_by_position.png",
            "retrieval_heatmap_order_s3_yarn_dca.png"} <= set(saved["plots"])


def test_s2_up_to_the_trained_length(checkpoints, tmp_path):
    """With s2_up_to_trained, S2 is evaluated at the lengths up to the trained length only; S3 at all."""
    settings = SETTINGS.replace(n_per_length=2, variants=("passkey",), conditions=("S2", "S3"), loss_docs=1,
                                s2_up_to_trained=True)
    res = lc.run_longcontext_eval(checkpoints, tmp_path / "eval", settings, log=None)
    grids = res["retrieval"]["passkey"]
    assert grids["S2"]["lengths"] == [n for n in settings.eval_lengths if n <= TRAINED] == [160]
    assert grids["S3"]["lengths"] == list(settings.eval_lengths) == [160, 384]
    assert "at_384" not in res["summary"]["passkey"]["S2"] and "at_384" in res["summary"]["passkey"]["S3"]
    assert any("only up to the trained length" in n for n in res["notes"])
    # what a dry run announces is what ran
    assert lc.items_per_condition(settings) == {c: len(g["items"]) for c, g in grids.items()} == {"S2": 2, "S3": 4}
    with pytest.raises(ConfigError, match="s2_up_to_trained"):
        SETTINGS.replace(s2_up_to_trained="yes")


def test_cli_dry_run_prints_resolved_settings(tmp_path):
    result = CliRunner().invoke(eval_group, [
        "longcontext", "--s2", str(tmp_path / "s2"), "--s3", str(tmp_path / "s3"), "--out", str(tmp_path / "o"),
        "--trained-length", "2048", "--lengths", "256,8192", "--n-per-length", "3", "--dry-run",
    ])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["settings"]["lengths"] == [256, 8192] and shown["settings"]["n_per_length"] == 3
    assert shown["settings"]["condition_overrides"]["S3+YaRN"]["beyond_trained"]["rope_scaling"]["factor"] == 4.0
    assert shown["settings"]["dca_chunk_size"] == 1536
    assert shown["items_per_condition"] == {c: 2 * 3 * 2 for c in shown["settings"]["conditions"]}
    bad = CliRunner().invoke(eval_group, ["longcontext", "--trained-length", "2048", "--conditions", "S3,S9",
                                          "--dry-run"])
    assert bad.exit_code != 0 and "S9" in bad.output
    missing = CliRunner().invoke(eval_group, ["longcontext", "--trained-length", "2048", "--out", str(tmp_path / "o")])
    assert missing.exit_code != 0 and "--s2" in missing.output
    unknown = CliRunner().invoke(eval_group, ["longcontext", "--dry-run"])
    assert unknown.exit_code != 0 and "--trained-length" in unknown.output


def test_cli_reads_the_trained_length_from_the_s3_stage(tmp_path):
    """The pipeline writes stage.json (the stage's resolved config) into the S3 directory."""
    s3 = tmp_path / "s3"
    s3.mkdir()
    (s3 / "stage.json").write_text(json.dumps({"key": "flagship/s3", "config": {"seq_len": 512}}))
    result = CliRunner().invoke(eval_group, ["longcontext", "--s3", str(s3), "--conditions", "S3,S3+YaRN+DCA",
                                             "--dry-run"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)["settings"]
    assert shown["trained_length"] == 512 and shown["lengths"] == [64, 128, 256, 512, 1024, 2048]
    assert (shown["dca_chunk_size"], shown["dca_local_size"], shown["loss_length"]) == (384, 32, 2048)


# ----------------------------------------------------------------------------- the claims
def _summary(s3_at, s2_at, plain_4x, dca_4x, yarn_4x):
    return {"passkey": {"S2": {"at_trained_length": s2_at, "at_200": s2_at, "at_800": 0.0},
                        "S3": {"at_trained_length": s3_at, "at_200": s3_at, "at_800": plain_4x},
                        "S3+YaRN": {"at_trained_length": s3_at, "at_200": s3_at, "at_800": yarn_4x},
                        "S3+YaRN+DCA": {"at_trained_length": s3_at, "at_200": s3_at, "at_800": dca_4x}}}


def test_claim_verdicts_follow_the_thresholds(tmp_path):
    """The two long-context rows on hand-made summaries, at and across the pass marks of claims.toml
    (S3 >= 90% at the trained length with S2 at least 40 points lower; YaRN + DCA >= 80% at 4x with
    plain S3 under 30%)."""
    from qwen3repro.evals.claims.longcontext import variant_rows
    from qwen3repro.evals.claims.settings import claim_settings

    figures = claim_settings().longcontext
    settings = lc.LongContextSettings(trained_length=200, lengths=(200, 800), n_per_length=40, variants=("passkey",))

    def rows(*accuracies):
        grid = {"lengths": [200, 800], "accuracy": [[1.0, 1.0], [0.9, 0.1]]}
        results = {"summary": _summary(*accuracies), "settings": {}, "retrieval": {"passkey": {"S3+YaRN+DCA": grid}}}
        return variant_rows("flagship", "passkey", results, settings, tmp_path, figures)

    abf, ext = rows(0.90, 0.45, 0.25, 0.80, 0.30)
    assert abf.reproduced is True and ext.reproduced is True and abf.diagnosis == ext.diagnosis == ""
    assert abf.measured == "at 200: S3 90%, S2 45% (n=40)"
    assert ext.measured == ("S2: 45%@200, 0%@800; S3: 90%@200, 25%@800; S3+YaRN: 90%@200, 30%@800; "
                            "S3+YaRN+DCA: 90%@200, 80%@800 (n=40 per length)")
    abf, ext = rows(0.875, 0.55, 0.30, 0.775, 0.85)
    assert abf.reproduced is False and ext.reproduced is False
    assert abf.diagnosis == ("S3 retrieves only 88% at its trained length (< 90%); "
                             "the S2 model already reaches 55% at 200")
    assert ext.diagnosis.startswith("YaRN + DCA reach 78% at 800 (< 80%); YaRN alone keeps 85% there")
    assert "by needle depth (start of the context -> end): 90%, 10%" in ext.diagnosis
    assert "plain S3 already reaches 30% at 800 (>= 30%)" in ext.diagnosis
    assert abf.report_figure == "context 4,096 -> 32,768 (§3.2)"
    assert ext.report_figure == "32K -> 128K (§3.2; RULER with YaRN x4, App. A.1.1)"


def test_claim_rows_from_a_pipeline_plan(checkpoints, tokenizer, tmp_path, make_plan):
    from qwen3repro.evals.claims.longcontext import claim_longcontext

    root = tmp_path / "runs"
    s3 = SimpleNamespace(seq_len=160)
    plan = make_plan(root, {"flagship/s2": None, "flagship/s3": s3, "student/s3": s3}, evals={"longcontext": {
        "lengths": [160, 640], "n_per_length": 2, "variants": ["passkey"], "depth_bins": 2, "loss_docs": 1,
        "loss_bucket": 128}})
    (row,) = claim_longcontext(plan, lambda line: None)
    assert row.reproduced is None and row.measured == "not measured" and "s2" in row.diagnosis
    assert row.role == "flagship"  # the first role that ran S3
    for stage in ("S2", "S3"):
        d = root / "flagship" / stage.lower()
        Qwen3.from_pretrained(checkpoints[stage]).save_pretrained(d)
        (d / "lineage.json").write_text("{}")
    tokenizer.save(root / "tokenizer")
    abf, ext = claim_longcontext(plan, lambda line: None)
    assert abf.name == "s3_abf[flagship/passkey]" and abf.reproduced is False  # a random model
    assert ext.name == "yarn_dca[flagship/passkey]" and ext.reproduced is False
    assert "at 160: S3" in abf.measured and "S2" in abf.measured
    assert "S3+YaRN+DCA" in ext.measured and "@640" in ext.measured and "@160" in ext.measured
    assert "S3+YaRN+DCA at 640 by needle depth" in ext.diagnosis  # a random model fails: the depth profile
    assert abf.plots and all(p.endswith(".png") for p in abf.plots)
    saved = json.loads((root / "claims" / "longcontext" / lc.RESULT_FILE).read_text())
    assert saved["settings"]["trained_length"] == 160 and saved["settings"]["dca_chunk_size"] == 120
    # A role without S2 and S3 stages is named, not measured.
    other = make_plan(root, {"student/s3": s3}, evals={"longcontext": {"role": "student"}})
    (row,) = claim_longcontext(other, lambda line: None)
    assert row.reproduced is None and "student has no S2 and S3" in row.diagnosis
