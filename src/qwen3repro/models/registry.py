"""Named model sizes: the eight released Qwen3 models and tiny proxies with real Qwen3 shapes.

The real entries are the April-2025 releases (not the 2507 refresh), post-trained variants
(`eos_token_id` 151645 `<|im_end|>`, `max_position_embeddings` 40960), exactly as their hub
`config.json` files; their parameter counts are checked against the model cards in the tests.

The tiny proxies keep what makes Qwen3 Qwen3: GQA, QK-norm, `head_dim` decoupled from
`hidden_size` (like 0.6B, 4B and 32B), SwiGLU, tied embeddings for the small dense models, and a
fine-grained MoE without shared experts. Their vocabulary matches the tiny tokenizer (byte-level
BPE trained on the synthetic corpus), padded like Qwen3's 151,669 → 151,936.
"""
from __future__ import annotations

from ..config import ConfigError, ModelConfig

# Fields every released Qwen3 model shares (the models' config.json files on the Hugging Face hub, HUB_IDS).
_QWEN3_COMMON = dict(
    vocab_size=151936,
    head_dim=128,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
    bos_token_id=151643,
    eos_token_id=151645,
    initializer_range=0.02,
)


def _dense(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, tied: bool) -> ModelConfig:
    return ModelConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        **_QWEN3_COMMON,
    )


def _moe(hidden: int, intermediate: int, moe_intermediate: int, layers: int, heads: int, kv_heads: int) -> ModelConfig:
    return ModelConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        moe_intermediate_size=moe_intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=False,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=(),
        router_aux_loss_coef=0.001,
        **_QWEN3_COMMON,
    )


# Real models, as their hub config.json files give them; layers and heads are also in the Qwen3 technical
# report's Table 1 (dense) and Table 2 (MoE).
REAL_MODELS: dict[str, ModelConfig] = {
    "qwen3-0.6b": _dense(1024, 3072, 28, 16, 8, tied=True),
    "qwen3-1.7b": _dense(2048, 6144, 28, 16, 8, tied=True),
    "qwen3-4b": _dense(2560, 9728, 36, 32, 8, tied=True),
    "qwen3-8b": _dense(4096, 12288, 36, 32, 8, tied=False),
    "qwen3-14b": _dense(5120, 17408, 40, 40, 8, tied=False),
    "qwen3-32b": _dense(5120, 25600, 64, 64, 8, tied=False),
    "qwen3-30b-a3b": _moe(2048, 6144, 768, 48, 32, 4),
    "qwen3-235b-a22b": _moe(4096, 12288, 1536, 94, 64, 4),
}

# Hub ids of the released post-trained checkpoints (used by the full-scale path only).
HUB_IDS: dict[str, str] = {
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-14b": "Qwen/Qwen3-14B",
    "qwen3-32b": "Qwen/Qwen3-32B",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen3-235b-a22b": "Qwen/Qwen3-235B-A22B",
}

# Tiny vocabulary: the tiny tokenizer's learned tokens + Qwen3's 26 special tokens fit in it.
TINY_VOCAB_SIZE = 1024
# No RoPE base here: the stage that builds a model sets the one its recipe states (recipes.rope_base).
_TINY_COMMON = dict(
    vocab_size=TINY_VOCAB_SIZE,
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
    bos_token_id=None,
    eos_token_id=None,  # set from the tokenizer when a run builds its model
    initializer_range=0.02,
)

TINY_MODELS: dict[str, ModelConfig] = {
    # For tests: seconds on a CPU. n_heads*head_dim (64) != hidden (48), like Qwen3-0.6B.
    "micro": ModelConfig(
        hidden_size=48, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        **{**_TINY_COMMON, "vocab_size": 512},
    ),
    "micro-moe": ModelConfig(
        hidden_size=48, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        **{**_TINY_COMMON, "vocab_size": 512},
    ),
    # The strong-to-weak student: ~1M parameters (0.79M without embeddings), so every stage trains in minutes
    # on a CPU.
    "tiny-student": ModelConfig(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
        **_TINY_COMMON,
    ),
    # The flagship that goes through all four post-training stages and teaches the student.
    "tiny-flagship": ModelConfig(
        hidden_size=192, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
        **_TINY_COMMON,
    ),
    # Fine-grained MoE without shared experts: 16 experts, top-4, like 128/top-8 scaled down.
    "tiny-moe": ModelConfig(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
        num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64, norm_topk_prob=True,
        router_aux_loss_coef=0.001,
        **_TINY_COMMON,
    ),
}

MODELS: dict[str, ModelConfig] = {**TINY_MODELS, **REAL_MODELS}


def get_model_config(name: str) -> ModelConfig:
    """The config registered under `name`; an unknown name lists the valid ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}") from None


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameter counts from the config alone (no weights allocated).

    total: every parameter; non_embedding: total minus input embedding and lm_head (the model
    cards' convention); active: parameters used per token (k of E experts; embeddings included).
    """
    h, d = config.hidden_size, config.head_dim
    nq, nkv = config.num_attention_heads, config.num_key_value_heads
    attention = h * nq * d + 2 * h * nkv * d + nq * d * h + 2 * d  # q, k, v, o + q_norm, k_norm
    norms = 2 * h  # input_layernorm + post_attention_layernorm
    dense_mlp = 3 * h * config.intermediate_size
    expert = 3 * h * config.moe_intermediate_size
    router = config.num_experts * h

    total_layers = active_layers = 0
    for i in range(config.num_hidden_layers):
        layer = attention + norms
        if config.is_sparse_layer(i):
            total_layers += layer + config.num_experts * expert + router
            active_layers += layer + config.num_experts_per_tok * expert + router
        else:
            total_layers += layer + dense_mlp
            active_layers += layer + dense_mlp
    embedding = config.vocab_size * h
    lm_head = 0 if config.tie_word_embeddings else config.vocab_size * h
    final_norm = h
    total = embedding + lm_head + total_layers + final_norm
    return {
        "total": total,
        "non_embedding": total - embedding - lm_head,
        "active": embedding + lm_head + active_layers + final_norm,
    }
