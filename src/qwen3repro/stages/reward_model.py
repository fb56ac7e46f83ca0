"""The Bradley–Terry reward model (Qwen3 report §4.4, general RL: rewards without a reference answer).

    run(RewardModelConfig.from_dict(recipe ⊕ scale), parent=<fusion checkpoint>, ctx) -> <out_dir>

What one run does:

1. **Data** (`data.preferences`): `n_train_pairs` training pairs over `domains`, and `n_eval_pairs`
   pairs and best-of-k sets for each evaluation split ("heldout_prompts", "heldout_templates"; the
   "train" rows of the evaluation are the first `n_eval_pairs` training pairs, and fresh
   training-partition best-of-k sets). Every label is a checker's verdict. Each response is scored as
   `rewards.reward_model.scored_text` renders it; a training pair with a side longer than `max_len`
   tokens is dropped and counted (as TRL's `RewardTrainer` filters, never truncating the answer away).
   With `policy_queries` > 0 the parent policy also answers training-partition add/mul queries
   `policy_samples` times each, and a right and a wrong answer to one query (by the rule reward) make a
   "policy" pair (`evals.reward_model.policy_pairs`; kept in policy_pairs.json for a resumed run): the
   policy's own writing, which the best-of-N reranking below and general RL's reward-model tasks score.
2. **The model**: the parent's backbone with a fresh scalar head
   (`Qwen3RewardModel.from_causal_lm(Qwen3.from_pretrained(parent))`); the parent is the
   thinking-mode fusion model, whose knowledge of the world and of the task families the head reads.
3. **Training** through `train.loop.train`: batches of `batch_size` pairs (chosen and rejected rows
   stacked, right-padded), `losses.bradley_terry_loss` with the optional `margin` and centring
   (`center_coefficient`), AdamW, linear warm-up then linear decay to `MIN_LR_RATIO` of the peak.
   metrics.jsonl holds per logged step the loss, the pairwise accuracy and the mean margin
   r_chosen − r_rejected of the step's pairs, and every `eval_every` steps the held-out accuracy; the
   progress line shows the ETA; step checkpoints every `ckpt_every` steps resume a cut run exactly.
4. **Evaluation** into eval.json (`evals.reward_model`): pairwise and best-of-k accuracy per domain
   and split for the reward model and the two baselines fitted on the training pairs (length only,
   bag of words), best-of-N reranking of the parent policy's samples to held-out add/mul queries
   (rule reward of a random pick, the reward model's pick and the oracle's), and a plot of pairwise
   accuracy per domain (`pairwise_accuracy.png`).

The directory holds the reward model in transformers' `Qwen3ForSequenceClassification` layout (with
the tokenizer's pad id in config.json), the tokenizer, metrics.jsonl, eval.json and, last,
lineage.json. `rewards.reward_model.RewardModelScorer.load(out_dir)` serves it as a reward.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from ..config import ConfigError, config_hash
from ..config_fields import NonNegative, Positive, checked_fields
from ..data.preferences import (BEST_OF, PREFERENCE_DOMAINS, BestOfKSet, PreferencePair, best_of_k_sets,
                                build_preferences)
from ..evals.reward_model import (BagOfWordsBaseline, LengthBaseline, best_of_k_accuracy, best_of_n_rerank,
                                  by_domain, rule_task_queries, pairwise_accuracy, plot_pairwise_accuracy,
                                  policy_pairs)
from ..files import write_json_atomic
from ..lineage import make_lineage, read_lineage, write_lineage
from ..losses import bradley_terry_loss
from ..models.qwen3 import Qwen3
from ..models.reward import Qwen3RewardModel
from ..rewards.reward_model import RewardModelScorer, pad_rows, scored_text
from ..tokenizer import Tokenizer
from ..train.loop import TrainConfig, resolve_device, train
from .common import StageContext, copy_tokenizer, identity_fields

EVAL_SPLITS = ("train", "heldout_prompts", "heldout_templates")
MIN_LR_RATIO = 0.0
"""The LR decays linearly to 0 over the run, as TRL's `RewardConfig` (a transformers `TrainingArguments`
with its linear schedule) does."""
BETAS = (0.9, 0.999)
"""AdamW betas: transformers' `TrainingArguments` defaults, which TRL's reward trainer keeps."""
PLOT_FILE = "pairwise_accuracy.png"
POLICY_PAIRS_FILE = "policy_pairs.json"


@dataclass(frozen=True)
class RewardModelConfig:
    """One reward-model run. Field groups: data, optimisation, loss, evaluation, bookkeeping."""

    name: str = "reward-model"
    # ---- data
    n_train_pairs: Positive = 2000
    """Training preference pairs, spread evenly over `domains`."""
    n_eval_pairs: Positive = 200
    """Pairs and best-of-k sets per evaluation split."""
    domains: tuple[str, ...] = PREFERENCE_DOMAINS
    max_len: Positive = 512
    """Longest scored sequence in tokens (longer training pairs are dropped; scoring keeps the last tokens)."""
    policy_queries: NonNegative = 0
    """Training-partition add/mul queries that the parent (the policy general RL starts from) answers
    `policy_samples` times each; a right and a wrong answer to one query make a "policy" pair
    (`evals.reward_model.policy_pairs`), added to the training pairs. 0: synthetic pairs only."""
    policy_samples: Positive = 8
    policy_pairs_per_query: Positive = 2
    # ---- optimisation
    steps: Positive = 300
    batch_size: Positive = 16
    """Pairs per optimizer step (2 × batch_size sequences)."""
    lr: float = 5e-5
    warmup_steps: NonNegative = 10
    weight_decay: float = 0.0
    clip_grad_norm: float = 1.0
    # ---- loss
    margin: float | None = None
    """Subtracted from r_chosen − r_rejected inside the sigmoid (None: no margin)."""
    center_coefficient: float | None = None
    """Weight of the centring term mean((r_chosen + r_rejected)²) (None: none; TRL recommends 0.01)."""
    # ---- evaluation
    eval_every: Positive = 50
    """Held-out pairwise accuracy every this many steps (and at the end)."""
    best_of: Positive = BEST_OF
    """k of the best-of-k sets (RewardBench: 4)."""
    bon_n: Positive = 8
    """N samples per query for best-of-N reranking."""
    bon_queries: Positive = 32
    """Held-out add/mul queries for best-of-N reranking."""
    bon_max_new_tokens: Positive = 128
    # ---- bookkeeping
    seed: int = 0
    ckpt_every: NonNegative = 50
    keep_last: NonNegative = 2
    log_every: Positive = 1
    device: str = "cpu"
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", tuple(self.domains))
        unknown = [d for d in self.domains if d not in PREFERENCE_DOMAINS]
        if unknown or not self.domains or len(set(self.domains)) != len(self.domains):
            raise ConfigError(f"{self.name}.domains: must be distinct names from {list(PREFERENCE_DOMAINS)}, "
                              f"got {list(self.domains)}")
        if not 2 <= self.best_of <= BEST_OF:
            raise ConfigError(f"{self.name}.best_of: must be in 2..{BEST_OF}, got {self.best_of}")
        if not self.lr > 0:
            raise ConfigError(f"{self.name}.lr: must be > 0, got {self.lr}")
        if self.center_coefficient is not None and self.center_coefficient < 0:
            raise ConfigError(f"{self.name}.center_coefficient: must be >= 0, got {self.center_coefficient}")
        if self.n_train_pairs < 2 * len(self.domains):
            raise ConfigError(f"{self.name}.n_train_pairs: needs at least 2 per domain ({2 * len(self.domains)}), "
                              f"got {self.n_train_pairs}")
        self.train_config()  # validates the optimisation fields, naming the bad one

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "RewardModelConfig") -> "RewardModelConfig":
        return cls(**checked_fields(cls, d, where))

    def train_config(self) -> TrainConfig:
        """AdamW over `steps` optimizer steps: linear warm-up, then linear decay to MIN_LR_RATIO."""
        return TrainConfig(steps=self.steps, lr=self.lr, betas=BETAS, weight_decay=self.weight_decay,
                           warmup_steps=self.warmup_steps, decay_shape="linear", decay_fraction=1.0,
                           min_lr_ratio=MIN_LR_RATIO, clip_grad_norm=self.clip_grad_norm, seed=self.seed,
                           device=self.device, ckpt_every=self.ckpt_every, keep_last=self.keep_last,
                           log_every=self.log_every)


# ----------------------------------------------------------------------------- batches
class PairLoader:
    """Re-iterable batches of `batch_size` tokenised pairs, reshuffled each epoch by (seed, epoch); each
    batch is {"input_ids", "attention_mask"} [2B, L] with the chosen rows first. The cursor
    (`state_dict`) checkpoints, so a resumed run sees exactly the batches it would have."""

    def __init__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int, pad_id: int,
                 seed: int = 0) -> None:
        if not pairs:
            raise ValueError("reward model: no training pairs (all dropped as too long, or none built)")
        self.pairs, self.batch_size, self.pad_id, self.seed = list(pairs), batch_size, pad_id, seed
        self.epoch = self.batch = 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.pairs)))
        random.Random(f"reward-model-pairs|{self.seed}|{epoch}").shuffle(order)
        return order

    def batches_per_epoch(self) -> int:
        return -(-len(self.pairs) // self.batch_size)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.pairs[i][0] for i in indices] + [self.pairs[i][1] for i in indices]
        ids, mask = pad_rows(rows, self.pad_id, "right")
        return {"input_ids": ids, "attention_mask": mask}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            epoch, b = self.epoch, self.batch
            if b >= self.batches_per_epoch():
                self.epoch, self.batch = epoch + 1, 0
                return
            self.batch = b + 1
            yield self.collate(self._order(epoch)[b * self.batch_size:(b + 1) * self.batch_size])

    def _fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([self.pairs, self.batch_size, self.seed]).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("fingerprint") not in (None, self._fingerprint()):
            raise ValueError("reward model: the pair loader's cursor was written for other data or settings")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def pair_loss(model: Qwen3RewardModel, batch: Mapping[str, torch.Tensor], *, margin: float | None = None,
              center_coefficient: float | None = None):
    """The Bradley–Terry loss of a batch of pairs (chosen rows first), with accuracy and mean margin."""
    rewards = model(batch["input_ids"], batch["attention_mask"])
    n = rewards.shape[0] // 2
    chosen, rejected = rewards[:n], rewards[n:]
    loss = bradley_terry_loss(chosen, rejected, margin=margin, center_coefficient=center_coefficient)
    with torch.no_grad():
        metrics = {"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean(),
                   "reward_chosen": chosen.mean(), "reward_rejected": rejected.mean()}
    return loss, metrics


# ----------------------------------------------------------------------------- data
def preferences_hash(pairs: Sequence[PreferencePair]) -> str:
    rows = [[p.prompt, p.chosen, p.rejected, p.domain, p.template, p.split] for p in pairs]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()[:16]


def tokenize_pairs(tokenizer: Tokenizer, pairs: Sequence[PreferencePair], max_len: int
                   ) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(token ids of each pair's chosen and rejected sequence, number of pairs dropped as too long)."""
    out, dropped = [], 0
    for p in pairs:
        chosen = tokenizer.encode(scored_text(p.prompt, p.chosen))
        rejected = tokenizer.encode(scored_text(p.prompt, p.rejected))
        if max(len(chosen), len(rejected)) > max_len:
            dropped += 1
            continue
        out.append((chosen, rejected))
    return out, dropped


@dataclass(frozen=True)
class EvaluationData:
    pairs: Mapping[str, list[PreferencePair]]
    sets: Mapping[str, list[BestOfKSet]]


def evaluation_data(cfg: RewardModelConfig, train_pairs: Sequence[PreferencePair]) -> EvaluationData:
    """Pairs and best-of-k sets per evaluation split (the "train" pairs are the first trained ones)."""
    pairs = {"train": list(train_pairs[:cfg.n_eval_pairs])}
    for split in EVAL_SPLITS[1:]:
        pairs[split] = build_preferences(cfg.n_eval_pairs, seed=cfg.seed, split=split, domains=cfg.domains)
    # A seed of its own: best-of-k sets of the training partition are fresh prompts, not the trained pairs'.
    sets = {split: best_of_k_sets(cfg.n_eval_pairs, seed=cfg.seed + 1, split=split, domains=cfg.domains,
                                  k=cfg.best_of) for split in EVAL_SPLITS}
    return EvaluationData(pairs, sets)


def heldout_accuracy_fn(tokenizer: Tokenizer, data: EvaluationData, max_len: int):
    """eval_fn for the training loop: pairwise accuracy on each split's evaluation pairs."""
    encoded = {split: [[tokenizer.encode(scored_text(p.prompt, r))[-max_len:] for r in (p.chosen, p.rejected)]
                       for p in pairs] for split, pairs in data.pairs.items()}

    def eval_fn(model: Qwen3RewardModel) -> dict[str, float]:
        scorer = RewardModelScorer(model, tokenizer, max_len=max_len)
        out = {}
        for split, rows in encoded.items():
            if not rows:
                continue
            scores = scorer.score_ids([row for pair in rows for row in pair])
            wins = [scores[2 * i] > scores[2 * i + 1] for i in range(len(rows))]
            out[f"accuracy/{split}"] = sum(wins) / len(rows)
        return out

    return eval_fn


# ----------------------------------------------------------------------------- evaluation
def evaluate(scorer: RewardModelScorer, tokenizer: Tokenizer, train_pairs: Sequence[PreferencePair],
             data: EvaluationData) -> dict[str, Any]:
    """Pairwise and best-of-k accuracy per split and domain for the reward model and both baselines."""
    scorers = {"reward_model": scorer.score_many, "length": LengthBaseline.fit(train_pairs).score_many,
               "bag_of_words": BagOfWordsBaseline.fit(tokenizer, train_pairs).score_many}
    pairwise = {name: {split: by_domain(pairwise_accuracy, fn, data.pairs[split]) for split in EVAL_SPLITS}
                for name, fn in scorers.items()}
    best_of_k = {name: {split: by_domain(best_of_k_accuracy, fn, data.sets[split]) for split in EVAL_SPLITS}
                 for name, fn in scorers.items()}
    return {"pairwise": pairwise, "best_of_k": best_of_k}


def data_summary(train_pairs: Sequence[PreferencePair], dropped: int) -> dict[str, Any]:
    """Counts per domain and template, and the share of pairs whose chosen response is the longer."""
    domains = sorted({p.domain for p in train_pairs})
    summary: dict[str, Any] = {"n_train_pairs": len(train_pairs) - dropped, "dropped_too_long": dropped,
                               "by_domain": {}}
    for d in domains:
        rows = [p for p in train_pairs if p.domain == d]
        summary["by_domain"][d] = {
            "pairs": len(rows),
            "chosen_longer_share": sum(len(p.chosen) > len(p.rejected) for p in rows) / len(rows),
            "templates": sorted({p.template for p in rows})}
    return summary


def _reward_model_of(parent: Path, max_len: int) -> Qwen3RewardModel:
    """The parent's backbone under a fresh scalar head, its positions extended to `max_len` if shorter."""
    lm = Qwen3.from_pretrained(parent)
    if lm.config.max_position_embeddings < max_len:
        longer = Qwen3(lm.config.replace(max_position_embeddings=max_len))
        longer.load_state_dict(lm.state_dict())
        lm = longer
    return Qwen3RewardModel.from_causal_lm(lm)


def policy_training_pairs(cfg: RewardModelConfig, parent: Path, policy: Qwen3, tokenizer: Tokenizer, out: Path,
                          ctx: StageContext) -> tuple[list[PreferencePair], dict[str, Any]]:
    """The "policy" training pairs (`policy_queries` > 0), kept in `POLICY_PAIRS_FILE` with the key of the
    parent and the settings, so that a resumed run trains on the pairs it started with."""
    if cfg.policy_queries == 0:
        return [], {"queries": 0, "pairs": 0}
    parent_lineage = read_lineage(parent)
    key = config_hash({"parent": parent_lineage.hash if parent_lineage else str(parent), "seed": cfg.seed,
                       "queries": cfg.policy_queries, "samples": cfg.policy_samples,
                       "pairs_per_query": cfg.policy_pairs_per_query, "max_new_tokens": cfg.bon_max_new_tokens})
    path = out / POLICY_PAIRS_FILE
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return [PreferencePair(**p) for p in saved["pairs"]], saved["counts"]
    queries = rule_task_queries(cfg.policy_queries, cfg.seed, split="train")
    pairs, counts = policy_pairs(policy, tokenizer, queries, cfg.policy_samples,
                                 max_new_tokens=cfg.bon_max_new_tokens, seed=cfg.seed,
                                 pairs_per_query=cfg.policy_pairs_per_query)
    write_json_atomic(path, {"key": key, "counts": counts,
                             "pairs": [dataclasses.asdict(p) for p in pairs]})
    ctx.say(f"{cfg.name}: {counts['pairs']} pairs of the policy's own right and wrong answers "
            f"({counts['queries_with_right_and_wrong']}/{counts['queries']} queries had both)")
    return pairs, counts


def run(cfg: RewardModelConfig, parent: Path, ctx: StageContext) -> Path:
    """Train the reward model from the parent checkpoint into `ctx.out_dir` (resumes a cut run)."""
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parent = Path(parent)
    if not (parent / "config.json").exists():
        raise ConfigError(f"{cfg.name}: needs a parent checkpoint with a model, got {parent}")
    tokenizer = Tokenizer.load(parent)
    torch.manual_seed(cfg.seed)  # the head's initialisation
    model = _reward_model_of(parent, cfg.max_len)

    train_pairs = build_preferences(cfg.n_train_pairs, seed=cfg.seed, split="train", domains=cfg.domains)
    policy = Qwen3.from_pretrained(parent).to(resolve_device(ctx.device_for(cfg.device))).eval()
    on_policy, on_policy_counts = policy_training_pairs(cfg, parent, policy, tokenizer, out, ctx)
    train_pairs = train_pairs + on_policy
    data_hash = preferences_hash(train_pairs)
    encoded, dropped = tokenize_pairs(tokenizer, train_pairs, cfg.max_len)
    data = evaluation_data(cfg, train_pairs)
    loader = PairLoader(encoded, batch_size=cfg.batch_size, pad_id=tokenizer.pad_token_id, seed=cfg.seed)
    ctx.say(f"{cfg.name}: {len(encoded):,} training pairs over {', '.join(cfg.domains)} ({dropped} dropped as "
            f"longer than {cfg.max_len} tokens), {cfg.steps} steps x {cfg.batch_size} pairs "
            f"({loader.batches_per_epoch()} batches/epoch), {cfg.n_eval_pairs} evaluation pairs per split")

    loss_fn = functools.partial(pair_loss, margin=cfg.margin, center_coefficient=cfg.center_coefficient)
    summary = train(model, loader, loss_fn, ctx.on_device(cfg.train_config()), out, resume="auto",
                    eval_fn=heldout_accuracy_fn(tokenizer, data, cfg.max_len), eval_every=cfg.eval_every,
                    printer=ctx.printer, run_extra={"stage": cfg.name, "data_hash": data_hash,
                                                    "reward_model": config_hash(identity_fields(cfg))})
    model.save_pretrained(out, pad_token_id=tokenizer.pad_token_id)
    copy_tokenizer(parent, out)

    scorer = RewardModelScorer(model.eval(), tokenizer, max_len=cfg.max_len)
    results = evaluate(scorer, tokenizer, train_pairs, data)
    results["best_of_n"] = best_of_n_rerank(policy, tokenizer, scorer, rule_task_queries(cfg.bon_queries, cfg.seed),
                                            cfg.bon_n, max_new_tokens=cfg.bon_max_new_tokens, seed=cfg.seed)
    plot_pairwise_accuracy(results["pairwise"], out / PLOT_FILE)
    write_json_atomic(out / "eval.json", {
        "stage": cfg.name, "steps": cfg.steps, "final_loss": summary["loss"],
        "final_eval": {k.removeprefix("eval/"): v for k, v in summary["eval"].items()},
        "headline": headline(results), **results, "k": cfg.best_of,
        "chance": {"pairwise": 0.5, "best_of_k": 1.0 / cfg.best_of},
        "data": {**data_summary(train_pairs, dropped), "policy_pairs": on_policy_counts},
        "elapsed_s": summary["elapsed_s"]})
    write_lineage(out, make_lineage(cfg.name, cfg, parent, data_hashes={"preferences": data_hash}))
    return out


def headline(results: Mapping[str, Any]) -> dict[str, float]:
    """The numbers a claim reads: overall accuracy on each held-out split for every scorer, and best-of-N."""
    out: dict[str, float] = {}
    for measure in ("pairwise", "best_of_k"):
        for name, splits in results[measure].items():
            for split in EVAL_SPLITS[1:]:
                out[f"{measure}/{name}/{split}"] = splits[split]["all"]["accuracy"]
    for key in ("random", "reward_model", "oracle", "gain"):
        out[f"best_of_n/{key}"] = results["best_of_n"][key]
    return out


__all__ = ["EVAL_SPLITS", "PairLoader", "RewardModelConfig", "data_summary", "evaluate", "evaluation_data",
           "headline", "pair_loss", "preferences_hash", "run", "tokenize_pairs"]
