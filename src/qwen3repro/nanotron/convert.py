"""Checkpoint conversion between nanotron's sharded layout and our Hugging Face layout, both directions.

nanotron (0.4) writes one safetensors file per parameter shard, under `<ckpt>/model/<module path>/`:
`model_<name>_pp-rank-P-of-PP_tp-rank-T-of-TP.safetensors` (sharded parameters; the file metadata records
which slice of the unsharded tensor it holds) or `model_<name>.safetensors` (replicated ones). Tied parameters
(embedding = LM head for the small dense models) are written once, under the first name.

* `nanotron_to_hf(ckpt, out)`: rebuilds every unsharded tensor from its shards' metadata (so any TP/PP layout
  works), splits the fused tensors (qkv -> q, k, v; gate_up -> gate, up) and writes `Qwen3.save_pretrained`'s
  layout (config.json + safetensors, hub tensor names, per-expert MoE keys).
* `hf_to_nanotron(hf_dir, out)`: writes each tensor unsharded (a single "tp-rank-0-of-1" shard with full-slice
  metadata); nanotron's `load_weights` re-shards it for whatever TP/PP the run uses, exactly as it does when a
  run changes topology. `model_config.json` next to it records the model.

The in-memory names map 1:1 except for fusing: see `nt_to_ours` / `ours_to_nt`. This module imports nanotron
only for the shard metadata format.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..models.hf import from_hub_state_dict, read_safetensors
from ..models.qwen3 import Qwen3
from .compat import import_nanotron

MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))

MODEL_CONFIG_JSON = "model_config.json"
_SHARD_RE = re.compile(r"^model_(?P<name>.+?)(?:_pp-rank-(?P<pp>\d+)-of-\d+_tp-rank-(?P<tp>\d+)-of-\d+)?\.safetensors$")
# Parameters that nanotron shards over TP (the rest are replicated): suffix of the nanotron name.
SHARDED_SUFFIXES = (
    "token_embedding.weight", "qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight", "down_proj.weight",
    "linear.weight", "experts.gate_up_proj", "experts.down_proj",
)


# ------------------------------------------------------------------------------------- name mapping
def nt_to_ours(nt: Dict[str, torch.Tensor], config: ModelConfig) -> Dict[str, torch.Tensor]:
    """Unsharded nanotron tensors (nanotron names) -> our `Qwen3.state_dict()` names (lm_head tied if needed)."""
    d, nq, nkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    out: Dict[str, torch.Tensor] = {}
    for name, t in nt.items():
        if name == "embedding.pp_block.token_embedding.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "final_norm.pp_block.norm.weight":
            out["model.norm.weight"] = t
        elif name == "lm_head.pp_block.linear.weight":
            out["lm_head.weight"] = t
        else:
            m = re.match(r"^decoder\.(\d+)\.pp_block\.(.+)$", name)
            if not m:
                raise KeyError(f"unexpected nanotron tensor {name!r}")
            p, rest = f"model.layers.{m.group(1)}.", m.group(2)
            if rest == "self_attn.qkv_proj.weight":
                q, k, v = t.split([nq * d, nkv * d, nkv * d], dim=0)
                out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"], out[p + "self_attn.v_proj.weight"] = q, k, v
            elif rest == "mlp.gate_up_proj.weight":
                gate, up = t.chunk(2, dim=0)
                out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
            else:
                out[p + rest] = t
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def ours_to_nt(sd: Dict[str, torch.Tensor], config: ModelConfig) -> Dict[str, torch.Tensor]:
    """Our `Qwen3.state_dict()` -> unsharded nanotron tensors (fused qkv and gate_up; tied lm_head dropped)."""
    out: Dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name == "model.embed_tokens.weight":
            out["embedding.pp_block.token_embedding.weight"] = t
        elif name == "model.norm.weight":
            out["final_norm.pp_block.norm.weight"] = t
        elif name == "lm_head.weight":
            if not config.tie_word_embeddings:
                out["lm_head.pp_block.linear.weight"] = t
        else:
            m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
            if not m:
                raise KeyError(f"unexpected tensor {name!r}")
            p, rest = f"decoder.{m.group(1)}.pp_block.", m.group(2)
            pre = f"model.layers.{m.group(1)}."
            if rest in ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight"):
                continue
            if rest == "self_attn.q_proj.weight":
                out[p + "self_attn.qkv_proj.weight"] = torch.cat(
                    [sd[pre + "self_attn.q_proj.weight"], sd[pre + "self_attn.k_proj.weight"], sd[pre + "self_attn.v_proj.weight"]])
            elif rest == "mlp.gate_proj.weight":
                out[p + "mlp.gate_up_proj.weight"] = torch.cat([sd[pre + "mlp.gate_proj.weight"], sd[pre + "mlp.up_proj.weight"]])
            else:
                out[p + rest] = t
    return out


# ------------------------------------------------------------------------- live (in-process) models
def tied_name(model, name: str) -> str:
    """The name nanotron saves a (possibly tied) parameter under."""
    param = model.get_parameter(name)
    if getattr(param, "is_tied", False):
        prefixes = {id(m): f"{n}." for n, m in model.named_modules()}
        prefixes[id(model)] = ""
        return param.get_tied_info().get_full_name_from_module_id_to_prefix(module_id_to_prefix=prefixes)
    return name


def local_shard(param, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of an unsharded tensor, following the parameter's nanotron sharding metadata."""
    if not getattr(param, "is_sharded", False):
        return full
    info = param.get_sharded_info()
    out = torch.empty(param.shape, dtype=full.dtype)
    for pair in info.local_global_slices_pairs:
        out[pair.local_slices] = full[pair.global_slices]
    return out


@torch.no_grad()
def load_state_dict_into(model, sd: Dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Copy our (unsharded, HF-named) weights into a built nanotron Qwen3 on this rank (its local shards)."""
    nt = ours_to_nt(sd, config)
    if config.tie_word_embeddings:
        nt["lm_head.pp_block.linear.weight"] = nt["embedding.pp_block.token_embedding.weight"]
    for name, param in model.named_parameters():
        key = name if name in nt else tied_name(model, name)
        param.copy_(local_shard(param, nt[key]).to(param.dtype))


# ------------------------------------------------------------------------------------ on disk
def read_nanotron_weights(ckpt: str | Path) -> Dict[str, torch.Tensor]:
    """Every parameter of a nanotron checkpoint, unsharded, by nanotron name (any TP/PP layout)."""
    import_nanotron()
    from nanotron.serialize.metadata import TensorMetadata

    root = Path(ckpt) / "model"
    if not root.is_dir():
        raise FileNotFoundError(f"{ckpt}: no model/ folder (not a nanotron checkpoint)")
    groups: Dict[str, list] = {}
    for f in sorted(root.rglob("*.safetensors")):
        m = _SHARD_RE.match(f.name)
        if not m:
            raise ValueError(f"unexpected file in a nanotron checkpoint: {f}")
        name = ".".join(f.relative_to(root).parent.parts + (m.group("name"),))
        groups.setdefault(name, []).append(f)
    out: Dict[str, torch.Tensor] = {}
    for name, files in groups.items():
        full: Optional[torch.Tensor] = None
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                data, meta = sf.get_tensor("data"), sf.metadata() or {}
            if "unsharded_shape" not in meta:
                full = data
                continue
            tm = TensorMetadata.from_str_dict(meta)
            if full is None:
                full = torch.empty(tuple(tm.unsharded_shape), dtype=data.dtype)
            for pair in tm.local_global_slices_pairs:
                full[pair.global_slices] = data[pair.local_slices]
        out[name] = full
    return out


def write_nanotron_weights(nt: Dict[str, torch.Tensor], ckpt: str | Path) -> None:
    """Write unsharded nanotron tensors as a TP=1/PP=1 checkpoint that nanotron re-shards on load."""
    import_nanotron()
    from nanotron.constants import CHECKPOINT_VERSION
    from nanotron.parallel.parameters import SlicesPair
    from nanotron.serialize.metadata import TensorMetadata

    root = Path(ckpt) / "model"
    for name, t in nt.items():
        *path, leaf = name.split(".")
        folder = root.joinpath(*path)
        folder.mkdir(parents=True, exist_ok=True)
        if name.endswith(SHARDED_SUFFIXES):
            full = tuple(slice(None) for _ in t.shape)
            meta = TensorMetadata(version=CHECKPOINT_VERSION,
                                  local_global_slices_pairs=(SlicesPair(local_slices=full, global_slices=full),),
                                  unsharded_shape=tuple(t.shape)).to_str_dict()
            save_file({"data": t.contiguous()}, str(folder / f"model_{leaf}_pp-rank-0-of-1_tp-rank-0-of-1.safetensors"), metadata=meta)
        else:
            save_file({"data": t.contiguous()}, str(folder / f"model_{leaf}.safetensors"))


def read_checkpoint_config(ckpt: str | Path) -> ModelConfig:
    """The model of a nanotron checkpoint: our model_config.json, or the trainer's config.yaml."""
    ckpt = Path(ckpt)
    if (ckpt / MODEL_CONFIG_JSON).is_file():
        return ModelConfig.from_dict(json.loads((ckpt / MODEL_CONFIG_JSON).read_text()))
    if (ckpt / "config.yaml").is_file():
        import yaml

        mc = yaml.safe_load((ckpt / "config.yaml").read_text())["model"]["model_config"]
        # The trainer's model config is ModelConfig's fields plus how it trained (nanotron.model.NANOTRON_FIELDS).
        return ModelConfig.from_dict({k: v for k, v in mc.items() if k in MODEL_FIELDS})
    raise FileNotFoundError(f"{ckpt}: neither {MODEL_CONFIG_JSON} nor config.yaml says which model this is")


def nanotron_to_hf(ckpt: str | Path, out: str | Path, config: Optional[ModelConfig] = None) -> Path:
    """nanotron checkpoint (any layout) -> Hugging Face directory loadable by `Qwen3.from_pretrained`/transformers."""
    config = config or read_checkpoint_config(ckpt)
    sd = nt_to_ours(read_nanotron_weights(ckpt), config)
    with torch.device("meta"):
        model = Qwen3(config)
    dtype = next(iter(sd.values())).dtype
    model.load_state_dict({k: v for k, v in sd.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(dtype)
    model.save_pretrained(out)
    return Path(out)


def hf_to_nanotron(hf_dir: str | Path, out: str | Path) -> Path:
    """Hugging Face directory -> nanotron checkpoint (weights + model_config.json), loadable at any TP/PP."""
    config = ModelConfig.from_json(str(Path(hf_dir) / "config.json"))
    sd = from_hub_state_dict(read_safetensors(hf_dir), config)
    write_nanotron_weights(ours_to_nt(sd, config), out)
    (Path(out) / MODEL_CONFIG_JSON).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return Path(out)


__all__ = [
    "nt_to_ours", "ours_to_nt", "load_state_dict_into", "local_shard", "tied_name", "read_nanotron_weights",
    "write_nanotron_weights", "nanotron_to_hf", "hf_to_nanotron", "read_checkpoint_config",
]
