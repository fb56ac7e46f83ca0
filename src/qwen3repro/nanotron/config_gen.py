"""Generate one nanotron 0.4 YAML per (stage, real model) from the stage's recipe and the model's full/ settings.

    spec = build_stage_spec("s2", "qwen3-0.6b", nodes=4, gpus_per_node=8)
    paths = write_stage_config(spec, out_dir)     # <stage>.yaml (nanotron) + <stage>.qwen3repro.json (ours)

Where each value comes from:

* the stage itself: its recipe (`recipes/<stage>.toml`, through `recipes.StageGraph` and `resolve_stage`): kind,
  parent (the nearest ancestor this scale trains), roles, sequence-length policy (S2 = S1's length, S3 = 8x),
  RoPE base (ABF: 1e4 in S1/S2, 1e6 from S3 on, inherited along the chain), schedule shape and the other
  scale-free optimisation settings (every field of its train table but the sizes), document masking, length mix
  and data category weights — the same files the tiny scale reads;
* model shape: `models.registry.REAL_MODELS` (via `Qwen3NTConfig.from_model_config`), with the stage's RoPE base
  and `max_position_embeddings` = the stage's sequence length;
* layout: `full/models.toml` (tp, pp; long_tp/long_pp at 32k; each model's role, flagship or student) and the
  command line (nodes, GPUs per node); dp = world / (tp·pp);
* sizes: `full/stages.toml` (the stages this scale trains; S1's and the SFT stages' sequence length, tokens,
  warmup; LR and batch for the SFT stages);
* LR and batch size of S1–S3: the scaling law in `full/stages.toml` ([scaling_law]) evaluated at the compute
  C = FLOPs per token × tokens of the stage, or of the parent a stage continues (S2 decays from S1's LR);
* the schedule: `train.TrainConfig.schedule()` (warmup–stable–decay, `train.schedule.WSDSchedule`), mapped to
  nanotron 0.4's `lr_warmup_steps` / `lr_decay_starting_step` / `lr_decay_steps` / `min_decay_lr` (0.4 knows
  linear and cosine decay, not 1-sqrt);
* chaining: each stage starts from its parent's latest checkpoint (`model.init_method.path`: weights only, fresh
  optimizer and schedule, as SmolLM3's long-context runs did), read from the `latest.txt` nanotron writes in the
  parent's `checkpoints/` when the config is generated (at every launch), never from a step number computed
  from today's layout; or from a released model converted by `convert.init_from_hf` (`init=`). A restart of the
  same stage resumes from its own `checkpoints_path`: `checkpoints.resume_checkpoint_path` is that folder, and
  nanotron resumes from its `latest.txt` (weights, optimizer, LR schedule, step and consumed samples; the
  launcher moves our loader past the consumed samples) or starts fresh when there is none;
* continued pretraining (S2, S3): the peak LR and batch size are those of the run it continues (S1's
  scaling-law point), not a from-scratch law at the stage's own compute, which would re-warm S3 above S1's
  peak. S2 decays from that LR at once (its recipe); S3 re-warms to it and decays again, the re-warm/re-decay
  rule for continued pretraining of Ibrahim et al. 2024 ("Simple and Scalable Strategies to Continually
  Pre-train Large Language Models", arXiv 2403.08763, §5); the tiny scale's S3 runs at S1's peak LR too;
* weight decay: on matrices only, none on norms and embeddings, as the tiny trainer (`train.loop`), through
  `optimizer.weight_decay_groups` in the launcher;
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
from ..data.mixture import SourceSpec, stage_mixture
from ..models.registry import HUB_IDS, REAL_MODELS, get_model_config
from ..perf import train_step_flops
from ..recipes import StageGraph, load_recipe, load_stage_graph, load_toml, repo_root, rope_base, split_recipe
from ..train.loop import TrainConfig
from ..train.schedule import WSDSchedule
from .compat import import_nanotron
from .plan import Layout, RunPlan

# ===================================================================================== STAGES
# The stages the full scale trains are those `full/stages.toml` sizes; everything else about a stage comes from
# its recipe (`recipes.StageGraph`): kind, parent, roles, sequence-length policy, RoPE base, schedule shape,
# length mix, document masking, data category weights. A stage whose parent is not trained here (reasoning RL
# is not nanotron's) starts from its nearest ancestor that is.

# How nanotron trains each kind of stage: packed documents, or masked conversations with the loss on assistant
# tokens only. The cold start and fusion build their conversations at tiny scale and read them from real
# datasets here; both train like an SFT stage.
NANOTRON_KINDS = {"pretrain": "pretrain", "sft": "sft", "coldstart": "sft", "fusion": "sft", "distill": "sft"}
# Where each kind keeps its optimisation settings in its recipe: a stage that builds its data first trains with
# the SFT stage's settings, in its `[sft]` table.
TRAIN_TABLE = {"pretrain": ("train",), "sft": ("train",), "coldstart": ("sft", "train"), "fusion": ("sft", "train"),
               "distill": ("sft", "train")}
# TrainConfig fields that are sizes or bookkeeping: the full scale sets these itself (full/stages.toml, the
# layout, nanotron's checkpointing); every other field of a recipe's train table is read.
SHARDS_DIRNAME = "sft-shards"  # a SFT stage's masked conversation shards, in its run folder
TOKEN_SHARDS_DIRNAME = "token-shards"  # a pretraining stage's packed rows (`pretrain_data`), in its run folder
SCALE_TRAIN_FIELDS = frozenset({"steps", "lr", "warmup_steps", "grad_accum", "ckpt_every", "keep_last", "log_every",
                                "seed", "device", "precision"})
CHECKPOINT_EVERY = 500  # steps; a stage's step count is rounded up to a multiple, so its last step is saved
# ================================================================================================


@dataclass(frozen=True)
class FullStage:
    """One stage as the full scale trains it: its recipe's facts, resolved against the stages it sizes."""

    name: str
    kind: str
    """How nanotron trains it: 'pretrain' or 'sft' (`NANOTRON_KINDS` of the recipe's kind)."""
    recipe_kind: str
    parent: str | None
    """The nearest ancestor this scale trains (None: random initialisation)."""
    roles: tuple[str, ...]
    seq_len: int
    rope_theta: float
    lr_from: str
    """The stage whose scaling-law point gives the peak LR and batch size: itself, or for continued pretraining the
    first stage of the run it continues (S1)."""
    train: dict[str, Any]
    """The recipe's scale-free optimisation settings (schedule shape, weight decay, betas, clipping)."""
    document_masking: bool
    length_mix: tuple[tuple[float, float, float], ...] | None
    category_weights: dict[str, float] | None
    recipe: dict[str, Any]
    """The whole resolved recipe, recorded in the sidecar."""

    def length_mix_tokens(self) -> list[dict[str, Any]] | None:
        """The length mix in tokens at this stage's length: [{"tokens": [lo, hi], "share": s}, ...]."""
        if not self.length_mix:
            return None
        return [{"tokens": [int(lo * self.seq_len), int(hi * self.seq_len)], "share": share}
                for lo, hi, share in self.length_mix]


def full_dir(root: Path | None = None) -> Path:
    return (root or repo_root()) / "full"


def full_stages(settings: Mapping[str, Any]) -> tuple[str, ...]:
    """The stages `full/stages.toml` sizes, in its order."""
    return tuple(settings.get("stages", {}))


def check_names(stage: str, model: str, settings: Mapping[str, Any]) -> None:
    """A wrong stage or model name is an error listing the valid ones."""
    if stage not in full_stages(settings):
        raise ConfigError(f"unknown stage {stage!r}; valid stages: {', '.join(full_stages(settings))}")
    if model not in REAL_MODELS:
        raise ConfigError(f"unknown model {model!r}; valid models: {', '.join(REAL_MODELS)}")


def resolve_stage(stage: str, settings: Mapping[str, Any], graph: StageGraph, root: Path | None = None) -> FullStage:
    """`stage`'s recipe facts as the full scale trains them."""
    facts = graph[stage]
    if facts.kind not in NANOTRON_KINDS:
        raise ConfigError(f"stage {stage!r} (kind {facts.kind!r}) is not trained through nanotron; kinds it trains: "
                          f"{', '.join(NANOTRON_KINDS)}")
    sized = set(full_stages(settings))
    size = settings["stages"][stage]
    _, recipe = split_recipe(load_recipe(stage, root))
    if facts.seq_len_factor is None:
        if "seq_len" not in size:
            raise ConfigError(f"full/stages.toml [stages.{stage}]: seq_len is required")
        seq_len = int(size["seq_len"])
    else:
        if "seq_len" in size:
            raise ConfigError(f"full/stages.toml [stages.{stage}]: seq_len comes from the parent stage "
                              f"(recipes/{stage}.toml: {facts.seq_len_factor}x); remove it")
        if facts.parent not in sized:
            raise ConfigError(f"{stage}: its length derives from {facts.parent!r}, which full/stages.toml does not size")
        seq_len = resolve_stage(facts.parent, settings, graph, root).seq_len * facts.seq_len_factor
    lr_from = stage
    while graph[lr_from].parent is not None and graph[graph[lr_from].parent].kind == "pretrain":
        lr_from = graph[lr_from].parent  # continued pretraining: the run it continues sets LR and batch (module doc)
    table: Any = recipe
    for key in TRAIN_TABLE[facts.kind]:
        table = table.get(key, {})
    train = {k: v for k, v in table.items() if k not in SCALE_TRAIN_FIELDS}
    TrainConfig.from_dict({**train, "steps": 1})  # the same strict check as the tiny stages
    mix = recipe.get("length_mix")
    return FullStage(
        name=stage, kind=NANOTRON_KINDS[facts.kind], recipe_kind=facts.kind, parent=graph.nearest(stage, sized),
        roles=facts.roles, seq_len=seq_len, rope_theta=rope_base(stage, graph, root), lr_from=lr_from, train=train,
        document_masking=bool(recipe.get("document_masking", NANOTRON_KINDS[facts.kind] == "sft")),
        length_mix=tuple(tuple(float(x) for x in row) for row in mix) if mix else None,
        category_weights=dict(recipe["category_weights"]) if recipe.get("category_weights") else None,
        recipe=recipe,
    )


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
    facts: FullStage
    settings: dict
    recompute: bool = False
    init: Path | None = None
    """A converted released checkpoint (`convert.init_from_hf`) to start from instead of the parent stage."""

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

    @property
    def checkpoint_interval(self) -> int:
        return checkpoint_interval(self.schedule.total_steps)

    @property
    def parent_checkpoints_path(self) -> Path | None:
        return None if self.parent is None else self.run_dir / self.model / self.parent / "checkpoints"

    @property
    def parent_checkpoint(self) -> Path | None:
        """The checkpoint this stage starts from: the converted released model (`init`), else the parent stage's
        latest checkpoint (its `latest.txt`; None while the parent has none), else None (random init)."""
        if self.init is not None:
            return self.init
        if self.parent is None:
            return None
        return latest_checkpoint(self.parent_checkpoints_path)

    @property
    def starts_from(self) -> str:
        """One line for the plan: where the weights come from."""
        if self.init is not None:
            return f"starts from {self.init} (a Hugging Face checkpoint, converted)"
        if self.parent is None:
            return "starts from random init"
        ckpt = self.parent_checkpoint
        if ckpt is None:
            return (f"starts from {self.parent}'s latest checkpoint: none yet in {self.parent_checkpoints_path} "
                    f"(train {self.parent} first, or start from a released model with INIT=)")
        return f"starts from {ckpt} ({self.parent}'s latest checkpoint)"

    @property
    def lr_rule(self) -> str:
        """Where the peak LR comes from, for the plan and the sidecar (module doc)."""
        facts = self.facts
        if facts.kind != "pretrain":
            return "full/stages.toml"
        if facts.lr_from == self.stage:
            return "[scaling_law] at this stage's compute"
        how = "decays from it" if self.schedule.warmup_steps == 0 else "re-warms to it and decays again"
        return (f"{facts.lr_from}'s peak ([scaling_law] at {facts.lr_from}'s compute): continued pretraining {how} "
                "(Ibrahim et al. 2024, arXiv 2403.08763)")

    @property
    def tokenizer(self) -> str:
        """The released model's tokenizer (its hub id): what the data jobs tokenise with and conversions ship."""
        return HUB_IDS[self.model]

    @property
    def is_sft(self) -> bool:
        """Cold start, fusion and off-policy distillation: conversations, loss on assistant tokens only."""
        return self.facts.kind == "sft"

    @property
    def shards_path(self) -> Path:
        """Where this stage's data job writes its shards, and where the launcher reads them by default: masked
        conversations (`sft_data`) for the SFT stages, packed token rows (`pretrain_data`) otherwise."""
        return self.run_dir / self.model / self.stage / (SHARDS_DIRNAME if self.is_sft else TOKEN_SHARDS_DIRNAME)

    @property
    def data_job(self) -> str:
        """The command that writes this stage's shards."""
        module = "sft_data" if self.is_sft else "pretrain_data"
        return f"python -m qwen3repro.nanotron.{module} --stage {self.stage} --model {self.model}"

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
            masking = "with" if self.facts.document_masking else "without"
            lines.append(f"  mask        every token counts (documents packed {masking} document masking)")
            if self.facts.length_mix:
                mix = ", ".join(f"{r['share']:.0%} in {r['tokens'][0]:,}-{r['tokens'][1]:,}"
                                for r in self.facts.length_mix_tokens())
                lines.append(f"  length mix  documents cut to the recipe's mix: {mix} tokens (pretrain_data)")
            lines.append(f"  shards      {self.shards_path} (write: {self.data_job} [--worker-index i --num-workers n])")
        return lines

    @property
    def role(self) -> str:
        """The model's role in the report's pipeline (full/models.toml): 'flagship' or 'student'."""
        return str(self.settings["models"][self.model]["role"])

    @property
    def in_report_pipeline(self) -> bool:
        """Whether the report trains this model through this stage (the recipe's roles)."""
        return self.role in self.facts.roles

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
        if self.init is None and self.parent is None:
            init = {"std": get_model_config(self.model).initializer_range}
        else:  # until the parent has a checkpoint, its folder: launching refuses first (`missing_parent`)
            init = {"path": str(self.parent_checkpoint or self.parent_checkpoints_path)}
        return {
            "general": {"project": "qwen3repro-full", "run": f"{self.model}-{self.stage}", "seed": 0,
                        "ignore_sanity_checks": True},
            "parallelism": {"dp": self.layout.dp, "tp": self.layout.tp, "pp": self.layout.pp, "pp_engine": "1f1b",
                            "tp_mode": "ALL_REDUCE", "tp_linear_async_communication": False,
                            "expert_parallel_size": 1},
            "model": {"model_config": mc, "init_method": init, "dtype": "bfloat16",
                      "make_vocab_size_divisible_by": 1, "ddp_bucket_cap_mb": 25},
            "tokenizer": {"tokenizer_name_or_path": self.tokenizer, "tokenizer_revision": None,
                          "tokenizer_max_length": None},
            "checkpoints": {"checkpoints_path": str(self.checkpoints_path), "checkpoint_interval": self.checkpoint_interval,
                            "save_initial_state": False,
                            # nanotron resumes from this folder's latest.txt, or starts fresh without one
                            "resume_checkpoint_path": str(self.checkpoints_path),
                            "checkpoints_path_is_shared_file_system": True},
            "logging": {"log_level": "info", "log_level_replica": "info", "iteration_step_info_interval": 1},
            "tokens": {"sequence_length": self.seq_len, "train_steps": steps,
                       "micro_batch_size": self.micro_batch_size, "batch_accumulation_per_replica": self.grad_accum,
                       "val_check_interval": -1, "limit_val_batches": 0, "limit_test_batches": 0},
            "optimizer": {
                "zero_stage": 1, "weight_decay": float(self.train["weight_decay"]),
                "clip_grad": float(self.train["clip_grad_norm"]), "accumulate_grad_in_fp32": True,
                "adam_eps": float(self.train["eps"]), "adam_beta1": float(self.train["betas"][0]),
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
            "stage": self.stage, "model": self.model, "kind": self.facts.kind, "recipe_kind": self.facts.recipe_kind,
            "role": self.role, "in_report_pipeline": self.in_report_pipeline,
            "recipe_file": f"recipes/{self.stage}.toml", "recipe": self.facts.recipe,
            "parent_stage": self.parent,
            "parent_checkpoint": str(self.parent_checkpoint) if self.parent_checkpoint else None,
            "init_from_release": str(self.init) if self.init else None,
            "seq_len": self.seq_len, "rope_theta": self.rope_theta, "recompute_layers": self.recompute,
            "lr_rule": self.lr_rule,
            # the launcher's optimizer groups (`optimizer.weight_decay_groups`): no decay on norms and embeddings
            "decay_embeddings": bool(self.train.get("decay_embeddings", False)),
            "document_masking": self.facts.document_masking,
            "length_mix": self.facts.length_mix_tokens(),
            "tokens": self.tokens, "lr": self.lr,
            "schedule": dataclasses.asdict(self.schedule),
            "layout": {**dataclasses.asdict(self.layout), "dp": self.layout.dp, "world": self.layout.world},
            "data": self.data,
            # What `launch.py --data` must be: masked conversation shards for the SFT stages (checked there).
            "shards": ({"format": "sft-masked", "path": str(self.shards_path),
                        "loss": "assistant tokens only (labels -100 elsewhere)"} if self.is_sft
                       else {"format": "packed-tokens", "path": str(self.shards_path), "loss": "every token"}),
        }


def checkpoint_interval(steps: int) -> int:
    return min(CHECKPOINT_EVERY, steps)


def latest_checkpoint(checkpoints_path: Path | None) -> Path | None:
    """`<checkpoints_path>/<step>` named by the `latest.txt` nanotron's trainer writes after each save, or None
    when the folder has none. A `latest.txt` naming a missing folder is an error (a checkpoint was removed)."""
    if checkpoints_path is None:
        return None
    latest = Path(checkpoints_path) / "latest.txt"
    if not latest.is_file():
        return None
    text = latest.read_text().strip()
    if not text.isdigit():
        raise ConfigError(f"{latest} should hold a step number, found {text!r}")
    ckpt = Path(checkpoints_path) / text
    if not ckpt.is_dir():
        raise ConfigError(f"{latest} names step {text}, but {ckpt} does not exist")
    return ckpt


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


def data_sources(facts: FullStage, settings: dict) -> dict:
    """The stage's sources as validated `SourceSpec` dicts; a pretraining stage's categories are weighted by its
    recipe's `category_weights`."""
    table = settings.get("data", {}).get(facts.name)
    if not table:
        raise ConfigError(f"full/stages.toml has no [data.{facts.name}] table")
    if "sources" in table:
        specs = [SourceSpec(**s) for s in table["sources"]]
        return {"sources": [dataclasses.asdict(s) for s in specs], "category_weights": None}
    if not facts.category_weights:
        raise ConfigError(f"full/stages.toml [data.{facts.name}] lists categories, but recipes/{facts.name}.toml "
                          "has no category_weights")
    by_cat = {cat: [SourceSpec(**s) for s in srcs] for cat, srcs in table.items()}
    mixture = stage_mixture(facts.name, by_cat, category_weights=facts.category_weights)
    return {"sources": [dataclasses.asdict(s) for s in mixture.sources], "category_weights": facts.category_weights}


def build_stage_spec(stage: str, model: str, nodes: int | None = None, gpus_per_node: int | None = None,
                     root: Path | None = None, run_dir: Path | None = None, init: Path | str | None = None) -> StageSpec:
    root = root or repo_root()
    settings = load_settings(root)
    check_names(stage, model, settings)
    facts = resolve_stage(stage, settings, load_stage_graph(root), root)
    size = settings["stages"][stage]
    preset = settings["models"][model]
    seq_len = facts.seq_len
    long = seq_len > int(settings["defaults"]["long_layout_above"])
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
    if facts.kind == "pretrain":
        source = resolve_stage(facts.lr_from, settings, load_stage_graph(root), root)
        lr, batch_tokens = scaling_law(settings, model, source.seq_len, int(settings["stages"][facts.lr_from]["tokens"]))
    else:
        lr, batch_tokens = float(size["lr"]), int(size["batch_tokens"])
    mbs = 1 if long else int(preset["micro_batch_size"])
    seqs = max(1, round(batch_tokens / seq_len))
    grad_accum = max(1, math.ceil(seqs / (mbs * layout.dp)))
    steps = max(1, math.ceil(tokens / (grad_accum * mbs * layout.dp * seq_len)))
    every = checkpoint_interval(steps)
    steps = math.ceil(steps / every) * every
    train = TrainConfig.from_dict({**facts.train, "steps": steps, "lr": lr,
                                   "warmup_steps": min(int(size.get("warmup_steps", 0)), steps - 1)})
    if train.decay_shape not in ("linear", "cosine"):
        raise ConfigError(f"{stage}: decay_shape {train.decay_shape!r} is not available in nanotron 0.4 "
                          "(linear or cosine)")
    return StageSpec(
        stage=stage, model=model, layout=layout, seq_len=seq_len, rope_theta=facts.rope_theta,
        tokens=tokens, lr=float(lr), micro_batch_size=mbs, grad_accum=grad_accum, schedule=train.schedule(),
        train=train.to_dict(), data=data_sources(facts, settings), parent=facts.parent,
        run_dir=Path(run_dir or Path("runs") / "full"), facts=facts, settings=settings, recompute=recompute,
        init=Path(init) if init else None,
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
    import_nanotron()
    from nanotron.config import get_config_from_file

    from .model import Qwen3NTConfig

    return get_config_from_file(str(yaml_path), model_config_class=Qwen3NTConfig)


def generate_all(out_root: Path, nodes: Mapping[str, int] | None = None) -> list[Path]:
    """Every stage × real model (at each model's default `nodes`, or `nodes[model]`), into out_root/<model>/<stage>/."""
    paths = []
    settings = load_settings()
    for model in REAL_MODELS:
        for stage in full_stages(settings):
            n = (nodes or {}).get(model) or int(settings["models"][model]["nodes"])
            spec = build_stage_spec(stage, model, nodes=n, run_dir=out_root)
            paths.append(write_stage_config(spec)[0])
    return paths


__all__ = [
    "FullStage", "StageSpec", "build_stage_spec", "check_names", "full_stages", "generate_all", "latest_checkpoint",
    "load_settings",
    "load_with_nanotron", "resolve_stage", "scaling_law", "validate", "write_stage_config",
]
