"""The training loop: learning, exact resume, atomic checkpoints, divergence, config checks, accumulation, logs."""
import functools
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3repro.config import ConfigError, ModelConfig
from qwen3repro.data.packing import PackingLoader
from qwen3repro.losses import masked_cross_entropy
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.run_lock import HOST
from qwen3repro.train import checkpoint as ckpt
from qwen3repro.train.loop import (TrainConfig, TrainingDivergedError, build_optimizer, causal_lm_loss,
                                   parameter_groups, train)

MICRO = ModelConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
)
QUIET = dict(printer=lambda line: None)



def micro_model(seed=0):
    torch.manual_seed(seed)
    return Qwen3(MICRO)


def docs(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 256, size=int(rng.integers(4, 30))).tolist() for _ in range(n)]


def packing(**kw):
    args = dict(seq_len=16, batch_size=2, eot_id=0, seed=1, document_masking=True)
    args.update(kw)
    return PackingLoader(docs(), **args)


class ListLoader:
    """A re-iterable loader without a cursor (the loop falls back to skipping consumed batches)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def noisy_loss(model, batch):
    """Pretraining CE on a random subset of targets: draws from torch, numpy and Python RNGs."""
    keep = torch.rand(batch["labels"].shape) < 0.8
    keep &= torch.from_numpy(np.random.rand(*batch["labels"].shape) < 0.95)
    if random.random() < 0.5:
        keep[:, 0] = False
    out = model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
    labels = batch["labels"].masked_fill(~keep, -100)
    return masked_cross_entropy(out.logits, labels), {"num_tokens": int((labels != -100).sum())}


class Crash(Exception):
    pass


def crashing(loss_fn, at_call):
    calls = {"n": 0}

    def fn(model, batch):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise Crash(f"simulated crash at loss call {at_call}")
        return loss_fn(model, batch)

    return fn


def logged_losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def base_cfg(**kw):
    args = dict(steps=8, lr=3e-3, warmup_steps=2, decay_fraction=0.5, grad_accum=2, clip_grad_norm=1.0,
                ckpt_every=2, keep_last=2, log_every=1, seed=3, weight_decay=0.1)
    args.update(kw)
    return TrainConfig(**args)


# ----------------------------------------------------------------------------- learning
def test_loss_decreases_on_memorisation(tmp_path):
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1, 256, (2, 16))}
    batch["labels"] = torch.roll(batch["input_ids"], -1, dims=1)
    batch["labels"][:, -1] = -100
    lines = []
    cfg = TrainConfig(steps=40, lr=1e-2, warmup_steps=4, log_every=10, weight_decay=0.0)
    out = train(micro_model(), ListLoader([batch]), causal_lm_loss, cfg, tmp_path / "run", printer=lines.append)
    losses = out["losses"]
    assert losses[40] < 0.3 * losses[1]
    assert out["step"] == 40 and out["loss"] == losses[40]
    progress = [l for l in lines if l.startswith("step")]
    assert len(progress) == 4 and all(k in progress[-1] for k in ("loss", "lr", "gnorm", "tok/s", "elapsed", "eta"))
    assert progress[-1].startswith("step 40/40")


# ----------------------------------------------------------------------------- exact resume
# 2 loss calls per step, checkpoints every 2 steps: a crash at call 3 is in step 2 (no checkpoint yet,
# resume starts over), at call 8 in step 4 (resume from step 2), at call 11 in step 6 (from step 4).
@pytest.mark.parametrize("cut_call,resumed_at", [(3, None), (8, 2), (11, 4)])
def test_resume_after_cut_is_bitwise_identical(tmp_path, cut_call, resumed_at):
    cfg = base_cfg()
    ref = train(micro_model(), packing(), noisy_loss, cfg, tmp_path / "ref", **QUIET)["losses"]
    assert len(ref) == 8

    run = tmp_path / "cut"
    with pytest.raises(Crash):
        train(micro_model(), packing(), crashing(noisy_loss, cut_call), cfg, run, **QUIET)
    # A new process rebuilds model and loader from scratch; when a checkpoint exists its weights must
    # win over the fresh init (hence a different init seed), otherwise the run starts over as built.
    out = train(micro_model(seed=0 if resumed_at is None else 99), packing(), noisy_loss, cfg, run, resume="auto", **QUIET)
    if resumed_at is None:
        assert out["resumed_from"] is None
    else:
        assert out["resumed_from"].endswith(f"step_{resumed_at:06d}")
    assert logged_losses(run) == ref  # every step, bit for bit (JSON floats round-trip exactly)
    final_a = Qwen3.from_pretrained(tmp_path / "ref").state_dict()
    final_b = Qwen3.from_pretrained(run).state_dict()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


_REFERENCE: dict = {}


@settings(max_examples=6)
@given(grad_accum=st.integers(1, 2), ckpt_every=st.integers(1, 3), cut=st.integers(1, 12), data=st.data())
def test_resume_at_arbitrary_cut_is_bitwise_identical(tmp_path_factory, grad_accum, ckpt_every, cut, data):
    """Property form: any checkpoint cadence, any crash point (counted in loss calls), one resume."""
    cut = min(cut, 6 * grad_accum)
    cfg = base_cfg(steps=6, grad_accum=grad_accum, ckpt_every=ckpt_every, keep_last=1)
    if grad_accum not in _REFERENCE:
        ref_dir = tmp_path_factory.mktemp("ref")
        _REFERENCE[grad_accum] = train(micro_model(), packing(), noisy_loss, cfg, ref_dir, **QUIET)["losses"]
    run = tmp_path_factory.mktemp("cut")
    with pytest.raises(Crash):
        train(micro_model(), packing(), crashing(noisy_loss, cut), cfg, run, **QUIET)
    # with a checkpoint, the fresh init must not matter; without one, the run restarts as built
    seed = data.draw(st.integers(1, 5)) if ckpt.find_latest(run) else 0
    train(micro_model(seed=seed), packing(), noisy_loss, cfg, run, **QUIET)
    assert logged_losses(run) == _REFERENCE[grad_accum]


def test_resume_without_loader_cursor_skips_consumed_batches(tmp_path):
    loader_batches = list(packing(document_masking=False))[:5]  # 5 batches per "epoch", cycled
    cfg = base_cfg(steps=6, grad_accum=1, ckpt_every=3)
    loss = functools.partial(causal_lm_loss, document_masking=False)
    ref = train(micro_model(), ListLoader(loader_batches), loss, cfg, tmp_path / "ref", **QUIET)["losses"]
    with pytest.raises(Crash):
        train(micro_model(), ListLoader(loader_batches), crashing(loss, 5), cfg, tmp_path / "cut", **QUIET)
    train(micro_model(), ListLoader(loader_batches), loss, cfg, tmp_path / "cut", **QUIET)
    assert logged_losses(tmp_path / "cut") == ref


def test_completed_run_resumes_to_nothing(tmp_path):
    cfg = base_cfg(steps=2, ckpt_every=0)
    train(micro_model(), packing(), causal_lm_loss, cfg, tmp_path, **QUIET)
    again = train(micro_model(), packing(), causal_lm_loss, cfg, tmp_path, **QUIET)
    assert again["losses"] == {} and again["step"] == 2
    assert sorted(logged_losses(tmp_path)) == [1, 2]


def test_a_run_cut_after_its_final_checkpoint_reports_its_loss_and_eval_on_resume(tmp_path):
    """Killed after the last step's checkpoint, before the caller wrote its results: the resumed call has
    no step left to train, and reports the final loss and evaluation of the uncut run."""
    cfg = base_cfg(steps=4, ckpt_every=2, grad_accum=1)
    eval_fn = functools.partial(_heldout_loss, batch=next(iter(packing(document_masking=False))))
    ref = train(micro_model(), packing(), causal_lm_loss, cfg, tmp_path / "ref", eval_fn=eval_fn, **QUIET)
    again = train(micro_model(99), packing(), causal_lm_loss, cfg, tmp_path / "ref", eval_fn=eval_fn, **QUIET)
    assert again["losses"] == {} and again["resumed_from"].endswith("step_000004")
    assert again["loss"] == ref["loss"] == ref["losses"][4]
    assert again["eval"] == ref["eval"] and set(ref["eval"]) == {"eval/heldout_loss"}
    # A log that lost the final record: the evaluation runs again on the final weights.
    log = tmp_path / "ref" / "metrics.jsonl"
    log.write_text("".join(line for line in log.read_text().splitlines(keepends=True) if '"step": 4' not in line))
    lines = []
    third = train(micro_model(99), packing(), causal_lm_loss, cfg, tmp_path / "ref", eval_fn=eval_fn,
                  printer=lines.append)
    assert third["eval"] == ref["eval"] and third["loss"] is None
    assert any("no loss for the final step 4" in line for line in lines)


def _heldout_loss(model, batch):
    return {"heldout_loss": float(causal_lm_loss(model, batch)[0])}


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_layout_and_pruning(tmp_path):
    cfg = base_cfg(steps=6, ckpt_every=1, keep_last=2)
    model = micro_model()
    out = train(model, packing(), causal_lm_loss, cfg, tmp_path, **QUIET)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [5, 6]
    assert ckpt.find_latest(tmp_path) == out["checkpoint"] == str(tmp_path / "checkpoints" / "step_000006")
    for d in (tmp_path, tmp_path / "checkpoints" / "step_000006"):
        assert {"model.safetensors", "config.json", "state"} <= set(os.listdir(d))
        assert set(os.listdir(d / "state")) == {
            "trainer.json", "loader.json", "optimizer.json", "optimizer.safetensors", "rng.json", "rng.safetensors"
        }
        meta = json.loads((d / "state" / "trainer.json").read_text())
        assert meta["step"] == 6 and meta["train_config"]["lr"] == cfg.lr and len(meta["run_hash"]) == 16
        assert json.loads((d / "state" / "loader.json").read_text())["cursor"]["loader"]["batch"] > 0
    loaded = Qwen3.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".")]


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = base_cfg(steps=6, ckpt_every=2)
    real = ckpt._save_optimizer
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 save dies half-way through writing
            raise OSError("disk full (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(ckpt, "_save_optimizer", dying)
    with pytest.raises(OSError, match="simulated"):
        train(micro_model(), packing(), causal_lm_loss, cfg, tmp_path, **QUIET)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    assert not os.path.exists(tmp_path / "checkpoints" / "step_000004")
    # A hard kill leaves a temp directory behind, named after its writer, which is gone: it is never taken for a
    # checkpoint, and the resumed run removes it.
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    leftover = f".tmp-step_000006-deadbeef.{killed.pid}@{HOST}"
    stale = tmp_path / "checkpoints" / leftover / "state"
    stale.mkdir(parents=True)
    (stale / "trainer.json").write_text("{")
    assert ckpt.find_latest(tmp_path).endswith("step_000002")
    state = ckpt.load_checkpoint(ckpt.find_latest(tmp_path), model=micro_model(), restore_rng=False)
    assert state["step"] == 2
    monkeypatch.setattr(ckpt, "_save_optimizer", real)
    out = train(micro_model(), packing(), causal_lm_loss, cfg, tmp_path, **QUIET)
    assert out["resumed_from"].endswith("step_000002") and out["step"] == 6
    assert not os.path.exists(tmp_path / "checkpoints" / leftover)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_non_finite_stops_run_and_keeps_last_good_checkpoint(tmp_path, kind):
    cfg = base_cfg(steps=6, ckpt_every=2, grad_accum=1)
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, m = causal_lm_loss(model, batch)
        if calls["n"] == 3:
            if kind == "loss":
                return loss * float("nan"), m
            # finite value, NaN gradient: d/dx sqrt(x) at 0 is inf, times 0
            p = next(model.parameters())
            return loss + torch.sqrt((p * 0).sum()), m
        return loss, m

    with pytest.raises(TrainingDivergedError, match=r"non-finite .*step 3.*step_000002"):
        train(micro_model(), packing(), poisoned, cfg, tmp_path, **QUIET)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    assert not os.path.exists(tmp_path / "model.safetensors")  # nothing published
    assert sorted(logged_losses(tmp_path)) == [1, 2]


class PlainLM(torch.nn.Module):
    """A model without save_pretrained/from_pretrained/config: the plain safetensors path."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(256, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 256, bias=False)
        self.head.weight = self.embed.weight  # tied, as in small Qwen3 models

    def forward(self, input_ids, **_):
        return self.head(self.norm(self.embed(input_ids)))


def test_plain_module_checkpoints_and_resumes(tmp_path):
    cfg = base_cfg(steps=4, ckpt_every=2, grad_accum=1)
    torch.manual_seed(0)
    ref = train(PlainLM(), packing(), causal_lm_loss, cfg, tmp_path / "ref", **QUIET)["losses"]
    torch.manual_seed(0)
    with pytest.raises(Crash):
        train(PlainLM(), packing(), crashing(causal_lm_loss, 4), cfg, tmp_path / "cut", **QUIET)
    out = train(PlainLM(), packing(), causal_lm_loss, cfg, tmp_path / "cut", **QUIET)
    assert out["resumed_from"].endswith("step_000002") and logged_losses(tmp_path / "cut") == ref
    assert os.path.exists(tmp_path / "cut" / "model.safetensors")


# ----------------------------------------------------------------------------- config checks
def test_resume_with_different_config_names_the_fields(tmp_path):
    cfg = base_cfg(steps=4, ckpt_every=2)
    with pytest.raises(Crash):
        train(micro_model(), packing(), crashing(causal_lm_loss, 6), cfg, tmp_path, **QUIET)
    with pytest.raises(ckpt.ConfigMismatchError, match=r"train\.lr") as e:
        train(micro_model(), packing(), causal_lm_loss, cfg.replace(lr=1e-3), tmp_path, **QUIET)
    assert "train.warmup_steps" not in str(e.value)
    other = Qwen3(MICRO.replace(intermediate_size=96))
    with pytest.raises(ckpt.ConfigMismatchError, match=r"model\.intermediate_size"):
        train(other, packing(), causal_lm_loss, cfg, tmp_path, **QUIET)
    with pytest.raises(ckpt.ConfigMismatchError, match=r"run\.data"):
        train(micro_model(), packing(), causal_lm_loss, cfg, tmp_path, run_extra={"data": "abc"}, **QUIET)
    # cadence and device are not part of the run's identity
    out = train(micro_model(), packing(), causal_lm_loss, cfg.replace(log_every=3, keep_last=5), tmp_path, **QUIET)
    assert out["step"] == 4


def test_fresh_start_refuses_directory_with_checkpoints(tmp_path):
    cfg = base_cfg(steps=2)
    train(micro_model(), packing(), causal_lm_loss, cfg, tmp_path, **QUIET)
    with pytest.raises(ckpt.CheckpointError, match="already holds checkpoints"):
        train(micro_model(), packing(), causal_lm_loss, cfg, tmp_path, resume=None, **QUIET)
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        train(micro_model(), packing(), causal_lm_loss, cfg, tmp_path / "x", resume=tmp_path / "missing", **QUIET)


def test_train_config_strict_loading():
    with pytest.raises(ConfigError, match="warmup_step"):
        TrainConfig.from_dict({"steps": 10, "warmup_step": 3})
    cfg = TrainConfig.from_dict({"steps": 10, "betas": [0.9, 0.99], "precision": "bf16"})
    assert cfg.betas == (0.9, 0.99) and TrainConfig.from_dict(cfg.to_dict()) == cfg
    for bad, field in ((dict(steps=0), "steps"), (dict(steps=5, precision="fp8"), "precision"),
                       (dict(steps=5, grad_accum=0), "grad_accum"), (dict(steps=5, decay_shape="exp"), "decay_shape"),
                       (dict(steps=5, device="tpu"), "device")):
        with pytest.raises(ConfigError, match=field):
            TrainConfig.from_dict(bad)


def test_weight_decay_groups():
    model = micro_model()
    groups = parameter_groups(model, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert id(model.model.embed_tokens.weight) not in decayed  # embeddings (and the tied head): no decay
    assert id(model.model.layers[0].self_attn.q_proj.weight) in decayed
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    n_unique = len({id(p) for p in model.parameters()})
    assert sum(len(g["params"]) for g in groups) == n_unique
    with_emb = parameter_groups(model, 0.1, decay_embeddings=True)
    assert id(model.model.embed_tokens.weight) in {id(p) for p in with_emb[0]["params"]}



def test_the_optimizer_matches_torch_adamw_and_marks_every_parameter_changed():
    """The fused AdamW equals torch's default AdamW up to rounding, and each step bumps every parameter's
    version counter (the fused kernel alone does not): the decode step's prepared weights rely on it."""
    torch.manual_seed(0)
    a, b = micro_model(), micro_model()
    b.load_state_dict(a.state_dict())
    cfg = TrainConfig(steps=3, lr=1e-2, weight_decay=0.1)
    ours = build_optimizer(a, cfg)
    reference = torch.optim.AdamW(parameter_groups(b, 0.1), lr=1e-2, betas=cfg.betas, eps=cfg.eps, foreach=False)
    ids = torch.randint(0, a.config.vocab_size, (2, 12))
    for _ in range(3):
        for model, opt in ((a, ours), (b, reference)):
            opt.zero_grad(set_to_none=True)
            causal_lm_loss(model, {"input_ids": ids, "labels": ids})[0].backward()
        versions = [p._version for p in a.parameters()]
        ours.step()
        reference.step()
        assert all(p._version > v for p, v in zip(a.parameters(), versions))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)

# bf16 rounds to 8 significant bits: one rounding is a relative error of at most 2^-8. The first step
# runs both precisions from the same weights, so its loss differs by about one rounding of the logits;
# later steps follow slightly different trajectories (0.7% apart at most on this toy), and 3% is still
# well below the 10-20% a single step moves the loss here.
BF16_FIRST_STEP_RTOL = 2.0**-8
BF16_TRAJECTORY_RTOL = 0.03


def test_bf16_learns_like_fp32_with_fp32_master_weights(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1, 256, (2, 16))}
    batch["labels"] = torch.roll(batch["input_ids"], -1, dims=1)
    batch["labels"][:, -1] = -100
    runs, logits_dtypes, models = {}, {}, {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(steps=12, lr=1e-2, warmup_steps=2, log_every=1, weight_decay=0.0, ckpt_every=0,
                          precision=precision)
        model = models[precision] = micro_model()
        seen = logits_dtypes[precision] = set()
        model.lm_head.register_forward_hook(lambda m, a, out, seen=seen: seen.add(out.dtype))
        runs[precision] = train(model, ListLoader([batch]), causal_lm_loss, cfg, tmp_path / precision, **QUIET)
    fp32, bf16 = runs["fp32"], runs["bf16"]

    # the result and the checkpoint record the precision that ran, and it did run: logits in bf16
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    for precision, out in runs.items():
        meta = json.loads((tmp_path / precision / "state" / "trainer.json").read_text())
        assert meta["precision"] == precision
    assert logits_dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}

    # it learns, and stays close to the fp32 run
    assert bf16["losses"][12] < 0.3 * bf16["losses"][1]
    assert bf16["losses"][1] == pytest.approx(fp32["losses"][1], rel=BF16_FIRST_STEP_RTOL)
    for step in range(1, 13):
        assert bf16["losses"][step] == pytest.approx(fp32["losses"][step], rel=BF16_TRAJECTORY_RTOL), step
    assert bf16["losses"] != fp32["losses"]

    # master weights and optimizer state stay fp32: in memory, in the saved model and in Adam's moments
    assert all(p.dtype == torch.float32 for p in models["bf16"].parameters())
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "bf16" / "model.safetensors").values())
    moments = load_file(tmp_path / "bf16" / "state" / "optimizer.safetensors")
    assert any(k.endswith("exp_avg") for k in moments) and any(k.endswith("exp_avg_sq") for k in moments)
    assert all(t.dtype == torch.float32 for k, t in moments.items() if k.endswith(("exp_avg", "exp_avg_sq")))


# ----------------------------------------------------------------------------- accumulation
def test_grad_accum_2x4_equals_1x8(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(1, 256, (8, 12))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[torch.rand(labels.shape) < 0.3] = -100  # unequal token counts per micro-batch
    big = [{"input_ids": ids, "labels": labels}]
    small = [{"input_ids": ids[:4], "labels": labels[:4]}, {"input_ids": ids[4:], "labels": labels[4:]}]
    common = dict(steps=3, lr=1e-2, warmup_steps=0, clip_grad_norm=0.5, log_every=1)
    a = train(micro_model(), ListLoader(big), causal_lm_loss, TrainConfig(grad_accum=1, **common), tmp_path / "a", **QUIET)
    b = train(micro_model(), ListLoader(small), causal_lm_loss, TrainConfig(grad_accum=2, **common), tmp_path / "b", **QUIET)
    for s in (1, 2, 3):
        assert a["losses"][s] == pytest.approx(b["losses"][s], rel=1e-5)
    wa, wb = Qwen3.from_pretrained(tmp_path / "a").state_dict(), Qwen3.from_pretrained(tmp_path / "b").state_dict()
    # Adam divides by sqrt(v): rounding differences on near-zero gradients move a weight by a
    # fraction of lr, so weights are compared at 1% of one step (lr = 1e-2).
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- step preparation
def test_prepare_step_sees_the_step_micro_batches_before_their_forwards(tmp_path):
    events = []

    def prepare(model, micro_batches):
        events.append(("prepare", [int(b["input_ids"][0, 0]) for b in micro_batches]))

    def loss_fn(model, batch):
        events.append(("loss", int(batch["input_ids"][0, 0])))
        return causal_lm_loss(model, batch)

    batches = [{"input_ids": torch.full((2, 6), i + 1), "labels": torch.full((2, 6), i + 1)} for i in range(6)]
    train(micro_model(), ListLoader(batches), loss_fn, base_cfg(steps=3, grad_accum=2, ckpt_every=0), tmp_path,
          prepare_step=prepare, **QUIET)
    assert events == [("prepare", [1, 2]), ("loss", 1), ("loss", 2), ("prepare", [3, 4]), ("loss", 3), ("loss", 4),
                      ("prepare", [5, 6]), ("loss", 5), ("loss", 6)]


def test_a_prepare_step_that_does_nothing_changes_nothing(tmp_path):
    """A loss without step preparation trains bit for bit as with a no-op one (same batches, same order)."""
    cfg = base_cfg(steps=4, ckpt_every=0)
    a = train(micro_model(), packing(), noisy_loss, cfg, tmp_path / "a", **QUIET)
    b = train(micro_model(), packing(), noisy_loss, cfg, tmp_path / "b", prepare_step=lambda m, mbs: None, **QUIET)
    assert a["losses"] == b["losses"]
    wa, wb = Qwen3.from_pretrained(tmp_path / "a").state_dict(), Qwen3.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------- metrics
def test_metrics_one_line_per_logged_step_after_resume(tmp_path):
    cfg = base_cfg(steps=8, log_every=2, ckpt_every=4, grad_accum=1)
    with pytest.raises(Crash):
        train(micro_model(), packing(), crashing(causal_lm_loss, 7), cfg, tmp_path, **QUIET)
    assert sorted(logged_losses(tmp_path)) == [2, 4, 6]  # step 6 was logged, but the checkpoint is at 4
    train(micro_model(), packing(), causal_lm_loss, cfg, tmp_path, **QUIET)
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert all({"loss", "lr", "grad_norm", "elapsed_s", "tokens_seen"} <= set(r) for r in records)


def test_eval_is_logged_and_rng_neutral(tmp_path):
    cfg = base_cfg(steps=4, ckpt_every=0, grad_accum=1)
    ref = train(micro_model(), packing(), noisy_loss, cfg, tmp_path / "a", **QUIET)

    def eval_fn(model):
        torch.rand(100), np.random.rand(10), random.random()  # must not shift training randomness
        assert not model.training
        return {"score": 1.5}

    out = train(micro_model(), packing(), noisy_loss, cfg, tmp_path / "b", eval_fn=eval_fn, eval_every=2, **QUIET)
    assert out["losses"] == ref["losses"] and out["eval"] == {"eval/score": 1.5}
    with open(tmp_path / "b" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r.get("eval/score") for r in records] == [None, 1.5, None, 1.5]
