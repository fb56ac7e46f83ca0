"""Bad checkpoints and configs give clear errors that name what is wrong; nothing unsafe is loaded."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen3repro.config import ConfigError, ModelConfig
from qwen3repro.models.hf import CheckpointError, parse_size
from qwen3repro.models.qwen3 import Qwen3

BASE = dict(vocab_size=41, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, bos_token_id=None, eos_token_id=None)
MOE = dict(BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)


@pytest.fixture
def saved(tmp_path):
    """A saved MoE checkpoint that these tests edit as another tool would: without `checksums.json`, whose
    check would refuse any edit before the structural checks under test see it (tests/security/test_checksums.py)."""
    torch.manual_seed(0)
    Qwen3(ModelConfig(**MOE)).save_pretrained(tmp_path)
    (tmp_path / "checksums.json").unlink()
    return tmp_path


def _edit_weights(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_wrong_shape_names_tensor_and_shapes(saved):
    name = "model.layers.1.self_attn.k_proj.weight"
    _edit_weights(saved, lambda t: t.__setitem__(name, torch.zeros(8, 16)))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*expected \(16, 16\), found \(8, 16\)"):
        Qwen3.from_pretrained(saved)


def test_wrong_shape_of_one_expert_is_named(saved):
    name = "model.layers.0.mlp.experts.3.down_proj.weight"
    _edit_weights(saved, lambda t: t.__setitem__(name, torch.zeros(16, 9)))
    with pytest.raises(CheckpointError, match=r"experts\.3\.down_proj\.weight"):
        Qwen3.from_pretrained(saved)


def test_missing_key_is_named(saved):
    _edit_weights(saved, lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.post_attention_layernorm\.weight"):
        Qwen3.from_pretrained(saved)


def test_missing_expert_is_named(saved):
    _edit_weights(saved, lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"experts\.2\.up_proj\.weight"):
        Qwen3.from_pretrained(saved)


def test_unexpected_key_is_named(saved):
    _edit_weights(saved, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(32)))
    with pytest.raises(CheckpointError, match=r"unexpected.*q_proj\.bias"):
        Qwen3.from_pretrained(saved)


def test_pickle_only_directory_is_refused_without_unpickling(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", boom)
    ModelConfig(**BASE).to_json(str(tmp_path / "config.json"))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*safetensors"):
        Qwen3.from_pretrained(tmp_path)


def test_no_weights_at_all(tmp_path):
    ModelConfig(**BASE).to_json(str(tmp_path / "config.json"))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Qwen3.from_pretrained(tmp_path)


def test_missing_shard_named(tmp_path):
    torch.manual_seed(0)
    Qwen3(ModelConfig(**MOE)).save_pretrained(tmp_path, max_shard_size="4KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        Qwen3.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
        (dict(head_dim=7), "head_dim"),
        (dict(num_experts=4, num_experts_per_tok=5, moe_intermediate_size=8), "num_experts_per_tok"),
    ],
)
def test_inconsistent_config_json_names_field(tmp_path, change, field):
    d = ModelConfig(**BASE).to_hf_dict()
    d.update(change)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=field):
        Qwen3.from_pretrained(tmp_path)


def test_unknown_config_key_is_named(saved):
    d = json.loads((saved / "config.json").read_text())
    d["rope_scaling_typo"] = 2
    (saved / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="rope_scaling_typo"):
        Qwen3.from_pretrained(saved)


def test_keys_transformers_writes_are_accepted(saved):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(saved)
    hf.save_pretrained(saved / "hf")
    d = json.loads((saved / "hf" / "config.json").read_text())
    assert "transformers_version" in d and "num_local_experts" in d  # extras transformers 5 writes
    model = Qwen3.from_pretrained(saved / "hf")
    assert model.config == ModelConfig(**MOE)


def test_atomic_save_keeps_the_old_checkpoint_on_failure(saved, monkeypatch):
    import qwen3repro.models.hf as hf

    before = (saved / "model.safetensors").read_bytes()

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        Qwen3(ModelConfig(**MOE)).save_pretrained(saved)
    assert (saved / "model.safetensors").read_bytes() == before
    assert not [p for p in saved.iterdir() if p.name.endswith(".tmp")]


def test_one_checkpoint_error_for_loading_and_resuming(saved):
    """The loader and the trainer raise the same class, which both `except ValueError` and `except
    RuntimeError` catch; the trainer's message adds the path and the model class to the loader's."""
    from qwen3repro.train import CheckpointError as TrainCheckpointError
    from qwen3repro.train.checkpoint import load_model_weights

    assert TrainCheckpointError is CheckpointError
    assert issubclass(CheckpointError, ValueError) and issubclass(CheckpointError, RuntimeError)
    _edit_weights(saved, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"model weights do not load into Qwen3 \(.*model\.norm\.weight"):
        load_model_weights(Qwen3(ModelConfig(**MOE)), str(saved))


def test_parse_size():
    assert parse_size("200KB") == 200_000
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("1MiB") == 2**20
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="size"):
        parse_size("lots")


def test_stacked_expert_layout_is_accepted(saved):
    """transformers' in-memory names (experts.gate_up_proj / experts.down_proj) load as well."""
    torch.manual_seed(1)
    model = Qwen3(ModelConfig(**MOE))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(saved / "model.safetensors"), metadata={"format": "pt"})
    back = Qwen3.from_pretrained(saved)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
