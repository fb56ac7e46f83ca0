"""Rotary position embeddings: plain RoPE with a configurable base (ABF), and YaRN.

Conventions follow transformers' Llama/Qwen3 ("rotate half": the two halves of `head_dim` form the
rotating pairs), so weights move between the two implementations unchanged.

* ABF (adjusted base frequency): the long-context stage raises `rope_theta` from 1e4 to 1e6
  (Qwen3 report §3.2, after Qwen2.5). Nothing else changes, so it is just `base`.
* YaRN (Peng et al. 2023) as computed by transformers' `_compute_yarn_parameters`: per-dimension
  blend of the original (extrapolated) and the interpolated (divided by `factor`) frequencies with a
  linear ramp between the correction dims of `beta_fast` and `beta_slow`, plus an attention factor
  `0.1 ln(factor) + 1` that multiplies cos and sin (so attention logits scale by its square).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..config import ModelConfig


def default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """θ_i = base^(-2i/d), i = 0 .. d/2-1, in float32."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature √(1/t) = 0.1·m·ln(s) + 1 (1 when s <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(
    head_dim: int,
    base: float,
    scaling: Mapping[str, Any],
    max_position_embeddings: int,
) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies and attention factor, as transformers computes them."""
    factor = scaling.get("factor")
    original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    if factor is None:
        factor = max_position_embeddings / original
    factor = float(factor)
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    truncate = scaling.get("truncate", True)

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength makes `num_rotations` turns over the original context.
        return (head_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)

    pos_freqs = base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp  # 1 for high-frequency dims (kept), 0 for low ones (interpolated)
    inv_freq = inv_freq_interpolation * (1 - extrapolation_weight) + inv_freq_extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def rope_parameters(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2], attention_factor) for a model config.

    With `dual_chunk_attention_config` set, the base frequencies and factor 1 whatever `rope_scaling`
    says, as in vLLM: its `get_rope` builds the `DualChunkRotaryEmbedding` (plain RoPE at DCA's
    remapped positions) instead of a YaRN embedding when the DCA config is present, and YaRN's
    temperature reaches DCA through the DCA config's `original_max_position_embeddings` (the dynamic
    key temperature, `dca.dynamic_key_temperature`). A config.json with both keys therefore means the
    same model here and in vLLM. DCA keeps every relative distance within the trained range, so
    YaRN's interpolation on top would only compress distances the model already resolves (at tiny
    scale it cut 8,192-token retrieval from 100% to 20% on development items, docs/LOG.md).
    """
    if config.rope_type == "yarn" and not config.dual_chunk_attention_config:
        return yarn_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings)
    return default_inv_freq(config.head_dim, config.rope_theta), 1.0


def rope_cos_sin(
    inv_freq: torch.Tensor,
    positions: torch.Tensor,
    attention_factor: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape positions.shape + (head_dim,), computed in float32 then cast."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., seq, head_dim] by cos/sin broadcastable to it (e.g. [batch, 1, seq, head_dim])."""
    return x * cos + rotate_half(x) * sin
