"""Long-context evaluation suite: conditions, retrieval grid, loss by position, result file, plots, CLI.

Everything runs on a micro random model and a tokenizer trained on a few hundred synthetic texts, at
lengths of a few hundred tokens with a "trained length" of 192, so YaRN/DCA switch on within the test.
"""
from __future__ import annotations

import json
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
    return {v: lc.build_items(tokenizer, v, SETTINGS.lengths, SETTINGS.n_per_length, (), 0, 0) for v in lc.VARIANTS}


# ----------------------------------------------------------------------------- settings
def test_suite_file_pins_the_code_defaults():
    assert lc.DEFAULT_SUITE.is_file()
    assert lc.load_suite().resolved() == lc.LongContextSettings().resolved()
    s = lc.load_suite()
    assert s.lengths == (256, 512, 1024, 2048, 4096, 8192) and s.n_per_length == 40
    assert s.dca_sizes == (1536, 128) and s.yarn_only_beyond_trained


def test_suite_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "suite.toml"
    bad.write_text('lengths = [256]\nn_per_lenght = 40\ncolor = "red"\n')
    with pytest.raises(ConfigError, match=r"n_per_lenght.*|color"):
        lc.load_suite(bad)
    with pytest.raises(ConfigError, match="conditions"):
        lc.LongContextSettings(conditions=("S3", "S3+NTK"))
    with pytest.raises(ConfigError, match="DCA"):
        lc.LongContextSettings(dca_chunk_size=4096)
    with pytest.raises(ConfigError, match="yarn_only_beyond_trained must be true or false"):
        lc.LongContextSettings.from_dict({"yarn_only_beyond_trained": "yes"})
    with pytest.raises(ConfigError, match="n_per_length must be an integer"):
        lc.LongContextSettings.from_dict({"n_per_length": "40"})


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


def test_grid_shape_and_records(checkpoints, tokenizer, items):
    grid = lc.retrieval_grid(checkpoints["S3"], tokenizer, "S3", settings=SETTINGS, items=items["order"],
                             variant="order")
    assert grid["lengths"] == [160, 384] and grid["depth_bin_edges"] == [0.0, 0.5, 1.0]
    assert len(grid["accuracy"]) == 2 and all(len(row) == 2 for row in grid["accuracy"])
    assert [sum(row) for row in grid["n"]] == [4, 4] and grid["n_by_length"] == [4, 4]
    assert all(a is None or 0 <= a <= 1 for row in grid["accuracy"] for a in row)
    assert len(grid["distractor_rate"]) == 2 and len(grid["items"]) == 8
    assert {"completion", "correct", "returned_distractor", "target", "distractor"} <= set(grid["items"][0])


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
        grid = lc.retrieval_grid(cheat, tokenizer, "S3+YaRN", settings=SETTINGS, items=items[variant], variant=variant)
        assert grid["accuracy_by_length"] == [1.0, 1.0]
        assert all(a in (None, 1.0) for row in grid["accuracy"] for a in row)
    wrong = StubSource(AnswerStub(tokenizer, items["order"], lambda it: it["values"][1], 512))
    grid = lc.retrieval_grid(wrong, tokenizer, "S3", settings=SETTINGS, items=items["order"], variant="order")
    assert grid["accuracy_by_length"] == [0.0, 0.0]
    assert grid["distractor_rate_by_length"] == [1.0, 1.0]
    assert all(r["returned_distractor"] and not r["correct"] for r in grid["items"])


# ----------------------------------------------------------------------------- loss, suite, plots
def test_loss_by_position(checkpoints, tokenizer):
    res = lc.loss_by_position(checkpoints["S3"], tokenizer, "S3+YaRN+DCA", 384, 2, settings=SETTINGS)
    assert res["bucket_start"] == [0, 64, 128, 192, 256, 320]
    assert res["count"][0] == 2 * 63 and all(m is None or m > 0 for m in res["mean_nll"])
    assert res["model_config"]["rope_scaling"]["factor"] == 4.0  # 384 > trained length


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


def test_cli_dry_run_prints_resolved_settings(tmp_path):
    result = CliRunner().invoke(eval_group, [
        "longcontext", "--s2", str(tmp_path / "s2"), "--s3", str(tmp_path / "s3"), "--out", str(tmp_path / "o"),
        "--lengths", "256,8192", "--n-per-length", "3", "--dry-run",
    ])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["settings"]["lengths"] == [256, 8192] and shown["settings"]["n_per_length"] == 3
    assert shown["settings"]["condition_overrides"]["S3+YaRN"]["beyond_trained"]["rope_scaling"]["factor"] == 4.0
    assert shown["settings"]["dca_chunk_size"] == 1536
    bad = CliRunner().invoke(eval_group, ["longcontext", "--conditions", "S3,S9", "--dry-run"])
    assert bad.exit_code != 0 and "S9" in bad.output
    missing = CliRunner().invoke(eval_group, ["longcontext", "--out", str(tmp_path / "o")])
    assert missing.exit_code != 0 and "--s2" in missing.output


# ----------------------------------------------------------------------------- the claims table
def test_scale_settings_follow_the_trained_length():
    s = lc.scale_settings({"lengths": [128, 512, 2048], "n_per_length": 2}, 512)
    assert s.trained_length == 512 and s.dca_sizes == (384, 32) and s.loss_length == 2048
    assert s.lengths == (128, 512, 2048) and s.n_per_length == 2
    assert lc.scale_settings({}, 2048).resolved() == lc.default_settings().resolved()
    with pytest.raises(ConfigError, match="bogus"):
        lc.scale_settings({"bogus": 1}, 512)


def test_claim_rows_from_a_pipeline_plan(checkpoints, tokenizer, tmp_path):
    from qwen3repro.evals.claims import claim_longcontext

    root = tmp_path / "runs"
    plan = SimpleNamespace(
        root=root,
        scale_config={"evals": {"longcontext": {"role": "flagship", "lengths": [160, 640], "n_per_length": 2,
                                                "variants": ["passkey"], "depth_bins": 2, "loss_docs": 1,
                                                "loss_bucket": 128}}},
        settings=SimpleNamespace(roles=("flagship",), threads=1),
        node=lambda key: SimpleNamespace(config=SimpleNamespace(seq_len=160)),
    )
    (row,) = claim_longcontext(plan, lambda line: None)
    assert row.reproduced is None and row.measured == "not measured" and "s2" in row.diagnosis
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
