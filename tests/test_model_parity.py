"""Parity with transformers' Qwen3ForCausalLM / Qwen3MoeForCausalLM, in both directions through disk.

Random tiny models in fp32: ours -> save_pretrained -> transformers.AutoModelForCausalLM.from_pretrained
must give the same logits (max abs diff <= 1e-4), and transformers -> save_pretrained -> ours likewise.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qwen3repro.config import ModelConfig  # noqa: E402
from qwen3repro.losses import load_balancing_loss  # noqa: E402
from qwen3repro.models.qwen3 import Qwen3  # noqa: E402

ATOL = 1e-4
COMMON = dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, rope_theta=10000.0,
              bos_token_id=None, eos_token_id=None)

DENSE = ModelConfig(**COMMON, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2,
                    head_dim=12, tie_word_embeddings=True)  # 6*12 != 48, GQA 3:1, tied
MOE = ModelConfig(**COMMON, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True,
                  tie_word_embeddings=False)
YARN = ModelConfig(**COMMON, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=256,
                   rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})


def _inputs(config: ModelConfig, batch: int = 2, seq: int = 13, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, seq), generator=g)


def _ours(config: ModelConfig, seed: int = 0) -> Qwen3:
    torch.manual_seed(seed)
    model = Qwen3(config).eval()
    with torch.no_grad():  # norms at 1 would hide a mix-up of q_norm/k_norm/layer norms
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _load_hf(path, attn="eager"):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=attn, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers reported loading problems: {problems}"
    return model.eval()


@pytest.mark.parametrize("config, seq", [(DENSE, 13), (MOE, 13), (YARN, 48)], ids=["dense", "moe", "yarn"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_ours_to_transformers(tmp_path, config, seq, attn):
    ours = _ours(config)
    ids = _inputs(config, seq=seq)
    ours.save_pretrained(tmp_path)
    hf = _load_hf(tmp_path, attn)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids).logits
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got - ref).abs().max().item() <= ATOL


@pytest.mark.parametrize("config, seq", [(DENSE, 13), (MOE, 13), (YARN, 48)], ids=["dense", "moe", "yarn"])
def test_transformers_to_ours(tmp_path, config, seq):
    # Build the transformers model from our config.json, randomise it there, save with transformers.
    ours0 = _ours(config)
    ours0.save_pretrained(tmp_path / "cfg")
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path / "cfg")
    torch.manual_seed(1)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    ours = Qwen3.from_pretrained(tmp_path / "hf")
    assert ours.config == config
    ids = _inputs(config, seq=seq, seed=3)
    with torch.no_grad():
        assert (ours(ids).logits - hf(input_ids=ids).logits).abs().max().item() <= ATOL


def test_yarn_parameters_survive_the_round_trip(tmp_path):
    """transformers 5 reads our rope_theta + rope_scaling config.json as the same YaRN parameters."""
    _ours(YARN).save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["rope_scaling"]["rope_type"] == "yarn" and on_disk["rope_theta"] == 10000.0
    hf = _load_hf(tmp_path)
    rp = hf.config.rope_parameters
    assert rp["rope_type"] == "yarn"
    assert rp["factor"] == 4.0
    assert rp["original_max_position_embeddings"] == 16
    assert rp["rope_theta"] == 10000.0
    from qwen3repro.models.rope import rope_parameters

    inv_freq, attention_factor = rope_parameters(YARN)
    torch.testing.assert_close(hf.model.rotary_emb.inv_freq, inv_freq)
    assert hf.model.rotary_emb.attention_scaling == pytest.approx(attention_factor)


def test_yarn_beyond_original_length_differs_from_plain_rope():
    """Sanity: the YaRN test really exercises scaled frequencies beyond original_max_position_embeddings."""
    ids = _inputs(YARN, seq=48)
    yarn = _ours(YARN)
    plain = Qwen3(YARN.replace(rope_scaling=None)).eval()
    plain.load_state_dict(yarn.state_dict())
    with torch.no_grad():
        assert (yarn(ids).logits - plain(ids).logits).abs().max().item() > 1e-3


def test_sharded_round_trip(tmp_path):
    ours = _ours(MOE)
    ours.save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(f"-of-{len(shards):05d}" in s for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    assert "model.layers.0.mlp.experts.5.down_proj.weight" in index["weight_map"]
    back = Qwen3.from_pretrained(tmp_path)
    for (k, a), (k2, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    ids = _inputs(MOE)
    hf = _load_hf(tmp_path)
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - back(ids).logits).abs().max().item() <= ATOL
    # Saving again unsharded removes the old shards and index.
    back.save_pretrained(tmp_path)
    assert sorted(p for p in os.listdir(tmp_path) if "safetensors" in p) == ["model.safetensors"]
    assert torch.equal(Qwen3.from_pretrained(tmp_path).lm_head.weight, ours.lm_head.weight)


def test_tied_checkpoint_has_no_lm_head(tmp_path):
    from safetensors import safe_open

    model = _ours(DENSE)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    back = Qwen3.from_pretrained(tmp_path)
    assert back.lm_head.weight is back.model.embed_tokens.weight


def test_moe_router_logits_and_aux_loss_match_transformers(tmp_path):
    ours = _ours(MOE)
    ours.save_pretrained(tmp_path)
    hf = _load_hf(tmp_path)
    ids = _inputs(MOE, batch=3, seq=9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # some left padding
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=ids, output_router_logits=True)
        ref_masked = hf(input_ids=ids, attention_mask=mask, output_router_logits=True)
        out = ours(ids, output_router_logits=True)
        out_masked = ours(ids, attention_mask=mask, output_router_logits=True)
    assert len(out.router_logits) == len(ref.router_logits) == MOE.num_hidden_layers
    for a, b in zip(out.router_logits, ref.router_logits):
        assert a.shape == (3 * 9, MOE.num_experts)
        assert (a - b).abs().max().item() <= ATOL
    # transformers' aux loss is the micro scope, all layers pooled
    aux = load_balancing_loss(out.router_logits, MOE.num_experts, MOE.num_experts_per_tok, scope="micro", layers="pooled")
    assert aux.item() == pytest.approx(ref.aux_loss.item(), abs=1e-5)
    aux_m = load_balancing_loss(out_masked.router_logits, MOE.num_experts, MOE.num_experts_per_tok, mask,
                                scope="micro", layers="pooled")
    assert aux_m.item() == pytest.approx(ref_masked.aux_loss.item(), abs=1e-5)
    # transformers adds coef * aux to the CE loss: recover the same total from our pieces.
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    total = ce + MOE.router_aux_loss_coef * aux
    assert total.item() == pytest.approx(ref.loss.item(), abs=1e-4)


def test_left_padded_batch_matches_transformers(tmp_path):
    ours = _ours(DENSE)
    ours.save_pretrained(tmp_path)
    hf = _load_hf(tmp_path, "sdpa")
    ids = _inputs(DENSE, batch=2, seq=10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max().item() <= ATOL


@pytest.mark.parametrize("config", [DENSE, MOE], ids=["dense", "moe"])
def test_gradients_match_transformers(tmp_path, config):
    """Training parity: the same loss gives the same parameter gradients (names are shared)."""
    ours = _ours(config).train()
    ours.save_pretrained(tmp_path)
    hf = _load_hf(tmp_path, "sdpa").train()
    ids = _inputs(config, batch=2, seq=11, seed=5)

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    loss_of(ours(ids).logits).backward()
    loss_of(hf(input_ids=ids).logits).backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    assert ours_grads.keys() == hf_grads.keys()
    for name, g in ours_grads.items():
        torch.testing.assert_close(g, hf_grads[name], atol=1e-5, rtol=1e-4, msg=name)
