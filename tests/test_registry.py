"""Parameter counts of the registered models.

The exact reference numbers follow from the released models' config.json files on the Hugging Face
hub and round to the model cards' figures (CARD_ROUNDED checks that independently); they are
written out here (not recomputed) so a wrong formula cannot agree with itself.
"""
import json

import pytest
from click.testing import CliRunner

from qwen3repro.cli import main
from qwen3repro.models.registry import MODELS, REAL_MODELS, TINY_MODELS, count_parameters, get_model_config
from qwen3repro.config import ConfigError

# name: (total, non_embedding, active)
CARD_COUNTS = {
    "qwen3-0.6b": (596_049_920, 440_467_456, 596_049_920),
    "qwen3-1.7b": (1_720_574_976, 1_409_410_048, 1_720_574_976),
    "qwen3-4b": (4_022_468_096, 3_633_511_936, 4_022_468_096),
    "qwen3-8b": (8_190_735_360, 6_946_075_648, 8_190_735_360),
    "qwen3-14b": (14_768_307_200, 13_212_482_560, 14_768_307_200),
    "qwen3-32b": (32_762_123_264, 31_206_298_624, 32_762_123_264),
    "qwen3-30b-a3b": (30_532_122_624, 29_909_792_768, 3_353_032_704),
    "qwen3-235b-a22b": (235_093_634_560, 233_848_974_848, 22_190_763_520),
}
# The model cards' rounded figures (total, non-embedding) in billions, as a second, independent check.
CARD_ROUNDED = {
    "qwen3-0.6b": (0.6, 0.44), "qwen3-1.7b": (1.7, 1.4), "qwen3-4b": (4.0, 3.6), "qwen3-8b": (8.2, 6.95),
    "qwen3-14b": (14.8, 13.2), "qwen3-32b": (32.8, 31.2), "qwen3-30b-a3b": (30.5, 29.9),
    "qwen3-235b-a22b": (235, 234),
}


def test_all_eight_real_models_registered():
    assert set(REAL_MODELS) == set(CARD_COUNTS)


@pytest.mark.parametrize("name", sorted(CARD_COUNTS))
def test_real_model_parameter_counts_exact(name):
    counts = count_parameters(get_model_config(name))
    assert (counts["total"], counts["non_embedding"], counts["active"]) == CARD_COUNTS[name]


@pytest.mark.parametrize("name", sorted(CARD_ROUNDED))
def test_real_model_counts_round_to_card(name):
    counts = count_parameters(get_model_config(name))
    total_b, non_emb_b = CARD_ROUNDED[name]
    digits = len(str(total_b).split(".")[1]) if "." in str(total_b) else 0
    assert round(counts["total"] / 1e9, digits) == pytest.approx(total_b)
    digits = len(str(non_emb_b).split(".")[1]) if "." in str(non_emb_b) else 0
    assert round(counts["non_embedding"] / 1e9, digits) == pytest.approx(non_emb_b)


def test_released_config_fields():
    # The released config.json files: shared fields, and the fields that differ from HF defaults.
    for cfg in REAL_MODELS.values():
        assert cfg.vocab_size == 151936 and cfg.head_dim == 128 and cfg.rope_theta == 1e6
        assert cfg.rms_norm_eps == 1e-6 and cfg.max_position_embeddings == 40960
    moe = REAL_MODELS["qwen3-235b-a22b"]
    assert (moe.num_experts, moe.num_experts_per_tok, moe.norm_topk_prob) == (128, 8, True)
    assert REAL_MODELS["qwen3-0.6b"].tie_word_embeddings and not REAL_MODELS["qwen3-8b"].tie_word_embeddings


def test_tiny_models_have_qwen3_shapes():
    for name, cfg in TINY_MODELS.items():
        assert cfg.num_attention_heads > cfg.num_key_value_heads, name  # GQA
    # head_dim decoupled from hidden/heads (as in Qwen3-0.6B) for the test model and the flagship
    for name in ("micro", "tiny-flagship"):
        cfg = TINY_MODELS[name]
        assert cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size, name
    assert any(c.is_moe for c in TINY_MODELS.values())


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError, match="qwen3-0.6b"):
        get_model_config("qwen3-7b")


def test_cli_model_info_json():
    result = CliRunner().invoke(main, ["model", "info", "qwen3-235b-a22b", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == dict(zip(("total", "non_embedding", "active"), CARD_COUNTS["qwen3-235b-a22b"]))


def test_cli_model_info_unknown_name():
    result = CliRunner().invoke(main, ["model", "info", "nope", "--json"])
    assert result.exit_code != 0 and "valid names" in result.output


def test_cli_help_everywhere():
    runner = CliRunner()
    for args in (["--help"], ["model", "--help"], ["model", "info", "--help"], ["model", "list", "--help"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0 and "Usage" in result.output, args


@pytest.mark.parametrize("name", sorted(MODELS))
def test_formula_equals_instantiated_model(name):
    """The formula counts exactly the parameters our model class creates (on the meta device: no memory)."""
    import torch

    from qwen3repro.models.qwen3 import Qwen3

    cfg = get_model_config(name)
    with torch.device("meta"):
        model = Qwen3(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)["total"]


@pytest.mark.parametrize("name", ["qwen3-0.6b", "qwen3-8b", "qwen3-30b-a3b"])
def test_formula_equals_transformers_model(name):
    """And what transformers' Qwen3/Qwen3-MoE classes create for the released configs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = get_model_config(name)
    hf_cfg = AutoConfig.for_model(**cfg.to_hf_dict())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)["total"]
