"""Reasoning RL with GRPO (Qwen3 report §4.2): the second post-training stage.

    run(GRPOConfig.from_dict(recipe ⊕ scale), parent=<cold-start checkpoint>, ctx) -> <out_dir>

What one run does:

1. **Query selection** (`rl.selection`): a pool of training-partition task items (`n_candidates`
   from `families`) is screened and measured against the cold-start model (k samples each), and
   `n_queries` query–verifier pairs are chosen by the report's four criteria. The cold start's used
   queries come from `used_queries_file`, or from `used_queries.json` in the parent directory when
   that exists (a JSON list of uids: the interface the cold-start stage writes). The result, with
   the pass-rate table and the counted drop reasons, is `selection.json` (reused on resume).
   `difficulties` narrows candidates and held-out items to a difficulty range. With nothing
   learnable the stage stops with the counted reasons (`fallback_to_screened` lets a wiring run,
   such as the micro scale, go on with the screened candidates).
2. **The loop**, for `steps` generation steps:
   rollouts (`rl.rollout.collect_rollouts`: `queries_per_step` queries × `group_size` samples in
   thinking mode, verifier rewards, dynamic sampling that drops equal-accuracy groups and refills)
   → old log-probs and entropies from one no-grad forward (π_old = the sampling policy; reference
   log-probs from the frozen starting model for the k3 KL) → `mu` optimisation passes over the
   batch, each split into `mini_batches` shuffled mini-batches, one AdamW step per mini-batch, with
   `losses.grpo_loss` (asymmetric clipping ε_low/ε_high, `loss_type` dapo | grpo | dr_grpo | bnpo,
   optional β·k3 KL) minus the entropy bonus (`rl.entropy.EntropyController`; the recipe's is
   proportional to the shortfall of recent entropy below the starting one). The very first
   mini-batch of each step is on-policy: ratio 1 and clip fraction 0.
3. **Metrics** every step in `metrics.jsonl`: reward, accuracy, entropy (mean token entropy of the
   rollouts at the sampling temperature), response length, clip fraction, KL (k3 to the starting
   model, always logged), share of zero-variance groups, groups kept and generation rounds, loss,
   grad norm, entropy coefficient; held-out pass@1 / pass@k every `eval_every` steps (and at
   steps 0 and the end) on `eval_items` held-out items (`data.tasks.is_heldout`), k samples each at
   pinned settings (written into eval.json; `evals.pass_at_k`). A progress line with ETA.
4. **Checkpoints** every `ckpt_every` steps (model, optimizer, step, query cursor, entropy
   controller, RNG; atomic, via `train.checkpoint`); a cut run resumes exactly: rollouts draw from a
   generator seeded by (seed, step), so a resumed run logs the same next-step metrics as an
   uninterrupted one. The stage directory gets the final model, tokenizer, eval.json and, last,
   lineage.json.
"""
from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..config import ConfigError, config_hash
from ..config_fields import NonNegative, Positive, checked_fields
from ..data import tasks
from ..data.queries import Query
from ..evals.pass_at_k import evaluate_pass_at_k
from ..generate import SamplingParams
from ..lineage import make_lineage, write_lineage
from ..losses import ADVANTAGE_SCALES, GRPO_LOSS_TYPES, grpo_loss
from ..models.qwen3 import Qwen3
from ..rl.entropy import ENTROPY_CONTROLS, ENTROPY_WINDOW, EntropyController, masked_mean
from ..rl.rollout import (
    QueryStream, RolloutBatch, ScoreFn, build_batch, collect_rollouts, policy_logprobs, verifier_score,
)
from ..rl.selection import USED_QUERIES_FILE, SelectionResult, load_used_uids, screen, select_queries
from ..tokenizer import Tokenizer
from ..progress import format_duration
from ..train.compute import COMPUTE_FILE, ComputeLedger, flop_parameters
from ..train.loop import TrainConfig, TrainingRun, resolve_device
from ..files import write_json_atomic
from .common import StageContext, copy_tokenizer, identity_fields

SELECTION_FILE = "selection.json"


@dataclass(frozen=True)
class PolicyOptimizer:
    """How the stages that train on their own samples (the RL stages, on-policy distillation) optimise: AdamW
    at a constant LR after a linear warm-up over optimizer steps, with gradient clipping; and their
    bookkeeping (checkpoint cadence, logging, seed, device)."""

    lr: float = 5e-5
    warmup_steps: NonNegative = 0
    """Linear warm-up over optimizer steps; then constant."""
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    clip_grad_norm: float = 1.0
    # ---- bookkeeping
    ckpt_every: NonNegative = 10
    keep_last: NonNegative = 2
    log_every: Positive = 1
    seed: int = 0
    device: str = "cpu"
    description: str = ""

    def policy_train_config(self, optimizer_steps: int) -> TrainConfig:
        """These settings as a TrainConfig over `optimizer_steps` (a WSD schedule without decay), with the
        stage's seed, device and checkpoint cadence."""
        return TrainConfig(steps=optimizer_steps, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay,
                           warmup_steps=self.warmup_steps, decay_fraction=0.0, clip_grad_norm=self.clip_grad_norm,
                           seed=self.seed, device=self.device, ckpt_every=self.ckpt_every, keep_last=self.keep_last,
                           log_every=self.log_every)


@dataclass(frozen=True)
class GRPOUpdate(PolicyOptimizer):
    """The GRPO update every RL stage shares (reasoning RL, general RL, the student's RL arm): the loss, the
    optimiser (`PolicyOptimizer`) and the entropy control, with `recipes/reasoning-rl.toml`'s defaults.
    Checked by `check_update_settings`."""

    # ---- loss
    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    """ε_high > ε_low is DAPO's clip-higher."""
    beta: float = 0.0
    """k3 KL coefficient to the starting model (the KL is logged either way)."""
    mu: Positive = 2
    """Optimisation passes over each rollout batch (off-policy after the first mini-batch)."""
    # ---- entropy control (rl.entropy)
    entropy_control: str = "proportional"
    """'none' | 'bonus' | 'adaptive' | 'proportional'."""
    entropy_coef: float = 0.0
    """Fixed coefficient ('bonus'), or the starting one ('adaptive')."""
    entropy_coef_delta: float = 0.005
    entropy_coef_max: float = 0.1
    entropy_target_ratio: float = 1.0
    """Target = ratio × the first step's entropy (adaptive) or the first ENTROPY_WINDOW steps' mean."""
    entropy_gain: float = 0.3
    """Proportional: coefficient = min(max, gain × relative shortfall below the target)."""


@dataclass(frozen=True)
class GRPOConfig(GRPOUpdate):
    """One reasoning-RL run. Field groups: the GRPO update (loss, optimisation, entropy: `GRPOUpdate`), queries,
    rollouts, eval, bookkeeping."""

    name: str = "reasoning-rl"
    # ---- query selection (§4.2's four criteria)
    families: tuple[str, ...] = ("add", "mul", "expr", "code", "order")
    """Task families (sub-domains) of the candidate pool."""
    difficulties: tuple[Positive, Positive] | None = None
    """(min, max) difficulty of candidates and held-out items (default: each family's training range)."""
    n_candidates: Positive = 256
    """Training-partition items drawn as candidates."""
    n_queries: Positive = 64
    """Query–verifier pairs to select (report: 3,995)."""
    selection_k: Positive = 8
    """Samples of the cold-start model per candidate to measure its pass rate."""
    pass_rate_ceiling: float = 0.9
    """Learnable iff 0 < pass rate < ceiling."""
    used_queries_file: str | None = None
    """Cold-start used query uids (default: <parent>/used_queries.json when it exists)."""
    fallback_to_screened: bool = False
    """When no candidate is learnable, train on the screened candidates anyway instead of failing
    (for wiring runs such as the micro scale, whose cold start solves nothing; every group then has
    equal rewards and nothing is learned)."""
    skip_if_nothing_learnable: bool = False
    """When no candidate is learnable, finish without training instead of failing: the output is the
    cold-start model unchanged, and eval.json records the reason and its held-out pass@1 (so a
    pipeline still reaches its later stages and reports the RL claim as not reproduced)."""
    # ---- rollouts
    steps: Positive = 50
    """Generation steps."""
    queries_per_step: Positive = 8
    group_size: Positive = 8
    """G: rollouts per query."""
    max_new_tokens: Positive = 96
    temperature: float = 1.0
    """Rollout temperature (no top-k/top-p: the sampler is the policy)."""
    dynamic_sampling: bool = True
    """Drop groups whose accuracy is all equal and refill (DAPO)."""
    max_gen_rounds: Positive = 3
    """Generation rounds per step with dynamic sampling."""
    scale_rewards: str = "group"
    """Advantage scaling: 'group' | 'batch' | 'none' (Dr. GRPO)."""
    # ---- optimisation (besides `GRPOUpdate`'s)
    mini_batches: Positive = 1
    """Mini-batches (= optimizer steps) per pass."""
    # ---- evaluation
    eval_every: Positive = 10
    eval_items: Positive = 64
    """Held-out items (pass@1 is the mean over eval_k samples each)."""
    eval_k: Positive = 8
    eval_temperature: float = 1.0
    eval_top_p: float = 1.0
    eval_top_k: NonNegative = 0
    eval_families: tuple[str, ...] | None = None
    """Default: `families`."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "families", tuple(self.families))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.difficulties is not None:
            object.__setattr__(self, "difficulties", tuple(int(d) for d in self.difficulties))
            if len(self.difficulties) != 2 or not 1 <= self.difficulties[0] <= self.difficulties[1]:
                raise ConfigError(f"{self.name}: difficulties must be [min, max] with 1 <= min <= max")
        if self.eval_families is not None:
            object.__setattr__(self, "eval_families", tuple(self.eval_families))
        unknown = [f for f in self.families + (self.eval_families or ()) if f not in tasks.FAMILIES]
        if unknown:
            raise ConfigError(f"{self.name}: unknown task families {unknown}; known: {sorted(tasks.FAMILIES)}")
        for name in ("n_candidates", "n_queries", "selection_k", "steps", "queries_per_step", "group_size",
                     "max_new_tokens", "max_gen_rounds", "mu", "mini_batches", "eval_every", "eval_items",
                     "eval_k", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{self.name}: {name} must be an integer >= 1, got {v!r}")
        check_update_settings(self)
        if self.mini_batches > self.queries_per_step * self.group_size:
            raise ConfigError(f"{self.name}: more mini_batches than rollouts per step")
        if not 0.0 < self.pass_rate_ceiling <= 1.0:
            raise ConfigError(f"{self.name}: pass_rate_ceiling must be in (0, 1]")
        if self.temperature <= 0 or self.eval_temperature < 0 or self.lr <= 0 or self.beta < 0:
            raise ConfigError(f"{self.name}: temperature and lr must be > 0, beta >= 0")
        if self.eval_k < 1 or self.ckpt_every < 0:
            raise ConfigError(f"{self.name}: eval_k >= 1 and ckpt_every >= 0 required")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "GRPOConfig") -> "GRPOConfig":
        return cls(**checked_fields(cls, d, where))

    @property
    def eval_sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.eval_temperature, top_p=self.eval_top_p, top_k=self.eval_top_k)

    def train_config(self) -> TrainConfig:
        """The optimiser settings over optimizer steps: `mu` x `mini_batches` per generation step."""
        return self.policy_train_config(self.steps * self.mu * self.mini_batches)


def check_update_settings(cfg: Any) -> None:
    """The GRPO settings every RL stage shares (reasoning RL, general RL): loss aggregation, advantage
    scaling, entropy control, clipping range, group size. The error names the stage and the setting."""
    if cfg.loss_type not in GRPO_LOSS_TYPES:
        raise ConfigError(f"{cfg.name}: loss_type must be one of {GRPO_LOSS_TYPES}, got {cfg.loss_type!r}")
    if cfg.scale_rewards not in ADVANTAGE_SCALES:
        raise ConfigError(f"{cfg.name}: scale_rewards must be one of {ADVANTAGE_SCALES}")
    if cfg.entropy_control not in ENTROPY_CONTROLS:
        raise ConfigError(f"{cfg.name}: entropy_control must be one of {ENTROPY_CONTROLS}")
    if not (0 <= cfg.epsilon_low < 1 and cfg.epsilon_high >= 0):
        raise ConfigError(f"{cfg.name}: need 0 <= epsilon_low < 1 and epsilon_high >= 0")
    if cfg.group_size < 2:
        raise ConfigError(f"{cfg.name}: group_size must be >= 2 (advantages are relative within a group)")


def entropy_controller(cfg: Any) -> EntropyController:
    """A fresh entropy controller from an RL stage config's entropy settings."""
    return EntropyController(cfg.entropy_control, cfg.entropy_coef, cfg.entropy_coef_delta, cfg.entropy_coef_max,
                             cfg.entropy_target_ratio, gain=cfg.entropy_gain)


# ----------------------------------------------------------------------------- queries and eval
def sample_task_items(rng: random.Random, n: int, *, heldout: bool, families: Sequence[str],
                      difficulties: tuple[int, int] | None = None, max_tries: int = 100_000) -> list[tasks.TaskItem]:
    """`n` items of the training (heldout=False) or evaluation partition, family and difficulty
    uniform (difficulty within `difficulties`, else each family's training range)."""
    items: list[tasks.TaskItem] = []
    for _ in range(max_tries):
        if len(items) == n:
            return items
        fam = tasks.FAMILIES[rng.choice(list(families))]
        lo, hi = difficulties or (fam.min_difficulty, fam.max_difficulty)
        item = fam.generate(rng.getrandbits(48), rng.randint(lo, hi))
        if tasks.is_heldout(item.uid) == heldout:
            items.append(item)
    raise RuntimeError(f"only {len(items)}/{n} {'held-out' if heldout else 'training'} items in {max_tries} tries")


def candidate_queries(cfg: GRPOConfig) -> list[Query]:
    """The candidate pool: `n_candidates` training-partition items of `families` (seeded)."""
    rng = random.Random(f"grpo-candidates|{cfg.seed}")
    return [Query.from_task(it) for it in sample_task_items(rng, cfg.n_candidates, heldout=False,
                                                            families=cfg.families, difficulties=cfg.difficulties)]


def eval_queries(cfg: GRPOConfig) -> list[Query]:
    """The held-out items pass@k is measured on (never trainable: `is_heldout`)."""
    rng = random.Random(f"grpo-eval|{cfg.seed}")
    return [Query.from_task(it) for it in sample_task_items(rng, cfg.eval_items, heldout=True,
                                                            families=cfg.eval_families or cfg.families,
                                                            difficulties=cfg.difficulties)]


# ----------------------------------------------------------------------------- one update
def clip_fraction(ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, eps_low: float, eps_high: float):
    """Share of counted tokens whose clipped branch is active (TRL's low/high clip ratios summed)."""
    adv = adv[:, None] if adv.dim() == 1 else adv
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return masked_mean(clipped.float(), mask)


def optimisation_passes(model, optimizer, batch: RolloutBatch, old_logps: torch.Tensor,
                        ref_logps: torch.Tensor | None, cfg: GRPOConfig, controller: EntropyController,
                        entropy_now: float, generator: torch.Generator, lr_at) -> list[dict[str, float]]:
    """`mu` passes over `batch` in `mini_batches` shuffled mini-batches; one AdamW step each.

    Returns one record per optimizer step: loss, clip fraction, KL, ratio mean/max, grad norm,
    entropy (differentiable one of this mini-batch) and the entropy coefficient used.
    """
    n = len(batch)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    coef = controller.active_coef(entropy_now)
    records = []
    for _ in range(cfg.mu):
        order = torch.randperm(n, generator=generator)
        for rows in torch.tensor_split(order, cfg.mini_batches):
            rows = rows.to(old_logps.device)
            mb = batch.select(rows)
            mask = mb.completion_mask
            logps, entropy = policy_logprobs(model, mb, cfg.temperature, with_entropy=True)
            ref = ref_logps[rows] if ref_logps is not None else None
            loss = grpo_loss(logps, old_logps[rows], mb.advantages, mask, loss_type=cfg.loss_type,
                             epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                             ref_logps=ref if cfg.beta > 0 else None, max_completion_length=cfg.max_new_tokens)
            mean_entropy = masked_mean(entropy, mask)
            total = loss - coef * mean_entropy if coef > 0 else loss
            lr = lr_at(len(records))
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm or float("inf")))
            if not math.isfinite(grad_norm) or not math.isfinite(float(total.detach())):
                raise FloatingPointError(
                    f"non-finite GRPO loss or gradient (loss {float(total.detach())}, grad {grad_norm})")
            optimizer.step()
            with torch.no_grad():
                ratio = torch.exp(logps.detach() - old_logps[rows])
                rec = {"loss": float(loss), "grad_norm": grad_norm, "entropy_bonus_coef": coef, "lr": lr,
                       "clip_fraction": float(clip_fraction(ratio, mb.advantages, mask, cfg.epsilon_low,
                                                             cfg.epsilon_high)),
                       "ratio_mean": float(masked_mean(ratio, mask)),
                       "ratio_max": float((ratio * mask).max()) if mask.any() else 1.0,
                       "train_entropy": float(mean_entropy)}
                if ref is not None:
                    delta = ref - logps.detach()
                    rec["kl"] = float(masked_mean(torch.exp(delta) - delta - 1, mask))
            records.append(rec)
    return records


# ----------------------------------------------------------------------------- the stage
def _select(cfg: GRPOConfig, parent: Path, out: Path, model, tokenizer, ctx: StageContext,
            score_fn: ScoreFn) -> tuple[SelectionResult, set[str]]:
    """Run (or reuse, when this run already did it) the query selection; write selection.json.
    Returns the selection and the cold start's used uids."""
    used_file = cfg.used_queries_file or (parent / USED_QUERIES_FILE if (parent / USED_QUERIES_FILE).exists() else None)
    used = load_used_uids(used_file)
    fields = ("families", "difficulties", "n_candidates", "n_queries", "selection_k", "pass_rate_ceiling",
              "max_new_tokens", "temperature", "seed")
    key = config_hash({"cfg": {k: getattr(cfg, k) for k in fields}, "used": sorted(used)})
    path = out / SELECTION_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return SelectionResult.from_dict(saved), used
    t0 = time.perf_counter()
    result = select_queries(candidate_queries(cfg), model, tokenizer, n_select=cfg.n_queries, k=cfg.selection_k,
                            ceiling=cfg.pass_rate_ceiling, used_uids=used, max_new_tokens=cfg.max_new_tokens,
                            temperature=cfg.temperature, seed=cfg.seed, score_fn=score_fn)
    write_json_atomic(path, {"key": key, "used_queries_file": str(used_file) if used_file else None,
                             **result.to_dict()})
    ctx.say(f"{cfg.name}: selected {len(result.selected)}/{result.n_candidates} queries in "
            f"{format_duration(time.perf_counter() - t0)}\n{result.to_markdown()}")
    return result, used


def run(cfg: GRPOConfig, parent: Path, ctx: StageContext, *, score_fn: ScoreFn = verifier_score) -> Path:
    """Train reasoning RL from the cold-start checkpoint `parent` into `ctx.out_dir` (resumes a cut run).

    `score_fn` replaces the verifier registry (tests use toy rewards); the default scores every
    completion with its query's registered verifier.
    """
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parent = Path(parent)
    torch_device = resolve_device(ctx.device_for(cfg.device))
    tokenizer = Tokenizer.load(parent)
    model = Qwen3.from_pretrained(parent).to(torch_device)
    reference = copy.deepcopy(model).eval().requires_grad_(False)  # the starting model: KL anchor

    selection, used = _select(cfg, parent, out, reference, tokenizer, ctx, score_fn)
    queries = selection.selected
    if not queries:
        reason = (f"no learnable queries were selected ({selection.drops()}): "
                  "the cold-start model solves none or all of the candidates")
        if cfg.skip_if_nothing_learnable and not cfg.fallback_to_screened:
            return _finish_untrained(cfg, parent, out, model, tokenizer, selection, reason, ctx, score_fn)
        if not cfg.fallback_to_screened:
            raise RuntimeError(f"{cfg.name}: {reason}; set fallback_to_screened for a wiring run")
        queries = screen(candidate_queries(cfg), used)[0][:cfg.n_queries]
        ctx.say(f"{cfg.name}: WARNING {reason}; training on {len(queries)} screened candidates (fallback_to_screened)")
    stream = QueryStream(queries, cfg.seed)
    heldout = eval_queries(cfg)

    run = TrainingRun(model, ctx.on_device(cfg.train_config()), out, total=cfg.steps, name=cfg.name,
                      printer=ctx.printer, run_extra={"stage": cfg.name, "grpo": config_hash(identity_fields(cfg)),
                                 "selection": config_hash([q.uid for q in queries])})
    controller = entropy_controller(cfg)
    ledger = ComputeLedger(n_student=flop_parameters(model.config))
    step, opt_steps = run.step, int(run.state.get("opt_steps", 0))
    if run.resumed_from is not None:
        stream.load_state_dict(run.state["loader"])
        controller.load_state_dict(run.state["entropy_controller"])
        ledger.load_state_dict(run.state["compute"])
    else:
        ctx.say(f"{cfg.name}: {cfg.steps} steps x {cfg.queries_per_step} queries x {cfg.group_size} rollouts, "
                f"{len(queries)} queries, loss {cfg.loss_type}, eps {cfg.epsilon_low}/{cfg.epsilon_high}, "
                f"beta {cfg.beta}, mu {cfg.mu}, entropy control {cfg.entropy_control}")

    def run_eval() -> dict[str, float]:
        res = run.evaluate(lambda m: evaluate_pass_at_k(m, tokenizer, heldout, k=cfg.eval_k, sampling=cfg.eval_sampling,
                                                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 7919,
                                                        score_fn=score_fn))
        return {f"eval/{k}": v for k, v in res.items()}

    def save(at_step: int) -> str:
        return run.save(at_step, loader_state=stream.state_dict(), opt_steps=opt_steps,
                        entropy_controller=controller.state_dict(), compute=ledger.state_dict(),
                        grpo_config=asdict(cfg))

    if step == 0:
        run.log({"step": 0, "flops": 0, **run_eval()})
    while step < cfg.steps:
        step_seed = cfg.seed * 1_000_003 + step
        generator = torch.Generator(device=torch_device).manual_seed(step_seed)  # sampling
        shuffler = torch.Generator().manual_seed(step_seed)  # mini-batch order (CPU indices)
        groups, stats = collect_rollouts(model, tokenizer, stream, n_groups=cfg.queries_per_step,
                                         group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                                         temperature=cfg.temperature, generator=generator,
                                         dynamic_sampling=cfg.dynamic_sampling, max_rounds=cfg.max_gen_rounds,
                                         score_fn=score_fn)
        record: dict[str, Any] = {
            "step": step + 1, "reward": stats.mean_reward, "response_length": stats.mean_length,
            "zero_variance_share": stats.zero_variance_share, "groups_generated": stats.groups_generated,
            "groups_kept": len(groups), "gen_rounds": stats.rounds, "truncated_share":
                stats.truncated / max(len(stats.lengths), 1), "no_reward_groups": stats.groups_no_reward,
        }
        ledger.add(generated=sum(stats.lengths))  # every sampled token, dropped groups' too
        if groups:
            batch = build_batch(groups, pad_id=tokenizer.pad_token_id, scale_rewards=cfg.scale_rewards).to(torch_device)
            with torch.no_grad():
                old_logps, entropy = policy_logprobs(model, batch, cfg.temperature)
                ref_logps, _ = policy_logprobs(reference, batch, cfg.temperature, with_entropy=False)
            mask = batch.completion_mask
            entropy_now = float(masked_mean(entropy, mask))
            delta = ref_logps - old_logps
            record.update(entropy=entropy_now, kl=float(masked_mean(torch.exp(delta) - delta - 1, mask)),
                          sampler_logp_gap=float(masked_mean((old_logps - batch.sampler_logps).abs(), mask)))
            first_opt_step = opt_steps
            updates = optimisation_passes(model, run.optimizer, batch, old_logps, ref_logps, cfg, controller,
                                          entropy_now, shuffler, lambda k: run.schedule.lr(first_opt_step + k))
            opt_steps += len(updates)
            n_read = int(batch.attention_mask.sum())
            # mu passes of forward + backward; the old and reference log-probs: two no-grad forwards
            ledger.add(trained=cfg.mu * n_read, student_scored=2 * n_read)
            for key in ("loss", "grad_norm", "clip_fraction", "ratio_mean", "lr"):
                record[key] = sum(u[key] for u in updates) / len(updates)
            record["ratio_max"] = max(u["ratio_max"] for u in updates)
            record["first_pass_clip_fraction"] = updates[0]["clip_fraction"]
            record["first_pass_ratio_max"] = updates[0]["ratio_max"]
            record["entropy_coef"] = updates[0]["entropy_bonus_coef"]
            controller.update(entropy_now)
        else:
            record["entropy_coef"] = controller.coef
        step += 1
        record["flops"] = ledger.flops
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            record.update(run_eval())
        record["elapsed_s"] = run.elapsed()
        fields: list[str] = []
        if step % cfg.log_every == 0 or step == cfg.steps:
            fields = [f"reward {record['reward']:.3f}", f"entropy {record.get('entropy', float('nan')):.4f}",
                      f"len {record['response_length']:.1f}", f"clip {record.get('clip_fraction', 0.0):.3f}",
                      f"kl {record.get('kl', 0.0):.4f}", f"zero-var {record['zero_variance_share']:.2f}"]
            if "eval/pass@1" in record:
                pk = f"pass@{cfg.eval_k}"
                fields.append(f"pass@1 {record['eval/pass@1']:.3f} {pk} {record['eval/' + pk]:.3f}")
        run.log(record, *fields)
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
            save(step)

    run.finish(step, save)
    copy_tokenizer(parent, out)
    records = run.metrics.read()
    write_json_atomic(out / "eval.json", summarize(cfg, records, selection))
    # Query selection's sampling (selection_k samples of each candidate) is not counted: the RL arm's
    # FLOPs are a lower bound.
    write_json_atomic(out / COMPUTE_FILE, {**ledger.summary(), "not_counted": "query selection"})
    write_lineage(out, make_lineage(cfg.name, cfg, parent))
    return out


def _finish_untrained(cfg: GRPOConfig, parent: Path, out: Path, model, tokenizer, selection: SelectionResult,
                      reason: str, ctx: StageContext, score_fn: ScoreFn) -> Path:
    """No learnable query: publish the starting model unchanged, with its held-out pass@k and the reason."""
    ctx.say(f"{cfg.name}: SKIPPED, {reason}; the output is the cold-start model unchanged")
    before = evaluate_pass_at_k(model, tokenizer, eval_queries(cfg), k=cfg.eval_k, sampling=cfg.eval_sampling,
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 7919, score_fn=score_fn)
    model.save_pretrained(out)
    copy_tokenizer(parent, out)
    summary = summarize(cfg, [], selection)
    pk = f"pass@{cfg.eval_k}"
    summary.update({"skipped": reason, "steps": 0, "pass@1_before": before["pass@1"], "pass@1_after": before["pass@1"],
                    "pass@1_gain": 0.0, f"{pk}_before": before[pk], f"{pk}_after": before[pk],
                    "pass@1_by_family_after": {k.split("/", 1)[1]: v for k, v in before.items()
                                               if k.startswith("pass@1/")}})
    write_json_atomic(out / "eval.json", summary)
    write_json_atomic(out / COMPUTE_FILE, ComputeLedger(n_student=flop_parameters(model.config)).summary())
    write_lineage(out, make_lineage(cfg.name, cfg, parent))
    return out


def window_means(values: Sequence[float], window: int) -> list[float]:
    """Means of every `window` consecutive values (one mean of all of them when there are fewer)."""
    if not values:
        return []
    window = min(window, len(values))
    return [sum(values[i:i + window]) / window for i in range(len(values) - window + 1)]


def summarize(cfg: GRPOConfig, records: Sequence[Mapping[str, Any]], selection: SelectionResult) -> dict[str, Any]:
    """eval.json: pass@1/pass@k before and after, the entropy trajectory's floor, pinned settings."""
    evals = [r for r in records if "eval/pass@1" in r]
    steps = [r for r in records if isinstance(r.get("entropy"), (int, float))]
    before, after = (evals[0], evals[-1]) if evals else ({}, {})
    pk = f"eval/pass@{cfg.eval_k}"
    smoothed = window_means([r["entropy"] for r in steps], ENTROPY_WINDOW)
    entropy_start = smoothed[0] if smoothed else None
    entropy_min = min(smoothed) if smoothed else None
    return {
        "stage": cfg.name,
        "steps": cfg.steps,
        "pass@1_before": before.get("eval/pass@1"), "pass@1_after": after.get("eval/pass@1"),
        f"pass@{cfg.eval_k}_before": before.get(pk), f"pass@{cfg.eval_k}_after": after.get(pk),
        "pass@1_gain": (after["eval/pass@1"] - before["eval/pass@1"]) if evals else None,
        "pass@1_by_family_after": {k.split("/", 2)[2]: v for k, v in after.items() if k.startswith("eval/pass@1/")},
        "entropy_window": ENTROPY_WINDOW,  # start, min and end are means over this many steps
        "entropy_start": entropy_start, "entropy_min": entropy_min,
        "entropy_end": smoothed[-1] if smoothed else None,
        "entropy_min_ratio": (entropy_min / entropy_start) if steps and entropy_start else None,
        "eval_settings": {"items": cfg.eval_items, "families": list(cfg.eval_families or cfg.families),
                          "difficulties": list(cfg.difficulties) if cfg.difficulties else "family training ranges",
                          "samples_per_item": cfg.eval_k, "temperature": cfg.eval_temperature,
                          "top_p": cfg.eval_top_p, "top_k": cfg.eval_top_k, "max_new_tokens": cfg.max_new_tokens,
                          "template": "chat template, thinking mode", "heldout": "data.tasks.is_heldout",
                          "seed": cfg.seed + 7919},
        "selection": {"n_candidates": selection.n_candidates, "n_selected": len(selection.selected),
                      "dropped": selection.drops(), "k": selection.k, "ceiling": selection.ceiling},
        "elapsed_s": records[-1].get("elapsed_s") if records else None,
    }


__all__ = ["GRPOConfig", "GRPOUpdate", "PolicyOptimizer", "run", "candidate_queries", "check_update_settings", "clip_fraction", "entropy_controller",
           "eval_queries", "optimisation_passes", "summarize"]
