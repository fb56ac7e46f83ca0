"""The one training loop of every supervised stage (pretraining S1-S3, SFT), and the run state it
shares with reinforcement learning (`TrainingRun`: GRPO steps through the same optimizer, schedule,
checkpoints, resume, metrics and progress line).

    summary = train(model, loader, loss_fn, cfg, out_dir, resume="auto")

What a step does (`cfg.grad_accum` micro-batches per optimizer step):

    lr = schedule(step)                                       # pure function of the step (schedule.py)
    prepare_step(model, [batch_1, ..., batch_k])              # only when given (below)
    for each micro-batch i:  loss_i, metrics_i = loss_fn(model, batch_i)      # under autocast if bf16
                             (w_i · loss_i).backward()        # w_i = metrics_i["num_tokens"] or 1
    grads /= Σ w_i                                            # token-weighted mean over the step
    grad_norm = clip(grads, cfg.clip_grad_norm)               # norm measured before clipping
    AdamW step

loss_fn contract. `loss_fn(model, batch) -> (loss, metrics)`: `loss` is a finite 0-d tensor, the
*mean* of the per-token (or per-sample) loss over this micro-batch; `metrics` is a dict of numbers
or 0-d tensors. If `metrics["num_tokens"]` is present it is the number of units `loss` averages
over, and micro-batches are weighted by it, so the optimised objective is the mean over every
token of the optimizer step, whatever the split into micro-batches (2×4 equals 1×8 even with
unequal padding). Without it every micro-batch has weight 1 (mean of micro-batch means). Logged
values: `loss` is that weighted mean; other metrics are weighted means too, except `num_tokens`,
which is summed. Report `num_tokens` for every micro-batch or for none (mixing is an error).

Step preparation. A loss that depends on the whole optimizer step (the MoE load-balancing loss of
global scope needs the step's expert selection counts before the first backward) passes
`prepare_step(model, micro_batches)`: the loop then draws the step's `grad_accum` micro-batches first
(moved to the device), calls it once under the same autocast, and feeds the same batches to
`loss_fn`. Without it the loop draws each micro-batch just before its forward.

Loader contract. `loader` is re-iterable: `iter(loader)` yields batches (anything `loss_fn` takes;
tensors in dicts/lists/tuples are moved to the device) and ends at the end of an epoch, after which
the loop calls `iter(loader)` again. If it has `state_dict()`/`load_state_dict()` (e.g.
`PackingLoader`), its cursor is checkpointed (JSON) and restored; otherwise the loop records how many
batches it consumed and, on resume, skips that many (exact for any loader whose order is a function of
its seed).

Weight decay (decoupled, AdamW): applied to matrices of linear layers (and an untied LM head);
not applied to biases, norm weights (any parameter with < 2 dims) nor embedding tables
(`nn.Embedding`, hence also a tied LM head), following OLMo 2, which dropped embedding decay for
stability; `decay_embeddings=True` decays them as well.

Determinism. On CPU in fp32 a run cut at any step and resumed with `resume="auto"` reproduces the
losses of the uninterrupted run bit for bit: model, optimizer, schedule step, loader cursor and
every RNG (torch CPU/CUDA, Python, numpy) are restored; evaluation runs with forked RNG state.

Failure. A non-finite loss or gradient norm raises `TrainingDivergedError` before the optimizer
step, and no checkpoint is written over the last good one. Resuming with a different model or
run-defining train config raises `ConfigMismatchError` naming the fields.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.autograd.graph import increment_version

from ..config import ConfigError, config_hash
from ..config_fields import NonNegative, Positive, TableOf, checked_fields
from ..losses import masked_cross_entropy
from ..progress import Progress
from . import checkpoint as ckpt
from .metrics import MetricsLog, default_printer
from .schedule import DECAY_SHAPES, WSDSchedule

PRECISIONS = ("fp32", "bf16")
# Fields that do not change what the run computes: they may differ when resuming.
NON_IDENTITY_FIELDS = frozenset({"ckpt_every", "keep_last", "log_every", "device"})


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm became NaN/Inf."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one training run (a stage's recipe fills these)."""

    steps: Positive
    """Number of optimizer steps."""
    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    decay_embeddings: bool = False
    """Apply weight decay to embedding tables too (default: no)."""
    warmup_steps: NonNegative = 0
    decay_shape: str = "linear"
    """'linear' | 'cosine' | '1-sqrt'."""
    decay_fraction: float = 0.2
    """Length of the decay phase as a fraction of `steps` (used when decay_start is None)."""
    decay_start: NonNegative | None = None
    """Step at which the decay begins (overrides decay_fraction). S2's accelerated decay starts early."""
    decay_end: NonNegative | None = None
    """Step at which the minimum is reached and then held (default: steps)."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of `lr`."""
    grad_accum: Positive = 1
    """Micro-batches per optimizer step."""
    clip_grad_norm: float | None = 1.0
    """Max global gradient norm (None or 0: no clipping; the norm is still measured and logged)."""
    precision: str = "fp32"
    """'fp32', or 'bf16' (autocast to bfloat16 where the device supports it; weights and optimizer stay fp32)."""
    ckpt_every: NonNegative = 0
    """Save a step checkpoint every N steps (0: only at the end)."""
    keep_last: NonNegative = 2
    """Step checkpoints kept under <out>/checkpoints (0: keep all)."""
    log_every: Positive = 10
    """Print the progress line and append to metrics.jsonl every N steps (and at the last step)."""
    seed: NonNegative = 0
    """Seeds torch, Python `random` and numpy at the start of a fresh run."""
    device: str = "cpu"
    """'cpu', 'cuda', 'cuda:N', or 'auto' (CUDA when available)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

        def pos_int(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                raise ConfigError(f"TrainConfig.{name} must be an integer {'>= 0' if allow_zero else '>= 1'}, got {v!r}")

        pos_int("steps")
        pos_int("grad_accum")
        pos_int("log_every")
        pos_int("warmup_steps", allow_zero=True)
        pos_int("ckpt_every", allow_zero=True)
        pos_int("keep_last", allow_zero=True)
        pos_int("seed", allow_zero=True)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        for name in ("lr", "weight_decay", "eps"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"TrainConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.clip_grad_norm is not None and (not math.isfinite(self.clip_grad_norm) or self.clip_grad_norm < 0):
            raise ConfigError(f"TrainConfig.clip_grad_norm must be None or >= 0, got {self.clip_grad_norm!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ConfigError(f"TrainConfig.decay_shape must be one of {DECAY_SHAPES}, got {self.decay_shape!r}")
        if not (self.device in ("cpu", "cuda", "auto", "mps") or self.device.startswith("cuda:")):
            raise ConfigError(f"TrainConfig.device must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto', got {self.device!r}")
        self.schedule()  # validates the schedule fields

    # ------------------------------------------------------------------ helpers
    def schedule(self) -> WSDSchedule:
        return WSDSchedule(
            base_lr=float(self.lr),
            total_steps=self.steps,
            warmup_steps=self.warmup_steps,
            decay_fraction=self.decay_fraction,
            decay_start=self.decay_start,
            decay_end=self.decay_end,
            min_lr_ratio=self.min_lr_ratio,
            decay_shape=self.decay_shape,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "TrainConfig") -> "TrainConfig":
        """Strict: an unknown key or a value of the wrong type is a ConfigError naming it (`where.key`)."""
        return cls(**checked_fields(cls, d, where))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def identity(self) -> dict[str, Any]:
        """The fields that define the run (everything but logging/checkpoint cadence and device)."""
        return {k: v for k, v in self.to_dict().items() if k not in NON_IDENTITY_FIELDS}


TrainTable = Annotated[Mapping[str, Any], TableOf(TrainConfig, supplied=("steps",))]
"""The annotation of a stage's `train` table: TrainConfig's fields, checked when the stage's settings are
read; the stage derives `steps` itself."""


# ----------------------------------------------------------------------------- pieces
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"TrainConfig.device={name!r} but CUDA is not available")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision actually used: bf16 falls back to fp32 (with a note) where autocast can't do it."""
    if precision != "bf16":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.amp.autocast_mode.is_autocast_available(device.type) else "fp32"


def autocast_context(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def parameter_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict[str, Any]]:
    """AdamW groups: [decayed matrices, non-decayed (biases, norms, embeddings)] (empty groups dropped)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or (id(p) in embedding_ids and not decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = parameter_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    # torch's fused kernel: one pass over each tensor instead of the default per-tensor loop of ~10 small
    # ops on CPU (the flagship's update 1.3 ms instead of 4.6; the same state, results equal up to rounding).
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                  fused=fused or None)
    if fused:
        # The fused kernel writes the parameters without bumping their version counters, which is how the
        # decode step's prepared weights (`generate.dense`) see that RL has changed the model.
        optimizer.register_step_post_hook(lambda *_: increment_version(params))
    return optimizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def move_to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not isinstance(batch, str):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def _batch_tokens(batch: Any, metrics: Mapping[str, Any]) -> int:
    """Tokens processed by a micro-batch (for tokens/s): input_ids.numel(), else num_tokens."""
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
        return int(batch["input_ids"].numel())
    n = metrics.get("num_tokens")
    return int(n) if n is not None else 0


def _num(v: Any) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


class _BatchStream:
    """Endless stream over a re-iterable loader, counting what it hands out."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self.it = None
        self.consumed = 0
        self.stateful = callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))

    def next(self) -> Any:
        if self.it is None:
            self.it = iter(self.loader)
        try:
            batch = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)  # next epoch
            try:
                batch = next(self.it)
            except StopIteration:
                raise RuntimeError("the loader yielded no batches (empty epoch)") from None
        self.consumed += 1
        return batch

    def state(self) -> dict[str, Any]:
        return {"batches": self.consumed, "loader": self.loader.state_dict() if self.stateful else None}

    def restore(self, state: Mapping[str, Any] | None) -> None:
        if not state:
            return
        if self.stateful and state.get("loader") is not None:
            self.loader.load_state_dict(state["loader"])
            self.consumed = int(state.get("batches", 0))
        else:
            for _ in range(int(state.get("batches", 0))):
                self.next()


def run_identity(model: nn.Module, cfg: TrainConfig, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Flat mapping of everything that defines the run: model config, train config, caller extras."""
    ident: dict[str, Any] = {}
    mcfg = getattr(getattr(model, "_orig_mod", model), "config", None)
    if dataclasses.is_dataclass(mcfg):
        for k, v in (mcfg.to_dict() if hasattr(mcfg, "to_dict") else dataclasses.asdict(mcfg)).items():
            ident[f"model.{k}"] = v
    else:
        ident["model.class"] = type(model).__name__
        ident["model.parameter_shapes"] = config_hash({n: list(p.shape) for n, p in model.state_dict().items()})
    for k, v in cfg.identity().items():
        ident[f"train.{k}"] = v
    for k, v in (extra or {}).items():
        ident[f"run.{k}"] = v
    # Normalise through JSON so the in-memory identity compares equal to the stored one.
    return json.loads(json.dumps(ident, sort_keys=True, default=str))


def resolve_resume(out_dir: str, resume: str | os.PathLike | None) -> str | None:
    """The checkpoint to continue from: "auto" (the newest in out_dir, if any), None (a fresh run, refused
    when out_dir already holds checkpoints) or a path (a checkpoint, or a run directory holding some)."""
    if resume is None:
        existing = ckpt.list_checkpoints(out_dir)
        if existing:
            raise ckpt.CheckpointError(
                f"{out_dir} already holds checkpoints (latest: {existing[-1][1]}); resume=None would start "
                "over and mix two runs. Use resume='auto' to continue, or a fresh output directory."
            )
        return None
    if resume == "auto":
        return ckpt.find_latest(out_dir)
    path = os.fspath(resume)
    if not ckpt.is_complete(path):
        latest = ckpt.find_latest(path) if os.path.isdir(path) else None
        if latest is None:
            raise ckpt.CheckpointError(f"resume: no complete checkpoint at {path}")
        path = latest
    return path



# ----------------------------------------------------------------------------- the run state
class TrainingRun:
    """The run state every training loop shares: `train` below and GRPO's generation steps.

        run = TrainingRun(model, cfg, out_dir, run_extra={...}, printer=say)
        step = run.step                         # 0, or where a cut run stopped
        while step < total:
            lr = run.set_lr(opt_step)           # cfg's WSD schedule, a pure function of the step
            ...                                 # forward, backward, optimizer.step(): the loop's own business
            step += 1
            run.log({"step": step, ...}, f"loss {loss:.4f}")    # metrics.jsonl + the progress line
            if due: run.save(step, loader_state=..., **extra)  # atomic step checkpoint
        run.finish(step, save)                  # the final checkpoint published into out_dir

    It owns what no loop should copy: device and precision, the AdamW optimizer, the schedule, the
    run identity (model config, train config, the caller's run-defining extras) checked on resume,
    resume itself (model, optimizer and RNG restored; the trainer state and loader cursor handed
    back in `state`), seeding a fresh run, `metrics.jsonl` (cut back to the resumed step, so a log
    always reads as one run), the progress line with its ETA, atomic step checkpoints pruned to
    `keep_last`, and publishing the last one. What a step is belongs to the loop: an optimizer step
    for `train`, a generation step of several optimizer steps for GRPO. `total` counts the loop's
    steps (default `cfg.steps`); `cfg.steps` counts optimizer steps and sizes the schedule.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, out_dir: str | os.PathLike, *,
                 total: int | None = None, run_extra: Mapping[str, Any] | None = None,
                 printer: Callable[[str], None] | None = None, resume: str | os.PathLike | None = "auto",
                 name: str = "") -> None:
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        os.makedirs(self.out_dir, exist_ok=True)
        self.say = printer or default_printer()
        self.cfg, self.name = cfg, name
        self.total = cfg.steps if total is None else total
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        label = name or "train"
        if self.precision != cfg.precision:
            self.say(f"{label}: precision {cfg.precision} is not supported on {self.device}; using {self.precision}")
        model.to(self.device)
        model.train()
        self.model = model
        self.optimizer = build_optimizer(model, cfg)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.schedule = cfg.schedule()
        self.identity = run_identity(model, cfg, run_extra)
        self.identity_hash = config_hash(self.identity)
        self.metrics = MetricsLog(os.path.join(self.out_dir, "metrics.jsonl"))

        ckpt.clean_stale(self.out_dir)
        self.resumed_from = resolve_resume(self.out_dir, resume)
        self.state: dict[str, Any] = {}
        """The resumed checkpoint's trainer state (empty on a fresh run); `state["loader"]` is the cursor."""
        if self.resumed_from is not None:
            self.state = ckpt.load_checkpoint(self.resumed_from, model=model, optimizer=self.optimizer,
                                              expected_identity=self.identity)
            self.say(f"{label}: resumed from {self.resumed_from} at step {int(self.state['step'])}/{self.total}")
        else:
            seed_everything(cfg.seed)
            n_params = sum(p.numel() for p in self.params)
            self.say(f"{label}: fresh run, {n_params:,} trainable parameters, {self.total} steps, "
                     f"device {self.device}, {self.precision}")
        self.step = int(self.state.get("step", 0))
        # A fresh run starts a fresh log; a resumed one drops what was logged after its checkpoint.
        self.metrics.truncate_to(self.step if self.resumed_from is not None else -1)
        self.progress = Progress(self.total, done=self.step, elapsed_before=float(self.state.get("elapsed_s", 0.0)),
                                 name=name)
        self.last_checkpoint = ckpt.find_latest(self.out_dir)

    # ------------------------------------------------------------------ during the run
    def set_lr(self, opt_step: int) -> float:
        """Set and return the schedule's LR for optimizer step `opt_step` (0-based)."""
        lr = self.schedule.lr(opt_step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def elapsed(self) -> float:
        return self.progress.elapsed()

    def log(self, record: Mapping[str, Any], *fields: str) -> None:
        """Append `record` (None values dropped) to metrics.jsonl; with `fields`, print the progress line."""
        self.progress.update(int(record["step"]))
        self.metrics.append({k: v for k, v in record.items() if v is not None})
        if fields:
            self.say(self.progress.line(*fields))

    def evaluate(self, eval_fn: Callable[[nn.Module], Mapping[str, Any]]) -> dict[str, Any]:
        """`eval_fn(model)` in eval mode without gradients, leaving every RNG as it was (so evaluating does
        not change what training draws next)."""
        rng = ckpt.capture_rng_state()
        self.model.eval()
        try:
            with torch.no_grad():
                return dict(eval_fn(self.model))
        finally:
            self.model.train()
            ckpt.restore_rng_state(rng)

    def save(self, step: int, *, loader_state: Any, **trainer_state: Any) -> str:
        """An atomic step checkpoint: model, optimizer, RNG, the loader cursor and the trainer state (the
        run's identity and elapsed time, plus what the loop passes)."""
        self.last_checkpoint = ckpt.save_step_checkpoint(
            self.out_dir, step, keep_last=self.cfg.keep_last, model=self.model, optimizer=self.optimizer,
            trainer_state={"step": step, "train_config": self.cfg.to_dict(),
                           "train_config_hash": config_hash(self.cfg.to_dict()), "run_identity": self.identity,
                           "run_hash": self.identity_hash, "elapsed_s": self.elapsed(),
                           "precision": self.precision, **trainer_state},
            loader_state=loader_state, rng_state=ckpt.capture_rng_state())
        return self.last_checkpoint

    def finish(self, step: int, save: Callable[[int], str]) -> str:
        """Publish the checkpoint of the last step into out_dir (saving it with `save(step)` when it is not on
        disk, e.g. a run resumed after its end whose last checkpoint was pruned); returns its path."""
        final = ckpt.find_latest(self.out_dir)
        if final is None or ckpt.read_trainer_state(final)["step"] != step:
            final = save(step)
        ckpt.publish(final, self.out_dir)
        return final


# ----------------------------------------------------------------------------- the loop
def train(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, Mapping[str, Any]]],
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: str | os.PathLike | None = "auto",
    eval_fn: Callable[[nn.Module], Mapping[str, Any]] | None = None,
    eval_every: int | None = None,
    run_extra: Mapping[str, Any] | None = None,
    printer: Callable[[str], None] | None = None,
    prepare_step: Callable[[nn.Module, list[Any]], None] | None = None,
) -> dict[str, Any]:
    """Train `model` for `cfg.steps` optimizer steps; write checkpoints and metrics under `out_dir`.

    resume: "auto" (continue from the newest checkpoint in out_dir/checkpoints, else start fresh),
    None (start fresh; refuses a directory that already holds checkpoints), or a checkpoint path.
    eval_fn(model) -> dict of numbers, run (no grad, eval mode, RNG-neutral) every `eval_every`
    steps and at the end; results are logged as "eval/<key>". run_extra: further run-defining
    values (recipe name, data hashes, ...) checked on resume like the configs. prepare_step(model,
    micro_batches): called once per step with the step's micro-batches before their forward passes
    (module doc, "Step preparation").

    Returns {"step", "steps", "loss", "losses" ({step: loss} trained in this call), "eval",
    "checkpoint" (the final step checkpoint), "out_dir", "resumed_from", "tokens_seen",
    "elapsed_s", "precision"}. A run resumed at its last step (cut after its final checkpoint) trains
    nothing: its "loss" and "eval" are those metrics.jsonl logged for that step, the evaluation rerun on
    the final weights when the log lacks them.
    """
    run = TrainingRun(model, cfg, out_dir, run_extra=run_extra, printer=printer, resume=resume)
    device, precision, optimizer, params = run.device, run.precision, run.optimizer, run.params
    stream = _BatchStream(loader)
    stream.restore(run.state.get("loader"))
    step, tokens_seen = run.step, int(run.state.get("tokens_seen", 0))

    def save(at_step: int) -> str:
        next_lr = run.schedule.lr(at_step) if at_step < cfg.steps else None
        return run.save(at_step, loader_state=stream.state(), tokens_seen=tokens_seen,
                        scheduler={"step": at_step, "next_lr": next_lr})

    def run_eval() -> dict[str, float]:
        results = run.evaluate(eval_fn)
        return {f"eval/{k}": _num(v) if isinstance(v, (torch.Tensor, int, float)) else v for k, v in results.items()}

    losses: dict[int, float] = {}
    last_eval: dict[str, Any] = {}
    window_tokens, window_t0 = 0, run.elapsed()

    while step < cfg.steps:
        lr = run.set_lr(step)
        optimizer.zero_grad(set_to_none=True)
        total_w, loss_sum = 0.0, 0.0
        msums: dict[str, float] = {}
        step_tokens, counted_tokens = 0, 0
        prepared = None
        if prepare_step is not None:
            prepared = [move_to_device(stream.next(), device) for _ in range(cfg.grad_accum)]
            with autocast_context(precision, device):
                prepare_step(model, prepared)
        for micro in range(cfg.grad_accum):
            batch = prepared[micro] if prepared is not None else move_to_device(stream.next(), device)
            with autocast_context(precision, device):
                loss, mets = loss_fn(model, batch)
            mets = dict(mets or {})
            loss_val = _num(loss)
            if not math.isfinite(loss_val):
                raise TrainingDivergedError(
                    f"non-finite loss ({loss_val}) at step {step + 1} (micro-batch {micro + 1}/{cfg.grad_accum}); "
                    f"nothing was saved for this step; last good checkpoint: {run.last_checkpoint or 'none'}"
                )
            if micro == 0:
                weighted = "num_tokens" in mets
            elif weighted != ("num_tokens" in mets):
                raise ValueError("loss_fn must report metrics['num_tokens'] for every micro-batch or for none")
            if weighted:
                w = float(_num(mets["num_tokens"]))
                (loss * w).backward()
            else:
                w = 1.0
                loss.backward()
            total_w += w
            loss_sum += w * loss_val
            for k, v in mets.items():
                if k == "num_tokens":
                    counted_tokens += int(_num(v))
                elif isinstance(v, (torch.Tensor, int, float)) and not isinstance(v, bool):
                    msums[k] = msums.get(k, 0.0) + w * _num(v)
            step_tokens += _batch_tokens(batch, mets)
        if total_w > 0 and total_w != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(total_w)
        max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm):
            raise TrainingDivergedError(
                f"non-finite gradient norm ({grad_norm}) at step {step + 1}; nothing was saved for this step; "
                f"last good checkpoint: {run.last_checkpoint or 'none'}"
            )
        optimizer.step()
        step += 1
        step_loss = loss_sum / total_w if total_w > 0 else 0.0
        losses[step] = step_loss
        tokens_seen += step_tokens
        window_tokens += step_tokens

        evaluated = False
        if eval_fn is not None and ((eval_every and step % eval_every == 0) or step == cfg.steps):
            last_eval = run_eval()
            evaluated = True
        if step % cfg.log_every == 0 or step == cfg.steps or evaluated:
            now = run.elapsed()
            tok_s = window_tokens / max(now - window_t0, 1e-9) if window_tokens else None
            window_tokens, window_t0 = 0, now
            record: dict[str, Any] = {
                "step": step,
                "loss": step_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "num_tokens": counted_tokens if counted_tokens else None,
                "tokens_seen": tokens_seen,
                "tokens_per_s": tok_s,
                "elapsed_s": now,
                **{k: v / total_w for k, v in msums.items()},
                **(last_eval if evaluated else {}),
            }
            fields = [f"loss {step_loss:.4f}", f"lr {lr:.2e}", f"gnorm {grad_norm:.3f}"]
            if tok_s is not None:
                fields.append(f"{tok_s:,.0f} tok/s")
            if evaluated:
                fields += [f"{k} {v:.4g}" for k, v in last_eval.items() if isinstance(v, float)]
            run.log(record, *fields)
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
            save(step)

    final = run.finish(step, save)
    final_loss = losses.get(step)
    if not losses:  # resumed at its last step (cut after the final checkpoint): this call trained nothing
        final_loss, last_eval = _logged_final_values(run, step)
        if eval_fn is not None and not last_eval:
            last_eval = run_eval()  # not in the log: evaluate the final weights again
    return {
        "step": step,
        "steps": cfg.steps,
        "loss": final_loss,
        "losses": losses,
        "eval": last_eval,
        "checkpoint": final,
        "out_dir": run.out_dir,
        "resumed_from": run.resumed_from,
        "tokens_seen": tokens_seen,
        "elapsed_s": run.elapsed(),
        "precision": precision,
    }


def _logged_final_values(run: TrainingRun, step: int) -> tuple[float | None, dict[str, Any]]:
    """The loss and the "eval/..." values metrics.jsonl holds for `step` (logged before its checkpoint was
    saved): what a run that resumes at its end, having nothing left to train, reports as its result."""
    record = next((r for r in reversed(run.metrics.read()) if r.get("step") == step), {})
    loss = record.get("loss")
    if not isinstance(loss, (int, float)) or isinstance(loss, bool):
        run.say(f"{run.name or 'train'}: {run.metrics.path} has no loss for the final step {step}; "
                "the run's final loss is unknown")
        loss = None
    return loss, {k: v for k, v in record.items() if k.startswith("eval/")}


# ----------------------------------------------------------------------------- pretraining loss
def causal_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], *, document_masking: bool = False):
    """Pretraining loss_fn over `PackingLoader` batches: masked next-token CE, weighted by target tokens.

    Labels are already shifted by the loader. With `document_masking`, `segment_ids` and
    `position_ids` go to the model so attention stays inside each document (use
    `functools.partial(causal_lm_loss, document_masking=True)`).
    """
    kwargs: dict[str, Any] = {}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    if document_masking and "segment_ids" in batch:
        kwargs["segment_ids"] = batch["segment_ids"]
    out = model(batch["input_ids"], **kwargs)
    logits = out.logits if hasattr(out, "logits") else out
    labels = batch["labels"]
    loss = masked_cross_entropy(logits, labels)
    return loss, {"num_tokens": int((labels != -100).sum())}


__all__ = [
    "NON_IDENTITY_FIELDS",
    "PRECISIONS",
    "TrainConfig",
    "TrainTable",
    "TrainingDivergedError",
    "TrainingRun",
    "build_optimizer",
    "causal_lm_loss",
    "parameter_groups",
    "run_identity",
    "seed_everything",
    "train",
]
