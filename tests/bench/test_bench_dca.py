"""Dual Chunk Attention vs plain causal SDPA at equal lengths (CPU, float32, no gradients).

Run with `make bench` (pytest -m bench --benchmark-enable -s tests/bench). The DCA case prints its
time over plain causal SDPA's at the same length (median and min: on a shared machine the min is
the steadier of the two).

DCA issues about a hundred tensor ops per call where SDPA issues one. When another process holds one
of the cores, every multi-threaded op waits at the intra-op thread barrier, so with 2 threads on a
busy 2-core machine DCA can look 10x slower than it is; one thread per process avoids that.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen3repro.models.dca import dual_chunk_attention
from qwen3repro.models.rope import apply_rope, default_inv_freq, rope_cos_sin

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 32
CHUNK_SIZE, LOCAL_SIZE = 1536, 128
_times: dict[tuple[int, str], tuple[float, float]] = {}  # (median, min) seconds


def _inputs(length: int):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, length, HEAD_DIM, generator=g)
    k = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=g)
    v = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=g)
    return q, k, v


def _plain(q, k, v, inv_freq):
    """What attention.py does without DCA: RoPE at absolute positions, then causal SDPA."""
    cos, sin = rope_cos_sin(inv_freq, torch.arange(q.shape[-2]))
    return F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v,
                                          is_causal=True, enable_gqa=True)


def _dca(q, k, v, inv_freq):
    return dual_chunk_attention(q, k, v, inv_freq=inv_freq, chunk_size=CHUNK_SIZE, local_size=LOCAL_SIZE)


@pytest.mark.bench
@pytest.mark.parametrize(
    "length,impl", [(2048, "sdpa"), (2048, "dca"), (8192, "sdpa"), (8192, "dca")], ids=lambda x: str(x)
)
def test_bench_dca_vs_sdpa(benchmark, length, impl):
    q, k, v = _inputs(length)
    inv_freq = default_inv_freq(HEAD_DIM, 1e6)
    fn = _dca if impl == "dca" else _plain
    benchmark.group = f"attention L={length}"
    with torch.inference_mode():
        out = benchmark(fn, q, k, v, inv_freq)
    assert out.shape == q.shape and torch.isfinite(out).all()
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    _times[(length, impl)] = (stats.stats.median, stats.stats.min)
    if impl == "dca" and (length, "sdpa") in _times:
        (dca_med, dca_min), (sdpa_med, sdpa_min) = _times[(length, "dca")], _times[(length, "sdpa")]
        print(f"\n[dca bench] L={length} heads {HEADS}/{KV_HEADS} head_dim {HEAD_DIM} chunk {CHUNK_SIZE} "
              f"local {LOCAL_SIZE}: median DCA {dca_med * 1e3:.1f} ms / SDPA {sdpa_med * 1e3:.1f} ms "
              f"= {dca_med / sdpa_med:.2f}x; min {dca_min * 1e3:.1f} / {sdpa_min * 1e3:.1f} ms "
              f"= {dca_min / sdpa_min:.2f}x")
