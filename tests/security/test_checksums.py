"""Checkpoints carry the size and SHA-256 of each file (`checksums.json`), checked before the file is read:
a flipped bit or a truncated file is one CheckpointError line naming the file, never a model or a resume
built on damaged bytes. Directories without checksums (from elsewhere, or older) still load."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch

from qwen3repro.config import ModelConfig
from qwen3repro.data.packing import PackingLoader
from qwen3repro.models.checksums import CHECKSUMS, read_checksums
from qwen3repro.models.hf import CheckpointError
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.train import checkpoint as ckpt
from qwen3repro.train.loop import TrainConfig, causal_lm_loss, train

MICRO = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
QUIET = dict(printer=lambda line: None)


def micro_model(seed: int = 0) -> Qwen3:
    torch.manual_seed(seed)
    return Qwen3(MICRO)


def loader() -> PackingLoader:
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 128, size=int(rng.integers(4, 30))).tolist() for _ in range(24)]
    return PackingLoader(docs, seq_len=16, batch_size=2, eot_id=0, seed=1)


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(steps=4, lr=3e-3, ckpt_every=2, keep_last=2, log_every=1, seed=3), **kw})


def flip_bit(path) -> None:
    """Flip one bit in the middle of a file's payload (a safetensors file's tensor bytes, past its header),
    the kind of damage that leaves every shape, and so every structural check, intact."""
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0] if path.suffix == ".safetensors" else 0
    data[start + (len(data) - start) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def flip_digit(path) -> None:
    """Turn the last even digit of a JSON file into the next odd one: still valid JSON, another value."""
    text = path.read_text()
    i = max(i for i, c in enumerate(text) if c in "02468")
    path.write_text(text[:i] + str(int(text[i]) + 1) + text[i + 1:])


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:-16])


def one_line_naming(error: pytest.ExceptionInfo, path) -> None:
    message = str(error.value)
    assert str(path) in message and "\n" not in message, message


@pytest.fixture
def saved(tmp_path):
    micro_model().save_pretrained(tmp_path / "model")
    return tmp_path / "model"


# ----------------------------------------------------------------------------- a saved model
def test_save_records_every_file_it_wrote(saved):
    files = read_checksums(saved)
    assert set(files) == {"config.json", "model.safetensors"}
    assert files["model.safetensors"]["size"] == (saved / "model.safetensors").stat().st_size


@pytest.mark.parametrize("damage", [flip_bit, truncate])
def test_damaged_weights_are_named(saved, damage):
    damage(saved / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        Qwen3.from_pretrained(saved)
    one_line_naming(e, saved / "model.safetensors")


def test_a_changed_config_value_is_named(saved):
    flip_digit(saved / "config.json")
    with pytest.raises(CheckpointError) as e:
        Qwen3.from_pretrained(saved)
    one_line_naming(e, saved / "config.json")


def test_damaged_shard_or_index_is_named(tmp_path):
    micro_model().save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(read_checksums(tmp_path)) == {"config.json", "model.safetensors.index.json",
                                                                  *(s.name for s in shards)}
    flip_bit(shards[1])
    with pytest.raises(CheckpointError) as e:
        Qwen3.from_pretrained(tmp_path)
    one_line_naming(e, shards[1])


def test_a_weight_file_the_checksums_do_not_list_is_named(saved):
    # A shard layout slipped in beside the recorded single file: the loader would read the index.
    model = micro_model(1)
    other = saved.parent / "other"
    model.save_pretrained(other, max_shard_size="20KB")
    for f in other.glob("model*"):
        (saved / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="not listed") as e:
        Qwen3.from_pretrained(saved)
    one_line_naming(e, saved / "model.safetensors.index.json")


def test_a_new_layout_replaces_the_old_checksums(tmp_path):
    micro_model().save_pretrained(tmp_path, max_shard_size="20KB")
    micro_model(1).save_pretrained(tmp_path)
    assert set(read_checksums(tmp_path)) == {"config.json", "model.safetensors"}
    Qwen3.from_pretrained(tmp_path)


def test_a_directory_without_checksums_loads_unchecked(saved):
    """A Hugging Face download (or a directory saved before checksums) has no checksums.json."""
    before = micro_model().state_dict()
    (saved / CHECKSUMS).unlink()
    loaded = Qwen3.from_pretrained(saved).state_dict()
    assert all(torch.equal(before[k], loaded[k]) for k in before)


def test_an_unreadable_checksum_file_is_named(saved):
    (saved / CHECKSUMS).write_text("{")
    with pytest.raises(CheckpointError) as e:
        Qwen3.from_pretrained(saved)
    one_line_naming(e, saved / CHECKSUMS)


def test_transformers_loads_a_directory_with_checksums(saved):
    transformers = pytest.importorskip("transformers")
    assert (saved / CHECKSUMS).is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(saved)
    ours = micro_model().state_dict()
    assert torch.equal(hf.state_dict()["model.embed_tokens.weight"], ours["model.embed_tokens.weight"])


# ----------------------------------------------------------------------------- trainer checkpoints
def test_every_file_of_a_checkpoint_and_of_the_published_stage_is_listed(tmp_path):
    train(micro_model(), loader(), causal_lm_loss, cfg(), tmp_path, **QUIET)
    for d in (tmp_path / "checkpoints" / "step_000004", tmp_path):
        files = {os.path.relpath(os.path.join(root, f), d) for root, _, names in os.walk(d) for f in names}
        files = {f for f in files if f.startswith("state") or f.startswith("model") or f == "config.json"}
        assert set(read_checksums(d)) == files, d
        assert {"state/optimizer.safetensors", "state/trainer.json", "state/rng.safetensors"} <= files


def test_checksums_are_written_in_the_checkpoint_s_atomic_step(tmp_path, monkeypatch):
    def failing(directory, names):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "record_checksums", failing)
    with pytest.raises(OSError, match="simulated"):
        train(micro_model(), loader(), causal_lm_loss, cfg(), tmp_path, **QUIET)
    assert ckpt.list_checkpoints(tmp_path) == []
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".")]


@pytest.mark.parametrize("name, damage", [
    ("model.safetensors", flip_bit),
    ("state/optimizer.safetensors", flip_bit),
    ("state/optimizer.safetensors", truncate),
    ("state/rng.safetensors", flip_bit),
    ("state/loader.json", flip_digit),
    ("state/trainer.json", flip_digit),
])
def test_resuming_from_a_damaged_checkpoint_names_the_file(tmp_path, name, damage):
    with pytest.raises(RuntimeError, match="cut"):
        train(micro_model(), loader(), _cut_at(3), cfg(), tmp_path, **QUIET)
    latest = tmp_path / "checkpoints" / "step_000002"
    damage(latest / name)
    with pytest.raises(CheckpointError) as e:
        train(micro_model(), loader(), causal_lm_loss, cfg(), tmp_path, **QUIET)
    one_line_naming(e, latest / name)


def test_a_checkpoint_without_checksums_resumes(tmp_path):
    ref = train(micro_model(), loader(), causal_lm_loss, cfg(), tmp_path / "ref", **QUIET)["losses"]
    with pytest.raises(RuntimeError, match="cut"):
        train(micro_model(), loader(), _cut_at(3), cfg(), tmp_path / "cut", **QUIET)
    (tmp_path / "cut" / "checkpoints" / "step_000002" / CHECKSUMS).unlink()
    out = train(micro_model(), loader(), causal_lm_loss, cfg(), tmp_path / "cut", **QUIET)
    assert out["resumed_from"].endswith("step_000002") and out["losses"] == {k: ref[k] for k in (3, 4)}


def test_a_damaged_published_stage_is_named_when_a_child_loads_it(tmp_path):
    train(micro_model(), loader(), causal_lm_loss, cfg(), tmp_path, **QUIET)
    flip_bit(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        Qwen3.from_pretrained(tmp_path)
    one_line_naming(e, tmp_path / "model.safetensors")


def _cut_at(step: int):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == step:
            raise RuntimeError(f"cut at step {step}")
        return causal_lm_loss(model, batch)

    return loss_fn


def test_checksum_file_format(saved):
    manifest = json.loads((saved / CHECKSUMS).read_text())
    assert manifest["algorithm"] == "sha256"
    assert all(len(e["sha256"]) == 64 and e["size"] > 0 for e in manifest["files"].values())
