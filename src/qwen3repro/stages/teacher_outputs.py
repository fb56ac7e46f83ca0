"""Teacher outputs for strong-to-weak distillation (Qwen3 report §4.5, "off-policy distillation": "we combine
the outputs of teacher models generated with both /think and /no_think modes for response distillation").

    run(TeacherOutputsConfig.from_dict(recipe ⊕ scale), parent=<the teacher checkpoint>, ctx) -> <out_dir>

The stage's parent is the teacher: the flagship at the end of its chain (general RL). What one run does:

1. **Prompts** spanning the task mix: reasoning task items of the training partition (`data.tasks`) and
   general tasks (`data.general_tasks`, the rule-verified tasks answered in one turn by default), each
   asked in every mode of `modes`. The mode is set the ways a user sets it (`chat.wants_thinking`): the
   flag in the user turn, in a system message, in the last turn of a two-turn chat whose first turn holds
   the other flag, or (thinking only) no flag at all.
2. **Generation** by the teacher through the one generation engine (`backend = "engine"`), or through vLLM
   at full scale (`"vllm"`; `"auto"` takes vLLM when it is installed), at the report's sampling settings of
   each mode (thinking: T 0.6, top-p 0.95, top-k 20; non-thinking: T 0.7, top-p 0.8, top-k 20).
3. **Kept**: a response that ended on its own, follows its mode (a non-empty think block when thinking,
   the empty one when not; `evals.thinking.follows_mode`) and, where the query has a verifier, is verified
   correct; at most `keep_per_query` distinct responses per (query, mode). Rejections are counted by reason.
4. **Written** as a `datasets` dataset (`data/`, `Dataset.save_to_disk`): one row per kept response with
   its conversation, mode, task, how the mode was set, whether a verifier checked it, the teacher
   checkpoint's lineage hash and the sampling settings; `teacher_outputs.json` holds the counts, the
   teacher's vocabulary and tokenizer hash (what a student is checked against) and the generation FLOPs;
   `lineage.json` last.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import datasets
import torch

from ..chat import EMPTY_THINK, parse, render, wants_thinking
from ..config import ConfigError, ModelConfig
from ..config_fields import NonNegative, Positive, checked_fields
from ..data import general_tasks, tasks
from ..data.queries import Query
from ..evals.thinking import follows_mode
from ..files import write_json_atomic
from ..generate import NON_THINKING_SAMPLING, THINKING_SAMPLING, SamplingParams, generate
from ..lineage import make_lineage, read_lineage, write_lineage
from ..models.qwen3 import Qwen3
from ..rl.rollout import ACCURACY_THRESHOLD, verifier_score
from ..tokenizer import Tokenizer
from ..train.compute import FORWARD_FLOPS_PER_PARAM, flop_parameters
from .common import StageContext, copy_tokenizer

DATA_DIR = "data"
REPORT_FILE = "teacher_outputs.json"
MODES = ("think", "no_think")
FLAGS = {"think": "/think", "no_think": "/no_think"}
BACKENDS = ("engine", "vllm", "auto")
# How a prompt sets its mode (the ways ThinkFollow tests a model on, so the student sees each of them).
MODE_SETTINGS = ("user_flag", "system_flag", "multi_turn", "unflagged")


def default_general_weights() -> dict[str, float]:
    """The general tasks a teacher answers in one turn and a rule verifies: the tool tasks need the tool
    loop of general RL, and the judge and reward-model tasks have no rule to keep only right answers."""
    return {name: t.weight for name, t in general_tasks.GENERAL_TASKS.items() if t.kind == "rule" and not t.tools}


@dataclass(frozen=True)
class TeacherOutputsConfig:
    name: str = "teacher-outputs"
    families: tuple[str, ...] = ()
    """Reasoning task families (empty: all of `data.tasks`)."""
    family_weights: Mapping[str, float] = field(default_factory=dict)
    """Shares of the families among the reasoning queries (empty: uniform)."""
    n_task_queries: Positive = 256
    n_general_queries: NonNegative = 64
    general_weights: Mapping[str, float] = field(default_factory=dict)
    """General task shares (empty: `default_general_weights()`)."""
    modes: tuple[str, ...] = MODES
    samples_per_query: Positive = 2
    """Responses sampled per (query, mode)."""
    keep_per_query: Positive = 1
    """Distinct kept responses per (query, mode): the report's distillation keeps few per query."""
    max_new_tokens_think: Positive = 288
    max_new_tokens_no_think: Positive = 96
    non_thinking_presence_penalty: float = 0.0
    """The report's non-thinking setting is 1.5; the tiny tokenizer has one token per digit, so a presence
    penalty would push against every repeated digit of an answer: off unless set."""
    system_flag_share: float = 0.25
    multi_turn_share: float = 0.25
    unflagged_share: float = 0.15
    """Shares of the thinking prompts with no flag (thinking is the default); the rest flag in the user turn."""
    verified_only: bool = True
    """Keep only verified-correct responses where the query has a verifier."""
    backend: str = "engine"
    batch_size: Positive = 64
    seed: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "families", tuple(self.families))
        object.__setattr__(self, "modes", tuple(self.modes))
        unknown = set(self.families) - set(tasks.FAMILIES)
        if unknown:
            raise ConfigError(f"{self.name}: unknown task families {sorted(unknown)}; known: {list(tasks.FAMILIES)}")
        stray = sorted(set(self.family_weights) - set(self.families or tasks.FAMILIES))
        if stray or any(not (isinstance(w, (int, float)) and w >= 0) for w in self.family_weights.values()):
            raise ConfigError(f"{self.name}: family_weights must give shares >= 0 to the stage's families "
                              f"{list(self.families or tasks.FAMILIES)}, got {dict(self.family_weights)}")
        if self.family_weights and not sum(self.family_weights.values()) > 0:
            raise ConfigError(f"{self.name}: family_weights give no family a positive share")
        if not self.modes or set(self.modes) - set(MODES) or len(set(self.modes)) != len(self.modes):
            raise ConfigError(f"{self.name}: modes must be distinct names from {MODES}, got {list(self.modes)}")
        unknown_tasks = sorted(set(self.general_weights) - set(general_tasks.GENERAL_TASKS))
        if unknown_tasks:
            raise ConfigError(f"{self.name}: unknown general_weights tasks {unknown_tasks}")
        with_tools = sorted(n for n in self.general_weights if general_tasks.GENERAL_TASKS[n].tools)
        if with_tools:
            raise ConfigError(f"{self.name}: tool tasks {with_tools} need the multi-turn tool loop of general RL; "
                              "teacher outputs are single-turn")
        for name in ("system_flag_share", "multi_turn_share", "unflagged_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{self.name}: {name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.system_flag_share + self.multi_turn_share + self.unflagged_share > 1.0:
            raise ConfigError(f"{self.name}: system_flag_share + multi_turn_share + unflagged_share must be <= 1")
        if self.backend not in BACKENDS:
            raise ConfigError(f"{self.name}: backend must be one of {BACKENDS}, got {self.backend!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "TeacherOutputsConfig") -> "TeacherOutputsConfig":
        return cls(**checked_fields(cls, d, where))

    def sampling(self, mode: str) -> SamplingParams:
        """The report's sampling settings of the mode (§4.3 footnote / model card)."""
        if mode == "think":
            return THINKING_SAMPLING
        return replace(NON_THINKING_SAMPLING, presence_penalty=self.non_thinking_presence_penalty)

    def max_new_tokens(self, mode: str) -> int:
        return self.max_new_tokens_think if mode == "think" else self.max_new_tokens_no_think


# ----------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Prompt:
    """One conversation for the teacher to finish: the query, the mode it asks for and how it asks."""

    query: Query
    task: str
    mode: str
    setting: str
    messages: tuple[dict, ...]


def prompt_queries(cfg: TeacherOutputsConfig) -> list[tuple[str, Query]]:
    """(task name, query): reasoning items, then general-task queries, all from the training partition."""
    rng = random.Random(f"teacher-queries|{cfg.seed}")
    families = cfg.families or tuple(tasks.FAMILIES)
    weights = [float(cfg.family_weights.get(f, 0.0)) for f in families] if cfg.family_weights else None
    seen: set[str] = set()
    out: list[tuple[str, Query]] = []
    for _ in range(100 * cfg.n_task_queries):
        if len(out) == cfg.n_task_queries:
            break
        family = rng.choices(families, weights=weights)[0]
        item = tasks.sample_item(rng, heldout=False, families=(family,))
        if item.uid not in seen:
            seen.add(item.uid)
            out.append((item.family, Query.from_task(item)))
    if cfg.n_general_queries:
        weights = dict(cfg.general_weights) or default_general_weights()
        out += general_tasks.sample_task_queries(weights, cfg.n_general_queries, seed=cfg.seed, heldout=False)
    return out


def _setting(rng: random.Random, cfg: TeacherOutputsConfig, mode: str) -> str:
    r = rng.random()
    if r < cfg.system_flag_share:
        return "system_flag"
    if r < cfg.system_flag_share + cfg.multi_turn_share:
        return "multi_turn"
    if mode == "think" and r < cfg.system_flag_share + cfg.multi_turn_share + cfg.unflagged_share:
        return "unflagged"
    return "user_flag"


def build_prompts(cfg: TeacherOutputsConfig) -> list[Prompt]:
    """Every query in every mode, each with a seeded way of setting the mode (see the module docstring)."""
    rng = random.Random(f"teacher-prompts|{cfg.seed}")
    families = cfg.families or tuple(tasks.FAMILIES)
    prompts = []
    for task, query in prompt_queries(cfg):
        for mode in cfg.modes:
            setting = _setting(rng, cfg, mode)
            if any(f in query.question for f in FLAGS.values()):
                setting = "user_flag"  # a question with its own flags (the format tasks): the last flag decides
            flag, other = FLAGS[mode], FLAGS["no_think" if mode == "think" else "think"]
            if setting == "system_flag":
                messages = [{"role": "system", "content": flag}, {"role": "user", "content": query.question}]
            elif setting == "multi_turn":  # an earlier exchange in the other mode, answered (context only)
                earlier = tasks.sample_item(rng, heldout=False, families=families)
                messages = [{"role": "user", "content": f"{earlier.question} {other}"},
                            {"role": "assistant", "content": earlier.answer, "train": False},
                            {"role": "user", "content": f"{query.question} {flag}"}]
            elif setting == "unflagged":
                messages = [{"role": "user", "content": query.question}]
            else:
                messages = [{"role": "user", "content": f"{query.question} {flag}"}]
            if wants_thinking(messages) != (mode == "think"):
                raise AssertionError(f"teacher prompt built wrong: {messages} does not ask for {mode}")
            prompts.append(Prompt(query, task, mode, setting, tuple(messages)))
    return prompts


# ----------------------------------------------------------------------------- checks
def tokenizer_hash(checkpoint: Path) -> str:
    """The hash of a checkpoint's tokenizer.json: two checkpoints share a vocabulary iff these are equal."""
    return hashlib.sha256((Path(checkpoint) / "tokenizer.json").read_bytes()).hexdigest()[:16]


def check_same_vocabulary(teacher: Mapping[str, Any], student: Mapping[str, Any], where: str) -> None:
    """Refuse a teacher and a student that do not share one vocabulary: distillation compares their
    distributions token by token. Each side is {"checkpoint", "vocab_size", "tokenizer_hash"}."""
    if teacher["vocab_size"] != student["vocab_size"]:
        raise ConfigError(f"{where}: teacher {teacher['checkpoint']} has vocab_size {teacher['vocab_size']} but "
                          f"student {student['checkpoint']} has {student['vocab_size']}: distillation needs one "
                          "vocabulary")
    if teacher["tokenizer_hash"] != student["tokenizer_hash"]:
        raise ConfigError(f"{where}: teacher {teacher['checkpoint']} and student {student['checkpoint']} have "
                          f"different tokenizers (tokenizer.json {teacher['tokenizer_hash']} vs "
                          f"{student['tokenizer_hash']}): distillation needs one vocabulary")


def vocabulary_of(checkpoint: Path) -> dict[str, Any]:
    """{"checkpoint", "vocab_size", "tokenizer_hash"} of a checkpoint directory, read without loading weights."""
    checkpoint = Path(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    return {"checkpoint": str(checkpoint), "vocab_size": int(config["vocab_size"]),
            "tokenizer_hash": tokenizer_hash(checkpoint)}


# ----------------------------------------------------------------------------- generation
def _vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str) -> str:
    """'engine' or 'vllm'; 'auto' takes vLLM when it is installed. Asking for vLLM without it is an error."""
    if backend == "auto":
        return "vllm" if _vllm_available() else "engine"
    if backend == "vllm" and not _vllm_available():
        raise ConfigError("teacher-outputs: backend 'vllm' needs the vllm package (pip install vllm); "
                          "backend 'engine' or 'auto' uses the project's own engine")
    return backend


def _generate_engine(model: Qwen3, tokenizer: Tokenizer, prompts: Sequence[list[int]], sampling: SamplingParams,
                     max_new_tokens: int, seed: int, batch_size: int) -> list[tuple[list[int], str]]:
    gens = generate(model, list(prompts), sampling, max_new_tokens=max_new_tokens, tokenizer=tokenizer, seed=seed,
                    max_batch_size=batch_size, pad_token_id=tokenizer.pad_token_id)
    return [(list(g.token_ids), g.finish_reason) for g in gens]


def _generate_vllm(checkpoint: Path, prompts: Sequence[list[int]], sampling: SamplingParams, max_new_tokens: int,
                   seed: int, stop_token_ids: Sequence[int]) -> list[tuple[list[int], str]]:  # pragma: no cover
    import vllm  # the full-scale path: one vLLM engine over the teacher's Hugging Face checkpoint

    llm = vllm.LLM(model=str(checkpoint), seed=seed)
    params = vllm.SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or -1,
                                 min_p=sampling.min_p, presence_penalty=sampling.presence_penalty,
                                 max_tokens=max_new_tokens, stop_token_ids=list(stop_token_ids))
    outs = llm.generate([vllm.inputs.TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    return [(list(o.outputs[0].token_ids) + ([stop_token_ids[0]] if o.outputs[0].finish_reason == "stop" else []),
             "stop" if o.outputs[0].finish_reason == "stop" else "length") for o in outs]


def assistant_content(text: str, mode: str) -> str:
    """The kept response as a training turn: Table 9's formats (thinking "<think>\\n…\\n</think>\\n\\n answer",
    non-thinking the empty think block and the answer)."""
    parsed = parse(text)
    answer = parsed["content"].strip()
    if mode == "no_think":
        return f"{EMPTY_THINK}{answer}"
    return f"<think>\n{parsed['reasoning_content'].strip()}\n</think>\n\n{answer}"


def judge(prompt: Prompt, text: str, token_ids: Sequence[int], finish_reason: str, verified_only: bool
          ) -> tuple[str, bool | None]:
    """(why, verified): why = 'kept' or the rejection reason; verified = None where no rule verifier exists."""
    if finish_reason != "stop":
        return "cut_by_length", None
    if not follows_mode(text, prompt.mode == "think"):
        return "wrong_mode_or_malformed", None
    if not prompt.query.verifier:
        return "kept", None
    result = verifier_score(prompt.query, text.split("<|im_end|>")[0], token_ids)
    if result.score is None:
        return ("verifier_failed", None) if verified_only else ("kept", None)
    correct = result.score >= ACCURACY_THRESHOLD
    if verified_only and not correct:
        return "wrong_answer", False
    return "kept", correct


@torch.no_grad()
def teacher_outputs(cfg: TeacherOutputsConfig, teacher: Path, ctx: StageContext | None = None
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate and filter the teacher's responses; (rows of the dataset, counts for the report)."""
    teacher = Path(teacher)
    tokenizer = Tokenizer.load(teacher)
    backend = resolve_backend(cfg.backend)
    device = ctx.torch_device if ctx is not None else None  # the run's device (default: the CPU)
    model = Qwen3.from_pretrained(teacher, device=device).eval() if backend == "engine" else None
    lineage = read_lineage(teacher)
    teacher_hash = lineage.hash if lineage else None
    prompts = build_prompts(cfg)
    rows: list[dict[str, Any]] = []
    counts: dict[str, dict[str, int]] = {}
    generated_tokens = 0
    t0 = time.perf_counter()
    for mode in cfg.modes:
        sampling, max_new = cfg.sampling(mode), cfg.max_new_tokens(mode)
        mine = [p for p in prompts if p.mode == mode]
        ids = [tokenizer.encode(render(list(p.messages), add_generation_prompt=True)) for p in mine]
        flat = [i for i in range(len(mine)) for _ in range(cfg.samples_per_query)]
        seed = cfg.seed * 1_000_003 + MODES.index(mode)
        if backend == "engine":
            outs = _generate_engine(model, tokenizer, [ids[i] for i in flat], sampling, max_new, seed, cfg.batch_size)
        else:  # pragma: no cover - needs vLLM and a GPU
            outs = _generate_vllm(teacher, [ids[i] for i in flat], sampling, max_new, seed,
                                  [tokenizer.im_end_id])
        kept_texts: dict[int, set[str]] = {}
        reasons = counts.setdefault(mode, {})
        for i, (token_ids, finish) in zip(flat, outs):
            generated_tokens += len(token_ids)
            text = tokenizer.decode(token_ids)
            why, verified = judge(mine[i], text, token_ids, finish, cfg.verified_only)
            if why == "kept":
                content = assistant_content(text, mode)
                seen = kept_texts.setdefault(i, set())
                if content in seen or len(seen) >= cfg.keep_per_query:
                    why = "duplicate_or_enough"
                else:
                    seen.add(content)
                    p = mine[i]
                    rows.append({"messages": [*p.messages, {"role": "assistant", "content": content}],
                                 "mode": mode, "task": p.task, "uid": p.query.uid, "mode_setting": p.setting,
                                 "verified": verified, "teacher": teacher_hash,
                                 "sampling": json.dumps({**asdict(sampling), "max_new_tokens": max_new},
                                                        sort_keys=True)})
            reasons[why] = reasons.get(why, 0) + 1
        if ctx is not None:
            ctx.say(f"{cfg.name}: {mode}: {reasons.get('kept', 0)}/{len(flat)} responses kept from {len(mine)} "
                    f"prompts ({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()) if k != 'kept') or '-'})")
    n_teacher = flop_parameters(ModelConfig.from_json(str(teacher / "config.json")))
    report = {
        "section": "Qwen3 report §4.5 strong-to-weak distillation, teacher outputs in both modes",
        "teacher": {**vocabulary_of(teacher), "lineage_hash": teacher_hash, "flop_parameters": n_teacher},
        "backend": backend,
        "prompts": len(prompts), "rows": len(rows),
        "by_mode": {m: sum(r["mode"] == m for r in rows) for m in cfg.modes},
        "by_task": _counts(r["task"] for r in rows),
        "by_mode_setting": _counts(r["mode_setting"] for r in rows),
        "outcomes": counts,
        "verified_share": (sum(r["verified"] is True for r in rows) / len(rows)) if rows else None,
        "sampling": {m: asdict(cfg.sampling(m)) for m in cfg.modes},
        "generated_tokens": generated_tokens,
        "generation_flops": FORWARD_FLOPS_PER_PARAM * n_teacher * generated_tokens,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return rows, report


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def run(cfg: TeacherOutputsConfig, parent: Path, ctx: StageContext) -> Path:
    """Generate the teacher's outputs from the teacher checkpoint `parent` into `ctx.out_dir/data` (a `datasets`
    dataset in Arrow files: what any `datasets` user, and the full scale's SFT data step, reads)."""
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parent = Path(parent)
    if not (parent / "config.json").exists():
        raise ConfigError(f"{cfg.name}: needs a teacher checkpoint with a model, got {parent}")
    rows, report = teacher_outputs(cfg, parent, ctx)
    if not rows:
        raise RuntimeError(f"{cfg.name}: the teacher {parent} produced no response that passed the filters "
                           f"({report['outcomes']}); nothing to distill")
    info = datasets.DatasetInfo(description=json.dumps({"teacher": report["teacher"], "sampling": report["sampling"]}))
    data = datasets.Dataset.from_list(rows, info=info)
    partial = out / f"{DATA_DIR}.writing"
    data.save_to_disk(str(partial))
    final = out / DATA_DIR
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    write_json_atomic(out / REPORT_FILE, report)
    copy_tokenizer(parent, out)
    write_lineage(out, make_lineage(cfg.name, cfg, parent, data_hashes={"rows": _rows_hash(rows)}))
    return out


def _rows_hash(rows: Sequence[Mapping[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(list(rows), sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def load_teacher_outputs(directory: Path, modes: Sequence[str] = MODES) -> tuple[list[list[dict]], dict[str, Any]]:
    """The conversations of a teacher-outputs directory in `modes` (fields the Arrow schema filled with None
    removed), and its report."""
    directory = Path(directory)
    report_path = directory / REPORT_FILE
    if not (directory / DATA_DIR).is_dir() or not report_path.is_file():
        raise FileNotFoundError(f"{directory}: not a teacher-outputs directory (no {DATA_DIR}/ or {REPORT_FILE})")
    data = datasets.load_from_disk(str(directory / DATA_DIR))
    missing = {"messages", "mode"} - set(data.column_names)
    if missing:
        raise ValueError(f"{directory / DATA_DIR}: missing columns {sorted(missing)}")
    conversations = [[{k: v for k, v in m.items() if v is not None} for m in row["messages"]]
                     for row in data if row["mode"] in modes]
    return conversations, json.loads(report_path.read_text())


__all__ = ["DATA_DIR", "MODES", "MODE_SETTINGS", "REPORT_FILE", "Prompt", "TeacherOutputsConfig",
           "assistant_content", "build_prompts", "check_same_vocabulary", "default_general_weights", "judge",
           "load_teacher_outputs", "prompt_queries", "resolve_backend", "run", "teacher_outputs", "tokenizer_hash",
           "vocabulary_of"]
