"""ModelConfig: validation names the offending field; HF config.json in both RoPE spellings."""
import json

import pytest

from qwen3repro.config import ConfigError, ModelConfig, config_hash
from qwen3repro.models.registry import get_model_config

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
        (dict(head_dim=7), "head_dim"),
        (dict(num_experts=4, num_experts_per_tok=5, moe_intermediate_size=8), "num_experts_per_tok"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=0), "moe_intermediate_size"),
        (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "rope_type"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0, "bogus": 1}), "bogus"),
        (dict(dual_chunk_attention_config={"chunk_size": 8, "local_size": 8}), "local_size"),
    ],
)
def test_inconsistent_config_names_field(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{**BASE, **change})


def test_unknown_key_in_our_own_files_is_an_error():
    with pytest.raises(ConfigError, match="hiden_size"):
        ModelConfig.from_dict({**BASE, "hiden_size": 3})


def test_hf_extra_keys_accepted_and_unknown_refused():
    cfg = ModelConfig(**BASE)
    d = cfg.to_hf_dict()
    d.update(transformers_version="5.24.0", dtype="float32", use_cache=False, layer_types=["full_attention"] * 2)
    assert ModelConfig.from_hf_dict(d) == cfg
    with pytest.raises(ConfigError, match="frobnicate"):
        ModelConfig.from_hf_dict({**d, "frobnicate": 1})
    with pytest.raises(ConfigError, match="attention_bias"):
        ModelConfig.from_hf_dict({**d, "attention_bias": True})


def test_both_rope_spellings_read_the_same():
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    cfg = ModelConfig(**BASE, rope_theta=1e6, rope_scaling=yarn)
    legacy = cfg.to_hf_dict()  # rope_theta + rope_scaling, as the released checkpoints
    assert legacy["rope_scaling"] == yarn and legacy["rope_theta"] == 1e6
    v5 = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**yarn, "rope_theta": 1e6}
    assert ModelConfig.from_hf_dict(v5) == cfg
    plain = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling")}
    plain["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    got = ModelConfig.from_hf_dict(plain)
    assert got.rope_theta == 5e5 and got.rope_scaling is None


def test_json_round_trip_and_hash(tmp_path):
    cfg = get_model_config("tiny-moe")
    path = tmp_path / "config.json"
    cfg.to_json(str(path))
    assert ModelConfig.from_json(str(path)) == cfg
    assert json.loads(path.read_text())["model_type"] == "qwen3_moe"
    assert config_hash(cfg) == config_hash(ModelConfig.from_json(str(path)))
    assert config_hash(cfg) != config_hash(cfg.replace(rope_theta=1e4 + 1))


def test_malformed_json_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_json(str(path))
