"""Throughput and efficiency measurements shared by the benchmarks and the training loop.

* `matmul_peak_flops`: the CPU/GPU's measured dense-matmul rate (not a datasheet number), so a
  training step can be reported as a fraction of what this machine actually sustains.
* `train_step_flops`: model FLOPs of one forward+backward (the PaLM appendix B convention:
  6 × matmul parameters × tokens, plus 12 × layers × heads·head_dim × seq per token for attention
  scores and values, counting the causal mask as full).
* `cpu_has_bf16`: whether the CPU advertises native bf16 arithmetic (AVX512-BF16 or AMX-BF16).
* `machine_info`: what a time or a floating-point figure depends on (CPU model, the ISA flags PyTorch's
  kernels dispatch on, threads, the measured fp32 matmul peak; for a run on a GPU, the GPU and its measured
  fp32 matmul peak too), recorded next to every pipeline's times.
"""
from __future__ import annotations

import os
import platform
import time

import torch

from .config import ModelConfig


# The CPU flags that decide which kernels PyTorch (and our decode kernels) run: the same code is about
# twice as fast on an AVX-512 machine as on an AVX2-only one.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU in a cpuinfo file; ("", empty) where there is none."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return "", set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def machine_info(*, measure_peak: bool = True, device: str = "cpu") -> dict:
    """The machine a run's times and figures belong to: CPU model, ISA flags present, logical CPUs,
    PyTorch threads and version, and (measured, a second or so) the fp32 matmul peak in GFLOP/s. A run on
    a GPU (`device` "cuda" or "cuda:N") adds the GPU's name and its measured fp32 matmul peak (TF32 as
    PyTorch's matmul setting has it: off by default)."""
    model, flags = cpuinfo()
    info = {"cpu": model or platform.processor() or platform.machine(),
            "isa": [f for f in ISA_FLAGS if f in flags], "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if measure_peak:
        info["matmul_peak_gflops_fp32"] = round(matmul_peak_flops(torch.float32, repeats=3) / 1e9, 1)
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        if measure_peak:
            info["gpu_matmul_peak_gflops_fp32"] = round(
                matmul_peak_flops(torch.float32, n=4096, repeats=3, device=device) / 1e9, 1)
    return info


def describe_machine(info: dict) -> str:
    """One line for a report: "AMD EPYC (avx2, fma), 2 threads, fp32 matmul peak 153 GFLOP/s" (and, for a
    run on a GPU, "; GPU NVIDIA H100 80GB HBM3, fp32 matmul peak 51000 GFLOP/s")."""
    peak = info.get("matmul_peak_gflops_fp32")
    line = (f"{info.get('cpu') or 'unknown CPU'} ({', '.join(info.get('isa') or ()) or 'no AVX flags'}), "
            f"{info.get('torch_threads')} thread{'' if info.get('torch_threads') == 1 else 's'}"
            + (f", fp32 matmul peak {peak:.0f} GFLOP/s" if peak else ""))
    if info.get("gpu"):
        gpu_peak = info.get("gpu_matmul_peak_gflops_fp32")
        line += f"; GPU {info['gpu']}" + (f", fp32 matmul peak {gpu_peak:.0f} GFLOP/s" if gpu_peak else "")
    return line


def cpu_has_bf16() -> bool:
    flags = cpuinfo()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def matmul_peak_flops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 10, device: str = "cpu") -> float:
    """Best sustained FLOP/s of an n×n @ n×n matmul over `repeats` runs."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def matmul_parameters(config: ModelConfig) -> int:
    """Parameters that take part in matmuls for one token (active experts only, lm_head included)."""
    h, d = config.hidden_size, config.head_dim
    nq, nkv = config.num_attention_heads, config.num_key_value_heads
    per_layer_attn = h * nq * d + 2 * h * nkv * d + nq * d * h
    total = 0
    for i in range(config.num_hidden_layers):
        total += per_layer_attn
        if config.is_sparse_layer(i):
            total += config.num_experts_per_tok * 3 * h * config.moe_intermediate_size + config.num_experts * h
        else:
            total += 3 * h * config.intermediate_size
    return total + config.vocab_size * h  # lm_head (the embedding lookup is not a matmul)


def train_step_flops(config: ModelConfig, batch_size: int, seq_len: int) -> float:
    tokens = batch_size * seq_len
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return tokens * (6 * matmul_parameters(config) + attention)
