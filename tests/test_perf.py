"""What a pipeline records about its machine (`perf.machine_info`): the CPU model and the ISA flags that
decide the kernels, read from cpuinfo; the thread count; the measured matmul peak."""
from __future__ import annotations

import torch

from qwen3repro import perf

XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 amx_bf16 amx_tile
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 amx_bf16 amx_tile
"""
EPYC = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma
"""


def test_cpuinfo_reads_the_model_and_the_flags_that_pick_kernels(tmp_path):
    for text, model, isa in ((XEON, "Intel(R) Xeon(R) Platinum 8488C",
                              ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]),
                             (EPYC, "AMD EPYC", ["avx2", "fma"])):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        name, flags = perf.cpuinfo(str(path))
        assert name == model and [f for f in perf.ISA_FLAGS if f in flags] == isa
    assert perf.cpuinfo(str(tmp_path / "missing")) == ("", set())


def test_machine_info_records_threads_and_a_measured_peak(monkeypatch):
    monkeypatch.setattr(perf, "cpuinfo", lambda path="": ("AMD EPYC", {"avx2", "fma", "sse2"}))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        info = perf.machine_info()
    finally:
        torch.set_num_threads(previous)
    assert info["cpu"] == "AMD EPYC" and info["isa"] == ["avx2", "fma"] and info["torch_threads"] == 1
    assert info["matmul_peak_gflops_fp32"] > 0 and info["torch"] == torch.__version__
    assert perf.describe_machine(info).startswith("AMD EPYC (avx2, fma), 1 thread, fp32 matmul peak ")
    quick = perf.machine_info(measure_peak=False)
    assert "matmul_peak_gflops_fp32" not in quick and "peak" not in perf.describe_machine(quick)
