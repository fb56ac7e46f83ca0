"""Load and save `Qwen3` in the Hugging Face layout (transformers loads our directories as they are).

A checkpoint directory holds `config.json` (`ModelConfig.to_hf_dict`) and the weights as safetensors:
one `model.safetensors`, or, above `max_shard_size`, `model-0000i-of-0000n.safetensors` shards plus
`model.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map": {key: file}}).

Tensor names are transformers' (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`,
..., `lm_head.weight`, omitted when the embeddings are tied; a reward model has `score.weight` instead).
MoE experts are stacked in memory (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj`
[E, H, I], as in transformers 5) and per expert on disk, as in the released hub checkpoints and as
transformers 5 writes them:
`mlp.experts.{e}.gate_proj.weight` [I, H], `...up_proj.weight` [I, H], `...down_proj.weight` [H, I]; the
router is `mlp.gate.weight` [E, H]. Loading also accepts the stacked names.

Only safetensors are read: pickle-based files (`pytorch_model.bin`, `*.pt`, ...) are refused, since
unpickling can run arbitrary code. Every problem is reported by name: a missing or unexpected tensor,
or a shape mismatch (expected vs found). Files are written to a temporary name and moved into place
with `os.replace`, so a crash never leaves a half-written file where a good one was.

Checksums. `save_pretrained` ends with `checksums.json`, the size and SHA-256 of every file it wrote
(`checksums`); `load_pretrained` checks the files it reads against it before reading them, so a
flipped bit or a truncated shard is an error naming the file rather than a model that loads with
damaged weights. A directory without `checksums.json` (a Hugging Face download) loads unchecked, and
transformers ignores the file.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..files import atomic_write
from .checksums import record_checksums, verify_checksums
from .errors import CheckpointError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# A Hugging Face hub repository id, "owner/name" (what a command accepts in place of a local directory).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------- sizes
_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "200KB", "1.5MiB" (decimal KB/MB/GB, binary KiB/MiB/GiB)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use bytes or a string like '5GB', '200KB', '1MiB'")
    value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


# ------------------------------------------------------------------------ state-dict conversion
def to_hub_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict -> hub tensor names (per-expert MoE weights; lm_head dropped when tied)."""
    tied = model.config.tie_word_embeddings
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        t = t.detach()
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name[: -len(".gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{prefix}.{e}.up_proj.weight"] = t[e, inter:].clone()
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t.contiguous()
    return out


def expected_hub_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Hub tensor name -> shape that `model` needs (no tensor is copied)."""
    tied = model.config.tie_word_embeddings
    shapes: dict[str, tuple[int, ...]] = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix, (num, two_i, h) = name[: -len(".gate_up_proj")], t.shape
            for e in range(num):
                shapes[f"{prefix}.{e}.gate_proj.weight"] = (two_i // 2, h)
                shapes[f"{prefix}.{e}.up_proj.weight"] = (two_i // 2, h)
        elif name.endswith(".mlp.experts.down_proj"):
            prefix, (num, h, i) = name[: -len(".down_proj")], t.shape
            for e in range(num):
                shapes[f"{prefix}.{e}.down_proj.weight"] = (h, i)
        else:
            shapes[name] = tuple(t.shape)
    return shapes


def _stacked_to_hub_names(name: str, shape: tuple[int, ...]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Expand a stacked expert tensor found in a file into the per-expert names/shapes it stands for."""
    if name.endswith(".mlp.experts.gate_up_proj") and len(shape) == 3:
        prefix = name[: -len(".gate_up_proj")]
        for e in range(shape[0]):
            yield f"{prefix}.{e}.gate_proj.weight", (shape[1] // 2, shape[2])
            yield f"{prefix}.{e}.up_proj.weight", (shape[1] // 2, shape[2])
    elif name.endswith(".mlp.experts.down_proj") and len(shape) == 3:
        prefix = name[: -len(".down_proj")]
        for e in range(shape[0]):
            yield f"{prefix}.{e}.down_proj.weight", (shape[1], shape[2])
    else:
        yield name, shape


def from_hub_state_dict(
    tensors: dict[str, torch.Tensor], config: ModelConfig, *, lm_head: bool = True
) -> dict[str, torch.Tensor]:
    """Hub tensor names -> our state dict (stack per-expert weights; tie lm_head if needed).

    lm_head: whether the model has a language-model head (a reward model has a score head instead,
    so tied embeddings give it no `lm_head.weight`)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name, t in tensors.items():
        m = _EXPERT_RE.match(name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
        else:
            out[name] = t
    for prefix, parts in experts.items():
        n = config.num_experts
        gate = torch.stack([parts["gate_proj"][e] for e in range(n)])
        up = torch.stack([parts["up_proj"][e] for e in range(n)])
        out[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[f"{prefix}.down_proj"] = torch.stack([parts["down_proj"][e] for e in range(n)])
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
        if lm_head:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


# ------------------------------------------------------------------------------------- reading
def _weight_files(path: Path) -> list[Path]:
    index = path / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).is_file():
                raise CheckpointError(f"{index} lists shard {f!r}, which does not exist in {path}")
        return [path / f for f in files]
    if (path / SAFE_WEIGHTS).is_file():
        return [path / SAFE_WEIGHTS]
    shards = sorted(p for p in path.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for pat in PICKLE_PATTERNS for p in path.glob(pat))
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickle-based weights ({', '.join(pickles)}); refusing to load them "
            "(unpickling can execute arbitrary code). Convert the checkpoint to safetensors "
            "(model.safetensors) with a trusted tool first."
        )
    raise CheckpointError(f"{path}: no {SAFE_WEIGHTS} or {SAFE_INDEX} found")


def _verify_weight_files(path: Path, files: list[Path]) -> None:
    """Check the shard index and the weight files against the directory's checksums, if it has them."""
    index = [SAFE_INDEX] if (path / SAFE_INDEX).is_file() else []
    verify_checksums(path, index + [f.name for f in files])


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or shards), by hub name; checksums checked first."""
    files = _weight_files(Path(path))
    _verify_weight_files(Path(path), files)
    return _read_tensors(files)


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                if key in tensors:
                    raise CheckpointError(f"tensor {key!r} appears in more than one shard ({f.name})")
                tensors[key] = sf.get_tensor(key)
    return tensors


def check_tensors(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], tied: bool) -> None:
    """Raise a CheckpointError naming the first missing/unexpected tensor or shape mismatch."""
    flat: dict[str, tuple[int, ...]] = {}
    for name, shape in found.items():
        for n, s in _stacked_to_hub_names(name, tuple(shape)):
            flat[n] = s
    if tied:
        flat.pop("lm_head.weight", None)  # transformers ignores an lm_head saved next to tied embeddings
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        problems.append(
            f"unexpected tensor(s): {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else "")
        )
    for name in sorted(set(expected) & set(flat)):
        if tuple(expected[name]) != tuple(flat[name]):
            problems.append(
                f"shape mismatch for tensor {name!r}: expected {tuple(expected[name])}, found {tuple(flat[name])}"
            )
    if problems:
        raise CheckpointError("checkpoint does not match the config: " + "; ".join(problems))


def load_pretrained(
    path: str | os.PathLike,
    model_class: Callable[[ModelConfig], torch.nn.Module],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
):
    """Build `model_class(config)` (a `Qwen3Decoder`: `Qwen3`, `Qwen3RewardModel`) from a Hugging Face
    layout directory and load its weights.

    dtype: None keeps the checkpoint's floating dtype; device: where the model lives (default CPU).
    The files read are checked against the directory's `checksums.json` first, when it has one
    (`checksums`: a directory from elsewhere, without it, loads unchecked).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{path}: no {CONFIG}")
    verify_checksums(path, [CONFIG])
    config = ModelConfig.from_json(str(path / CONFIG))
    files = _weight_files(path)  # refuses pickle-only directories before anything else is read
    _verify_weight_files(path, files)

    with torch.device("meta"):
        model = model_class(config)
    expected = expected_hub_shapes(model)
    found: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    found[key] = tuple(sf.get_slice(key).get_shape())
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    check_tensors(found, expected, config.tie_word_embeddings)

    tensors = _read_tensors(files)
    if dtype is None:
        floating = [t.dtype for t in tensors.values() if t.is_floating_point()]
        dtype = floating[0] if floating else torch.float32
    has_lm_head = hasattr(model, "lm_head")
    state = {k: t.to(device=device or "cpu", dtype=dtype)
             for k, t in from_hub_state_dict(tensors, config, lm_head=has_lm_head).items()}
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings and has_lm_head:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


# ------------------------------------------------------------------------------------- writing
def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_pretrained(
    model, path: str | os.PathLike, max_shard_size: int | str = "5GB", config_updates: dict[str, Any] | None = None
) -> None:
    """Write config.json and safetensors weights (sharded above max_shard_size) into `path`, then their
    checksums (`checksums.json`).

    config.json is `model.config.to_hf_dict()` with `config_updates` on top: a model with another
    head than the language-model head names its transformers architecture there.

    Other files in the directory (tokenizer, training state, ...) are left alone, and so are their
    checksums; weight files of a previous save that the new one does not use are removed after the new
    ones are in place.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    max_bytes = parse_size(max_shard_size)
    tensors = {k: v.to("cpu") for k, v in to_hub_state_dict(model).items()}
    shards = _shard(tensors, max_bytes)
    metadata = {"format": "pt"}

    if len(shards) == 1:
        names = [SAFE_WEIGHTS]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        atomic_write(path / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata=metadata))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        }
        atomic_write(path / SAFE_INDEX, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2) + "\n"))

    hf = model.config.to_hf_dict()
    hf.update(config_updates or {})
    dtype = next(iter(tensors.values())).dtype
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    atomic_write(
        path / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    )

    # Remove weight files of an older save with a different layout (they would confuse loaders).
    keep = set(names) | ({SAFE_INDEX} if len(shards) > 1 else set())
    stale = [p for p in path.iterdir() if (p.name == SAFE_INDEX or p.name == SAFE_WEIGHTS or _SHARD_RE.match(p.name))]
    for p in stale:
        if p.name not in keep:
            p.unlink()
    record_checksums(path, sorted(keep | {CONFIG}))


__all__ = [
    "CheckpointError",
    "parse_size",
    "to_hub_state_dict",
    "from_hub_state_dict",
    "expected_hub_shapes",
    "read_safetensors",
    "load_pretrained",
    "save_pretrained",
]
