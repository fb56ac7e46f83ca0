"""Checkpoint conversion between nanotron's sharded layout and our Hugging Face layout, both directions.

nanotron (0.4) writes one safetensors file per parameter shard, under `<ckpt>/model/<module path>/`:
`model_<name>_pp-rank-P-of-PP_tp-rank-T-of-TP.safetensors` (sharded parameters; the file metadata records
which slice of the unsharded tensor it holds) or `model_<name>.safetensors` (replicated ones). Tied parameters
(embedding = LM head for the small dense models) are written once, under the first name.

What nanotron 0.4's trainer writes (`DistributedTrainer.save_checkpoint`, `serialize.save`), per checkpoint:

    <checkpoints_path>/latest.txt                the last saved step (read by resume_checkpoint_path)
    <checkpoints_path>/<step>/config.yaml        the whole run config (`Config.save_as_yaml`); its
                                                 model.model_config is our `Qwen3NTConfig`
                              model_config.json  `json.dumps(asdict(model_config))`: the same fields
                              checkpoint_metadata.json   {version, tp, dp, metas: {last_train_step,
                                                 consumed_train_samples}} (`serialize.metadata.save_meta`)
                              model/...          the weights (`serialize.weights.save_weights`, DP rank 0)
                              optimizer/, lr_scheduler/, random/   training state (not read here)

The model config of such a checkpoint is `ModelConfig`'s fields plus the nanotron-only ones
(`model.NANOTRON_FIELDS`: the config marker, attention kernel, recomputation, load-balancing scope).

* `nanotron_to_hf(ckpt, out)`: a checkpoint folder, or a run's checkpoints folder (its `latest.txt` step) ->
  rebuilds every unsharded tensor from its shards' metadata (so any TP/PP layout works), splits the fused
  tensors (qkv -> q, k, v; gate_up -> gate, up) and writes `Qwen3.save_pretrained`'s layout (config.json +
  safetensors, hub tensor names, per-expert MoE keys), which transformers' Qwen3/Qwen3Moe classes load.
* `init_from_hf(source, model, out)`: a released model (hub id or local directory) -> the first checkpoint of a
  stage (`model.init_method.path`), after checking that its config is the registry's `model`.
  `hf_to_nanotron(hf_dir, out)`: the same conversion without the registry check. Both write each tensor
  unsharded (a single "tp-rank-0-of-1" shard with full-slice metadata); nanotron's `load_weights` re-shards it
  for whatever TP/PP the run uses, exactly as it does when a run changes topology. They stream: one decoder
  layer in memory at a time (about 5 GB of bf16 experts per layer for 235B-A22B), not the whole model.
  (`nanotron_to_hf` still holds the whole model.)

The in-memory names map 1:1 except for fusing: see `nt_to_ours` / `ours_to_nt`. Command line (`--help`):

    python -m qwen3repro.nanotron.convert init --model qwen3-8b --source Qwen/Qwen3-8B-Base --out DIR
    python -m qwen3repro.nanotron.convert to-hf CKPT OUT
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import huggingface_hub
import torch
from packaging.version import Version
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ConfigError, ModelConfig
from ..models.checksums import verify_checksums
from ..models.errors import CheckpointError
from ..models.hf import (
    HUB_ID, SAFE_INDEX, _weight_files, check_tensors, expected_hub_shapes, from_hub_state_dict,
)
from ..models.qwen3 import Qwen3
from ..models.registry import get_model_config
from .compat import import_nanotron

MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))

MODEL_CONFIG_JSON = "model_config.json"
CONFIG_YAML = "config.yaml"
CHECKPOINT_METADATA_JSON = "checkpoint_metadata.json"
LATEST_TXT = "latest.txt"
_SHARD_RE = re.compile(r"^model_(?P<name>.+?)(?:_pp-rank-(?P<pp>\d+)-of-\d+_tp-rank-(?P<tp>\d+)-of-\d+)?\.safetensors$")
# Parameters that nanotron shards over TP (the rest are replicated): suffix of the nanotron name.
SHARDED_SUFFIXES = (
    "token_embedding.weight", "qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight", "down_proj.weight",
    "linear.weight", "experts.gate_up_proj", "experts.down_proj",
)
# What a released model must share with the registry's entry for its weights to be that model: every field
# that sets a tensor's shape or which layers are sparse, plus the routing rule (norm_topk_prob changes the
# function, not a shape). Not compared: RoPE base, context length and special tokens, which differ between a
# Base release and the post-trained one and which the stage's config sets anyway.
ARCHITECTURE_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "tie_word_embeddings", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob",
)
# What `init_from_hf` takes from a hub repository: the config, the safetensors weights (and their index) and the
# tokenizer. Never pickle-based weights (`*.bin`, `*.pt`), which can run code when loaded.
HUB_ALLOW_PATTERNS = (
    "config.json", "*.safetensors", SAFE_INDEX,
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json",
)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


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


# ------------------------------------------------------------------------- checkpoint model config
def nanotron_only_fields() -> frozenset:
    """The fields a nanotron run adds to `ModelConfig` (`model.NANOTRON_FIELDS`), by name."""
    from .model import NANOTRON_FIELDS

    return frozenset(name for name, _, _ in NANOTRON_FIELDS)


def model_config_from_nanotron(d: object, where: str | Path) -> ModelConfig:
    """The `ModelConfig` in a checkpoint's model config: ours (`ModelConfig.to_dict`) or the trainer's
    (`asdict(Qwen3NTConfig)`: `ModelConfig`'s fields but the inference-only ones, plus `NANOTRON_FIELDS`).

    The nanotron-only fields say how the run trained, not what the model computes, so they are dropped. Any
    other key is an error naming `where`: a config we cannot read fully is not silently read in part."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: the model config is not a mapping (got {type(d).__name__})")
    nanotron_only = nanotron_only_fields()
    unknown = sorted(set(d) - MODEL_FIELDS - nanotron_only)
    if unknown:
        raise ConfigError(f"{where}: unknown model config key(s) {unknown}; a Qwen3 checkpoint's model config has "
                          f"ModelConfig's fields and nanotron's {sorted(nanotron_only)}")
    if d.get("is_qwen3_config", True) is not True:
        raise ConfigError(f"{where}: is_qwen3_config is {d['is_qwen3_config']!r}: not a Qwen3 model config")
    try:
        return ModelConfig.from_dict({k: v for k, v in d.items() if k not in nanotron_only})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: incomplete model config ({e})") from None


def read_checkpoint_config(ckpt: str | Path) -> ModelConfig:
    """The model of a nanotron checkpoint folder: its model_config.json, or the model config in its config.yaml.

    The trainer writes model_config.json last (after the weights), so a checkpoint cut short after its weights
    has only config.yaml; both hold the same fields (module doc)."""
    ckpt = Path(ckpt)
    if (ckpt / MODEL_CONFIG_JSON).is_file():
        path = ckpt / MODEL_CONFIG_JSON
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return model_config_from_nanotron(d, path)
    if (ckpt / CONFIG_YAML).is_file():
        import yaml

        path = ckpt / CONFIG_YAML
        try:
            run = yaml.safe_load(path.read_text())
            mc = run["model"]["model_config"]
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        except (KeyError, TypeError):
            raise ConfigError(f"{path}: no model.model_config section (not a nanotron run config)") from None
        return model_config_from_nanotron(mc, f"{path} (model.model_config)")
    raise FileNotFoundError(f"{ckpt}: neither {MODEL_CONFIG_JSON} nor {CONFIG_YAML} says which model this is")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (it has model/), or a run's checkpoints folder: the step its latest.txt names."""
    path = Path(path)
    if (path / "model").is_dir():
        return path
    latest = path / LATEST_TXT
    if latest.is_file():
        step = latest.read_text().strip()
        ckpt = path / step
        if not (ckpt / "model").is_dir():
            raise FileNotFoundError(f"{latest} names step {step!r}, but {ckpt} holds no model/ folder")
        return ckpt
    raise FileNotFoundError(f"{path}: not a nanotron checkpoint (no model/ folder) nor a checkpoints folder "
                            f"(no {LATEST_TXT})")


# The files of a Hugging Face tokenizer (Qwen3's: tokenizer.json, its config with the chat template, vocab, merges).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")


def copy_tokenizer(source: str | Path, out: str | Path, revision: Optional[str] = None) -> list[str]:
    """Copy a tokenizer (a hub id such as Qwen/Qwen3-8B, or a local Hugging Face folder) into `out`, so a
    converted checkpoint loads with its tokenizer and chat template (`AutoTokenizer`, `qwen3repro eval-hf`).
    Returns the names copied; a source with no tokenizer.json is an error."""
    folder = resolve_hf_source(source, revision, allow_patterns=TOKENIZER_FILES)
    names = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if "tokenizer.json" not in names:
        raise CheckpointError(f"{source}: no tokenizer.json, so not a tokenizer to copy")
    Path(out).mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(folder / name, Path(out) / name)
    return names


def nanotron_to_hf(ckpt: str | Path, out: str | Path, config: Optional[ModelConfig] = None,
                   tokenizer: str | Path | None = None) -> Path:
    """nanotron checkpoint (any layout; or a checkpoints folder: its latest step) -> Hugging Face directory
    loadable by `Qwen3.from_pretrained` and transformers' `AutoModelForCausalLM`; with `tokenizer` (a hub id or
    folder), its tokenizer files too (`copy_tokenizer`)."""
    ckpt = resolve_checkpoint(ckpt)
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
    if tokenizer is not None:
        copy_tokenizer(tokenizer, out)
    return Path(out)


# ---------------------------------------------------------------------- Hugging Face -> nanotron
def resolve_hf_source(source: str | Path, revision: Optional[str] = None,
                      allow_patterns: Sequence[str] = HUB_ALLOW_PATTERNS) -> Path:
    """A local Hugging Face directory as it is, or a hub id ("Qwen/Qwen3-8B-Base") downloaded into the hub cache
    (only the files `allow_patterns` match: by default the config, safetensors weights and tokenizer). Returns
    the local directory."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{source}: a file, not a Hugging Face checkpoint directory")
    if not HUB_ID.match(str(source)):
        raise CheckpointError(f"{source}: no such directory, and not a hub id of the form 'org/name'")
    return Path(huggingface_hub.snapshot_download(repo_id=str(source), revision=revision,
                                                  allow_patterns=list(allow_patterns)))


def check_matches_registry(found: ModelConfig, expected: ModelConfig, name: str, where: str | Path) -> None:
    """A ConfigError naming every `ARCHITECTURE_FIELDS` field where `found` (the checkpoint) differs from
    `expected` (the registry's `name`), with both values."""
    diffs = [f"{f}: {name} has {getattr(expected, f)!r}, the checkpoint has {getattr(found, f)!r}"
             for f in ARCHITECTURE_FIELDS if getattr(found, f) != getattr(expected, f)]
    if diffs:
        raise ConfigError(f"{where} is not {name}: " + "; ".join(diffs))


def _tensor_files(hf_dir: Path) -> Dict[str, Path]:
    """Hub tensor name -> the safetensors file holding it (index, single file or shards, as `hf.load_pretrained`
    finds them; pickle-only directories are refused), after checking the files against the directory's
    checksums when it has them."""
    files = _weight_files(hf_dir)
    verify_checksums(hf_dir, ([SAFE_INDEX] if (hf_dir / SAFE_INDEX).is_file() else []) + [f.name for f in files])
    where: Dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                if key in where:
                    raise CheckpointError(f"{hf_dir}: tensor {key!r} is in both {where[key].name} and {f.name}")
                where[key] = f
    return where


def _read(keys: Iterable[str], where: Dict[str, Path]) -> Dict[str, torch.Tensor]:
    by_file: Dict[Path, list] = {}
    for key in keys:
        by_file.setdefault(where[key], []).append(key)
    out: Dict[str, torch.Tensor] = {}
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as sf:
            for key in names:
                out[key] = sf.get_tensor(key)
    return out


def _write_checkpoint(hf_dir: Path, config: ModelConfig, out: str | Path, metas: dict, overwrite: bool) -> Path:
    """Write the nanotron checkpoint of the Hugging Face directory `hf_dir` (whose config is `config`).

    The folder holds what nanotron's trainer reads to start from it (`model.init_method.path`: only
    `serialize.load_weights`, which reads model/ and, for a shard file without a version, the version in
    checkpoint_metadata.json) and the model config the trainer writes next to its own checkpoints:

        model/...                  every parameter, unsharded ("tp-rank-0-of-1" shards with full-slice metadata)
        checkpoint_metadata.json   nanotron's format (`save_meta`): version, tp 1, dp 1, metas (step 0, source)
        model_config.json          `asdict(Qwen3NTConfig)`, as the trainer writes it (`read_checkpoint_config`)

    It is written under a temporary name and renamed at the end, so a failed conversion never leaves a folder
    a run could start from."""
    import_nanotron()
    from nanotron.constants import CHECKPOINT_VERSION
    from nanotron.serialize.metadata import CheckpointMetadata, process_type

    from .model import Qwen3NTConfig

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already holds files; remove it or convert with overwrite")

    where = _tensor_files(hf_dir)
    # Every name and shape first (per-expert keys or stacked ones), so a wrong checkpoint fails before writing.
    shapes = {}
    for key, f in where.items():
        with safe_open(str(f), framework="pt") as sf:
            shapes[key] = tuple(sf.get_slice(key).get_shape())
    with torch.device("meta"):
        expected = expected_hub_shapes(Qwen3(config))
    try:
        check_tensors(shapes, expected, config.tie_word_embeddings)
    except CheckpointError as e:
        raise CheckpointError(f"{hf_dir}: {e}") from None
    # A tied checkpoint may carry a copy of the embedding as lm_head.weight; nanotron stores the embedding once.
    keys = [k for k in where if not (config.tie_word_embeddings and k == "lm_head.weight")]

    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # the leftovers of an interrupted conversion
    tmp.mkdir(parents=True)
    try:
        # One group per decoder layer (the fused and stacked tensors need all of a layer's pieces), then the rest.
        groups: Dict[int, list] = {}
        for key in keys:
            m = _LAYER_RE.match(key)
            groups.setdefault(int(m.group(1)) if m else -1, []).append(key)
        for index in sorted(groups):
            ours = from_hub_state_dict(_read(groups[index], where), config, lm_head=False)
            write_nanotron_weights(ours_to_nt(ours, config), tmp)
        meta = CheckpointMetadata(version=CHECKPOINT_VERSION, tp=1, dp=1,
                                  metas={"last_train_step": 0, "consumed_train_samples": 0, **metas})
        (tmp / CHECKPOINT_METADATA_JSON).write_text(
            json.dumps(process_type(dataclasses.asdict(meta), type_hooks={Version: str}), indent=2, sort_keys=True))
        # Dual chunk attention is an inference setting nanotron does not train (model.INFERENCE_ONLY_FIELDS);
        # it changes no weight.
        nt_config = Qwen3NTConfig.from_model_config(config.replace(dual_chunk_attention_config=None))
        (tmp / MODEL_CONFIG_JSON).write_text(json.dumps(dataclasses.asdict(nt_config)))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def init_from_hf(source: str | Path, model: str | ModelConfig, out_dir: str | Path, *, revision: Optional[str] = None,
                 overwrite: bool = False) -> Path:
    """A released model -> the nanotron checkpoint a stage starts from (its `model.init_method.path`).

    source: a hub id ("Qwen/Qwen3-8B-Base", downloaded with `resolve_hf_source`) or a local Hugging Face
    directory (Qwen3ForCausalLM / Qwen3MoeForCausalLM: config.json and safetensors with hub tensor names).
    model: the registry name it must be (`models.registry`; e.g. "qwen3-8b"), or the `ModelConfig` itself.
    Its architecture must be the registry's (`ARCHITECTURE_FIELDS`): a mismatch is a ConfigError naming each
    differing field and both values, raised before anything is written. Returns `out_dir`, which holds model/,
    checkpoint_metadata.json and model_config.json (`_write_checkpoint`)."""
    name, expected = (model, get_model_config(model)) if isinstance(model, str) else ("the expected model", model)
    # The config alone first: from the hub, a wrong model then fails before its weights are downloaded.
    config_dir = resolve_hf_source(source, revision, allow_patterns=("config.json",))
    if not (config_dir / "config.json").is_file():
        raise CheckpointError(f"{source}: no config.json (not a Hugging Face checkpoint)")
    found = ModelConfig.from_json(str(config_dir / "config.json"))
    check_matches_registry(found, expected, name, f"{source} (config.json)")
    hf_dir = resolve_hf_source(source, revision)
    metas = {"converted_from": str(source)}
    if not Path(source).expanduser().is_dir():  # downloaded: the hub cache's snapshot folder is the commit
        metas["revision"] = hf_dir.name
    return _write_checkpoint(hf_dir, found, out_dir, metas, overwrite)


def hf_to_nanotron(hf_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Hugging Face directory -> nanotron checkpoint loadable at any TP/PP (as `init_from_hf`, for any model)."""
    hf_dir = Path(hf_dir)
    config = ModelConfig.from_json(str(hf_dir / "config.json"))
    return _write_checkpoint(hf_dir, config, out, {"converted_from": str(hf_dir)}, overwrite)


# ------------------------------------------------------------------------------------ command line
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwen3repro.nanotron.convert",
        description="Convert checkpoints between Hugging Face (Qwen3ForCausalLM / Qwen3MoeForCausalLM) and nanotron.")
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser(
        "init", help="released model -> the nanotron checkpoint a stage starts from (model.init_method.path)",
        description="Convert a released model into a nanotron checkpoint folder (model/, checkpoint_metadata.json, "
                    "model_config.json) that a stage's model.init_method.path can point at. Its architecture must "
                    "be the registry's --model.")
    init.add_argument("--model", required=True, help="registry name it must match, e.g. qwen3-8b")
    init.add_argument("--source", required=True,
                      help="hub id (e.g. Qwen/Qwen3-8B-Base; config, safetensors and tokenizer are downloaded) "
                           "or a local Hugging Face directory")
    init.add_argument("--out", required=True, help="the nanotron checkpoint folder to write")
    init.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of --source")
    init.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    to_hf = sub.add_parser(
        "to-hf", help="nanotron checkpoint -> Hugging Face directory",
        description="Convert a nanotron checkpoint (any TP/PP layout) into a Hugging Face directory that "
                    "transformers' AutoModelForCausalLM loads.")
    to_hf.add_argument("ckpt", help="a checkpoint folder (<checkpoints_path>/<step>) or a checkpoints folder "
                                    "(its latest.txt step)")
    to_hf.add_argument("out", help="the Hugging Face directory to write")
    to_hf.add_argument("--tokenizer", default=None, help="also copy this tokenizer (hub id, e.g. Qwen/Qwen3-8B, or "
                       "a local folder), so the directory loads with its chat template")
    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            path = init_from_hf(args.source, args.model, args.out, revision=args.revision, overwrite=args.overwrite)
        else:
            path = nanotron_to_hf(args.ckpt, args.out, tokenizer=args.tokenizer)
    except (ValueError, OSError) as e:  # ConfigError and CheckpointError are ValueErrors; missing files OSErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


__all__ = [
    "nt_to_ours", "ours_to_nt", "load_state_dict_into", "local_shard", "tied_name", "read_nanotron_weights",
    "write_nanotron_weights", "nanotron_to_hf", "hf_to_nanotron", "init_from_hf", "read_checkpoint_config",
    "model_config_from_nanotron", "nanotron_only_fields", "resolve_checkpoint", "resolve_hf_source",
    "check_matches_registry", "copy_tokenizer", "ARCHITECTURE_FIELDS", "HUB_ALLOW_PATTERNS", "TOKENIZER_FILES", "main",
]


if __name__ == "__main__":
    sys.exit(main())
