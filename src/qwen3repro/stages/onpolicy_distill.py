"""On-policy strong-to-weak distillation (Qwen3 report §4.5, phase 2): "the student model generates on-policy
sequences for fine-tuning ... prompts are sampled, and the student produces responses in either /think or
/no_think mode. The student is then fine-tuned by aligning its logits with those of a teacher model ... to
minimize the KL divergence."

    run(OnPolicyDistillConfig.from_dict(recipe ⊕ scale), parent=<off-policy distilled student>, ctx) -> <out_dir>

The teacher is the checkpoint of the stage the recipe `uses` (`teacher`). Before any compute the stage
checks that teacher and student share one vocabulary and that the longest prompt plus the longest
response fits the teacher's context; a mismatch is an error naming it. Then, every step:

1. `queries_per_step` training task items from a seeded stream, each asked in every mode of `modes`
   (the flag in the user turn); the student samples `samples_per_query` responses per prompt at
   `temperature` (1: its own distribution, no top-k/top-p), through the generation engine;
2. student (with gradient) and teacher (without) read prompt + response in one forward each;
3. the loss on the response tokens, by `loss`:
   * "jsd": `losses.generalized_jsd_loss` over the full vocabulary, `beta` (1 = reverse KL(P_S‖P_T), the
     report's objective; 0 = forward KL) at `jsd_temperature`;
   * "pg": `losses.reverse_kl_pg_loss`, the policy-gradient form with per-token advantage
     −(log p_S − log p_T) at discount 0;
4. one AdamW step.

Logged every step in metrics.jsonl, overall and per mode: the teacher KL (full-vocabulary reverse KL of the
student's sampled positions before the update), the student's entropy and the response length; the loss,
gradient norm and FLOPs so far (`train.compute`: 6·N_S per trained token, 2·N_S per generated token,
2·N_T per token the teacher reads; a prompt's prefill is not counted, in any stage). Held-out pass@1 / pass@k every `eval_every` steps on the items
`stages.grpo.eval_queries` draws for the same settings, so this stage and reasoning RL are measured on one
set. A cut run resumes exactly (the stream cursor, the compute ledger and the RNG are in the checkpoint).
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..chat import render
from ..config import ConfigError, ModelConfig, config_hash
from ..config_fields import Positive, checked_fields
from ..data import tasks
from ..data.queries import Query
from ..evals.pass_at_k import evaluate_pass_at_k
from ..files import write_json_atomic
from ..generate import SamplingParams, generate
from ..lineage import make_lineage, write_lineage
from ..losses import generalized_jsd_loss, reverse_kl_pg_loss
from ..models.qwen3 import Qwen3
from ..rl.entropy import masked_mean, token_entropy
from ..rl.rollout import QueryStream
from ..tokenizer import Tokenizer
from ..train.compute import COMPUTE_FILE, ComputeLedger, flop_parameters
from ..train.loop import TrainConfig, TrainingRun, resolve_device
from .common import StageContext, copy_tokenizer, identity_fields
from .grpo import PolicyOptimizer, eval_queries, sample_task_items
from .teacher_outputs import FLAGS, MODES, check_same_vocabulary, vocabulary_of

LOSSES = ("jsd", "pg")


@dataclass(frozen=True)
class OnPolicyDistillConfig(PolicyOptimizer):
    """One on-policy distillation run: prompts and sampling, loss, evaluation, bookkeeping; the optimiser is
    `stages.grpo.PolicyOptimizer`'s (its lr default here is 1e-4)."""

    name: str = "onpolicy-distill"
    teacher: str = "flagship/general-rl"
    """The `uses` entry of the teacher checkpoint."""
    # ---- prompts and sampling
    families: tuple[str, ...] = ("add", "mul")
    difficulties: tuple[Positive, Positive] | None = None
    n_queries: Positive = 256
    """Training-partition items the prompts are drawn from."""
    modes: tuple[str, ...] = MODES
    steps: Positive = 20
    queries_per_step: Positive = 8
    samples_per_query: Positive = 1
    """Student responses per (query, mode) each step."""
    max_new_tokens: Positive = 160
    """Longest response in thinking mode (what reasoning RL's rollouts are allowed)."""
    max_new_tokens_no_think: Positive = 48
    temperature: float = 1.0
    # ---- loss
    loss: str = "jsd"
    beta: float = 1.0
    """Generalized JSD interpolation: 1 = reverse KL(P_S‖P_T) (the report), 0 = forward KL."""
    jsd_temperature: float = 1.0
    lr: float = 1e-4
    # ---- evaluation (the fields `stages.grpo.eval_queries` reads, same meaning)
    eval_every: Positive = 10
    eval_items: Positive = 48
    eval_k: Positive = 8
    eval_temperature: float = 1.0
    eval_families: tuple[str, ...] | None = None
    eval_max_new_tokens: Positive = 160

    def __post_init__(self) -> None:
        object.__setattr__(self, "families", tuple(self.families))
        object.__setattr__(self, "modes", tuple(self.modes))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.eval_families is not None:
            object.__setattr__(self, "eval_families", tuple(self.eval_families))
        if self.difficulties is not None:
            object.__setattr__(self, "difficulties", tuple(int(d) for d in self.difficulties))
            if len(self.difficulties) != 2 or not 1 <= self.difficulties[0] <= self.difficulties[1]:
                raise ConfigError(f"{self.name}: difficulties must be [min, max] with 1 <= min <= max")
        unknown = [f for f in self.families + (self.eval_families or ()) if f not in tasks.FAMILIES]
        if unknown:
            raise ConfigError(f"{self.name}: unknown task families {unknown}; known: {sorted(tasks.FAMILIES)}")
        if not self.modes or set(self.modes) - set(MODES) or len(set(self.modes)) != len(self.modes):
            raise ConfigError(f"{self.name}: modes must be distinct names from {MODES}, got {list(self.modes)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"{self.name}: loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"{self.name}: beta must be in [0, 1], got {self.beta!r}")
        if self.temperature <= 0 or self.jsd_temperature <= 0 or self.lr <= 0:
            raise ConfigError(f"{self.name}: temperature, jsd_temperature and lr must be > 0")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "OnPolicyDistillConfig") -> "OnPolicyDistillConfig":
        return cls(**checked_fields(cls, d, where))

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature)

    @property
    def eval_sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.eval_temperature)

    def max_new(self, mode: str) -> int:
        return self.max_new_tokens if mode == "think" else self.max_new_tokens_no_think

    def train_config(self) -> TrainConfig:
        return self.policy_train_config(self.steps)


def training_queries(cfg: OnPolicyDistillConfig) -> list[Query]:
    rng = random.Random(f"onpolicy-queries|{cfg.seed}")
    return [Query.from_task(it) for it in sample_task_items(rng, cfg.n_queries, heldout=False, families=cfg.families,
                                                            difficulties=cfg.difficulties)]


def prompt_ids(tokenizer: Tokenizer, query: Query, mode: str) -> list[int]:
    """The query as one user turn carrying the mode's flag, ending with the assistant header."""
    return tokenizer.encode(render([{"role": "user", "content": f"{query.question} {FLAGS[mode]}"}],
                                   add_generation_prompt=True))


def check_fits_teacher(prompt_lengths: Sequence[int], cfg: OnPolicyDistillConfig, teacher_config: ModelConfig,
                       teacher_dir: Path) -> None:
    """Refuse prompts whose tokens plus the longest response exceed the teacher's context: the teacher
    must read every token it scores."""
    longest = max(prompt_lengths) + max(cfg.max_new(m) for m in cfg.modes)
    if longest > teacher_config.max_position_embeddings:
        raise ConfigError(f"{cfg.name}: the longest student prompt ({max(prompt_lengths)} tokens) plus "
                          f"{max(cfg.max_new(m) for m in cfg.modes)} response tokens is {longest} tokens, beyond the "
                          f"teacher's context of {teacher_config.max_position_embeddings} ({teacher_dir})")


@dataclass
class Batch:
    """Prompt (left-padded to width P) + response (right-padded) rows, with which mode each row asked for."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    prompt_width: int
    modes: list[str]
    prompt_tokens: int


def build_rows(prompts: Sequence[list[int]], responses: Sequence[list[int]], modes: Sequence[str], pad_id: int) -> Batch:
    width = max(len(p) for p in prompts)
    t = max(1, max(len(r) for r in responses))
    n = len(prompts)
    input_ids = torch.full((n, width + t), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width + t), dtype=torch.bool)
    response_mask = torch.zeros((n, t), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, width - len(p):width] = torch.tensor(p)
        attention[i, width - len(p):width + len(r)] = True
        if r:
            input_ids[i, width:width + len(r)] = torch.tensor(r)
            response_mask[i, :len(r)] = True
    position_ids = (attention.long().cumsum(-1) - 1).clamp(min=0)
    return Batch(input_ids, attention, position_ids, response_mask, width, list(modes), sum(len(p) for p in prompts))


def response_logits(model, batch: Batch) -> torch.Tensor:
    """Logits [N, T, V] that predict each response token, from one forward over prompt + response."""
    p, t = batch.prompt_width, batch.response_mask.shape[1]
    out = model(batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask)
    return out.logits[:, p - 1:p + t - 1].float()


def reverse_kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_S‖P_T) over the full vocabulary at every position [N, T] (no gradient)."""
    with torch.no_grad():
        s, t = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
        return (s.exp() * (s - t)).sum(-1)


def distill_loss(cfg: OnPolicyDistillConfig, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 batch: Batch) -> torch.Tensor:
    mask = batch.response_mask
    if cfg.loss == "jsd":
        return generalized_jsd_loss(student_logits, teacher_logits, mask, beta=cfg.beta, temperature=cfg.jsd_temperature)
    targets = batch.input_ids[:, batch.prompt_width:batch.prompt_width + mask.shape[1]]
    s = torch.log_softmax(student_logits, -1).gather(-1, targets[..., None])[..., 0]
    t = torch.log_softmax(teacher_logits, -1).gather(-1, targets[..., None])[..., 0]
    return reverse_kl_pg_loss(s, t, mask.float())


def _per_mode(values: torch.Tensor, batch: Batch, mode: str) -> float | None:
    rows = torch.tensor([m == mode for m in batch.modes], device=values.device)
    if not rows.any():
        return None
    return float(masked_mean(values[rows], batch.response_mask[rows].float()))


def run(cfg: OnPolicyDistillConfig, parent: Path, ctx: StageContext) -> Path:
    """Distill the teacher into the student checkpoint `parent` on the student's own samples, into `ctx.out_dir`."""
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parent = Path(parent)
    teacher_dir = ctx.input_dir(cfg.teacher)
    for who, d in (("student", parent), ("teacher", teacher_dir)):
        if not (Path(d) / "config.json").exists():
            raise ConfigError(f"{cfg.name}: needs a {who} checkpoint with a model, got {d}")
    # ---- checks that cost no compute: one vocabulary, every prompt within the teacher's context
    check_same_vocabulary(vocabulary_of(teacher_dir), vocabulary_of(parent), cfg.name)
    tokenizer = Tokenizer.load(parent)
    queries = training_queries(cfg)
    teacher_config = ModelConfig.from_json(str(Path(teacher_dir) / "config.json"))
    check_fits_teacher([len(prompt_ids(tokenizer, q, m)) for q in queries for m in cfg.modes], cfg, teacher_config,
                       teacher_dir)

    device = resolve_device(ctx.device_for(cfg.device))
    model = Qwen3.from_pretrained(parent).to(device)
    teacher = Qwen3.from_pretrained(teacher_dir).to(device).eval().requires_grad_(False)
    ledger = ComputeLedger(n_student=flop_parameters(model.config), n_teacher=flop_parameters(teacher.config))
    stream = QueryStream(queries, cfg.seed)
    heldout = eval_queries(cfg)
    run = TrainingRun(model, ctx.on_device(cfg.train_config()), out, total=cfg.steps, name=cfg.name,
                      printer=ctx.printer, run_extra={"stage": cfg.name, "onpolicy": config_hash(identity_fields(cfg))})
    step = run.step
    if run.resumed_from is not None:
        stream.load_state_dict(run.state["loader"])
        ledger.load_state_dict(run.state["compute"])
    else:
        ctx.say(f"{cfg.name}: {cfg.steps} steps x {cfg.queries_per_step} queries x {len(cfg.modes)} modes x "
                f"{cfg.samples_per_query} samples, loss {cfg.loss} (beta {cfg.beta}), teacher {teacher_dir}")

    def run_eval() -> dict[str, float]:
        res = run.evaluate(lambda m: evaluate_pass_at_k(m, tokenizer, heldout, k=cfg.eval_k, sampling=cfg.eval_sampling,
                                                        max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed + 7919))
        return {f"eval/{k}": v for k, v in res.items()}

    def save(at_step: int) -> str:
        return run.save(at_step, loader_state=stream.state_dict(), compute=ledger.state_dict(),
                        onpolicy_config=asdict(cfg))

    if step == 0:
        run.log({"step": 0, "flops": 0, **run_eval()})
    while step < cfg.steps:
        generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
        prompts, responses, modes = [], [], []
        model.eval()
        with torch.no_grad():
            taken = stream.take(cfg.queries_per_step)
            for mode in cfg.modes:
                ids = [prompt_ids(tokenizer, q, mode) for q in taken for _ in range(cfg.samples_per_query)]
                gens = generate(model, ids, cfg.sampling, max_new_tokens=cfg.max_new(mode), tokenizer=tokenizer,
                                generator=generator, pad_token_id=tokenizer.pad_token_id)
                prompts += ids
                responses += [list(g.token_ids) for g in gens]
                modes += [mode] * len(ids)
        model.train()
        batch = build_rows(prompts, responses, modes, tokenizer.pad_token_id)
        batch = Batch(batch.input_ids.to(device), batch.attention_mask.to(device), batch.position_ids.to(device),
                      batch.response_mask.to(device), batch.prompt_width, batch.modes, batch.prompt_tokens)
        with torch.no_grad():
            teacher_logits = response_logits(teacher, batch)
        student_logits = response_logits(model, batch)
        loss = distill_loss(cfg, student_logits, teacher_logits, batch)
        lr = run.set_lr(step)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, cfg.clip_grad_norm or float("inf")))
        if not math.isfinite(grad_norm) or not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"{cfg.name}: non-finite loss or gradient at step {step + 1} "
                                     f"(loss {float(loss.detach())}, grad norm {grad_norm})")
        run.optimizer.step()
        n_generated = int(batch.response_mask.sum())
        n_read = int(batch.attention_mask.sum())
        ledger.add(trained=n_read, generated=n_generated, teacher_scored=n_read)
        kl = reverse_kl_per_token(student_logits.detach(), teacher_logits)
        entropy = token_entropy(student_logits.detach(), 1.0)
        mask = batch.response_mask.float()
        record: dict[str, Any] = {"step": step + 1, "loss": float(loss.detach()), "grad_norm": grad_norm, "lr": lr,
                                  "teacher_kl": float(masked_mean(kl, mask)),
                                  "entropy": float(masked_mean(entropy, mask)),
                                  "response_length": n_generated / len(modes), "flops": ledger.flops}
        for mode in cfg.modes:
            rows = [i for i, m in enumerate(modes) if m == mode]
            record[f"teacher_kl/{mode}"] = _per_mode(kl, batch, mode)
            record[f"entropy/{mode}"] = _per_mode(entropy, batch, mode)
            record[f"response_length/{mode}"] = float(batch.response_mask[rows].sum()) / max(len(rows), 1)
        step += 1
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record.update(run_eval())
        record["elapsed_s"] = run.elapsed()
        fields: list[str] = []
        if step % cfg.log_every == 0 or step == cfg.steps:
            fields = [f"loss {record['loss']:.4f}", f"teacher KL {record['teacher_kl']:.4f}",
                      f"entropy {record['entropy']:.3f}", f"len {record['response_length']:.1f}"]
            if "eval/pass@1" in record:
                fields.append(f"pass@1 {record['eval/pass@1']:.3f} pass@{cfg.eval_k} {record[f'eval/pass@{cfg.eval_k}']:.3f}")
        run.log(record, *fields)
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
            save(step)

    run.finish(step, save)
    copy_tokenizer(parent, out)
    records = run.metrics.read()
    write_json_atomic(out / COMPUTE_FILE, ledger.summary())
    write_json_atomic(out / "eval.json", summarize(cfg, records))
    write_lineage(out, make_lineage(cfg.name, cfg, parent, uses={cfg.teacher: teacher_dir}))
    return out


def summarize(cfg: OnPolicyDistillConfig, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """eval.json: held-out pass@1 / pass@k before and after, and the teacher KL of the first and last steps."""
    evals = [r for r in records if "eval/pass@1" in r]
    steps = [r for r in records if "teacher_kl" in r]
    pk = f"eval/pass@{cfg.eval_k}"
    window = max(1, min(5, len(steps) // 2))
    mean = lambda rows, key: (sum(r[key] for r in rows) / len(rows)) if rows else None  # noqa: E731
    out = {
        "stage": cfg.name, "steps": cfg.steps, "loss": cfg.loss, "beta": cfg.beta,
        "pass@1_before": evals[0].get("eval/pass@1") if evals else None,
        "pass@1_after": evals[-1].get("eval/pass@1") if evals else None,
        f"pass@{cfg.eval_k}_before": evals[0].get(pk) if evals else None,
        f"pass@{cfg.eval_k}_after": evals[-1].get(pk) if evals else None,
        "teacher_kl_window": window,
        "teacher_kl_start": mean(steps[:window], "teacher_kl"),
        "teacher_kl_end": mean(steps[-window:], "teacher_kl"),
    }
    for mode in cfg.modes:
        key = f"teacher_kl/{mode}"
        rows = [r for r in steps if key in r]
        out[f"{key}_start"] = mean(rows[:window], key)
        out[f"{key}_end"] = mean(rows[-window:], key)
    return out


__all__ = ["LOSSES", "OnPolicyDistillConfig", "build_rows", "check_fits_teacher", "distill_loss", "prompt_ids",
           "reverse_kl_per_token", "run", "summarize", "training_queries"]
