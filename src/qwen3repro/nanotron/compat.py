"""The one place that knows how the pinned `nanotron==0.4` must be imported and run on CPU.

1. Import fix. The PyPI wheel 0.4 (identical to the git tag v0.4) cannot be imported: `nanotron/logging.py`
   does `from nanotron.config.config import LoggingArgs`, which closes the cycle
   logging -> config.config -> utils_config -> pipeline_parallel.engine -> logging (upstream issues #191, #213,
   #235; fixed upstream in commit cd4d5ed7 the day after the tag, never released). `import_nanotron()` runs the
   module's own source with that one line replaced by a placeholder name (the import was used only in a type
   annotation), registers it as `nanotron.logging`, then imports `nanotron.config` first (the order matters: the
   other order hits a second cycle through `nanotron.parallel.parameters`). Site-packages is never modified.
   If the offending line is gone (a fixed release), the fix is a no-op and nanotron is imported normally.
   `import_bug_present()` says which case applies; the tests assert it, so a version bump is noticed.

2. numpy-2 shard metadata: 0.4 computes the slices of parameters built with `contiguous_chunks` (fused QKV,
   fused gate/up) with numpy, so under numpy 2 the checkpoint metadata reads `np.int64(256)` and nanotron's own
   loader cannot parse it back (`ValueError: invalid literal for int()`), which breaks re-sharding on load.
   `normalise_sharded_metadata(model)` turns those numbers into Python ints once the model is built.

3. CPU test hooks (`cpu_parallel_context`): nanotron 0.4's `ParallelContext` asserts backend == "nccl" and calls
   `torch.cuda.set_device`. On CPU the tests initialise a gloo process group first, replace
   `ParallelContext.set_device` by a no-op for the duration of the construction, and construct with the default
   backend argument; the groups are then created with `dist.get_backend()` = gloo. Only the tests (and the GPU
   check's CPU fallback) use this; training on GPUs uses the unmodified class.

Nothing in `qwen3repro` imports this module unless the full-scale path is used, so `import qwen3repro` and the
other CLI commands never import nanotron.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types
from importlib.metadata import version

import torch.distributed as dist

PINNED_VERSION = "0.4"
_BUGGY_LINE = "from nanotron.config.config import LoggingArgs"
_REPLACEMENT = 'LoggingArgs = "LoggingArgs"  # qwen3repro compat: breaks the import cycle (upstream cd4d5ed7)'
_done = False


def _logging_source() -> tuple[str, str]:
    spec = importlib.util.find_spec("nanotron.logging")
    if spec is None or spec.origin is None:
        raise ImportError("nanotron is not installed; install the full extra: pip install -e '.[full]'")
    with open(spec.origin) as f:
        return spec.origin, f.read()


def import_bug_present() -> bool:
    """True while the installed nanotron still has the circular import of 0.4 (read from its source)."""
    return _BUGGY_LINE in _logging_source()[1]


def import_nanotron() -> types.ModuleType:
    """Import nanotron (working around 0.4's import cycle when present) and return the package."""
    global _done
    if _done:
        return sys.modules["nanotron"]
    nanotron = importlib.import_module("nanotron")  # the package __init__ itself imports nothing heavy
    if "nanotron.logging" not in sys.modules:
        origin, source = _logging_source()
        if _BUGGY_LINE in source:
            assert source.count(_BUGGY_LINE) == 1, "unexpected nanotron/logging.py: the import fix needs review"
            module = types.ModuleType("nanotron.logging")
            module.__file__ = origin
            module.__package__ = "nanotron"
            # A spec, so that importlib.util.find_spec("nanotron.logging") keeps working once it is loaded.
            module.__spec__ = importlib.util.spec_from_file_location("nanotron.logging", origin)
            sys.modules["nanotron.logging"] = module
            try:
                exec(compile(source.replace(_BUGGY_LINE, _REPLACEMENT), origin, "exec"), module.__dict__)
            except BaseException:
                del sys.modules["nanotron.logging"]
                raise
            nanotron.logging = module
    importlib.import_module("nanotron.config")  # must come before nanotron.parallel.* (second cycle)
    importlib.import_module("nanotron.logging")
    _done = True
    return nanotron


def nanotron_version() -> str:
    return version("nanotron")


def normalise_sharded_metadata(model) -> None:
    """Python ints (not numpy scalars) in every sharded parameter's slices and unsharded shape (module doc, item 2)."""
    import_nanotron()
    from nanotron.parallel.parameters import NanotronParameter, SlicesPair

    def _int(x):
        return None if x is None else int(x)

    def _slice(s: slice) -> slice:
        return slice(_int(s.start), _int(s.stop), _int(s.step))

    for param in model.parameters():
        if isinstance(param, NanotronParameter) and param.is_sharded:
            info = param.get_sharded_info()
            info.unsharded_shape = tuple(int(n) for n in info.unsharded_shape)
            info.local_global_slices_pairs = tuple(
                SlicesPair(local_slices=tuple(map(_slice, p.local_slices)), global_slices=tuple(map(_slice, p.global_slices)))
                for p in info.local_global_slices_pairs
            )


# ----------------------------------------------------------------------------------- CPU test hooks
def init_gloo(rank: int, world_size: int, port: int) -> None:
    """Start a gloo process group on localhost (tests: one call per spawned process)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world_size)


def cpu_parallel_context(tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1):
    """A nanotron `ParallelContext` over an already initialised gloo group (see module doc, item 2)."""
    import_nanotron()
    from nanotron.parallel import ParallelContext

    if not dist.is_initialized():
        raise RuntimeError("cpu_parallel_context needs torch.distributed initialised first (compat.init_gloo)")
    with _no_set_device(ParallelContext):
        return ParallelContext(
            tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp, expert_parallel_size=ep
        )


@contextlib.contextmanager
def _no_set_device(cls):
    original = cls.set_device
    cls.set_device = lambda self: None
    try:
        yield
    finally:
        cls.set_device = original


def gpu_parallel_context(tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1):
    """nanotron's own `ParallelContext` (NCCL, CUDA): what launches on GPUs use."""
    import_nanotron()
    from nanotron.parallel import ParallelContext

    return ParallelContext(
        tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp, expert_parallel_size=ep
    )


__all__ = [
    "PINNED_VERSION", "import_nanotron", "import_bug_present", "nanotron_version", "normalise_sharded_metadata",
    "init_gloo", "cpu_parallel_context", "gpu_parallel_context",
]
