"""KV cache: prefill + incremental decoding gives the logits of one full forward (dense and MoE)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3repro.config import ModelConfig
from qwen3repro.models.qwen3 import Qwen3

ATOL = 1e-5
COMMON = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=12, rope_theta=10000.0,
              bos_token_id=None, eos_token_id=None)
CONFIGS = {
    "dense": ModelConfig(**COMMON, tie_word_embeddings=True),
    "moe": ModelConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
}
torch.manual_seed(0)
MODELS = {name: Qwen3(cfg).eval() for name, cfg in CONFIGS.items()}


@given(
    name=st.sampled_from(sorted(MODELS)),
    batch=st.integers(1, 3),
    prompt=st.integers(1, 12),
    chunks=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25)
def test_incremental_decoding_matches_full_forward(name, batch, prompt, chunks, seed):
    model = MODELS[name]
    total = prompt + sum(chunks)
    ids = torch.randint(0, model.config.vocab_size, (batch, total), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_kv_cache(batch, total + 2)
        pieces = [model(ids[:, :prompt], kv_cache=cache).logits]
        start = prompt
        for n in chunks:  # one token at a time (n = 1) and chunks of several tokens
            pieces.append(model(ids[:, start : start + n], kv_cache=cache).logits)
            start += n
    assert cache.length == total
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=ATOL, rtol=0)


@given(
    name=st.sampled_from(sorted(MODELS)),
    lengths=st.lists(st.integers(1, 9), min_size=2, max_size=3),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=20)
def test_left_padded_batch_matches_single_sequences(name, lengths, steps, seed):
    """Batched generation with left padding + attention_mask + position_ids == each row alone."""
    model = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    seqs = [torch.randint(0, model.config.vocab_size, (n + steps,), generator=g) for n in lengths]
    b = len(lengths)
    prompt = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        prompt[i, width - n :] = seqs[i][:n]
        mask[i, width - n :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = model.new_kv_cache(b, width + steps)
        out = model(prompt, attention_mask=mask, position_ids=pos, kv_cache=cache).logits
        batched = [out[:, -1]]
        next_pos = pos[:, -1:] + 1
        full_mask = mask
        for t in range(steps - 1):
            tok = torch.stack([s[n + t] for s, n in zip(seqs, lengths)])[:, None]
            full_mask = torch.cat([full_mask, torch.ones(b, 1, dtype=torch.long)], 1)
            # alternate the two mask spellings: full [B, past+1], or new-tokens-only (the cache remembers)
            am = full_mask if t % 2 == 0 else None
            out = model(tok, attention_mask=am, position_ids=next_pos, kv_cache=cache).logits
            batched.append(out[:, -1])
            next_pos = next_pos + 1
        for i, n in enumerate(lengths):
            alone = model(seqs[i][None, : n + steps - 1]).logits[0, n - 1 :]
            got = torch.stack([x[i] for x in batched])
            torch.testing.assert_close(got, alone, atol=ATOL, rtol=0)
            # the prompt rows themselves (real tokens only) match too
            torch.testing.assert_close(
                model(prompt, attention_mask=mask, position_ids=pos).logits[i, width - n :],
                model(seqs[i][None, :n]).logits[0],
                atol=ATOL,
                rtol=0,
            )


def test_cache_overflow_and_crop():
    model = MODELS["dense"]
    ids = torch.randint(0, 61, (1, 6))
    with torch.no_grad():
        cache = model.new_kv_cache(1, 5)
        with pytest.raises(ValueError, match="max_len"):
            model(ids, kv_cache=cache)
        cache = model.new_kv_cache(1, 8)
        model(ids, kv_cache=cache)
        cache.crop(4)  # rewind two tokens and feed different ones
        other = torch.randint(0, 61, (1, 2))
        got = model(other, kv_cache=cache).logits
        full = model(torch.cat([ids[:, :4], other], 1)).logits[:, 4:]
    torch.testing.assert_close(got, full, atol=ATOL, rtol=0)


def test_cache_dtype_and_shape():
    model = MODELS["moe"]
    cache = model.new_kv_cache(2, 7)
    cfg = model.config
    assert cache.k.shape == (cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 7, cfg.head_dim)
    assert cache.k.dtype == torch.float32 and cache.length == 0
