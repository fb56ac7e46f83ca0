"""Typed, frozen configuration.

`ModelConfig` is the one description of a Qwen3 decoder (dense or MoE) used by every stage, the
registry, the Hugging Face load/save path and the nanotron backend. It reads and writes
`config.json` in the Hugging Face layout:

* our own files (recipes, registry entries) are loaded strictly: an unknown key is an error that
  names it;
* a `config.json` written by transformers may carry keys we do not model (`torch_dtype`,
  `transformers_version`, `use_cache`, ...): those listed in `HF_PASSTHROUGH_KEYS` are accepted and
  ignored, anything else is still an error;
* RoPE settings are read in both spellings: `rope_theta` + `rope_scaling` as in the released Qwen3
  checkpoints, and transformers 5's `rope_parameters`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration is inconsistent or names an unknown field."""


# Keys transformers writes into config.json that carry no information our model needs. Values that
# would change the computation (attention_bias, sliding windows, hidden_act, ...) are checked in
# `ModelConfig.from_hf_dict` instead of being ignored.
HF_PASSTHROUGH_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "use_cache",
        "attention_dropout",
        "max_window_layers",
        "layer_types",
        "pad_token_id",
        "output_router_logits",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "_name_or_path",
        "id2label",
        "label2id",
        "problem_type",
        "tokenizer_class",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "tie_encoder_decoder",
        "task_specific_params",
        "_attn_implementation_autoset",
        "use_return_dict",
        "mlp_bias",
        "partial_rotary_factor",
    }
)

# Keys whose value must be the Qwen3 one; any other value is refused rather than silently ignored.
HF_FIXED_KEYS: dict[str, Any] = {
    "attention_bias": False,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "sliding_window": None,
    "mlp_bias": False,
}

ROPE_TYPES = ("default", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    """A Qwen3 decoder. Field names and meanings follow transformers' `Qwen3Config`/`Qwen3MoeConfig`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    # None, or {"rope_type": "yarn", "factor": float, "original_max_position_embeddings": int, ...}
    # (optional: "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate").
    rope_scaling: Mapping[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    # Mixture of experts (num_experts == 0 means dense).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    # Dual chunk attention (Qwen2.5-1M's config key): {"chunk_size": C, "local_size": W, ...}.
    dual_chunk_attention_config: Mapping[str, Any] | None = None

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        # Normalise containers so the dataclass stays hashable and comparable.
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", list(self.eos_token_id))
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_theta <= 1:
            raise ConfigError(f"rope_theta must be > 1, got {self.rope_theta}")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.num_experts < 0:
            raise ConfigError(f"num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                    f"num_experts ({self.num_experts})"
                )
            if self.moe_intermediate_size <= 0:
                raise ConfigError(f"moe_intermediate_size must be > 0 for MoE, got {self.moe_intermediate_size}")
            if self.decoder_sparse_step <= 0:
                raise ConfigError(f"decoder_sparse_step must be > 0, got {self.decoder_sparse_step}")
        if self.intermediate_size <= 0 and any(not self.is_sparse_layer(i) for i in range(self.num_hidden_layers)):
            raise ConfigError(f"intermediate_size must be > 0, got {self.intermediate_size}")
        if self.rope_scaling is not None:
            self._check_rope_scaling(self.rope_scaling)
        if self.dual_chunk_attention_config is not None:
            dca = self.dual_chunk_attention_config
            unknown = set(dca) - {"chunk_size", "local_size", "original_max_position_embeddings"}
            if unknown:
                raise ConfigError(f"dual_chunk_attention_config: unknown key(s) {sorted(unknown)}")
            chunk, local = dca.get("chunk_size"), dca.get("local_size")
            if not isinstance(chunk, int) or not isinstance(local, int) or not 0 <= local < chunk:
                raise ConfigError(
                    "dual_chunk_attention_config needs integers 0 <= local_size < chunk_size, "
                    f"got chunk_size={chunk!r}, local_size={local!r}"
                )

    @staticmethod
    def _check_rope_scaling(rs: Mapping[str, Any]) -> None:
        rope_type = rs.get("rope_type", rs.get("type"))
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling.rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
        known = {
            "rope_type",
            "type",
            "factor",
            "original_max_position_embeddings",
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "truncate",
            "rope_theta",
        }
        unknown = set(rs) - known
        if unknown:
            raise ConfigError(f"rope_scaling: unknown key(s) {sorted(unknown)}")
        if rope_type == "yarn":
            factor = rs.get("factor")
            if factor is not None and (not isinstance(factor, (int, float)) or factor < 1):
                raise ConfigError(f"rope_scaling.factor must be >= 1, got {factor!r}")

    # ------------------------------------------------------------------ derived facts
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """transformers' rule: a layer is sparse iff it is not in mlp_only_layers and the step divides it."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        if self.dual_chunk_attention_config is not None:
            d["dual_chunk_attention_config"] = dict(self.dual_chunk_attention_config)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Strict: every key must be a field of ModelConfig."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown ModelConfig key(s): {sorted(unknown)}")
        return cls(**dict(d))

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as transformers writes it for Qwen3ForCausalLM / Qwen3MoeForCausalLM."""
        d = self.to_dict()
        if d["dual_chunk_attention_config"] is None:
            del d["dual_chunk_attention_config"]
        if self.is_moe:
            d.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"])
        else:
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                      "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef"):
                del d[k]
            d.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
        d.update(
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=self.num_hidden_layers,
            use_cache=True,
            torch_dtype="float32",
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Read a Hugging Face config.json (either RoPE spelling); refuse values we cannot honour."""
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in (None, "qwen3", "qwen3_moe"):
            raise ConfigError(f"config.json: model_type must be 'qwen3' or 'qwen3_moe', got {model_type!r}")
        for key, expected in HF_FIXED_KEYS.items():
            if key in d and d[key] != expected and not (key == "sliding_window" and not d.get("use_sliding_window")):
                raise ConfigError(f"config.json: {key}={d[key]!r} is not supported (Qwen3 uses {expected!r})")
        # transformers 5 writes Qwen3MoeConfig.num_experts under its attribute-map name.
        if "num_local_experts" in d:
            local = d.pop("num_local_experts")
            if d.setdefault("num_experts", local) != local:
                raise ConfigError(
                    f"config.json: num_experts={d['num_experts']!r} and num_local_experts={local!r} disagree"
                )
        # transformers 5 spelling: everything RoPE-related inside rope_parameters.
        rope_parameters = d.pop("rope_parameters", None)
        if rope_parameters:
            rp = dict(rope_parameters)
            if "rope_theta" in rp:
                d["rope_theta"] = rp.pop("rope_theta")
            rope_type = rp.get("rope_type", rp.get("type", "default"))
            if rope_type != "default":
                d["rope_scaling"] = rp
            elif not d.get("rope_scaling"):
                d["rope_scaling"] = None
        rs = d.get("rope_scaling")
        if rs and rs.get("rope_type", rs.get("type")) == "default":
            d["rope_scaling"] = None
        elif rs:
            rs = dict(rs)
            if "type" in rs and "rope_type" not in rs:
                rs["rope_type"] = rs.pop("type")
            rs.pop("rope_theta", None)
            d["rope_scaling"] = rs
        names = {f.name for f in dataclasses.fields(cls)}
        for key in list(d):
            if key in names:
                continue
            if key in HF_PASSTHROUGH_KEYS or key in HF_FIXED_KEYS:
                del d[key]
                continue
            raise ConfigError(f"config.json: unknown key {key!r}")
        if d.get("head_dim") is None:
            d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d["num_attention_heads"]
        if d.get("intermediate_size") is None:
            d["intermediate_size"] = 0
        for key in ("mlp_only_layers",):
            if d.get(key) is None:
                d.pop(key, None)
        return cls(**d)

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        """Read a config.json; every error names the file."""
        try:
            with open(path) as f:
                d = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        try:
            return cls.from_hf_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {str(e).removeprefix('config.json: ')}") from None
        except KeyError as e:
            raise ConfigError(f"{path}: required key {e} is missing") from None
        except (TypeError, ValueError, AttributeError) as e:  # a field of the wrong type
            raise ConfigError(f"{path}: malformed ({e})") from None


def config_hash(obj: Any) -> str:
    """Stable short hash of a config (dataclass or JSON-able mapping) for run lineage."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def strict_fields(cls: type, d: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check that a mapping names only fields of a dataclass; the error names the unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(names)}")
    return dict(d)


__all__ = ["ModelConfig", "ConfigError", "config_hash", "strict_fields", "field"]
