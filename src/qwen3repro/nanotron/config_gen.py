"""Generate one nanotron 0.4 YAML per (stage, real model) from the stage's recipe and the model's full/ settings.

    spec = build_stage_spec("s2", "qwen3-0.6b", nodes=4, gpus_per_node=8)
    paths = write_stage_config(spec, out_dir)     # <stage>.yaml (nanotron) + <stage>.qwen3repro.json (ours)

Where each value comes from:

* model shape: `models.registry.REAL_MODELS` (via `Qwen3NTConfig.from_model_config`), with the stage's RoPE base
  (ABF: 1e4 in S1/S2, 1e6 from S3 on) and `max_position_embeddings` = the stage's sequence length;
* layout: `full/models.toml` (tp, pp; long_tp/long_pp at 32k) and the command line (nodes, GPUs per node);
  dp = world / (tp·pp);
* sizes: `full/stages.toml` (sequence length, tokens, warmup; LR and batch for the SFT stages);
* LR and batch size of S1–S3: the scaling law in `full/stages.toml` ([scaling_law]) evaluated at the stage's
  compute C = FLOPs per token × tokens;
* schedule shape: `recipes/<stage>.toml` ([train]: decay_start/decay_fraction/decay_end, decay_shape,
  min_lr_ratio, weight_decay, betas, clip_grad_norm; top level: rope_theta) when the file exists, else
  `STAGE_FACTS` below. The warmup–stable–decay schedule is computed by `train.schedule.WSDSchedule` and mapped
  to nanotron 0.4's `lr_warmup_steps` / `lr_decay_starting_step` / `lr_decay_steps` / `min_decay_lr`
  (0.4 knows linear and cosine decay, not 1-sqrt);
* chaining: each stage starts from the previous stage's last checkpoint (`model.init_method.path`: weights
  only, fresh optimizer and schedule, as SmolLM3's long-context runs did); restarts of the same stage resume
  from its own `checkpoints_path` (`checkpoints.resume_checkpoint_path`, set by the launcher when one exists);
* data: real `datasets` sources (`full/stages.toml` [data.<stage>]) as `data.mixture.SourceSpec`s, written into
  the sidecar JSON; batches reach nanotron through our loader, so the YAML's `data` section has no HF dataset
  (0.4's loader is strict: it accepts no keys of ours there). The SFT stages (cold start, fusion, off-policy
  distillation) train on masked conversation shards written by `sft_data` to `StageSpec.shards_path`; the
  sidecar's `shards` entry says which kind of `--data` the launcher must get.

Generated files are never edited by hand: change the recipe, full/*.toml or this module and regenerate. They go
to `runs/full/<model>/<stage>/` (relative to the repository root, where make and the launchers run; runs/ is
not tracked), with the checkpoints of the chain under `runs/full/<model>/<stage>/checkpoints/`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import ConfigError
from ..models.registry import REAL_MODELS, get_model_config
from ..perf import train_step_flops
from ..recipes import load_toml, repo_root
from ..train.schedule import WSDSchedule
from .plan import Layout, RunPlan

STAGES = ("s1", "s2", "s3", "cold-start", "fusion", "distill")

# ===================================================================================== STAGE FACTS
# The one place that states the stage facts this module needs. `recipes/<stage>.toml` overrides them when it
# exists (keys read: rope_theta; [train] decay_start, decay_fraction, decay_end, decay_shape, min_lr_ratio,
# weight_decay, betas, clip_grad_norm). Report §3.2: S1 and S2 at 4,096 tokens with RoPE base 1e4 (the
# released configs say 1e6 because they are post-S3), S2's accelerated decay, S3 at 32,768 tokens with base
# 1e6 (ABF) and a 75/25 length mix (75% of documents in [16,384, 32,768], 25% in [4,096, 16,384]).
# Post-training: the flagships go cold start -> reasoning RL -> fusion -> general RL; the students go
# off-policy -> on-policy distillation (§4). RL stages are not generated here yet, so fusion starts from the
# cold-start checkpoint until reasoning RL exists at full scale. `lr_from`: S2 continues S1's stable LR and
# batch size (then decays), so both come from S1's scaling-law point.
STAGE_FACTS: dict[str, dict[str, Any]] = {
    "s1": dict(kind="pretrain", parent=None, rope_theta=10_000.0,
               train=dict(decay_fraction=0.0, decay_shape="linear", min_lr_ratio=0.1)),
    "s2": dict(kind="pretrain", parent="s1", rope_theta=10_000.0, lr_from="s1",
               train=dict(decay_start=0, decay_shape="cosine", min_lr_ratio=0.1)),
    "s3": dict(kind="pretrain", parent="s2", rope_theta=1_000_000.0,
               length_mix={"[16384, 32768]": 0.75, "[4096, 16384)": 0.25},
               train=dict(decay_fraction=1.0, decay_shape="cosine", min_lr_ratio=0.1)),
    "cold-start": dict(kind="sft", parent="s3", rope_theta=1_000_000.0, models="flagship",
                       train=dict(decay_fraction=1.0, decay_shape="cosine", min_lr_ratio=0.1)),
    "fusion": dict(kind="sft", parent="cold-start", rope_theta=1_000_000.0, models="flagship",
                   train=dict(decay_fraction=1.0, decay_shape="cosine", min_lr_ratio=0.1)),
    "distill": dict(kind="sft", parent="s3", rope_theta=1_000_000.0, models="student",
                    train=dict(decay_fraction=1.0, decay_shape="cosine", min_lr_ratio=0.1)),
}
FLAGSHIPS = ("qwen3-235b-a22b", "qwen3-32b")
TRAIN_DEFAULTS = dict(weight_decay=0.1, betas=[0.9, 0.95], clip_grad_norm=1.0)
CHECKPOINT_EVERY = 500  # steps; a stage's step count is rounded up to a multiple, so its last step is saved
RECIPE_TRAIN_KEYS = ("decay_start", "decay_fraction", "decay_end", "decay_shape", "min_lr_ratio",
                     "weight_decay", "betas", "clip_grad_norm")
# ================================================================================================


def check_names(stage: str, model: str) -> None:
    """A wrong stage or model name is an error listing the valid ones."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")
    if model not in REAL_MODELS:
        raise ConfigError(f"unknown model {model!r}; valid models: {', '.join(REAL_MODELS)}")


def full_dir(root: Path | None = None) -> Path:
    return (root or repo_root()) / "full"


def stage_facts(stage: str, root: Path | None = None) -> dict[str, Any]:
    """STAGE_FACTS[stage] with `recipes/<stage>.toml` (when present) applied on top."""
    facts = json.loads(json.dumps(STAGE_FACTS[stage]))
    path = (root or repo_root()) / "recipes" / f"{stage}.toml"
    facts["recipe"] = None
    if path.is_file():
        recipe = load_toml(path)
        facts["recipe"] = str(path.relative_to(root or repo_root()))
        if "rope_theta" in recipe:
            facts["rope_theta"] = float(recipe["rope_theta"])
        train = recipe.get("train", {})
        picked = {k: train[k] for k in RECIPE_TRAIN_KEYS if k in train}
        if picked:
            # The recipe states the whole schedule shape: drop our defaults for the decay window.
            for k in ("decay_start", "decay_fraction", "decay_end"):
                if any(key in picked for key in ("decay_start", "decay_fraction", "decay_end")):
                    facts["train"].pop(k, None)
            facts["train"].update(picked)
    return facts


@dataclass
class StageSpec:
    """Everything a stage × model run needs; `nanotron_dict` and `sidecar` are what gets written."""

    stage: str
    model: str
    layout: Layout
    seq_len: int
    rope_theta: float
    tokens: int
    lr: float
    micro_batch_size: int
    grad_accum: int
    schedule: WSDSchedule
    train: dict
    data: dict
    parent: str | None
    run_dir: Path
    facts: dict
    settings: dict
    recompute: bool = False

    @property
    def model_config(self):
        return get_model_config(self.model).replace(rope_theta=self.rope_theta, max_position_embeddings=self.seq_len)

    @property
    def nanotron_model_config(self):
        from .model import Qwen3NTConfig

        return Qwen3NTConfig.from_model_config(self.model_config, recompute_layers=self.recompute)

    @property
    def checkpoints_path(self) -> Path:
        return self.run_dir / self.model / self.stage / "checkpoints"

    parent_steps: int | None = None

    @property
    def checkpoint_interval(self) -> int:
        return checkpoint_interval(self.schedule.total_steps)

    @property
    def parent_checkpoint(self) -> Path | None:
        """The parent stage's last checkpoint: nanotron writes `<checkpoints_path>/<step>`."""
        if self.parent is None:
            return None
        return self.run_dir / self.model / self.parent / "checkpoints" / str(self.parent_steps)

    @property
    def is_sft(self) -> bool:
        """Cold start, fusion and off-policy distillation: conversations, loss on assistant tokens only."""
        return self.facts["kind"] == "sft"

    @property
    def shards_path(self) -> Path:
        """Where `sft_data` writes this stage's masked shards (and where the launcher reads them by default)."""
        from .sft_data import SHARDS_DIRNAME

        return self.run_dir / self.model / self.stage / SHARDS_DIRNAME

    def data_lines(self) -> list[str]:
        """What the stage trains on and which tokens carry the loss, for the printed plan."""
        def where(s: dict) -> str:
            extra = f", config {s['config_name']}" if s.get("config_name") else ""
            return (f"{s['kind']} {s['path_or_id']} ({s['text_field']} column{extra}, split {s['split']}, "
                    f"weight {s['weight']:g})")

        lines = [f"  data        {'conversations (SFT)' if self.is_sft else 'pretraining mixture'}: "
                 f"{len(self.data['sources'])} source(s)"]
        lines += [f"    source    {where(s)}" for s in self.data["sources"]]
        if self.is_sft:
            lines += [
                "  mask        loss on assistant tokens only (chat.tokenize_conversation on our Qwen3 template):",
                "              labels -100 on system/user/tool tokens, assistant headers and padding",
                f"  packing     conversations packed into rows of {self.seq_len} tokens, position ids restarting "
                "per conversation; longer ones dropped and counted",
                f"  shards      {self.shards_path} (write: python -m qwen3repro.nanotron.sft_data --stage "
                f"{self.stage} --model {self.model})",
            ]
        else:
            lines.append("  mask        every token counts (documents packed with document masking)")
        return lines

    @property
    def in_report_pipeline(self) -> bool:
        who = self.facts.get("models")
        if who == "flagship":
            return self.model in FLAGSHIPS
        if who == "student":
            return self.model not in FLAGSHIPS
        return True

    def plan(self) -> RunPlan:
        d = self.settings["defaults"]
        return RunPlan(self.model, self.stage, self.layout, self.seq_len, self.micro_batch_size, self.grad_accum,
                       self.tokens, self.lr, zero_stage=1, recompute=self.recompute, gpu_memory_gib=float(d["gpu_memory_gib"]),
                       peak_tflops=float(d["peak_tflops_bf16"]), mfu=float(d["mfu"]), config=self.model_config,
                       train_steps=self.schedule.total_steps)

    # ------------------------------------------------------------------------------------ outputs
    def nanotron_dict(self) -> dict:
        mc = dataclasses.asdict(self.nanotron_model_config)
        start, end = self.schedule.decay_window
        steps = self.schedule.total_steps
        decaying = end > start and self.schedule.min_lr_ratio < 1.0
        init = {"path": str(self.parent_checkpoint)} if self.parent else {"std": get_model_config(self.model).initializer_range}
        return {
            "general": {"project": "qwen3repro-full", "run": f"{self.model}-{self.stage}", "seed": 0,
                        "ignore_sanity_checks": True},
            "parallelism": {"dp": self.layout.dp, "tp": self.layout.tp, "pp": self.layout.pp, "pp_engine": "1f1b",
                            "tp_mode": "ALL_REDUCE", "tp_linear_async_communication": False,
                            "expert_parallel_size": 1},
            "model": {"model_config": mc, "init_method": init, "dtype": "bfloat16",
                      "make_vocab_size_divisible_by": 1, "ddp_bucket_cap_mb": 25},
            "tokenizer": {"tokenizer_name_or_path": f"{_hub_id(self.model)}", "tokenizer_revision": None,
                          "tokenizer_max_length": None},
            "checkpoints": {"checkpoints_path": str(self.checkpoints_path), "checkpoint_interval": self.checkpoint_interval,
                            "save_initial_state": False, "resume_checkpoint_path": None,
                            "checkpoints_path_is_shared_file_system": True},
            "logging": {"log_level": "info", "log_level_replica": "info", "iteration_step_info_interval": 1},
            "tokens": {"sequence_length": self.seq_len, "train_steps": steps,
                       "micro_batch_size": self.micro_batch_size, "batch_accumulation_per_replica": self.grad_accum,
                       "val_check_interval": -1, "limit_val_batches": 0, "limit_test_batches": 0},
            "optimizer": {
                "zero_stage": 1, "weight_decay": float(self.train["weight_decay"]),
                "clip_grad": float(self.train["clip_grad_norm"]), "accumulate_grad_in_fp32": True,
                "adam_eps": 1e-8, "adam_beta1": float(self.train["betas"][0]),
                "adam_beta2": float(self.train["betas"][1]), "torch_adam_is_fused": True,
                "learning_rate_scheduler": {
                    "learning_rate": self.lr,
                    "lr_warmup_steps": self.schedule.warmup_steps,
                    "lr_warmup_style": "linear",
                    "lr_decay_style": self.schedule.decay_shape,
                    "lr_decay_starting_step": start if decaying else steps,
                    "lr_decay_steps": (end - start) if decaying else 0,
                    "min_decay_lr": self.lr * self.schedule.min_lr_ratio if decaying else self.lr,
                },
            },
            "data": {"dataset": None, "seed": 0, "num_loading_workers": 1},
            "profiler": None,
            "lighteval": None,
        }

    def sidecar(self) -> dict:
        return {
            "generated_by": "qwen3repro.nanotron.config_gen (do not edit; regenerate)",
            "stage": self.stage, "model": self.model, "kind": self.facts["kind"],
            "in_report_pipeline": self.in_report_pipeline,
            "recipe": self.facts.get("recipe"),
            "parent_stage": self.parent,
            "parent_checkpoint": str(self.parent_checkpoint) if self.parent else None,
            "seq_len": self.seq_len, "rope_theta": self.rope_theta, "recompute_layers": self.recompute,
            "length_mix": self.facts.get("length_mix"),
            "tokens": self.tokens, "lr": self.lr,
            "schedule": dataclasses.asdict(self.schedule),
            "layout": {**dataclasses.asdict(self.layout), "dp": self.layout.dp, "world": self.layout.world},
            "data": self.data,
            # What `launch.py --data` must be: masked conversation shards for the SFT stages (checked there).
            "shards": ({"format": "sft-masked", "path": str(self.shards_path),
                        "loss": "assistant tokens only (labels -100 elsewhere)"} if self.is_sft
                       else {"format": "tokens", "path": None, "loss": "every token"}),
        }


def checkpoint_interval(steps: int) -> int:
    return min(CHECKPOINT_EVERY, steps)


def _hub_id(model: str) -> str:
    from ..models.registry import HUB_IDS

    return HUB_IDS[model]


def load_settings(root: Path | None = None) -> dict:
    fd = full_dir(root)
    models, stages = load_toml(fd / "models.toml"), load_toml(fd / "stages.toml")
    missing = sorted(set(REAL_MODELS) - set(models.get("models", {})))
    if missing:
        raise ConfigError(f"full/models.toml has no entry for {', '.join(missing)}")
    return {"defaults": models["defaults"], "models": models["models"], **stages}


def scaling_law(settings: dict, model: str, seq_len: int, tokens: int) -> tuple[float, int]:
    """(peak LR, batch size in tokens) from [scaling_law] at C = FLOPs per token × tokens."""
    law = settings["scaling_law"]
    flops_per_token = train_step_flops(get_model_config(model), 1, seq_len) / seq_len
    c = flops_per_token * tokens
    return law["lr_coef"] * c ** law["lr_exp"], int(law["batch_coef"] * c ** law["batch_exp"])


def data_sources(stage: str, settings: dict) -> dict:
    """The stage's sources as validated `SourceSpec` dicts, with category weights for pretraining stages."""
    from ..data.mixture import STAGE_CATEGORY_WEIGHTS, SourceSpec, stage_mixture

    table = settings.get("data", {}).get(stage)
    if not table:
        raise ConfigError(f"full/stages.toml has no [data.{stage}] table")
    if "sources" in table:
        specs = [SourceSpec(**s) for s in table["sources"]]
        return {"sources": [dataclasses.asdict(s) for s in specs], "category_weights": None}
    by_cat = {cat: [SourceSpec(**s) for s in srcs] for cat, srcs in table.items()}
    mixture = stage_mixture(stage, by_cat)
    return {"sources": [dataclasses.asdict(s) for s in mixture.sources],
            "category_weights": dict(STAGE_CATEGORY_WEIGHTS[stage])}


def build_stage_spec(stage: str, model: str, nodes: int | None = None, gpus_per_node: int | None = None,
                     root: Path | None = None, run_dir: Path | None = None) -> StageSpec:
    check_names(stage, model)
    root = root or repo_root()
    settings = load_settings(root)
    facts = stage_facts(stage, root)
    size = settings["stages"][stage]
    preset = settings["models"][model]
    seq_len = int(size["seq_len"])
    long = seq_len > 4096
    gpn = int(gpus_per_node or settings["defaults"]["gpus_per_node"])
    tp = int(preset["long_tp"] if long else preset["tp"])
    pp = int(preset["long_pp"] if long else preset["pp"])
    recompute = bool(preset.get("long_recompute" if long else "recompute", False))
    if nodes is None:
        nodes = int(preset.get("nodes", max(1, math.ceil(tp * pp / gpn))))
    layout = Layout(int(nodes), gpn, tp, pp)
    problems = layout.check()
    if problems:
        raise ConfigError(f"{model} {stage}: " + "; ".join(problems))
    tokens = int(size["tokens"])
    if facts["kind"] == "pretrain":
        src = settings["stages"][facts.get("lr_from") or stage]
        lr, batch_tokens = scaling_law(settings, model, int(src["seq_len"]), int(src["tokens"]))
    else:
        lr, batch_tokens = float(size["lr"]), int(size["batch_tokens"])
    mbs = 1 if long else int(preset["micro_batch_size"])
    seqs = max(1, round(batch_tokens / seq_len))
    grad_accum = max(1, math.ceil(seqs / (mbs * layout.dp)))
    steps = max(1, math.ceil(tokens / (grad_accum * mbs * layout.dp * seq_len)))
    every = checkpoint_interval(steps)
    steps = math.ceil(steps / every) * every
    parent_steps = None
    if facts["parent"] is not None:
        parent_steps = build_stage_spec(facts["parent"], model, nodes=nodes, gpus_per_node=gpus_per_node,
                                        root=root, run_dir=run_dir).schedule.total_steps
    train = {**TRAIN_DEFAULTS, **facts["train"]}
    if train.get("decay_shape") not in ("linear", "cosine"):
        raise ConfigError(f"{stage}: decay_shape {train.get('decay_shape')!r} is not available in nanotron 0.4 "
                          "(linear or cosine)")
    schedule = WSDSchedule(
        base_lr=lr, total_steps=steps, warmup_steps=min(int(size.get("warmup_steps", 0)), steps - 1),
        decay_fraction=float(train.get("decay_fraction", 0.2)), decay_start=train.get("decay_start"),
        decay_end=train.get("decay_end"), min_lr_ratio=float(train.get("min_lr_ratio", 0.1)),
        decay_shape=train["decay_shape"],
    )
    return StageSpec(
        stage=stage, model=model, layout=layout, seq_len=seq_len, rope_theta=float(facts["rope_theta"]),
        tokens=tokens, lr=float(lr), micro_batch_size=mbs, grad_accum=grad_accum, schedule=schedule, train=train,
        data=data_sources(stage, settings), parent=facts["parent"], run_dir=Path(run_dir or Path("runs") / "full"),
        facts=facts, settings=settings, recompute=recompute, parent_steps=parent_steps,
    )


def validate(spec: StageSpec) -> list[str]:
    """Our own checks on a spec (empty list = fine)."""
    from .model import check_tp

    problems = list(spec.layout.check())
    mc = spec.model_config
    try:
        check_tp(mc, spec.layout.tp)
    except ValueError as e:
        problems.append(str(e))
    if mc.num_key_value_heads < spec.layout.tp:
        problems.append(f"KV heads {mc.num_key_value_heads} < tp {spec.layout.tp} (replication not implemented)")
    if spec.layout.pp > mc.num_hidden_layers:
        problems.append(f"pp {spec.layout.pp} > {mc.num_hidden_layers} layers")
    want_len = int(spec.settings["stages"][spec.stage]["seq_len"])
    if spec.seq_len != want_len:
        problems.append(f"sequence length {spec.seq_len} != {want_len}")
    if spec.rope_theta != float(stage_facts(spec.stage)["rope_theta"]):
        problems.append(f"RoPE base {spec.rope_theta} differs from the stage's")
    return problems


def write_stage_config(spec: StageSpec, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write `<stage>.yaml` (nanotron) and `<stage>.qwen3repro.json` (ours); return both paths."""
    import yaml

    out_dir = Path(out_dir or spec.run_dir / spec.model / spec.stage)
    out_dir.mkdir(parents=True, exist_ok=True)
    yaml_path, side_path = out_dir / f"{spec.stage}.yaml", out_dir / f"{spec.stage}.qwen3repro.json"
    header = (f"# Generated by qwen3repro.nanotron.config_gen for {spec.model}, stage {spec.stage}. Do not edit:\n"
              f"# change recipes/, full/*.toml or config_gen.py and regenerate (make full ... DRY_RUN=1).\n")
    yaml_path.write_text(header + yaml.safe_dump(spec.nanotron_dict(), sort_keys=False))
    side_path.write_text(json.dumps(spec.sidecar(), indent=2) + "\n")
    return yaml_path, side_path


def load_with_nanotron(yaml_path: Path):
    """Load a generated YAML through nanotron's own loader with our model-config class."""
    from .compat import import_nanotron

    import_nanotron()
    from nanotron.config import get_config_from_file

    from .model import Qwen3NTConfig

    return get_config_from_file(str(yaml_path), model_config_class=Qwen3NTConfig)


def generate_all(out_root: Path, nodes: Mapping[str, int] | None = None) -> list[Path]:
    """Every stage × real model (at each model's default `nodes`, or `nodes[model]`), into out_root/<model>/<stage>/."""
    paths = []
    settings = load_settings()
    for model in REAL_MODELS:
        for stage in STAGES:
            n = (nodes or {}).get(model) or int(settings["models"][model]["nodes"])
            spec = build_stage_spec(stage, model, nodes=n, run_dir=out_root)
            paths.append(write_stage_config(spec)[0])
    return paths


__all__ = [
    "STAGES", "STAGE_FACTS", "StageSpec", "build_stage_spec", "write_stage_config", "validate", "check_names",
    "load_with_nanotron", "generate_all", "stage_facts", "scaling_law", "load_settings",
]
