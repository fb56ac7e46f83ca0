"""Compiled CPU kernels for the generation engine's decode step: the whole step in one call, or its
parts (fused attention, RMSNorm and SwiGLU), and top-k sampling.

At rollout sizes a decode step on a CPU is mostly per-operation overhead: ~10 small tensor operations
per layer for attention (QK-norm, RoPE, cache writes, q·kᵀ, softmax, p·v), 4 per RMSNorm, 2 for
SwiGLU and a dozen for top-k / top-p sampling, each costing microseconds of dispatch. The C files here
do each of those in one call, and `decode_step.c` does a whole step (every layer's matrix products
included) in one, each thread running its share of the rows through it alone. They are compiled at first use with the system's C compiler (`$CC`, else `cc`), with
`-march=native` and OpenMP, into a per-user cache (`$QWEN3REPRO_KERNEL_CACHE`, else
`$XDG_CACHE_HOME/qwen3repro/kernels`, else `~/.cache/qwen3repro/kernels`), named by a hash of the
source, the flags, the compiler and the CPU, and loaded with `ctypes` (plain C: no Python or PyTorch
headers, so a build takes well under a second). The attention and step kernels are compiled per head
dimension and group size, so its inner loops have constant trip counts.

Without a working compiler (or with `QWEN3REPRO_KERNELS=0`) the loaders return None, once warning
why, and the engine runs the same arithmetic as PyTorch operations; the results agree to float
rounding either way (tests/test_kernels.py).

A kernel is used only where it is faster: whether a kernel or its PyTorch operations run is measured,
once per machine and shape, by `faster` (both timed on the same buffers, the faster kept), and the
choice is kept on disk next to the built kernels, so it is paid once per machine, not per process.
`QWEN3REPRO_KERNELS` picks: `auto` (the default: measured), `1` (always the kernels, e.g. to test
them), `0` (never). `QWEN3REPRO_KERNEL_ISA` picks the instruction set they are built for: `native`
(the default: this CPU's), `avx2` (`-mavx2 -mfma`: stands in for an AVX2-only machine on an AVX-512
one), or `generic` (the compiler's baseline).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import json
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..perf import cpuinfo

__all__ = ["attention_kernel", "elementwise_kernel", "step_kernel", "sampling_kernel", "enabled", "mode", "cache_dir", "faster", "measured_choices"]

_SOURCES = Path(__file__).resolve().parent
LANES = 16  # the widest vector decode_attention.c uses (AVX-512's 16 floats): head dimension and cache length are multiples of it
MAX_TOP_K = 256  # sample_top_k.c's MAX_K (its candidate arrays): the two must be equal


def mode() -> str:
    """`QWEN3REPRO_KERNELS`: "auto" (unset or auto: the kernels where measured faster), "on" (1/true/yes/on:
    always), "off" (0/false/no/off: never)."""
    value = os.environ.get("QWEN3REPRO_KERNELS", "auto").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    if value in ("1", "true", "yes", "on"):
        return "on"
    if value in ("", "auto"):
        return "auto"
    raise ValueError(f"QWEN3REPRO_KERNELS={value!r}: expected auto, 1 or 0")


def enabled() -> bool:
    """False when `QWEN3REPRO_KERNELS` is 0/false/no/off."""
    return mode() != "off"


def isa() -> str:
    """`QWEN3REPRO_KERNEL_ISA`: the instruction set the kernels are built for (see the module docstring)."""
    value = os.environ.get("QWEN3REPRO_KERNEL_ISA", "native").strip().lower() or "native"
    if value not in _ISA_FLAGS:
        raise ValueError(f"QWEN3REPRO_KERNEL_ISA={value!r}: expected one of {', '.join(_ISA_FLAGS)}")
    return value


def cache_dir() -> Path:
    if os.environ.get("QWEN3REPRO_KERNEL_CACHE"):
        return Path(os.environ["QWEN3REPRO_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwen3repro" / "kernels"


@functools.lru_cache(maxsize=None)
def _cpu_signature() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags."""
    model, flags = cpuinfo()
    if not (model or flags):
        return platform.processor() or platform.machine()
    return "\n".join([model, " ".join(sorted(flags))])


_ISA_FLAGS = {"native": ("-march=native",), "avx2": ("-mavx2", "-mfma"), "generic": ()}


def _flag_sets(target_isa: str) -> list[tuple[str, ...]]:
    """Tried in order until one compiles: the first is the fast one; the others keep a compiler without
    the instruction-set flags or OpenMP usable (slower, still correct)."""
    sets = [("-O3", *_ISA_FLAGS[target_isa], "-fopenmp", "-fno-math-errno"), ("-O3", "-fopenmp", "-fno-math-errno"),
            ("-O3", "-fno-math-errno")]
    return list(dict.fromkeys(sets))


@functools.lru_cache(maxsize=None)
def _build(source: str, defines: tuple[tuple[str, int], ...], target_isa: str) -> ctypes.CDLL | None:
    """Compile `source` (a file next to this one) with `defines` for `target_isa` (`_ISA_FLAGS`) into the
    cache and load it, or warn once and return None."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        warnings.warn(f"no C compiler ({compiler!r}) found: the generation engine uses PyTorch operations "
                      "instead of its compiled decode kernels (slower; the same arithmetic)", stacklevel=3)
        return None
    # The source and the headers it may include: a change to either is a new build.
    text = "\0".join(f.read_text() for f in [_SOURCES / source, *sorted(_SOURCES.glob("*.h"))])
    macros = [f"-D{k}={v}" for k, v in defines]
    errors = []
    for flags in _flag_sets(target_isa):
        command = [compiler, *flags, *macros, "-shared", "-fPIC", "-std=gnu11"]
        key = hashlib.sha256("\0".join([text, *command, _compiler_version(compiler), _cpu_signature()]).encode())
        target = _writable_cache() / f"{Path(source).stem}-{key.hexdigest()[:16]}.so"
        if not target.exists():
            # Compile to a temporary name and rename: concurrent processes never load a half-written file.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            result = subprocess.run([*command, str(_SOURCES / source), "-o", tmp, "-lm"],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                os.unlink(tmp)
                errors.append(f"{' '.join(flags)}: {result.stderr.strip()[-500:]}")
                continue
            os.replace(tmp, target)
        try:
            return ctypes.CDLL(str(target))
        except OSError as e:
            errors.append(f"{' '.join(flags)}: loading {target.name}: {e}")
    warnings.warn(f"compiling {source} failed; the generation engine uses PyTorch operations instead "
                  f"(slower; the same arithmetic):\n" + "\n".join(errors), stacklevel=3)
    return None


@functools.lru_cache(maxsize=None)
def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return ""


@functools.lru_cache(maxsize=None)
def _writable_cache() -> Path:
    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path)
        probe.close()
        return path
    except OSError:  # a read-only home: a private directory for this process
        return Path(tempfile.mkdtemp(prefix="qwen3repro-kernels-"))


class AttentionKernel:
    """`decode_attention.c` for one (head dimension, group size); see that file for the layouts.

    `bind` checks the buffers once and returns a call that takes only what changes between steps (the
    cache slot and the thread count): a decode step calls it once per layer, and per-call argument
    checks and conversions would cost as much as the operations the kernel replaces."""

    def __init__(self, lib: ctypes.CDLL, head_dim: int, group: int) -> None:
        self.head_dim, self.group = head_dim, group
        self.name = Path(lib._name).stem  # names the build (source, flags, compiler, CPU) in measured choices
        fn = self._fn = lib.decode_attention
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [p, i64, p, ctypes.c_float, p, p, p, p, p, p, p, i64, i64, i64, i64, ctypes.c_int]
        fn.restype = None

    def bind(self, qkv, qk_norm, eps: float, rope, positions, keys, values, bias, scores, out, kv_heads: int):
        """-> call(slot, threads): writes the step's key/value at `slot` and the attention output into `out`.

        qkv [B, ≥ (kv_heads·(G+2))·D] (unit stride along a row), qk_norm [kv_heads·(G+1), D],
        rope [P, ..., D/2, 2] (P above every position), positions [B] int64, keys [B·kv_heads, D, T],
        values [B·kv_heads, T, D], bias [B·kv_heads, ..., T] or None, scores [B·kv_heads, G, T],
        out [B, kv_heads·G·D]; float32 on the CPU. The call keeps references to them (C holds their
        addresses)."""
        b, d, g = qkv.shape[0], self.head_dim, self.group
        t = keys.shape[-1]
        tensors = [qkv, qk_norm, rope, keys, values, scores, out] + ([] if bias is None else [bias])
        problems = []
        if not all(x.dtype == torch.float32 and x.device.type == "cpu" for x in tensors):
            problems.append("tensors must be float32 on the CPU")
        if positions.dtype != torch.int64 or positions.shape != (b,) or not positions.is_contiguous():
            problems.append(f"positions must be int64 [{b}], contiguous")
        if qkv.stride(1) != 1 or qkv.shape[1] < kv_heads * (g + 2) * d or not all(x.is_contiguous() for x in tensors[1:]):
            problems.append("qkv needs unit stride along a row; the other tensors must be contiguous")
        expected = {"qk_norm": (qk_norm.numel(), kv_heads * (g + 1) * d), "rope pair": (rope.shape[-2:], (d // 2, 2)),
                    "keys": (keys.shape, (b * kv_heads, d, t)), "values": (values.shape, (b * kv_heads, t, d)),
                    "scores": (scores.shape, (b * kv_heads, g, t)), "out": (out.numel(), b * kv_heads * g * d)}
        if bias is not None:
            expected["bias"] = (bias.numel(), b * kv_heads * t)
        problems += [f"{name}: {tuple(got) if isinstance(got, torch.Size) else got} != {want}"
                     for name, (got, want) in expected.items() if got != want]
        if t % LANES:
            problems.append(f"cache length {t} must be a multiple of {LANES}")
        if problems:
            raise ValueError("decode_attention: " + "; ".join(problems))
        fixed = (qkv.data_ptr(), qkv.stride(0), qk_norm.data_ptr(), eps, rope.data_ptr(), positions.data_ptr(),
                 keys.data_ptr(), values.data_ptr(), None if bias is None else bias.data_ptr(), scores.data_ptr(),
                 out.data_ptr(), b, kv_heads, t)
        fn, alive = self._fn, (*tensors, positions)  # the call holds its tensors: their memory stays valid

        def call(slot: int, threads: int) -> None:
            if not 0 <= slot < t:
                raise ValueError(f"slot {slot} outside the cache [0, {t})")
            fn(*fixed, slot, threads)

        call.tensors = alive

        return call


class ElementwiseKernel:
    """`decode_norm_swiglu.c`: a decode step's RMSNorm scaling and SwiGLU, each bound once to its buffers
    (as `AttentionKernel.bind`) and then called with the thread count only."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.name = Path(lib._name).stem
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self._rms, self._swiglu = lib.rms_scale, lib.swiglu
        self._rms.argtypes = [p, p, i64, i64, ctypes.c_float, ctypes.c_int]
        self._swiglu.argtypes = [p, p, i64, i64, ctypes.c_int]
        self._rms.restype = self._swiglu.restype = None

    @staticmethod
    def _check(what: str, tensors) -> None:
        if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors):
            raise ValueError(f"{what}: tensors must be float32 on the CPU, contiguous")

    def bind_rms(self, x: torch.Tensor, out: torch.Tensor, eps: float):
        """-> call(threads): out = x · (mean(x², last dim) + eps)^-½, x and out [rows, n]."""
        self._check("rms_scale", (x, out))
        if x.dim() != 2 or out.shape != x.shape:
            raise ValueError(f"rms_scale: x {tuple(x.shape)} and out {tuple(out.shape)} must be the same [rows, n]")
        fn, fixed = self._rms, (x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)

        def call(threads: int) -> None:
            fn(*fixed, threads)

        call.tensors = (x, out)  # the call holds its tensors: their memory stays valid
        return call

    def bind_swiglu(self, gu: torch.Tensor, out: torch.Tensor):
        """-> call(threads): out = silu(gate) · up, gu [rows, 2·inter] (gate, then up), out [rows, inter]."""
        self._check("swiglu", (gu, out))
        if gu.dim() != 2 or gu.shape[1] % 2 or out.shape != (gu.shape[0], gu.shape[1] // 2):
            raise ValueError(f"swiglu: gu {tuple(gu.shape)} must be [rows, 2·inter] and out {tuple(out.shape)} [rows, inter]")
        fn, fixed = self._swiglu, (gu.data_ptr(), out.data_ptr(), gu.shape[0], gu.shape[1] // 2)

        def call(threads: int) -> None:
            fn(*fixed, threads)

        call.tensors = (gu, out)
        return call


class StepLayer(ctypes.Structure):
    """decode_step.c's `struct step_layer`: one layer's prepared weights, epsilons and KV cache."""
    _fields_ = [(name, ctypes.c_void_p) for name in ("w_qkv", "qk_norm", "w_o", "w_gu", "w_down", "keys", "values")] + [
        (name, ctypes.c_float) for name in ("attn_norm_eps", "qk_norm_eps", "mlp_norm_eps")]


class StepArgs(ctypes.Structure):
    """decode_step.c's `struct step_args`: the model, the cache and the workspace of one batch."""
    _fields_ = ([(name, ctypes.c_int64) for name in ("batch", "hidden", "kv_heads", "inter", "vocab", "capacity", "n_layers")]
                + [("layers", ctypes.POINTER(StepLayer))]
                + [(name, ctypes.c_void_p) for name in ("embed", "lm_head", "rope", "bias")]
                + [("final_norm_eps", ctypes.c_float)]
                + [(name, ctypes.c_void_p) for name in ("x", "xn", "qkv", "scores", "att", "gu", "act")])


class StepKernel:
    """`decode_step.c` for one (head dimension, group size): a whole dense decode step in one call.

    `bind` checks every buffer once and returns a call that takes only what changes between steps
    (tokens, positions, the logits' buffer, the cache slot, the thread count), as `AttentionKernel.bind`."""

    def __init__(self, lib: ctypes.CDLL, head_dim: int, group: int) -> None:
        self.head_dim, self.group = head_dim, group
        self.name = Path(lib._name).stem
        fn = self._fn = lib.decode_step
        p = ctypes.c_void_p
        fn.argtypes = [ctypes.POINTER(StepArgs), p, p, p, ctypes.c_int64, ctypes.c_int]
        fn.restype = None

    def bind(self, *, embed, lm_head, layers, rope, bias, final_eps: float, workspace: dict, kv_heads: int):
        """-> call(tokens, positions, logits, slot, threads): one decode step, logits [B, V] written.

        embed [V, hidden]; lm_head [hidden, V]; layers: per layer a dict of w_qkv [hidden, Hk·(G+2)·D],
        qk_norm [Hk·(G+1), D], w_o [Hk·G·D, hidden], w_gu [hidden, 2·inter], w_down [inter, hidden],
        keys [B·Hk, D, T], values [B·Hk, T, D] and the floats attn_norm_eps, qk_norm_eps, mlp_norm_eps;
        rope [P, ..., D/2, 2]; bias [B·Hk, ..., T] or None; workspace x, xn [B, hidden], qkv [B, Hk·(G+2)·D],
        scores [B·Hk, G, T], att [B, Hk·G·D], gu [B, 2·inter], act [B, inter]. Float32 on the CPU,
        contiguous; the call keeps references to them (C holds their addresses)."""
        d, g, hk = self.head_dim, self.group, kv_heads
        vocab, hidden = embed.shape
        b = workspace["x"].shape[0]
        inter = workspace["act"].shape[1]
        t = layers[0]["keys"].shape[-1] if layers else 0
        want = {  # name -> (tensor, shape)
            "embed": (embed, (vocab, hidden)), "lm_head": (lm_head, (hidden, vocab)),
            "x": (workspace["x"], (b, hidden)), "xn": (workspace["xn"], (b, hidden)),
            "qkv": (workspace["qkv"], (b, hk * (g + 2) * d)), "scores": (workspace["scores"], (b * hk, g, t)),
            "att": (workspace["att"], (b, hk * g * d)), "gu": (workspace["gu"], (b, 2 * inter)),
            "act": (workspace["act"], (b, inter)),
        }
        for i, layer in enumerate(layers):
            want.update({
                f"layer {i} w_qkv": (layer["w_qkv"], (hidden, hk * (g + 2) * d)),
                f"layer {i} qk_norm": (layer["qk_norm"], (hk * (g + 1), d)),
                f"layer {i} w_o": (layer["w_o"], (hk * g * d, hidden)),
                f"layer {i} w_gu": (layer["w_gu"], (hidden, 2 * inter)),
                f"layer {i} w_down": (layer["w_down"], (inter, hidden)),
                f"layer {i} keys": (layer["keys"], (b * hk, d, t)), f"layer {i} values": (layer["values"], (b * hk, t, d)),
            })
        problems = [f"{name}: {tuple(x.shape)} != {shape}" for name, (x, shape) in want.items() if tuple(x.shape) != shape]
        tensors = [x for x, _ in want.values()] + [rope] + ([] if bias is None else [bias])
        if not all(x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous() for x in tensors):
            problems.append("tensors must be float32 on the CPU, contiguous")
        if rope.shape[-2:] != (d // 2, 2):
            problems.append(f"rope pair: {tuple(rope.shape[-2:])} != {(d // 2, 2)}")
        if bias is not None and bias.numel() != b * hk * t:
            problems.append(f"bias: {bias.numel()} != {b * hk * t}")
        if t % LANES:
            problems.append(f"cache length {t} must be a multiple of {LANES}")
        if problems:
            raise ValueError("decode_step: " + "; ".join(problems))
        c_layers = (StepLayer * len(layers))(*[
            StepLayer(*(layer[k].data_ptr() for k in ("w_qkv", "qk_norm", "w_o", "w_gu", "w_down", "keys", "values")),
                      layer["attn_norm_eps"], layer["qk_norm_eps"], layer["mlp_norm_eps"])
            for layer in layers
        ])
        ws = workspace
        args = StepArgs(b, hidden, hk, inter, vocab, t, len(layers), c_layers,
                        embed.data_ptr(), lm_head.data_ptr(), rope.data_ptr(), None if bias is None else bias.data_ptr(),
                        final_eps, *(ws[k].data_ptr() for k in ("x", "xn", "qkv", "scores", "att", "gu", "act")))
        fn, pointer = self._fn, ctypes.byref(args)

        def call(tokens: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor, slot: int, threads: int) -> None:
            if not 0 <= slot < t:
                raise ValueError(f"slot {slot} outside the cache [0, {t})")
            if (tokens.dtype != torch.int64 or positions.dtype != torch.int64 or tokens.shape != (b,)
                    or positions.shape != (b,) or not (tokens.is_contiguous() and positions.is_contiguous())
                    or logits.dtype != torch.float32 or logits.shape != (b, vocab) or not logits.is_contiguous()):
                raise ValueError(f"decode_step: tokens and positions must be int64 [{b}], logits float32 [{b}, {vocab}]")
            fn(pointer, tokens.data_ptr(), positions.data_ptr(), logits.data_ptr(), slot, threads)

        call.tensors, call.args = tensors, (args, c_layers)  # the call holds its memory: C has the addresses
        return call


class SamplingKernel:
    """`sample_top_k.c`: next tokens [B] from logits [B, V], top-k, temperature, top-p and noise [B, k]."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.name = Path(lib._name).stem
        fn = self._fn = lib.sample_top_k
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [p, i64, i64, i64, i64, ctypes.c_float, ctypes.c_float, p, p, ctypes.c_int]
        fn.restype = ctypes.c_int

    def __call__(self, logits: torch.Tensor, k: int, temperature: float, top_p: float, noise: torch.Tensor):
        b, v = logits.shape
        if (logits.dtype != torch.float32 or logits.stride(1) != 1 or noise.dtype != torch.float32
                or not noise.is_contiguous() or noise.shape != (b, k) or logits.device.type != "cpu"):
            raise ValueError("sample_top_k: float32 CPU logits with unit stride along the vocabulary, noise [B, k]")
        tokens = torch.empty(b, dtype=torch.long)
        # top_p >= 1 means "off": +inf keeps every candidate whatever the rounding of the running sum.
        rc = self._fn(logits.data_ptr(), logits.stride(0), b, v, k, temperature,
                      top_p if top_p < 1.0 else math.inf, noise.data_ptr(), tokens.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise ValueError(f"top-k {k} must be in [1, min({MAX_TOP_K}, vocabulary {v})]")
        return tokens


# ------------------------------------------------------------------------------ measured choices
# Choices measured by `faster`, in this process and as kept on disk: {key: {"choice", "seconds"}}.
_CHOICES: dict[str, dict] = {}
ROUNDS = 5  # interleaved timings of each candidate; the fastest of each candidate's is compared


def measured_choices() -> dict[str, dict]:
    """The choices `faster` made or read in this process: {key: {"choice": name, "seconds": {name: s}}}."""
    return dict(_CHOICES)


def _choices_file() -> Path:
    """Per machine: the CPU, the threads' library and PyTorch's version all change which path is faster."""
    machine = hashlib.sha256("\0".join([_cpu_signature(), torch.__version__]).encode()).hexdigest()[:16]
    return _writable_cache() / f"choices-{machine}.json"


def _read_choices(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}
    return data if isinstance(data, dict) else {}


def faster(key: str, candidates: Callable[[], dict[str, Callable[[], object]]]) -> str:
    """The name of the fastest of the calls `candidates()` returns (name -> a call doing the work) for
    `key` on this machine; `candidates` is called only when a measurement is needed.

    Measured once per machine: each candidate runs once to warm up, then `ROUNDS` times, interleaved,
    and the one with the smallest time wins (the minimum is the least disturbed by other work on a
    shared machine). The choice and the times are kept in the cache directory (`choices-<machine>.json`,
    replaced atomically), so later processes read it instead of measuring. `key` must name everything
    the answer depends on besides the machine: the operation, its shapes, the thread count, the
    kernel's build."""
    if key in _CHOICES:
        return _CHOICES[key]["choice"]
    path = _choices_file()
    known = _read_choices(path).get(key)
    if isinstance(known, dict) and isinstance(known.get("choice"), str):
        _CHOICES[key] = known
        return known["choice"]
    candidates = candidates()
    for run in candidates.values():
        run()
    best = {name: math.inf for name in candidates}
    for _ in range(ROUNDS):
        for name, run in candidates.items():
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
    record = {"choice": min(best, key=best.get), "seconds": best}
    _CHOICES[key] = record
    data = _read_choices(path)  # re-read: another process may have added choices meanwhile
    data[key] = record
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return record["choice"]


def bucket(n: int) -> int:
    """The power of two at or above n (≥ 1): shapes within a factor of two share a measured choice."""
    return 1 << max(0, int(n) - 1).bit_length()


def attention_kernel(head_dim: int, group: int) -> AttentionKernel | None:
    """The fused decode-attention kernel for this head shape, or None (no compiler, disabled, or a head
    dimension that is not a multiple of 16)."""
    if not enabled() or head_dim % LANES or not 1 <= group <= 16 or head_dim > 512:
        return None
    lib = _build("decode_attention.c", (("HEAD_DIM", head_dim), ("GROUP", group)), isa())
    return None if lib is None else AttentionKernel(lib, head_dim, group)


def step_kernel(head_dim: int, group: int) -> StepKernel | None:
    """The whole-step decode kernel for this head shape, or None (as `attention_kernel`)."""
    if not enabled() or head_dim % LANES or not 1 <= group <= 16 or head_dim > 512:
        return None
    lib = _build("decode_step.c", (("HEAD_DIM", head_dim), ("GROUP", group)), isa())
    return None if lib is None else StepKernel(lib, head_dim, group)


def elementwise_kernel() -> ElementwiseKernel | None:
    """The fused RMSNorm scaling and SwiGLU of a decode step, or None (no compiler, or disabled)."""
    if not enabled():
        return None
    lib = _build("decode_norm_swiglu.c", (), isa())
    return None if lib is None else ElementwiseKernel(lib)


def sampling_kernel() -> SamplingKernel | None:
    """The fused top-k sampler, or None (no compiler, or disabled)."""
    if not enabled():
        return None
    lib = _build("sample_top_k.c", (), isa())
    return None if lib is None else SamplingKernel(lib)
