"""The shared SFT stage (assistant-only loss, batching, run + resume, strict config) and the cold-start
stage that builds its data and trains with it."""
import json

import pytest
import torch

from qwen3repro.chat import tokenize_conversation
from qwen3repro.coldstart.pipeline import to_messages, write_jsonl
from qwen3repro.coldstart.reasoner import CONCLUSION, assemble, summary_text
from qwen3repro.config import ConfigError, config_hash
from qwen3repro.data import tasks
from qwen3repro.lineage import make_lineage, read_lineage, write_lineage
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.models.registry import get_model_config
from qwen3repro.rl.selection import USED_QUERIES_FILE
from qwen3repro.stages import coldstart, sft
from qwen3repro.stages.coldstart import ColdStartStageConfig
from qwen3repro.stages.common import StageContext
from qwen3repro.tokenizer import train_tokenizer

QUIET = dict(printer=lambda line: None)


def conversation(family, seed, difficulty=2):
    item = tasks.generate(family, seed, difficulty)
    response = assemble(list(item.trace_steps) + [CONCLUSION + item.answer], summary_text(item, item.answer))
    return to_messages(item.question, response)


CONVS = [conversation(f, s) for f in ("add", "mul") for s in range(12)]


@pytest.fixture(scope="module")
def tok():
    texts = [m["content"] for c in CONVS for m in c] + [m["content"] for s in range(40)
                                                      for m in conversation("order", s, 3)]
    return train_tokenizer(texts, 300)


@pytest.fixture(scope="module")
def parent(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("parent")
    tok.save(d)
    torch.manual_seed(0)
    Qwen3(get_model_config("micro").replace(eos_token_id=tok.endoftext_id, bos_token_id=None)).save_pretrained(d)
    write_lineage(d, make_lineage("parent", {"test": 1}))
    return d


def micro(tok):
    torch.manual_seed(0)
    return Qwen3(get_model_config("micro").replace(eos_token_id=tok.endoftext_id, bos_token_id=None))


# ----------------------------------------------------------------------------- assistant-only loss
def test_labels_cover_exactly_the_assistant_tokens(tok):
    ids, mask = tokenize_conversation(tok, CONVS[0])
    ex = sft.make_example(ids, mask)
    trained = [t for t, lab in zip(ids[1:], ex.labels) if lab != -100]
    assert tok.decode(trained) == tok.decode([t for t, m in zip(ids, mask) if m])
    assert tok.decode(trained).startswith("<think>") and tok.decode(trained).endswith("<|im_end|>")
    assert all(lab in (-100, t) for t, lab in zip(ids[1:], ex.labels))


def test_user_token_targets_do_not_change_loss_or_gradient(tok):
    """Changing the targets at every non-assistant position (user turn, headers) leaves the loss and
    every gradient bit-identical, and the logits of those positions get exactly zero gradient."""
    ids, mask = tokenize_conversation(tok, CONVS[1])
    altered = [t if m else (t * 7 + 3) % len(tok) for t, m in zip(ids, mask)]  # new targets, same inputs
    ex_a = sft.make_example(ids, mask)
    ex_b = sft.Example(ex_a.input_ids, sft.make_example(altered, mask).labels)
    results = []
    for ex in (ex_a, ex_b):
        model = micro(tok)
        batch = {"input_ids": torch.tensor([ex.input_ids]), "labels": torch.tensor([ex.labels])}
        loss, metrics = sft.sft_loss(model, batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))

    model = micro(tok)
    logits = model(torch.tensor([ex_a.input_ids])).logits.detach().requires_grad_(True)
    labels = torch.tensor([ex_a.labels])
    from qwen3repro.losses import masked_cross_entropy

    masked_cross_entropy(logits, labels).backward()
    user = labels[0] == -100
    assert user.any() and (~user).any()
    assert torch.all(logits.grad[0][user] == 0) and torch.any(logits.grad[0][~user] != 0)
    assert metrics["num_tokens"] == int((~user).sum())


def test_pad_and_pack_batches_give_the_same_loss(tok):
    examples, dropped = sft.tokenize_conversations(tok, CONVS[:6], seq_len=512)
    assert dropped == 0
    model = micro(tok)
    losses = []
    for batching in ("pad", "pack"):
        loader = sft.SFTLoader(examples, batch_size=16, seq_len=512, pad_id=tok.pad_token_id, batching=batching)
        (batch,) = list(loader)
        loss, metrics = sft.sft_loss(model, batch)
        losses.append((float(loss.detach()), metrics["num_tokens"]))
        if batching == "pack":
            assert batch["input_ids"].shape[0] < len(examples)  # several conversations share a row
    assert losses[0][1] == losses[1][1]
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)


def test_too_long_conversations_are_dropped_and_counted(tok):
    examples, dropped = sft.tokenize_conversations(tok, CONVS[:4], seq_len=20)
    assert examples == [] and dropped == 4


def test_loader_cursor_resumes_exactly(tok):
    examples, _ = sft.tokenize_conversations(tok, CONVS, seq_len=512)
    a = sft.SFTLoader(examples, batch_size=5, seq_len=512, pad_id=0, seed=3)
    it = iter(a)
    next(it), next(it)
    state = a.state_dict()
    rest = [b["input_ids"] for b in it]
    b = sft.SFTLoader(examples, batch_size=5, seq_len=512, pad_id=0, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(rest, [b_["input_ids"] for b_ in b]))


# ----------------------------------------------------------------------------- the stage
def stage_cfg(data, **kw):
    d = dict(name="sft-test", data=str(data), seq_len=256, batch_size=4, steps=6, n_eval=4,
             train={"lr": 1e-3, "log_every": 2, "ckpt_every": 2})
    d.update(kw)
    return sft.SFTConfig.from_dict(d)


def test_run_and_resume(tmp_path, parent, monkeypatch):
    data = tmp_path / "convs.jsonl"
    write_jsonl(data, CONVS)
    cfg = stage_cfg(data)
    ref = sft.run(cfg, parent, StageContext(tmp_path / "ref", tmp_path / "cache", **QUIET))
    ref_losses = [json.loads(line)["loss"] for line in (ref / "metrics.jsonl").read_text().splitlines()]

    calls = {"n": 0}
    real = sft.sft_loss

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("cut")
        return real(model, batch)

    monkeypatch.setattr(sft, "sft_loss", crashing)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg, parent, StageContext(cut, tmp_path / "cache", **QUIET))
    assert not (cut / "lineage.json").exists() and any((cut / "checkpoints").iterdir())
    monkeypatch.setattr(sft, "sft_loss", real)
    sft.run(cfg, parent, StageContext(cut, tmp_path / "cache", **QUIET))
    cut_losses = [json.loads(line)["loss"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert cut_losses[-1] == ref_losses[-1]

    ev = json.loads((ref / "eval.json").read_text())
    assert ev["n_train"] == len(CONVS) - 4 and ev["n_eval"] == 4 and "heldout_assistant_loss" in ev
    assert 0 < ev["assistant_token_share"] < 1
    lin = read_lineage(ref)
    assert lin.complete and lin.data_hashes["conversations"]
    assert Qwen3.from_pretrained(ref) is not None and (ref / "tokenizer.json").exists()


def test_coldstart_stage_builds_its_data_then_trains_with_packing(tmp_path, parent):
    """The cold-start stage: data pipeline, used queries for RL, the SFT trainer, and its own lineage."""
    table = {"n_queries": 24, "n_validation": 4, "n_candidates": 2, "families": ["add", "mul"]}
    sft_table = {"batching": "pack", "epochs": 1.0, "seq_len": 384, "batch_size": 4, "n_eval": 2,
                 "train": {"lr": 1e-3, "log_every": 2, "ckpt_every": 2}}
    for responses in ("filtered", "unfiltered"):
        cfg = ColdStartStageConfig.from_dict({"name": "cs", "responses": responses, "coldstart": table,
                                              "sft": sft_table})
        out = coldstart.run(cfg, parent, StageContext(tmp_path / responses, tmp_path / "cache", **QUIET))
        report = json.loads((out / "coldstart_report.json").read_text())
        ev = json.loads((out / "eval.json").read_text())
        assert report["counts_add_up"]
        assert ev["n_train"] + ev["n_eval"] + ev["dropped_too_long"] == report["selection"][responses]
        assert json.loads((out / USED_QUERIES_FILE).read_text()) == report["used_uids"][responses]
        lineage = read_lineage(out)
        assert lineage.complete and lineage.config_hash == config_hash(cfg)  # the stage's own config


def test_unknown_config_keys_are_named():
    with pytest.raises(ConfigError, match="bogus"):
        sft.SFTConfig.from_dict({"name": "x", "data": "x.jsonl", "seq_len": 8, "batch_size": 1, "steps": 1,
                                 "bogus": 2})
    with pytest.raises(ConfigError, match="lrr"):
        stage_cfg("x.jsonl", train={"lrr": 1})
    with pytest.raises(ConfigError, match="n_querys"):
        ColdStartStageConfig.from_dict({"name": "cs", "coldstart": {"n_querys": 3},
                                        "sft": {"seq_len": 8, "batch_size": 1, "steps": 1}})
    with pytest.raises(ConfigError, match="set `data` of the stage itself"):
        ColdStartStageConfig.from_dict({"name": "cs", "sft": {"data": "x", "seq_len": 8, "batch_size": 1, "steps": 1}})
    with pytest.raises(ConfigError, match="responses"):
        ColdStartStageConfig.from_dict({"name": "cs", "responses": "some",
                                        "sft": {"seq_len": 8, "batch_size": 1, "steps": 1}})
    with pytest.raises(ConfigError, match="exactly one"):
        stage_cfg("x.jsonl", epochs=1.0)
    with pytest.raises(ConfigError, match="batching"):
        stage_cfg("x.jsonl", batching="bucket")


def test_cold_start_recipe_resolves_with_a_scale_table():
    from qwen3repro.recipes import deep_merge, load_recipe, split_recipe

    scale = {"name": "cold-start", "coldstart": {"n_queries": 1200, "n_validation": 100},
             "sft": {"seq_len": 512, "batch_size": 16, "steps": 400, "train": {"lr": 1e-3}}}
    cfg = ColdStartStageConfig.from_dict(deep_merge(split_recipe(load_recipe("cold-start"))[1], scale))
    assert cfg.responses == "filtered" and cfg.coldstart["n_candidates"] == 4
    cs = cfg.data_config()
    assert cs.rates().wrong_answer == 0.12 and cs.filter_thresholds().similarity_max_containment == 0.5
    assert cfg.sft_config().batching == "pack" and cfg.sft_config().train["lr"] == 1e-3
