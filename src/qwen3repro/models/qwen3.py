"""The Qwen3 decoder (dense and MoE), readable top to bottom.

Architecture choices (Qwen3 technical report §2; transformers' Qwen3/Qwen3Moe modelling code):

* decoder-only transformer, pre-norm: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x)), final RMSNorm;
  RMSNorm is computed in float32 (as transformers does), eps = `rms_norm_eps`;
* grouped-query attention (GQA): `num_attention_heads` query heads share `num_key_value_heads` K/V
  heads; `head_dim` is explicit (heads · head_dim may differ from hidden_size, e.g. Qwen3-0.6B);
* QK-norm: an RMSNorm of size head_dim, shared across heads, on q and k after projection, before RoPE;
* no biases anywhere (Qwen2's QKV bias is gone);
* SwiGLU MLP: down(silu(gate(x)) · up(x));
* rotary position embeddings, "rotate half" convention; `rope_theta` is the base (the long-context
  stage raises it 1e4 → 1e6: ABF); YaRN (`rope_scaling`) for inference beyond the trained length;
  cos/sin are computed once per forward and shared by every layer;
* MoE variant: sparse layers (see `ModelConfig.is_sparse_layer`) replace the MLP with a softmax top-k
  router over fine-grained SwiGLU experts, no shared experts (models/moe.py);
* embeddings tied to the LM head or not (`tie_word_embeddings`);
* weight init as transformers: normal(0, initializer_range) for linear/embedding/expert weights,
  norms at 1.

Module and parameter names follow transformers (`model.layers.{i}.self_attn.q_proj.weight`, ...), so
`state_dict()` keys equal the Hugging Face ones (MoE experts are stacked as in transformers' memory
layout; hf.py converts them to the hub's per-expert keys).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import hf
from .attention import Attention, AttentionMask, KVCache, RMSNorm, build_attention_mask, rope_tables
from .moe import SparseMoE
from .rope import rope_cos_sin, rope_parameters


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, S, V]
    kv_cache: KVCache | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None  # one [B·S, E] per sparse layer


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.is_sparse = config.is_sparse_layer(layer_idx)
        self.mlp = SparseMoE(config) if self.is_sparse else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache=None, positions=None, rope=None, keep_last=0):
        """keep_last > 0: the last `keep_last` positions' outputs only (see `Attention.forward`)."""
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, positions, rope, keep_last)
        x = x[:, x.shape[1] - attn.shape[1]:] + attn
        h = self.post_attention_layernorm(x)
        if self.is_sparse:
            h, router_logits = self.mlp(h)
            return x + h, router_logits
        return x + self.mlp(h), None


def _padding_mask(attention_mask, b, s, past, kv_cache, position_ids, device) -> torch.Tensor | None:
    """Real-token flags [B, past + S] for every key slot, or None when nothing is padding.

    `attention_mask` may cover past + new tokens (transformers' convention) or, with a cache, only the
    new ones: the cache remembers the past's flags (and the new tokens' positions, recorded here).
    """
    full, new = None, None
    if attention_mask is not None:
        am = attention_mask.to(device=device, dtype=torch.bool)
        if am.shape == (b, past + s):
            full, new = am, am[:, past:]
        elif am.shape == (b, s) and kv_cache is not None:
            new = am
            full = torch.cat([kv_cache.valid[:, :past], am], dim=1) if past else am
        else:
            raise ValueError(f"attention_mask has shape {tuple(am.shape)}; expected {(b, past + s)} (past + new)")
    elif kv_cache is not None and kv_cache.has_padding:
        full = torch.cat([kv_cache.valid[:, :past], torch.ones(b, s, dtype=torch.bool, device=device)], dim=1)
    if kv_cache is not None:
        kv_cache.record(position_ids, new)
    if full is not None and bool(full.all()):
        return None  # keeps SDPA's causal fast path for an all-ones mask
    return full


class Qwen3Backbone(nn.Module):
    """Embeddings, decoder layers and final norm (transformers' `Qwen3Model`, prefix `model.`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen3Decoder(nn.Module):
    """The decoder without an output head: backbone (`model.`), RoPE tables, KV caches, init and the
    Hugging Face layout. `final_hidden_states` runs it; the heads on top are the subclasses': the
    language-model head (`Qwen3`) and the scalar reward head (`reward.Qwen3RewardModel`).

    A subclass builds its head after `super().__init__` and then calls `reset_parameters()`, so that
    a seed gives the same weights whatever the subclass adds after the backbone.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Backbone(config)
        # RoPE frequencies stay float32 whatever the model dtype (a plain attribute, not a buffer, so
        # `model.to(torch.bfloat16)` cannot round them); forward moves them to the input's device.
        with torch.device("cpu"):  # also when the model is built on the meta device (hf.py)
            self.inv_freq, self.attention_factor = rope_parameters(config)

    # ------------------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """transformers' init: normal(0, initializer_range) weights, norms at 1."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, SparseMoE):
                module.experts.gate_up_proj.normal_(0.0, std)
                module.experts.down_proj.normal_(0.0, std)

    # ------------------------------------------------------------------------------ caches
    def new_kv_cache(
        self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, device=None
    ) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` tokens (prompt + generated)."""
        p = self.model.embed_tokens.weight
        c = self.config
        return KVCache(
            c.num_hidden_layers, batch_size, max_len, c.num_key_value_heads, c.head_dim,
            dtype=dtype or p.dtype, device=device or p.device,
        )

    # ------------------------------------------------------------------------------ forward
    def final_hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        keep_last: int = 0,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(the final-norm hidden states [B, S, H], the router logits of every sparse layer).

        input_ids [B, S]; position_ids [B, S] (default: past_len + arange(S)); attention_mask
        [B, past_len + S] or [B, S] when a cache remembers the past (1 = real token, 0 = padding);
        segment_ids [B, S] document ids of packed sequences (attention stays inside a document; pass
        position_ids that restart at 0 per document to match separate forwards); kv_cache from
        `new_kv_cache`. keep_last > 0: the hidden states of the last `keep_last` positions only
        [B, keep_last, H]; the last layer then computes its queries, attention and MLP for those
        positions alone (its keys and values for all, into the cache), and its router logits cover them.
        """
        b, s = input_ids.shape
        device = input_ids.device
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=device)[None]
        elif position_ids.dim() == 1:
            position_ids = position_ids[None]

        full_mask = _padding_mask(attention_mask, b, s, past, kv_cache, position_ids, device)
        mask: AttentionMask = build_attention_mask(
            b, s, past, attention_mask=full_mask, segment_ids=segment_ids, device=device
        )

        x = self.model.embed_tokens(input_ids)
        if self.inv_freq.device != device:  # a plain attribute: follow the input once, not every call
            self.inv_freq = self.inv_freq.to(device)
        cos, sin = rope_tables(*rope_cos_sin(self.inv_freq, position_ids, self.attention_factor, dtype=x.dtype))
        rope = (self.inv_freq, self.attention_factor)

        router_logits = []
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            x, logits = layer(x, cos, sin, mask, kv_cache, position_ids, rope, keep_last if i == last else 0)
            if logits is not None:
                router_logits.append(logits)
        if kv_cache is not None:
            kv_cache.advance(s)
        return self.model.norm(x), tuple(router_logits)

    # ------------------------------------------------------------------------------ load / save
    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        """Load a Hugging Face layout directory (config.json + safetensors); see hf.py."""
        return hf.load_pretrained(path, cls, device=device, dtype=dtype)

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        """Write config.json + model.safetensors (sharded above `max_shard_size`), atomically; see hf.py."""
        hf.save_pretrained(self, path, max_shard_size=max_shard_size)


class Qwen3(Qwen3Decoder):
    """Qwen3 causal language model. `forward(input_ids) -> CausalLMOutput(logits, kv_cache, router_logits)`.

    Incremental decoding:

        cache = model.new_kv_cache(batch_size, max_len=prompt_len + max_new_tokens)
        logits = model(prompt_ids, attention_mask=mask, position_ids=pos, kv_cache=cache).logits
        while ...:  # one (or more) new tokens per call; positions continue per row
            logits = model(next_ids, position_ids=pos_next, kv_cache=cache).logits
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        output_router_logits: bool = False,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """input_ids [B, S]; the other inputs as in `final_hidden_states`. logits_to_keep > 0 (as in
        transformers): logits [B, logits_to_keep, V] of the last positions only, e.g. 1 for a prompt's
        prefill, and the last layer computes no more than those need (`final_hidden_states`' keep_last)."""
        hidden, router_logits = self.final_hidden_states(
            input_ids, position_ids=position_ids, attention_mask=attention_mask, segment_ids=segment_ids,
            kv_cache=kv_cache, keep_last=logits_to_keep,
        )
        return CausalLMOutput(
            logits=self.lm_head(hidden),
            kv_cache=kv_cache,
            router_logits=router_logits if output_router_logits and self.config.is_moe else None,
        )

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            params.pop(id(self.model.embed_tokens.weight), None)
            params.pop(id(self.lm_head.weight), None)
        return sum(p.numel() for p in params.values())


__all__ = ["Qwen3", "Qwen3Decoder", "CausalLMOutput", "MLP", "DecoderLayer", "KVCache"]
