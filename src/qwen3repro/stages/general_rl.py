"""General RL (Qwen3 report §4.4, "Stage 4"): GRPO from the fused model over a multi-task mixture.

    run(GeneralRLConfig.from_dict(recipe ⊕ scale), parent=<fusion checkpoint>, ctx) -> <out_dir>

The report's fourth post-training stage trains on "over 20 distinct tasks, each with customized
scoring criteria" with three kinds of reward: rules, a model judging against a reference answer,
and a reward model without a reference. Here:

1. **Tasks** (`data.general_tasks`): the scale's `tasks` table weights the named tasks; a pool of
   `n_queries` training-partition queries is drawn by weight (held-out items never), and
   `eval_per_task` held-out queries per task are the evaluation set.
2. **Prompts** in both thinking modes: each drawn query gets `/think` (share `think_flag_share`),
   `/no_think` (`no_think_flag_share`) or no flag (thinking, the default), in the user turn or (share
   `system_flag_share`) in a system message; a query that offers tools lists their schemas in the
   system turn, as Qwen3's template does.
3. **Rollouts** (`tools.tool_rollouts`): G samples per query, turn by turn; a turn with tool calls
   gets the tool environment's `<tool_response>` user turn appended as token ids (never re-rendered)
   and the model continues, within the caps on turns, calls and tool-response tokens. Tool-response
   tokens carry loss mask 0, so neither the policy loss nor the KL reads them.
4. **Rewards** (`rewards` registry, one per task): rule rewards read the final turn only (never a
   tool response); "judge" asks a judge model over HTTP (`rewards.judge`: at CPU scales a loopback
   `qwen3repro serve`-style server that serves the parent checkpoint, at full scale any
   OpenAI-compatible server such as vLLM, `judge_base_url`); "reward_model" scores with the
   Bradley–Terry model of the stage this one `uses` (`stages.reward_model`). With `format_gate` a
   response whose think block does not follow the requested mode scores 0 on every task (the report's
   format-following ability: "respond to /think and /no_think"), each malformed tool call costs
   `malformed_call_penalty`, and a rollout of a tool-offering query whose calls all ran earns
   `valid_call_bonus`. A reward that could not be computed ("no reward": a judge timeout, an
   unparseable judge answer) is left out of its group's statistics and counted by reason.
5. **Dynamic sampling on rewards**: a group whose valid rewards are all equal has no advantage
   and is dropped and refilled (graded rewards make the reasoning stage's accuracy test too coarse).
6. **The update** is the reasoning stage's loss (`losses.grpo_loss`: DAPO token-level aggregation,
   clip-higher, μ passes, the proportional entropy control), with the loss mask above; the groups are
   padded in up to three batches of similar lengths (prompts that list tools are hundreds of tokens
   longer), and each optimizer step accumulates their gradients weighted to equal the whole batch's
   loss (`optimisation_passes`).
7. **Metrics** every step: reward overall and per task, mode-follow rate, tool calls (ok, malformed,
   per outcome), no-reward counts by reason, entropy, KL, clip fraction, lengths; held-out reward per
   task, mode-follow and tool-call success every `eval_every` steps (and at 0 and the end, so
   "before" is the fused model). Checkpoints resume exactly (the query stream, entropy controller,
   optimizer and step; rollouts are seeded by step).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import random
import threading
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..chat import render
from ..config import ConfigError, config_hash
from ..config_fields import NonNegative, Positive, checked_fields
from ..data import general_tasks
from ..data.queries import Query
from ..data.world import build_world
from ..evals.thinking import follows_mode
from ..files import write_json_atomic
from ..generate import SamplingParams
from ..lineage import make_lineage, write_lineage
from ..losses import group_advantages, grpo_loss
from ..models.qwen3 import Qwen3
from ..progress import format_duration
from ..rewards import REWARDS, RewardResult
from ..rewards import judge as judge_module
from ..rewards import reward_model as reward_model_module
from ..rl.entropy import EntropyController, masked_mean
from ..rl.rollout import Group, QueryStream, RolloutBatch, build_batch, policy_logprobs
from ..serve import ChatCompletions, make_server
from ..tokenizer import Tokenizer
from ..tools import ToolEnvironment, ToolLimits, Trajectory, default_tools, tool_rollouts
from ..train.loop import TrainConfig, TrainingRun, resolve_device
from .common import StageContext, copy_tokenizer, identity_fields
from .grpo import GRPOUpdate, check_update_settings, clip_fraction, entropy_controller, window_means

FLAG_THINK, FLAG_NO_THINK = "/think", "/no_think"
MODES = ("think", "no_think", "unflagged")


@dataclass(frozen=True)
class GeneralRLConfig(GRPOUpdate):
    """One general-RL run. Field groups: the GRPO update (loss, optimisation, entropy: `stages.grpo.GRPOUpdate`),
    tasks, modes, tools, judge, reward model, rollouts, evaluation, bookkeeping."""

    name: str = "general-rl"
    # ---- tasks
    tasks: Mapping[str, float] = field(default_factory=dict)
    """Task name -> weight (`data.general_tasks.GENERAL_TASKS`); empty: every task at its default weight."""
    n_queries: Positive = 512
    """Training-partition queries drawn by weight (the pool the steps cycle through)."""
    # ---- thinking modes (the fusion stage's switches, §4.3)
    think_flag_share: float = 0.35
    no_think_flag_share: float = 0.35
    """The rest of the prompts carry no flag (thinking, the template's default)."""
    system_flag_share: float = 0.3
    """Share of flagged prompts whose flag sits in a system message rather than the user turn."""
    format_gate: bool = True
    """A response whose think block does not follow the requested mode scores 0 on every task."""
    # ---- tools
    max_turns: Positive = 3
    max_calls: Positive = 3
    max_response_tokens: Positive = 64
    malformed_call_penalty: float = 0.1
    """Subtracted per malformed tool call (invalid JSON, no name, no arguments)."""
    valid_call_bonus: float = 0.2
    """Added once to a trajectory of a query that offers tools when it made calls and every one ran: a
    rollout that uses the tool correctly beats one that does not call it, before the answer is right."""
    # ---- judge (reference-based model reward)
    judge_base_url: str = ""
    """An OpenAI-compatible server (`.../v1`); empty: a loopback server of the parent checkpoint."""
    judge_model: str = "judge"
    judge_timeout: float = 30.0
    judge_retries: int = 1
    judge_concurrency: Positive = 2
    judge_max_tokens: Positive = 48
    # ---- reward model (reference-free model reward)
    reward_model: str = "reward-model"
    """The stage whose Bradley–Terry model scores the "reward_model" tasks (the recipe's `uses`)."""
    # ---- rollouts
    steps: Positive = 30
    queries_per_step: Positive = 8
    group_size: Positive = 8
    max_new_tokens: Positive = 96
    """Per assistant turn."""
    max_completion_tokens: Positive = 256
    """Per trajectory: model turns and tool responses together."""
    temperature: float = 1.0
    dynamic_sampling: bool = True
    max_gen_rounds: Positive = 2
    scale_rewards: str = "group"
    # ---- evaluation
    eval_every: Positive = 10
    eval_per_task: Positive = 4
    """Held-out queries per task (one sample each, per mode drawn like training prompts)."""
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    eval_top_k: NonNegative = 20
    # ---- bookkeeping (besides `PolicyOptimizer`'s)
    world_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "tasks", {str(k): float(v) for k, v in dict(self.tasks).items()})
        unknown = sorted(set(self.tasks) - set(general_tasks.GENERAL_TASKS))
        if unknown:
            raise ConfigError(f"{self.name}: unknown tasks {unknown}; known: {sorted(general_tasks.GENERAL_TASKS)}")
        if any(w < 0 or not math.isfinite(w) for w in self.tasks.values()) or (self.tasks and
                                                                              sum(self.tasks.values()) <= 0):
            raise ConfigError(f"{self.name}: task weights must be finite, >= 0, and not all 0")
        shares = (self.think_flag_share, self.no_think_flag_share, self.system_flag_share)
        if any(not 0 <= s <= 1 for s in shares) or self.think_flag_share + self.no_think_flag_share > 1:
            raise ConfigError(f"{self.name}: flag shares must be in [0, 1] with think + no_think <= 1")
        check_update_settings(self)
        if self.temperature <= 0 or self.lr <= 0 or min(self.beta, self.malformed_call_penalty,
                                                        self.valid_call_bonus) < 0:
            raise ConfigError(f"{self.name}: temperature and lr must be > 0; beta, malformed_call_penalty and "
                              "valid_call_bonus >= 0")
        if self.max_completion_tokens < self.max_new_tokens:
            raise ConfigError(f"{self.name}: max_completion_tokens ({self.max_completion_tokens}) < max_new_tokens "
                              f"({self.max_new_tokens})")
        if self.judge_timeout <= 0 or self.judge_retries < 0:
            raise ConfigError(f"{self.name}: judge_timeout must be > 0 and judge_retries >= 0")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "GeneralRLConfig") -> "GeneralRLConfig":
        return cls(**checked_fields(cls, d, where))

    @property
    def task_weights(self) -> dict[str, float]:
        """The mix's tasks with a positive weight whose reward is registered (`unscored_tasks` are left out)."""
        weights = self.tasks or general_tasks.default_weights()
        return {name: w for name, w in weights.items() if w > 0 and name not in self.unscored_tasks}

    @property
    def unscored_tasks(self) -> dict[str, str]:
        """Weighted tasks that nothing can reward (their reward is not registered), with the reason: they
        are left out of the mix and reported, never trained on unrewarded."""
        weights = self.tasks or general_tasks.default_weights()
        out = {}
        for name, w in weights.items():
            reward = general_tasks.GENERAL_TASKS[name].reward
            if w > 0 and reward not in REWARDS:
                out[name] = f"no reward function {reward!r} registered"
        return out

    @property
    def tool_limits(self) -> ToolLimits:
        return ToolLimits(max_turns=self.max_turns, max_calls=self.max_calls,
                          max_response_tokens=self.max_response_tokens)

    @property
    def eval_sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.eval_temperature, top_p=self.eval_top_p, top_k=self.eval_top_k)

    def train_config(self) -> TrainConfig:
        """AdamW over optimizer steps (`mu` per generation step), warm-up then constant."""
        return self.policy_train_config(self.steps * self.mu)


# ----------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Prompt:
    """One query as the policy sees it: the chat, the mode its flags ask for, and its token ids."""

    query: Query
    messages: tuple[Mapping[str, str], ...]
    mode: str
    """'think' | 'no_think' | 'unflagged' (thinking)."""
    ids: tuple[int, ...]

    @property
    def thinking(self) -> bool:
        return self.mode != "no_think"


def draw_mode(rng: random.Random, cfg: GeneralRLConfig) -> tuple[str, bool]:
    """(mode, flag in the system message?) for one prompt."""
    u = rng.random()
    mode = "think" if u < cfg.think_flag_share else (
        "no_think" if u < cfg.think_flag_share + cfg.no_think_flag_share else "unflagged")
    return mode, mode != "unflagged" and rng.random() < cfg.system_flag_share


def build_prompt(query: Query, mode: str, in_system: bool, tokenizer, env: ToolEnvironment) -> Prompt:
    """The chat for `query` with its mode flag, rendered up to the assistant header (tools listed when
    the query offers them). The template renders in thinking mode: the flag alone switches it. A query
    whose reference states `thinking` (the format tasks) carries its own flags in its question: its mode
    is that one and nothing is added."""
    if isinstance(query.reference.get("thinking"), bool):
        mode, in_system = ("think" if query.reference["thinking"] else "no_think"), False
        flag = None
    else:
        flag = {"think": FLAG_THINK, "no_think": FLAG_NO_THINK}.get(mode)
    messages: list[dict[str, str]] = []
    if flag and in_system:
        messages.append({"role": "system", "content": flag})
    messages.append({"role": "user", "content": f"{query.question} {flag}" if flag and not in_system
                     else query.question})
    tools = env.schemas(list(query.tools)) if query.tools else None
    text = render(messages, tools=tools, add_generation_prompt=True, enable_thinking=True)
    return Prompt(query, tuple(messages), mode, tuple(tokenizer.encode(text)))


# ----------------------------------------------------------------------------- rewards
class Scorer:
    """Scores trajectories with their task's reward, the mode gate, the malformed-call penalty and the
    valid-call bonus.

    Counts every outcome that is not a plain score: "no reward" by reason (a task whose reward is not
    registered, a reward that raised, a judge or reward-model failure), the gate, the penalties.
    """

    def __init__(self, cfg: GeneralRLConfig) -> None:
        self.cfg = cfg
        self.counts: Counter[str] = Counter()
        self._accepts_thinking: dict[str, bool] = {}

    def _reward_fn(self, name: str):
        fn = REWARDS.get(name or "")
        if fn is not None and name not in self._accepts_thinking:
            self._accepts_thinking[name] = "thinking" in inspect.signature(fn).parameters
        return fn

    def score(self, prompt: Prompt, traj: Trajectory) -> tuple[float, bool]:
        """(reward, followed the mode); NaN reward = no reward."""
        query = prompt.query
        followed = follows_mode(traj.final_text, prompt.thinking)
        fn = self._reward_fn(query.verifier or "")
        if fn is None:
            self.counts[f"no_reward/no reward function {query.verifier!r}"] += 1
            return float("nan"), followed
        kwargs = dict(query.reference)
        if self._accepts_thinking.get(query.verifier or "") and "thinking" not in kwargs:
            kwargs["thinking"] = prompt.thinking
        try:
            result = fn(traj.final_text, **kwargs)
        except Exception as exc:  # a reward bug is an infrastructure failure, never the policy's fault
            result = RewardResult(None, f"reward error: {type(exc).__name__}")
        if result.score is None:
            reason = str(result.reason).split(":")[0] if result.reason else "unknown"
            self.counts[f"no_reward/{query.verifier}/{reason}"] += 1
            return float("nan"), followed
        value = float(result.score)
        if self.cfg.format_gate and not followed:
            self.counts["mode_gate"] += 1
            value = 0.0
        if traj.malformed_calls:
            self.counts["malformed_call_penalty"] += traj.malformed_calls
            value -= self.cfg.malformed_call_penalty * traj.malformed_calls
        elif prompt.query.tools and traj.n_calls and traj.n_ok_calls == traj.n_calls:
            self.counts["valid_call_bonus"] += 1
            value += self.cfg.valid_call_bonus
        return value, followed


# ----------------------------------------------------------------------------- reward servers
class LoopbackJudge:
    """A judge server on 127.0.0.1 serving a frozen copy of a checkpoint through our engine (the
    `qwen3repro serve` app), so the judge reward goes over real HTTP as it does at full scale."""

    def __init__(self, model, tokenizer, max_tokens: int) -> None:
        app = ChatCompletions(model, tokenizer, model_name="judge", max_tokens=max_tokens)
        self.server = make_server(app)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        host, port = self.server.server_address[:2]
        self.base_url = f"http://{host}:{port}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def judge_client(cfg: GeneralRLConfig, base_url: str) -> judge_module.JudgeClient:
    return judge_module.JudgeClient(judge_module.JudgeSettings(
        base_url=base_url, model=cfg.judge_model, max_tokens=cfg.judge_max_tokens, timeout=cfg.judge_timeout,
        retries=cfg.judge_retries, concurrency=cfg.judge_concurrency, enable_thinking=False))


# ----------------------------------------------------------------------------- rollouts
@dataclass
class StepRollouts:
    groups: list[Group]
    prompts: list[Prompt]
    records: list[dict[str, Any]]
    """One per trajectory generated (kept or not): task, mode, reward, followed, calls, length."""
    generated_groups: int = 0
    zero_variance_groups: int = 0
    no_reward_groups: int = 0
    rounds: int = 0


def _trajectory_record(prompt: Prompt, traj: Trajectory, reward: float, followed: bool) -> dict[str, Any]:
    return {"task": prompt.query.domain,  # the task's name: `training_queries` and `heldout_queries` put it there
            "mode": prompt.mode, "reward": reward, "followed": followed, "calls": traj.n_calls,
            "ok_calls": traj.n_ok_calls, "malformed": traj.malformed_calls, "length": len(traj.completion),
            "model_tokens": int(sum(traj.loss_mask)), "finish": traj.finish_reason,
            "outcomes": [c["outcome"] for c in traj.calls], "tools_offered": bool(prompt.query.tools)}


def roll_out(model, tokenizer, prompts: Sequence[Prompt], cfg: GeneralRLConfig, envs: Mapping[bool, ToolEnvironment],
             scorer: Scorer, *, group_size: int, sampling: SamplingParams, generator: torch.Generator
             ) -> list[tuple[Prompt, list[Trajectory], list[float], list[bool]]]:
    """`group_size` trajectories per prompt, scored; prompts that offer tools roll out in the tool
    environment, the others in one with no tools (a call there is answered as an unknown tool)."""
    out: dict[int, tuple[Prompt, list[Trajectory], list[float], list[bool]]] = {}
    was_training = model.training
    model.eval()
    try:
        for offers_tools in (False, True):
            idx = [i for i, p in enumerate(prompts) if bool(p.query.tools) == offers_tools]
            if not idx:
                continue
            flat = [list(prompts[i].ids) for i in idx for _ in range(group_size)]
            trajs = tool_rollouts(model, tokenizer, flat, envs[offers_tools], sampling=sampling,
                                  max_new_tokens=cfg.max_new_tokens, max_completion_tokens=cfg.max_completion_tokens,
                                  generator=generator)
            for j, i in enumerate(idx):
                chunk = trajs[j * group_size:(j + 1) * group_size]
                scored = [scorer.score(prompts[i], t) for t in chunk]
                out[i] = (prompts[i], chunk, [s for s, _ in scored], [f for _, f in scored])
    finally:
        model.train(was_training)
    return [out[i] for i in range(len(prompts))]


def _has_signal(rewards: Sequence[float]) -> bool:
    valid = [r for r in rewards if not math.isnan(r)]
    return len(valid) >= 2 and max(valid) - min(valid) > 1e-6


def collect(model, tokenizer, stream: QueryStream, cfg: GeneralRLConfig, envs, scorer: Scorer, rng: random.Random,
            generator: torch.Generator) -> StepRollouts:
    """Groups with a learning signal (dynamic sampling on reward variance), refilled for `max_gen_rounds`."""
    result = StepRollouts([], [], [])
    sampling = SamplingParams(temperature=cfg.temperature)
    while len(result.groups) < cfg.queries_per_step and result.rounds < (cfg.max_gen_rounds if cfg.dynamic_sampling
                                                                          else 1):
        result.rounds += 1
        queries = stream.take(cfg.queries_per_step - len(result.groups))
        prompts = [build_prompt(q, *draw_mode(rng, cfg), tokenizer, envs[bool(q.tools)]) for q in queries]
        for prompt, trajs, rewards, followed in roll_out(model, tokenizer, prompts, cfg, envs, scorer,
                                                         group_size=cfg.group_size, sampling=sampling,
                                                         generator=generator):
            result.generated_groups += 1
            result.records += [_trajectory_record(prompt, t, r, f) for t, r, f in zip(trajs, rewards, followed)]
            valid = sum(not math.isnan(r) for r in rewards)
            if valid < 2:
                result.no_reward_groups += 1
            elif not _has_signal(rewards):
                result.zero_variance_groups += 1
            if _has_signal(rewards) or (not cfg.dynamic_sampling and valid >= 2):
                result.groups.append(Group(
                    prompt.query, list(prompt.ids), [t.completion for t in trajs], [t.logprobs for t in trajs],
                    [[m == 0 for m in t.loss_mask] for t in trajs], [t.finish_reason for t in trajs], rewards))
                result.prompts.append(prompt)
    result.groups = result.groups[:cfg.queries_per_step]
    return result


def summarize_records(records: Sequence[Mapping[str, Any]], prefix: str = "") -> dict[str, float]:
    """Means over trajectory records: reward (overall and per task), mode-follow (overall, per mode),
    tool calls per trajectory, tool-call success, malformed calls, no-reward share."""
    out: dict[str, float] = {}
    if not records:
        return out

    def mean(values):
        values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
        return sum(values) / len(values) if values else float("nan")

    out[f"{prefix}reward"] = mean([r["reward"] for r in records])
    out[f"{prefix}follow"] = mean([float(r["followed"]) for r in records])
    for mode in MODES:
        rows = [r for r in records if r["mode"] == mode]
        if rows:
            out[f"{prefix}follow/{mode}"] = mean([float(r["followed"]) for r in rows])
    by_task: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r["reward"])
    for task, values in sorted(by_task.items()):
        out[f"{prefix}reward/{task}"] = mean(values)
    tool_rows = [r for r in records if r["tools_offered"]]
    if tool_rows:
        out[f"{prefix}tool_calls"] = mean([r["calls"] for r in tool_rows])
        # A trajectory's tool use succeeded when it made at least one call and every call ran.
        out[f"{prefix}tool_success"] = mean([float(r["calls"] > 0 and r["ok_calls"] == r["calls"]) for r in tool_rows])
    out[f"{prefix}malformed_calls"] = mean([r["malformed"] for r in records])
    outcomes = Counter(o for r in records for o in r.get("outcomes", ()))
    for outcome, n in sorted(outcomes.items()):
        out[f"{prefix}calls/{outcome}"] = float(n)
    out[f"{prefix}no_reward_share"] = sum(isinstance(r["reward"], float) and math.isnan(r["reward"])
                                          for r in records) / len(records)
    out[f"{prefix}length"] = mean([r["length"] for r in records])
    return out


# ----------------------------------------------------------------------------- the update
# A prompt that lists tools is several hundred tokens longer than one that does not, and a rollout batch
# right-aligns every prompt to the longest: one batch would spend most of its compute on padding. The
# groups are therefore split into up to MAX_BUCKETS buckets of similar lengths, each its own padded batch,
# and one optimizer step accumulates the gradients of every bucket, each weighted so that the sum is the
# loss of the whole batch (token-level losses by the bucket's share of the tokens, sequence-level ones by
# its share of the rows): the same update as one unpadded batch.
MAX_BUCKETS = 3


def _padded_cells(groups: Sequence[Group]) -> int:
    """Token positions of `groups` as one padded batch (rows x (longest prompt + longest completion))."""
    prompt = max(len(g.prompt) for g in groups)
    completion = max((len(c) for g in groups for c in g.completions), default=0)
    return sum(len(g.completions) for g in groups) * (prompt + max(completion, 1))


def step_advantages(groups: Sequence[Group], buckets: Sequence[Sequence[Group]], scale: str) -> list[torch.Tensor]:
    """Each bucket's advantages, row for row, as `build_batch` computes them over all the step's `groups`."""
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32)
    whole = group_advantages(rewards, len(groups[0].completions), scale).view(len(groups), -1)
    row = {id(g): whole[i] for i, g in enumerate(groups)}
    return [torch.cat([row[id(g)] for g in bucket]) for bucket in buckets]


def bucket_groups(groups: Sequence[Group], max_buckets: int = MAX_BUCKETS) -> list[list[Group]]:
    """`groups` sorted by prompt length and cut into at most `max_buckets` runs that minimise the padded
    positions of all the batches (an exact search over the cut points)."""
    ordered = sorted(groups, key=lambda g: (len(g.prompt), max((len(c) for c in g.completions), default=0)))
    n = len(ordered)
    best: dict[tuple[int, int], tuple[int, list[int]]] = {}

    def solve(start: int, left: int) -> tuple[int, list[int]]:
        if start == n:
            return 0, []
        if (start, left) not in best:
            options = [(_padded_cells(ordered[start:]), [n])]
            if left > 1:
                for end in range(start + 1, n):
                    rest, cuts = solve(end, left - 1)
                    options.append((_padded_cells(ordered[start:end]) + rest, [end, *cuts]))
            best[start, left] = min(options, key=lambda o: o[0])
        return best[start, left]

    cuts = [0, *solve(0, max_buckets)[1]] if n else [0]
    return [ordered[a:b] for a, b in zip(cuts, cuts[1:])]


@dataclass
class Bucket:
    """One padded batch of a step, its old and reference log-probs and its masked sums."""

    batch: RolloutBatch
    old_logps: torch.Tensor
    ref_logps: torch.Tensor
    tokens: float
    entropy_sum: float
    kl_sum: float
    gap_sum: float
    masked_tool_tokens: int

    @classmethod
    @torch.no_grad()
    def of(cls, groups: Sequence[Group], model, reference, cfg: GeneralRLConfig, pad_id: int, device,
           advantages: torch.Tensor) -> "Bucket":
        """`advantages`: the rows' advantages, computed over the whole step (`step_advantages`): a bucket's own
        statistics would differ from the step's under scale_rewards = "batch"."""
        batch = dataclasses.replace(build_batch(groups, pad_id=pad_id), advantages=advantages).to(device)
        old_logps, entropy = policy_logprobs(model, batch, cfg.temperature)
        ref_logps, _ = policy_logprobs(reference, batch, cfg.temperature, with_entropy=False)
        mask = batch.completion_mask
        delta = ref_logps - old_logps
        in_rows = batch.attention_mask[:, batch.prompt_width:]
        return cls(batch, old_logps, ref_logps, float(mask.sum()), float((entropy * mask).sum()),
                   float(((torch.exp(delta) - delta - 1) * mask).sum()),
                   float(((old_logps - batch.sampler_logps).abs() * mask).sum()),
                   int(((mask == 0) & in_rows).sum()))


def _weight(bucket: Bucket, loss_type: str, tokens: float, rows: int) -> float:
    """The bucket's share of the whole batch's loss (see the section comment)."""
    if loss_type in ("dapo", "bnpo"):
        return bucket.tokens / max(tokens, 1.0)
    return len(bucket.batch) / rows


def optimisation_passes(model, optimizer, buckets: Sequence[Bucket], cfg: GeneralRLConfig,
                        controller: EntropyController, entropy_now: float, lr_at) -> list[dict[str, float]]:
    """`mu` passes over the step's buckets, one AdamW step per pass (gradients accumulated over the buckets).
    Records as `stages.grpo.optimisation_passes` gives them."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    coef = controller.active_coef(entropy_now)
    tokens, rows = sum(b.tokens for b in buckets), sum(len(b.batch) for b in buckets)
    records = []
    for _ in range(cfg.mu):
        lr = lr_at(len(records))
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_value = entropy_value = clipped = ratio_sum = 0.0
        ratio_max = 1.0
        for b in buckets:
            mask = b.batch.completion_mask
            logps, entropy = policy_logprobs(model, b.batch, cfg.temperature, with_entropy=True)
            loss = grpo_loss(logps, b.old_logps, b.batch.advantages, mask, loss_type=cfg.loss_type,
                             epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                             ref_logps=b.ref_logps if cfg.beta > 0 else None,
                             max_completion_length=cfg.max_completion_tokens)
            share = b.tokens / max(tokens, 1.0)
            bucket_entropy = masked_mean(entropy, mask)
            total = _weight(b, cfg.loss_type, tokens, rows) * loss - coef * share * bucket_entropy
            total.backward()
            loss_value += float(_weight(b, cfg.loss_type, tokens, rows) * loss.detach())
            entropy_value += share * float(bucket_entropy.detach())
            with torch.no_grad():
                ratio = torch.exp(logps.detach() - b.old_logps)
                clipped += share * float(clip_fraction(ratio, b.batch.advantages, mask, cfg.epsilon_low,
                                                       cfg.epsilon_high))
                ratio_sum += float((ratio * mask).sum())
                if mask.any():
                    ratio_max = max(ratio_max, float((ratio * mask).max()))
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm or float("inf")))
        if not math.isfinite(grad_norm) or not math.isfinite(loss_value):
            raise FloatingPointError(f"non-finite general-RL loss or gradient (loss {loss_value}, grad {grad_norm})")
        optimizer.step()
        records.append({"loss": loss_value, "grad_norm": grad_norm, "entropy_bonus_coef": coef, "lr": lr,
                        "clip_fraction": clipped, "ratio_mean": ratio_sum / max(tokens, 1.0), "ratio_max": ratio_max,
                        "train_entropy": entropy_value})
    return records


# ----------------------------------------------------------------------------- the stage
def _named(pairs: Sequence[tuple[str, Query]]) -> list[Query]:
    """Queries whose `domain` is their task's name: general RL tabulates rewards by task."""
    return [dataclasses.replace(query, domain=name) for name, query in pairs]


def training_queries(cfg: GeneralRLConfig) -> list[Query]:
    return _named(general_tasks.sample_task_queries(cfg.task_weights, cfg.n_queries, seed=cfg.seed, heldout=False,
                                                    world=build_world(cfg.world_seed)))


def heldout_queries(cfg: GeneralRLConfig) -> list[Query]:
    """`eval_per_task` held-out queries of every task of the mix, in task order."""
    world = build_world(cfg.world_seed)
    out: list[Query] = []
    for task in cfg.task_weights:
        out += _named(general_tasks.sample_task_queries({task: 1.0}, cfg.eval_per_task, seed=cfg.seed + 7919,
                                                        heldout=True, world=world))
    return out


def evaluate(model, tokenizer, queries: Sequence[Query], cfg: GeneralRLConfig, envs, scorer: Scorer,
             seed: int) -> dict[str, float]:
    """Held-out reward per task, mode-follow and tool-call success: one sample per query at the pinned
    evaluation settings, modes drawn as in training (seeded, so every evaluation sees the same prompts)."""
    rng = random.Random(f"general-rl-eval|{seed}")
    prompts = [build_prompt(q, *draw_mode(rng, cfg), tokenizer, envs[bool(q.tools)]) for q in queries]
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    records = []
    for prompt, trajs, rewards, followed in roll_out(model, tokenizer, prompts, cfg, envs, scorer, group_size=1,
                                                     sampling=cfg.eval_sampling, generator=generator):
        records += [_trajectory_record(prompt, t, r, f) for t, r, f in zip(trajs, rewards, followed)]
    return summarize_records(records, "eval/")


def run(cfg: GeneralRLConfig, parent: Path, ctx: StageContext) -> Path:
    """Train general RL from the fused checkpoint `parent` into `ctx.out_dir` (resumes a cut run)."""
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parent = Path(parent)
    rm_dir = ctx.input_dir(cfg.reward_model)
    torch_device = resolve_device(ctx.device_for(cfg.device))
    tokenizer = Tokenizer.load(parent)
    model = Qwen3.from_pretrained(parent).to(torch_device)
    reference = copy.deepcopy(model).eval().requires_grad_(False)  # the fused model: KL anchor and loopback judge

    world = build_world(cfg.world_seed)
    tools = default_tools(world)
    envs = {True: ToolEnvironment(tools, cfg.tool_limits), False: ToolEnvironment([], cfg.tool_limits)}
    scorer = Scorer(cfg)
    judge_server = LoopbackJudge(reference, tokenizer, cfg.judge_max_tokens) if not cfg.judge_base_url else None
    judge = judge_client(cfg, cfg.judge_base_url or judge_server.base_url)
    rm_scorer = reward_model_module.RewardModelScorer.load(rm_dir, device=torch_device)  # next to the policy
    judge_module.configure_judge(judge)
    reward_model_module.configure_reward_model(rm_scorer)
    try:
        return _train(cfg, parent, out, model, reference, tokenizer, envs, scorer, judge, rm_dir, ctx, torch_device)
    finally:
        judge_module.configure_judge(None)
        reward_model_module.configure_reward_model(None)
        if judge_server is not None:
            judge_server.close()


def _train(cfg: GeneralRLConfig, parent: Path, out: Path, model, reference, tokenizer, envs, scorer: Scorer,
           judge, rm_dir: Path, ctx: StageContext, torch_device) -> Path:
    queries = training_queries(cfg)
    heldout = heldout_queries(cfg)
    stream = QueryStream(queries, cfg.seed)
    run = TrainingRun(model, ctx.on_device(cfg.train_config()), out, total=cfg.steps, name=cfg.name,
                      printer=ctx.printer,
                      run_extra={"stage": cfg.name, "general_rl": config_hash(identity_fields(cfg))})
    controller = entropy_controller(cfg)
    step, opt_steps = run.step, int(run.state.get("opt_steps", 0))
    if run.resumed_from is not None:
        stream.load_state_dict(run.state["loader"])
        controller.load_state_dict(run.state["entropy_controller"])
        # The counted reward outcomes (training and evaluation alike) go on from where the cut run saved them,
        # so eval.json's totals are the uncut run's.
        scorer.counts = Counter(run.state.get("reward_counts", {}))
        judge.stats.restore(run.state.get("judge_counts", {}))
    else:
        for name, why in cfg.unscored_tasks.items():
            ctx.say(f"{cfg.name}: WARNING task {name} left out of the mix: {why}")
        mix = ", ".join(f"{k} {v:g}" for k, v in cfg.task_weights.items())
        ctx.say(f"{cfg.name}: {cfg.steps} steps x {cfg.queries_per_step} queries x {cfg.group_size} rollouts over "
                f"{len(cfg.task_weights)} tasks ({len(queries)} queries; {mix})")

    def run_eval() -> dict[str, float]:
        return run.evaluate(lambda m: evaluate(m, tokenizer, heldout, cfg, envs, scorer, cfg.seed + 7919))

    def save(at_step: int) -> str:
        return run.save(at_step, loader_state=stream.state_dict(), opt_steps=opt_steps,
                        entropy_controller=controller.state_dict(), reward_counts=dict(scorer.counts),
                        judge_counts=judge.stats.counts(), general_rl_config=asdict(cfg))

    if step == 0:
        run.log({"step": 0, **run_eval()})
    while step < cfg.steps:
        step_seed = cfg.seed * 1_000_003 + step
        generator = torch.Generator(device=torch_device).manual_seed(step_seed)
        rng = random.Random(f"general-rl-modes|{step_seed}")
        before = Counter(scorer.counts)
        judged_before = judge.stats.counts()
        rollouts = collect(model, tokenizer, stream, cfg, envs, scorer, rng, generator)
        generated = max(rollouts.generated_groups, 1)
        record: dict[str, Any] = {"step": step + 1, **summarize_records(rollouts.records),
                                  "groups_generated": rollouts.generated_groups, "groups_kept": len(rollouts.groups),
                                  "zero_variance_share": rollouts.zero_variance_groups / generated,
                                  "no_reward_groups": rollouts.no_reward_groups, "gen_rounds": rollouts.rounds}
        for key, n in (scorer.counts - before).items():
            record[f"count/{key}"] = n
        judged = judge.stats.counts()
        for key, n in judged.items():
            if n - judged_before.get(key, 0):
                record[f"judge/{key}"] = n - judged_before.get(key, 0)
        if rollouts.groups:
            cut = bucket_groups(rollouts.groups)
            buckets = [Bucket.of(groups, model, reference, cfg, tokenizer.pad_token_id, torch_device, advantages)
                       for groups, advantages in zip(cut, step_advantages(rollouts.groups, cut, cfg.scale_rewards))]
            tokens = sum(b.tokens for b in buckets)
            entropy_now = sum(b.entropy_sum for b in buckets) / max(tokens, 1.0)
            record.update(entropy=entropy_now, kl=sum(b.kl_sum for b in buckets) / max(tokens, 1.0),
                          sampler_logp_gap=sum(b.gap_sum for b in buckets) / max(tokens, 1.0),
                          masked_tool_tokens=sum(b.masked_tool_tokens for b in buckets), buckets=len(buckets))
            first_opt_step = opt_steps
            updates = optimisation_passes(model, run.optimizer, buckets, cfg, controller, entropy_now,
                                          lambda k: run.schedule.lr(first_opt_step + k))
            opt_steps += len(updates)
            for key in ("loss", "grad_norm", "clip_fraction", "ratio_mean", "lr"):
                record[key] = sum(u[key] for u in updates) / len(updates)
            record["entropy_coef"] = updates[0]["entropy_bonus_coef"]
            controller.update(entropy_now)
        else:
            record["entropy_coef"] = controller.coef
        step += 1
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            record.update(run_eval())
        record["elapsed_s"] = run.elapsed()
        fields: list[str] = []
        if step % cfg.log_every == 0 or step == cfg.steps:
            fields = [f"reward {record.get('reward', float('nan')):.3f}", f"follow {record.get('follow', 0):.2f}",
                      f"tools {record.get('tool_success', float('nan')):.2f}",
                      f"entropy {record.get('entropy', float('nan')):.3f}", f"kl {record.get('kl', 0.0):.4f}",
                      f"kept {len(rollouts.groups)}/{rollouts.generated_groups}"]
            if "eval/reward" in record:
                fields.append(f"eval reward {record['eval/reward']:.3f} follow {record['eval/follow']:.2f}")
        run.log(record, *fields)
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
            save(step)

    run.finish(step, save)
    copy_tokenizer(parent, out)
    records = run.metrics.read()
    write_json_atomic(out / "eval.json", summarize(cfg, records, scorer, judge))
    write_lineage(out, make_lineage(cfg.name, cfg, parent, uses={cfg.reward_model: rm_dir}))
    ctx.say(f"{cfg.name}: done in {format_duration(run.elapsed())}")
    return out


def _finite(value: Any) -> Any:
    """A logged metric as eval.json keeps it: a mean over no valid reward (logged as "nan") is None."""
    if isinstance(value, str) or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value


def summarize(cfg: GeneralRLConfig, records: Sequence[Mapping[str, Any]], scorer: Scorer, judge) -> dict[str, Any]:
    """eval.json: held-out metrics before (step 0, the fused model) and after, per-task curves' ends,
    entropy trajectory, counted no-reward reasons and judge outcomes, pinned settings."""
    evals = [r for r in records if "eval/reward" in r]
    steps = [r for r in records if isinstance(r.get("entropy"), (int, float))]
    before, after = (evals[0], evals[-1]) if evals else ({}, {})
    smoothed = window_means([r["entropy"] for r in steps], 5)
    keys = sorted({k for r in evals for k in r if k.startswith("eval/")})
    return {
        "stage": cfg.name,
        "steps": cfg.steps,
        "before": {k[5:]: _finite(before.get(k)) for k in keys},
        "after": {k[5:]: _finite(after.get(k)) for k in keys},
        "curve_steps": [r["step"] for r in evals],
        "entropy_start": smoothed[0] if smoothed else None,
        "entropy_min": min(smoothed) if smoothed else None,
        "counts": dict(scorer.counts),
        "judge": judge.stats.counts(),
        "tasks": cfg.task_weights,
        "unscored_tasks": cfg.unscored_tasks,
        "eval_settings": {"per_task": cfg.eval_per_task, "temperature": cfg.eval_temperature, "top_p": cfg.eval_top_p,
                          "top_k": cfg.eval_top_k, "max_new_tokens": cfg.max_new_tokens,
                          "max_completion_tokens": cfg.max_completion_tokens, "heldout": "data.tasks.is_heldout",
                          "seed": cfg.seed + 7919},
        "elapsed_s": records[-1].get("elapsed_s") if records else None,
    }


__all__ = ["Bucket", "GeneralRLConfig", "MAX_BUCKETS", "Prompt", "Scorer", "bucket_groups", "build_prompt", "collect",
           "draw_mode", "evaluate", "heldout_queries", "optimisation_passes", "run", "summarize", "summarize_records",
           "training_queries"]
