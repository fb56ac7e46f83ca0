"""Training checkpoints: safetensors + JSON, written atomically, enough to resume exactly.

Layout of one checkpoint directory (a step checkpoint `<out>/checkpoints/step_XXXXXX`, or the
stage directory `<out>` itself once the run is done):

    model.safetensors  config.json      # Hugging Face layout, via model.save_pretrained(dir)
    state/
      trainer.json                      # step, scheduler, train config + run hash, counters (written last)
      loader.json                       # data-loader cursor
      optimizer.safetensors             # optimizer tensors, keys "state.<param index>.<name>"
      optimizer.json                    # param groups (hyper-parameters) + non-tensor optimizer state
      rng.safetensors  rng.json         # torch CPU [+ CUDA] generator states; Python `random`, numpy
    checksums.json                      # size + SHA-256 of every file above (`models.checksums`)

No pickle anywhere: nothing is written with torch.save nor read with torch.load.

Checksums. `checksums.json` is written after every other file of the checkpoint and inside the same
atomic step (in the temporary directory, before the rename). Loading checks each file against it
before reading it: a flipped bit or a truncated file is a CheckpointError naming the file, never a
resume from damaged weights or optimizer moments. A checkpoint without `checksums.json` (written
before checksums existed) loads unchecked.

Atomicity. A step checkpoint is written into a temporary sibling directory (`.tmp-step_...`),
every file and directory is fsynced, then the directory is renamed onto its final name and the
parent directory is fsynced. A crash at any point leaves either the new complete checkpoint or no
new checkpoint; earlier checkpoints are never touched until a newer one is complete, and then only
the ones beyond `keep_last` are pruned. The final stage directory is published by copying the last
(already durable) step checkpoint into `<out>`, file by file with `os.replace`, then `state/`, then
`checksums.json`; a crash while publishing is repaired by resuming, which republishes. Temporary names
carry the creating process and host, so the leftovers of a crash are told apart from a live writer's
(`clean_stale`).

Resume check. A checkpoint records the *run identity*: a flat mapping `{"model.<field>": ...,
"train.<field>": ..., "run.<key>": ...}` of everything that defines the run, and its hash. Resuming
with a different identity raises `ConfigMismatchError` naming every field that differs.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import random
import re
import shutil
import uuid
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file
# Aliased: this module's own save_model writes a whole checkpoint directory.
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from ..config import ConfigError, ModelConfig
from ..models.checksums import CHECKSUMS, read_checksums, record_checksums, verify_checksums
from ..models.hf import CheckpointError
from ..run_lock import HOST, holds, process_alive

STATE_DIR = "state"
CHECKPOINTS_DIR = "checkpoints"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_PREFIXES = (".tmp-", ".old-", ".trash-")
_TEMP_MARK_RE = re.compile(r"-[0-9a-f]{8}\.(?P<pid>\d+)@(?P<host>[^/]+)$")  # see _temp_name


class ConfigMismatchError(ConfigError):
    """Resuming a run from a checkpoint written by a run with a different configuration."""


# ----------------------------------------------------------------------------- file helpers
def _fsync_path(path: str) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file missing: {path}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint file is corrupt (not valid JSON): {path} ({e})") from e


def _remove_tree(path: str) -> None:
    """Delete a directory so that a crash mid-delete never leaves something that looks like a checkpoint."""
    if not os.path.exists(path):
        return
    parent, name = os.path.split(path.rstrip(os.sep))
    trash = os.path.join(parent, _temp_name(".trash-", name))
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _temp_name(prefix: str, name: str) -> str:
    """The name of a temporary sibling (`prefix` is one of _TMP_PREFIXES): unique, and marked with the
    creating process and host so that `clean_stale` can tell a crashed run's leftovers from a live
    writer's: `.tmp-step_000020-1a2b3c4d.4242@host`."""
    return f"{prefix}{name}-{uuid.uuid4().hex[:8]}.{os.getpid()}@{HOST}"


def _is_stale(name: str, under_our_lock: bool) -> bool:
    """Whether the temporary entry `name` provably belongs to no live writer: its mark names this host and
    a process that is gone, or this process (which is not writing there while it starts a run); without
    such a mark (another host, or an unmarked name), only when it lies in a run directory this process
    holds the lock of."""
    mark = _TEMP_MARK_RE.search(name)
    if mark is not None and mark.group("host") == HOST:
        pid = int(mark.group("pid"))
        return pid == os.getpid() or not process_alive(pid)
    return under_our_lock


def clean_stale(out_dir: str) -> None:
    """Remove temporary directories left by a cut run (`.tmp-*`, `.old-*`, `.trash-*`), those only
    (`_is_stale`): a concurrent writer's are left alone."""
    under_our_lock = holds(out_dir)
    for parent in (out_dir, os.path.join(out_dir, CHECKPOINTS_DIR)):
        if not os.path.isdir(parent):
            continue
        for name in os.listdir(parent):
            if name.startswith(_TMP_PREFIXES) and _is_stale(name, under_our_lock):
                p = os.path.join(parent, name)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)


# ----------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from: torch CPU (+ CUDA), Python `random`, numpy."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    v, s, g = state["python"]
    random.setstate((v, tuple(s), g))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    cuda = state.get("torch_cuda")
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def _save_rng(state_dir: str, rng: Mapping[str, Any]) -> None:
    tensors = {"torch_cpu": rng["torch_cpu"].contiguous()}
    for i, s in enumerate(rng.get("torch_cuda") or []):
        tensors[f"torch_cuda.{i}"] = s.contiguous()
    save_file(tensors, os.path.join(state_dir, "rng.safetensors"))
    write_json(os.path.join(state_dir, "rng.json"), {"python": rng["python"], "numpy": rng["numpy"]})


def _load_rng(state_dir: str) -> dict[str, Any]:
    path = os.path.join(state_dir, "rng.safetensors")
    tensors = _load_safetensors(path)
    rest = read_json(os.path.join(state_dir, "rng.json"))
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda.")), key=lambda k: int(k.split(".")[1]))]
    return {"torch_cpu": tensors["torch_cpu"], "torch_cuda": cuda, **rest}


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint file is corrupt: {path} ({e})") from e


# ----------------------------------------------------------------------------- optimizer
def _save_optimizer(state_dir: str, optimizer: torch.optim.Optimizer) -> None:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                other.setdefault(str(idx), {})[key] = value
    groups = []
    for g in sd["param_groups"]:
        g = dict(g)
        for k, v in g.items():
            if isinstance(v, torch.Tensor):
                g[k] = {"__tensor__": v.item()}
            elif isinstance(v, tuple):
                g[k] = {"__tuple__": list(v)}
        groups.append(g)
    save_file(tensors, os.path.join(state_dir, "optimizer.safetensors"))
    write_json(
        os.path.join(state_dir, "optimizer.json"),
        {"class": type(optimizer).__name__, "param_groups": groups, "state": other},
    )


def _load_optimizer(state_dir: str, optimizer: torch.optim.Optimizer) -> None:
    meta = read_json(os.path.join(state_dir, "optimizer.json"))
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(
            f"{state_dir}: optimizer is {meta.get('class')!r} in the checkpoint, {type(optimizer).__name__!r} now"
        )
    tensors = _load_safetensors(os.path.join(state_dir, "optimizer.safetensors"))
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        for k, v in g.items():
            if isinstance(v, dict) and "__tuple__" in v:
                g[k] = tuple(v["__tuple__"])
            elif isinstance(v, dict) and "__tensor__" in v:
                g[k] = torch.tensor(v["__tensor__"])
        groups.append(g)
    saved_sizes = [len(g["params"]) for g in groups]
    current_sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != current_sizes:
        raise CheckpointError(
            f"{state_dir}: optimizer parameter groups hold {saved_sizes} parameters in the checkpoint, "
            f"{current_sizes} in the model being resumed"
        )
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, rest in meta.get("state", {}).items():
        state.setdefault(int(idx), {}).update(rest)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{state_dir}: optimizer state does not fit the optimizer ({e})") from e


# ----------------------------------------------------------------------------- model
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def save_model(model: torch.nn.Module, path: str) -> None:
    """Hugging Face layout: `model.save_pretrained(path)` when the model has it, else safetensors + config.json."""
    model = _unwrap(model)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(path)
        return
    save_safetensors_model(model, os.path.join(path, "model.safetensors"))
    cfg = getattr(model, "config", None)
    if isinstance(cfg, ModelConfig):
        cfg.to_json(os.path.join(path, "config.json"))


def load_model_weights(model: torch.nn.Module, path: str) -> None:
    """Load a checkpoint's weights into an existing model in place (exact, any key layout).

    If the model class has `from_pretrained`, the checkpoint is read by it (so the class's own
    Hugging Face key mapping applies, and `Qwen3`'s checks the checksums) and its state dict is copied
    in; otherwise the `model.safetensors` file is checked against the checksums and loaded directly.
    """
    model = _unwrap(model)
    weights = os.path.join(path, "model.safetensors")
    if not os.path.exists(weights) and not any(n.startswith("model") and n.endswith(".safetensors") for n in os.listdir(path)):
        raise CheckpointError(f"checkpoint has no model weights: {weights}")
    try:
        if hasattr(type(model), "from_pretrained"):
            loaded = type(model).from_pretrained(path)
            model.load_state_dict(loaded.state_dict(), strict=True)
        else:
            verify_checksums(path, ["model.safetensors"])
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            load_safetensors_model(model, weights, strict=True, device=str(device))
    except Exception as e:  # a CheckpointError of the loader too: the message adds the path and the model
        raise CheckpointError(f"{path}: model weights do not load into {type(model).__name__} ({e})") from e


# ----------------------------------------------------------------------------- identity
def identity_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Field-by-field differences between two run identities, as readable strings."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if _canon(a) != _canon(b):
            diffs.append(f"{key}: checkpoint {a!r}, now {b!r}")
    return diffs


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def check_identity(ckpt_path: str, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    diffs = identity_diff(saved, current)
    if diffs:
        raise ConfigMismatchError(
            f"cannot resume from {ckpt_path}: it was written by a run with a different configuration; "
            f"mismatching field(s): {', '.join(d.split(':')[0] for d in diffs)}\n  " + "\n  ".join(diffs)
            + "\nStart a fresh run (new output directory, or resume=None after removing its checkpoints) "
            "or restore the original configuration."
        )


# ----------------------------------------------------------------------------- save / load
def write_checkpoint_dir(
    path: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: Mapping[str, Any],
    loader_state: Any,
    rng_state: Mapping[str, Any] | None = None,
) -> str:
    """Write a complete checkpoint at `path` atomically (temp sibling + fsync + rename)."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, _temp_name(".tmp-", name))
    os.makedirs(os.path.join(tmp, STATE_DIR))
    try:
        state_dir = os.path.join(tmp, STATE_DIR)
        save_model(model, tmp)
        if optimizer is not None:
            _save_optimizer(state_dir, optimizer)
        write_json(os.path.join(state_dir, "loader.json"), {"cursor": loader_state})
        _save_rng(state_dir, rng_state if rng_state is not None else capture_rng_state())
        meta = dict(trainer_state)
        meta.update(
            format=FORMAT_VERSION,
            has_optimizer=optimizer is not None,
            saved_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            torch_version=torch.__version__,
        )
        write_json(os.path.join(state_dir, "trainer.json"), meta)  # marks the state complete
        recorded = read_checksums(tmp) or {}  # the model's own save records its files
        record_checksums(tmp, [name for name in _relative_files(tmp) if name not in recorded])
        _fsync_tree(tmp)
        old = None
        if os.path.exists(path):
            old = os.path.join(parent, _temp_name(".old-", name))
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_path(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _relative_files(root: str) -> list[str]:
    """Every file under `root` but its checksum manifest, as "/"-separated paths relative to it."""
    found = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if rel != CHECKSUMS:
                found.append(rel)
    return sorted(found)


def step_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, CHECKPOINTS_DIR, f"step_{step:06d}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATE_DIR, "trainer.json"))


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """Complete step checkpoints under `<out_dir>/checkpoints`, oldest first."""
    root = os.path.join(out_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        p = os.path.join(root, name)
        if m and os.path.isdir(p) and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest(out_dir: str) -> str | None:
    """The newest complete step checkpoint of a run directory, or None (for `resume="auto"`)."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def prune(out_dir: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints (keep_last <= 0 keeps everything)."""
    if keep_last <= 0:
        return
    for _step, p in list_checkpoints(out_dir)[:-keep_last]:
        _remove_tree(p)


def save_step_checkpoint(out_dir: str, step: int, *, keep_last: int, **kwargs: Any) -> str:
    path = write_checkpoint_dir(step_dir(out_dir, step), **kwargs)
    prune(out_dir, keep_last)
    return path


def publish(ckpt_path: str, stage_dir: str) -> None:
    """Make `stage_dir` hold the checkpoint at `ckpt_path` (model files + state/), replacing file by file.

    The model files come first, then `state/`, then `checksums.json`: the files it lists are in place
    before it is. Files of `stage_dir` that are not part of a checkpoint (metrics.jsonl, lineage.json,
    tokenizer files, checkpoints/) are left alone.
    """
    stage_dir = os.path.abspath(stage_dir)
    tmp = os.path.join(stage_dir, _temp_name(".tmp-", "publish"))
    shutil.copytree(ckpt_path, tmp)
    try:
        _fsync_tree(tmp)
        for name in sorted(os.listdir(tmp)):
            if name in (STATE_DIR, CHECKSUMS):
                continue
            os.replace(os.path.join(tmp, name), os.path.join(stage_dir, name))
        target = os.path.join(stage_dir, STATE_DIR)
        old = None
        if os.path.exists(target):
            old = os.path.join(stage_dir, _temp_name(".old-", STATE_DIR))
            os.rename(target, old)
        os.rename(os.path.join(tmp, STATE_DIR), target)
        if os.path.exists(os.path.join(tmp, CHECKSUMS)):
            os.replace(os.path.join(tmp, CHECKSUMS), os.path.join(stage_dir, CHECKSUMS))
        elif os.path.exists(os.path.join(stage_dir, CHECKSUMS)):  # a checkpoint without checksums: drop a list of other files
            os.remove(os.path.join(stage_dir, CHECKSUMS))
        _fsync_path(stage_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_trainer_state(path: str) -> dict[str, Any]:
    state_dir = os.path.join(path, STATE_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not is_complete(path):
        raise CheckpointError(f"not a complete checkpoint (no {STATE_DIR}/trainer.json): {path}")
    verify_checksums(path, [f"{STATE_DIR}/trainer.json"])
    meta = read_json(os.path.join(state_dir, "trainer.json"))
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this code reads {FORMAT_VERSION}")
    return meta


def load_checkpoint(
    path: str,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
    expected_identity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint into `model`/`optimizer` in place; return the trainer state.

    The returned dict is `trainer.json` plus `"loader"` (the loader cursor). The identity check runs
    before anything is loaded; RNG states are restored last (loading a model may draw from them). Every
    file read is checked against the checkpoint's `checksums.json` first, when it has one.
    """
    meta = read_trainer_state(path)
    if expected_identity is not None:
        check_identity(path, meta.get("run_identity", {}), expected_identity)
    state_dir = os.path.join(path, STATE_DIR)
    state_files = ["loader.json", *(["rng.safetensors", "rng.json"] if restore_rng else []),
                   *(["optimizer.json", "optimizer.safetensors"]
                     if optimizer is not None and meta.get("has_optimizer", True) else [])]
    verify_checksums(path, [f"{STATE_DIR}/{name}" for name in state_files])
    if model is not None:
        load_model_weights(model, path)
    if optimizer is not None:
        if not meta.get("has_optimizer", True):
            raise CheckpointError(f"{path}: checkpoint has no optimizer state")
        _load_optimizer(state_dir, optimizer)
    meta["loader"] = read_json(os.path.join(state_dir, "loader.json")).get("cursor")
    if restore_rng:
        restore_rng_state(_load_rng(state_dir))
    return meta


__all__ = [
    "CHECKPOINTS_DIR",
    "STATE_DIR",
    "CheckpointError",
    "ConfigMismatchError",
    "capture_rng_state",
    "restore_rng_state",
    "check_identity",
    "identity_diff",
    "clean_stale",
    "find_latest",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_weights",
    "prune",
    "publish",
    "read_trainer_state",
    "save_model",
    "save_step_checkpoint",
    "step_dir",
    "write_checkpoint_dir",
]
