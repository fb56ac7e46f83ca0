"""Evaluate any Hugging Face checkpoint with our suites: ours after conversion, or a released Qwen3.

    qwen3repro eval-hf Qwen/Qwen3-0.6B --out runs/eval/qwen3-0.6b --device cuda
    qwen3repro eval-hf runs/full/s3/hf --suites thinkfollow,budget --n 16 --out DIR

The checkpoint is a local directory in the Hugging Face layout (config.json, safetensors weights,
tokenizer files) or a hub id, downloaded into the hub cache when the evaluation starts. Suites
(`SUITES`):

* ``thinkfollow`` — the report's ThinkFollow (Table 22): multi-turn chats whose `/think` and
  `/no_think` flags sit in the system message, in user turns or conflict; a reply follows when its
  think block matches the last flag (`thinking.measure_think_follow`).
* ``modes`` — accuracy on held-out verifiable task items in thinking mode vs non-thinking mode
  (`enable_thinking=False`), by difficulty (`thinking.measure_accuracy_by_mode`).
* ``budget`` — accuracy vs thinking budget (report Fig. 2) with the non-thinking baseline and s1's
  Control / Scaling (`thinking.measure_budget_curve`).
* ``pass-at-k`` — pass@1 and pass@k of k samples per item in thinking mode (`pass_at_k.measure_pass_at_k`).
* ``longcontext`` — pass-key retrieval by (length, depth) as is and with YaRN (factor 4 over the
  trained length), plus dual chunk attention where our model runs the checkpoint
  (`evals.longcontext`; transformers has no DCA).

Backends (`evals.backends`): ``ours`` (our `Qwen3` class and engine, when it loads the checkpoint
and the checkpoint's chat template renders our suites' chats exactly as `chat.render`), ``transformers``
and ``vllm`` (the checkpoint's own chat template). ``auto`` takes ours where it applies (one engine
with the in-loop thinking budget, YaRN and DCA), else vLLM on a GPU when it is installed, else
transformers.

The task items are the synthetic families' held-out items (`data.tasks`). A released model has not
seen their bare format, so by default each question gets an instruction on the answer's form
(`BOXED_INSTRUCTION`, Qwen's usual math instruction) and the scorer reads the last `\\boxed{}` of the
answer when there is one (`final_answer`), then applies the task verifier (exact match after
normalisation). `--instruction ""` gives the tiny models' protocol. Scores on these items are not
the report's benchmarks (AIME, LiveCodeBench, ...): the curves' shapes compare, their levels do not.

Outputs in the output directory: `metrics.json` (settings, backend, template check and every
suite's result; rewritten after each suite with "complete": false until the end), `summary.md`
and PNG plots.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .. import plotting
from ..chat import render
from ..config import ConfigError, ModelConfig
from ..data import tasks
from ..data.queries import Query
from ..data.synthetic import s2_eval_items
from ..files import RunFileError, atomic_write, write_json_atomic
from ..models.errors import CheckpointError
from ..models.hf import HUB_ID
from ..models.qwen3 import Qwen3
from ..rewards import RewardResult, answer_text
from ..rl.rollout import verifier_score
from ..tokenizer import Tokenizer
from . import longcontext as lc
from .backends import EngineBackend, GenerationBackend, TransformersBackend, VLLMBackend, require
from .longcontext.decoding import first_word_complete
from .longcontext.models import stderr_log
from .longcontext.retrieval import score_item, settings_items, tabulate
from .longcontext.settings import EXTRA_NEW_TOKENS
from .pass_at_k import measure_pass_at_k
from .thinking import (
    FOLLOW_KINDS, ThinkingEvalConfig, follow_conversations, is_correct, measure_accuracy_by_mode,
    measure_budget_curve, measure_think_follow, pinned_settings, plot_budget, plot_fusion,
)

SUITES = ("thinkfollow", "modes", "budget", "pass-at-k", "longcontext")
BACKENDS = ("auto", "ours", "transformers", "vllm")
DEVICES = ("cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.md"
# Qwen's instruction for math answers (model cards, "Best Practices"): the answer lands in \boxed{}.
BOXED_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
# Files of a hub checkpoint the suites read: config, weights, tokenizer (with its chat template).
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja"]
# The report's figures the summary quotes next to ours (Qwen3 technical report).
REPORT_THINKFOLLOW = "88.7 after thinking-mode fusion, 98.9 after general RL (Qwen3-32B, Table 22)"
REPORT_BUDGET = ("accuracy rises with the budget from 1K to 32K thinking tokens on AIME'24/'25, LiveCodeBench v5 "
                 "and GPQA-Diamond (Qwen3-235B-A22B, Fig. 2)")
# What each long-context condition means for one evaluated checkpoint (the suite's names are the
# pipeline's stages: here the checkpoint plays S3, whatever stage it comes from).
CONDITION_MEANING = {"S3": "the checkpoint as is", "S3+YaRN": "YaRN, factor 4 over the trained length",
                     "S3+YaRN+DCA": "YaRN and dual chunk attention"}


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class HFEvalSettings:
    """Sizes and protocol of an evaluation (all written into metrics.json)."""

    suites: tuple[str, ...] = SUITES
    n: int = 40
    """ThinkFollow chats (rounded up to a multiple of 8: every case asks both modes); task items of
    modes, budget and pass@k (spread evenly over (family, difficulty)); retrieval items per (length,
    variant)."""
    k: int = 8
    """Samples per item for pass@k."""
    max_new_tokens: int = 2048
    """Token limit of a thinking-mode reply (ThinkFollow, modes, pass@k)."""
    answer_tokens: int = 512
    """Token limit of a non-thinking reply, and room for the answer after a budget's forced text."""
    budgets: tuple[int, ...] = (0, 128, 256, 512, 1024, 2048)
    families: tuple[str, ...] = ()
    """Task families of modes, budget and pass@k (empty: all)."""
    follow_families: tuple[str, ...] = ("add", "mul", "order")
    instruction: str = BOXED_INSTRUCTION
    presence_penalty: float = 0.0
    """Non-thinking sampling's presence penalty; the report uses 1.5, but digits are single tokens in
    Qwen3's tokenizer too, so a penalty would push against every repeated digit of an answer."""
    trained_length: int = 0
    """Long context: the length the checkpoint was trained at (0: from config.json)."""
    lengths: tuple[int, ...] = ()
    """Long context: evaluated lengths in tokens (empty: the suite's multiples of the trained length)."""
    variants: tuple[str, ...] = lc.VARIANTS
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("suites", "budgets", "families", "follow_families", "lengths", "variants"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "budgets", tuple(sorted(set(self.budgets))))
        problems = []
        if not self.suites or set(self.suites) - set(SUITES):
            problems.append(f"suites must be a non-empty subset of {', '.join(SUITES)}, got {list(self.suites)}")
        for name in ("n", "k", "max_new_tokens", "answer_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        if not self.budgets or self.budgets[0] < 0:
            problems.append(f"budgets must be non-empty and >= 0, got {list(self.budgets)}")
        unknown = set(self.families + self.follow_families) - set(tasks.FAMILIES)
        if unknown:
            problems.append(f"unknown task families {sorted(unknown)} (known: {', '.join(tasks.FAMILIES)})")
        if not self.variants or set(self.variants) - set(lc.VARIANTS):
            problems.append(f"variants must be a non-empty subset of {', '.join(lc.VARIANTS)}")
        if self.trained_length < 0 or any(x < 1 for x in self.lengths):
            problems.append("trained_length and lengths must be positive numbers of tokens")
        if problems:
            raise ConfigError("eval-hf settings: " + "; ".join(problems))

    @property
    def follow_chats(self) -> int:
        """ThinkFollow chats: n rounded up to whole blocks of every (case, asked mode) pair, so that
        both modes are asked in every case."""
        block = 2 * len(FOLLOW_KINDS)
        return math.ceil(self.n / block) * block

    def thinking_config(self) -> ThinkingEvalConfig:
        return ThinkingEvalConfig(follow_n=self.follow_chats, follow_families=self.follow_families,
                                  families=self.families, max_new_tokens=self.max_new_tokens, budgets=self.budgets,
                                  non_thinking_presence_penalty=self.presence_penalty, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# ----------------------------------------------------------------------------- scoring
def boxed_answer(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (braces matched); None without a closed one."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 1, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            inner = text[begin:i].strip()
            # \boxed{\text{Zosa}}: a name written as LaTeX text.
            wrapped = re.fullmatch(r"\\(?:text|textbf|mathrm)\{(.*)\}", inner)
            return wrapped.group(1) if wrapped else inner
    return None


def final_answer(completion: str) -> str:
    """The completion with its answer (what follows the think block) replaced by the answer's last
    `\\boxed{}` content, when it has one; otherwise the completion as it is. The verifiers then
    read the boxed value as the whole answer."""
    boxed = boxed_answer(answer_text(completion))
    if boxed is None:
        return completion
    head = completion[:completion.rfind("</think>") + len("</think>")] if "</think>" in completion else ""
    return head + "\n\n" + boxed


def score_task(item: tasks.TaskItem, completion: str) -> bool:
    """Task verifier on the final answer (`final_answer`)."""
    return is_correct(item, final_answer(completion))


def score_query(query: Query, text: str, token_ids: Sequence[int]) -> RewardResult:
    """The query's registered verifier on the final answer (`final_answer`)."""
    return verifier_score(query, final_answer(text), token_ids)


def balanced_items(n: int, families: Sequence[str] = (), seed: int = 0) -> list[tasks.TaskItem]:
    """`n` held-out task items taken in turn from every (family, difficulty) cell, the cells ordered
    by difficulty rank within their family and then by family: a small n covers every family first,
    a larger one every cell."""
    names = tuple(families) or tuple(tasks.FAMILIES)
    cells = sum(tasks.FAMILIES[f].max_difficulty - tasks.FAMILIES[f].min_difficulty + 1 for f in names)
    by_cell: dict[tuple[str, int], list[tasks.TaskItem]] = {}
    for it in s2_eval_items(seed=seed, n_per_cell=math.ceil(n / cells), families=names):
        by_cell.setdefault((it.family, it.difficulty), []).append(it)
    order = sorted(by_cell, key=lambda c: (c[1] - tasks.FAMILIES[c[0]].min_difficulty, names.index(c[0])))
    columns = [by_cell[c] for c in order]
    rounds = max(len(c) for c in columns)
    return [c[i] for i in range(rounds) for c in columns if i < len(c)][:n]


# ----------------------------------------------------------------------------- the checkpoint
@dataclass(frozen=True)
class Checkpoint:
    """What CHECKPOINT names: a local directory, or a hub id (path None until it is downloaded)."""

    spec: str
    path: Path | None
    hub_id: str | None = None

    def config(self) -> dict[str, Any] | None:
        if self.path is None:
            return None
        try:
            return json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path / 'config.json'}: not readable JSON ({e})") from None


def _checkpoint_dir(path: Path) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (a checkpoint is a directory in the Hugging Face layout)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json, so not a Hugging Face checkpoint directory (expected "
                              "config.json with safetensors weights and the tokenizer files next to it; convert a "
                              "training checkpoint to this layout first)")
    return path


def resolve_checkpoint(spec: str, *, download: bool) -> Checkpoint:
    """A local directory as is; otherwise a hub id, from the hub cache, downloaded when `download`
    (without it, an id not in the cache resolves with path None)."""
    path = Path(spec).expanduser()
    if path.exists():
        return Checkpoint(spec, _checkpoint_dir(path))
    if not HUB_ID.match(spec):
        raise CheckpointError(f"{spec}: no such checkpoint directory, and not a hub id (owner/name)")
    require("huggingface_hub", f"{spec}: a hub id")
    import huggingface_hub as hub

    try:
        local = hub.snapshot_download(spec, allow_patterns=HUB_FILES, local_files_only=not download)
    except Exception as e:  # the hub client raises many types (not cached, offline, unknown repo, ...)
        if not download:
            return Checkpoint(spec, None, spec)
        raise CheckpointError(f"{spec}: cannot fetch it from the hub ({type(e).__name__}: {e})") from None
    return Checkpoint(spec, _checkpoint_dir(Path(local)), spec)


def trained_length(ckpt: Checkpoint, settings: HFEvalSettings) -> int | None:
    """The long-context suite's reference length: `settings.trained_length`, else the config's YaRN
    original length, else its max_position_embeddings (None when the config is not at hand)."""
    if settings.trained_length:
        return settings.trained_length
    config = ckpt.config()
    if config is None:
        return None
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    return int(scaling.get("original_max_position_embeddings") or config.get("max_position_embeddings") or 0) or None


# ----------------------------------------------------------------------------- the chat template
def probe_chats() -> list[tuple[list[dict], bool]]:
    """Chats the suites send, (messages, enable_thinking): one ThinkFollow chat per case (system
    flags, earlier turns with their answers) and a one-turn question in both modes."""
    chats = [(c["messages"], True) for c in follow_conversations(len(FOLLOW_KINDS), families=("add",))]
    question = [{"role": "user", "content": tasks.generate("add", 0, 2).question + BOXED_INSTRUCTION}]
    return chats + [(question, True), (question, False)]


def compare_templates(reference: Callable[[list[dict], bool], list[int]],
                      candidate: Callable[[list[dict], bool], list[int]]) -> dict[str, Any]:
    """Token ids of the probe chats' prompts under two renderers: how many agree, and the first that does not."""
    probes = probe_chats()
    differ = [(m, e) for m, e in probes if reference(m, e) != candidate(m, e)]
    first = None
    if differ:
        m, e = differ[0]
        first = {"messages": m, "enable_thinking": e}
    return {"probes": len(probes), "matching": len(probes) - len(differ), "matches": not differ,
            "first_difference": first}


def _chat_render_ids(tokenizer) -> Callable[[list[dict], bool], list[int]]:
    return lambda m, e: tokenizer.encode(render(m, add_generation_prompt=True, enable_thinking=e))


def ours_support(ckpt: Checkpoint) -> tuple[str | None, dict[str, Any]]:
    """(why our Qwen3 class and engine cannot evaluate the checkpoint, or None; the template check).

    Our path renders prompts with `chat.render`, so it applies only where the checkpoint's own chat
    template renders the suites' chats to the same tokens (checked with transformers when installed)."""
    template: dict[str, Any] = {"renderer": "chat.render (our Qwen3 chat template)"}
    if ckpt.path is None:
        return "the hub checkpoint is not downloaded yet (decided when the run downloads it)", template
    try:
        ModelConfig.from_json(str(ckpt.path / "config.json"))
    except ConfigError as e:
        return f"our Qwen3 class does not take its config ({e})", template
    if not any(ckpt.path.glob("*.safetensors")):
        return "no safetensors weights", template
    try:
        tokenizer = Tokenizer.load(ckpt.path)
    except (RunFileError, ValueError) as e:
        return f"its tokenizer does not load as ours ({e})", template
    if importlib.util.find_spec("transformers") is None:
        template["checked"] = "no: transformers is not installed, so the checkpoint's template was not rendered"
        return None, template
    require("transformers", "checking the chat template")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(ckpt.path))
    if getattr(hf, "chat_template", None) is None:
        template["checked"] = "no: the checkpoint has no chat template"
        return None, template
    check = compare_templates(_chat_render_ids(tokenizer), lambda m, e: hf.encode(
        hf.apply_chat_template(m, tokenize=False, add_generation_prompt=True, enable_thinking=e),
        add_special_tokens=False))
    template.update(check, checked="the checkpoint's chat template vs chat.render, token ids of the probe chats")
    if not check["matches"]:
        return "its chat template renders the suites' chats differently from chat.render", template
    return None, template


def choose_backend(requested: str, ckpt: Checkpoint, device: str) -> tuple[str, str, dict[str, Any]]:
    """(backend, why, template check of our path) for `--backend requested` (see the module docstring)."""
    if requested not in BACKENDS:
        raise ConfigError(f"unknown backend {requested!r}; one of {', '.join(BACKENDS)}")
    vllm = importlib.util.find_spec("vllm") is not None
    if requested == "vllm" and not vllm:
        raise ConfigError("--backend vllm: vLLM is not installed (pip install vllm)")
    if requested in ("vllm", "transformers"):
        return requested, "requested", {}
    problem, template = ours_support(ckpt)
    if requested == "ours":
        if problem:
            raise CheckpointError(f"--backend ours: {problem}; use --backend transformers")
        return "ours", "requested", template
    if problem is None:
        return "ours", "our Qwen3 class loads the checkpoint and its chat template renders as chat.render", template
    if vllm and device == "cuda":
        return "vllm", f"not ours: {problem}; vLLM is installed", template
    return "transformers", f"not ours: {problem}", template


def torch_dtype(dtype: str, device: str) -> torch.dtype:
    """The torch dtype of `--dtype`; auto is float32 on a CPU (bfloat16 matmuls are slow there) and
    bfloat16 on a GPU (the released weights' dtype)."""
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; one of auto, {', '.join(DTYPES)}") from None


def load_backend(name: str, ckpt: Checkpoint, *, device: str, dtype: torch.dtype,
                 settings: HFEvalSettings) -> GenerationBackend:
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if name == "ours":
        model = Qwen3.from_pretrained(ckpt.path, device=device, dtype=dtype).eval()
        return EngineBackend(model, Tokenizer.load(ckpt.path), max_batch_size=settings.batch_size)
    if name == "transformers":
        return TransformersBackend(ckpt.path, device=device, dtype=dtype, batch_size=settings.batch_size)
    return VLLMBackend(ckpt.path, dtype=str(dtype).removeprefix("torch."), seed=settings.seed)


# ----------------------------------------------------------------------------- the suites
class SuiteUnavailable(Exception):
    """A suite the chosen backend cannot run (recorded in metrics.json with the reason)."""


@dataclass
class Context:
    """What every suite runner reads: the loaded backend, the checkpoint, the settings, where to write."""

    backend: GenerationBackend
    ckpt: Checkpoint
    settings: HFEvalSettings
    out: Path
    log: Callable[[str], None]


def _thinkfollow(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    return measure_think_follow(ctx.backend, s.thinking_config(), s.max_new_tokens, instruction=s.instruction,
                                score=score_task)


def _modes(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    return measure_accuracy_by_mode(ctx.backend, s.thinking_config(), balanced_items(s.n, s.families, s.seed),
                                    instruction=s.instruction, score=score_task, answer_tokens=s.answer_tokens)


def _budget(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    return measure_budget_curve(ctx.backend, s.thinking_config(), balanced_items(s.n, s.families, s.seed),
                                instruction=s.instruction, score=score_task, answer_tokens=s.answer_tokens,
                                answer_room=s.answer_tokens)


def _pass_at_k(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    cfg = s.thinking_config()
    queries = [Query.from_task(it) for it in balanced_items(s.n, s.families, s.seed)]
    result = measure_pass_at_k(ctx.backend, queries, k=s.k, sampling=cfg.thinking_sampling,
                               max_new_tokens=s.max_new_tokens, seed=s.seed + 31, score_fn=score_query,
                               instruction=s.instruction)
    return {"k": s.k, "n": len(queries), "metrics": result, "sampling": dataclasses.asdict(cfg.thinking_sampling),
            "max_new_tokens": s.max_new_tokens}


def longcontext_settings(ckpt: Checkpoint, settings: HFEvalSettings,
                         conditions: Sequence[str]) -> lc.LongContextSettings:
    """The long-context suite (evals/longcontext.toml) resolved for this checkpoint and run."""
    length = trained_length(ckpt, settings)
    if length is None:
        raise ConfigError("long context: the trained length is unknown (config.json is not at hand): "
                          "pass --trained-length")
    overrides: dict[str, Any] = {"n_per_length": settings.n, "variants": settings.variants,
                                 "conditions": tuple(conditions)}
    if settings.lengths:
        overrides["lengths"] = settings.lengths
    return lc.suite_settings(length, overrides, where="eval-hf long-context settings")


def longcontext_conditions(backend_name: str) -> tuple[tuple[str, ...], str]:
    """The conditions a backend evaluates, and what it says about DCA."""
    if backend_name == "ours":
        return ("S3", "S3+YaRN", "S3+YaRN+DCA"), "evaluated with our Qwen3 class's dual chunk attention (models/dca.py)"
    if backend_name == "transformers":
        return ("S3", "S3+YaRN"), ("not available: transformers implements YaRN (rope scaling) but not dual chunk "
                                   "attention; evaluate with --backend ours for the YaRN + DCA condition")
    return (), "the vLLM backend does not run the long-context suite"


def _longcontext(ctx: Context) -> dict[str, Any]:
    conditions, dca = longcontext_conditions(ctx.backend.name)
    if not conditions:
        raise SuiteUnavailable(dca)
    settings = longcontext_settings(ctx.ckpt, ctx.settings, conditions)
    retrieval: dict[str, dict[str, Any]] = {}
    for variant in settings.variants:
        retrieval[variant] = {}
        if isinstance(ctx.backend, EngineBackend):
            tok = ctx.backend.tokenizer
            items = settings_items(tok, variant, settings)
            source = lc.CheckpointModels(ctx.ckpt.path, model=ctx.backend.model)
            for c in conditions:
                retrieval[variant][c] = lc.retrieval_grid(source, tok, c, settings=settings, variant=variant,
                                                          items=items, log=ctx.log)
        else:
            items = lc.build_items(ctx.backend, variant, settings.eval_lengths, settings.n_per_length,
                                   settings.depths, settings.seed, settings.world_seed)
            for c in conditions:
                retrieval[variant][c] = retrieval_on_backend(ctx.backend, c, variant, items, settings, ctx.log)
    result = {"trained_length": settings.trained_length, "conditions": list(conditions),
              "condition_meaning": {c: CONDITION_MEANING[c] for c in conditions}, "dca": dca,
              "settings": settings.resolved(), "retrieval": retrieval}
    result["summary"] = lc.summarize(result, settings)
    result["plots"] = [f"longcontext/{p}" for p in lc.write_plots(result, ctx.out / "longcontext")]
    return result


def retrieval_on_backend(backend: TransformersBackend, condition: str, variant: str, items: Sequence[Mapping],
                         settings: lc.LongContextSettings, log: Callable[[str], None]) -> dict[str, Any]:
    """`longcontext.retrieval_grid` on a transformers model: greedy continuations of the raw prompts
    (no chat template, as for our models), YaRN switched on per length as the condition says."""
    cond = lc.CONDITIONS[condition]
    lengths = sorted({int(it["length"]) for it in items})
    prompts = [backend.encode(it["prompt"]) for it in items]
    answer_tokens = [backend.count_tokens(f" {it['target']}.") for it in items]
    records: list[dict | None] = [None] * len(items)
    configs: dict[str, Any] = {}
    t0 = time.perf_counter()
    for length in lengths:
        yarn = cond.yarn and (length > settings.trained_length or not settings.yarn_only_beyond_trained)
        scaling = settings.yarn_scaling() if yarn else None
        configs[str(length)] = {"rope_scaling": scaling, "dual_chunk_attention_config": None}
        idx = [i for i, it in enumerate(items) if int(it["length"]) == length]
        with backend.rope_scaling(scaling, int(settings.yarn_factor * settings.trained_length)):
            for batch in lc.batches([prompts[i] for i in idx], settings.max_batch_tokens, equal_lengths=False):
                rows = [idx[j] for j in batch]
                max_new = max(answer_tokens[i] for i in rows) + EXTRA_NEW_TOKENS
                for i, out in zip(rows, backend.greedy_continue([prompts[i] for i in rows], max_new)):
                    records[i] = score_item(items[i], _first_word(backend, out), len(prompts[i]))
        log(f"[eval-hf] longcontext {condition} {variant} L={length}: {len(idx)} items")
    return tabulate(condition, variant, lengths, settings.depth_bins, records, configs, time.perf_counter() - t0)


def _first_word(backend: GenerationBackend, ids: Sequence[int]) -> str:
    """The completion cut where its first word is complete (as `longcontext.greedy_decode` cuts it)."""
    for n in range(1, len(ids) + 1):
        text = backend.decode(ids[:n], skip_special_tokens=True)
        if first_word_complete(text):
            return text
    return backend.decode(ids, skip_special_tokens=True)


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "thinkfollow": _thinkfollow, "modes": _modes, "budget": _budget, "pass-at-k": _pass_at_k,
    "longcontext": _longcontext,
}


# ----------------------------------------------------------------------------- the plan
def plan(checkpoint: str, settings: HFEvalSettings, *, backend: str = "auto", device: str = "cpu",
         dtype: str = "auto", out: str | Path | None = None) -> dict[str, Any]:
    """What a run would do, without loading a model or downloading anything (`--dry-run`)."""
    ckpt = resolve_checkpoint(checkpoint, download=False)
    name, why, template = choose_backend(backend, ckpt, device)
    s = settings
    suites: dict[str, Any] = {}
    per_budget = len(s.budgets) + 1
    sizes = {
        "thinkfollow": {"chats": s.follow_chats, "cases": list(FOLLOW_KINDS), "families": list(s.follow_families),
                        "replies": s.follow_chats, "max_new_tokens": s.max_new_tokens},
        "modes": {"items": s.n, "replies": 2 * s.n,
                  "max_new_tokens": {"thinking": s.max_new_tokens, "non_thinking": s.answer_tokens}},
        "budget": {"items": s.n, "budgets": list(s.budgets), "replies": s.n * per_budget,
                   "max_new_tokens": "budget + forced text + answer_tokens"},
        "pass-at-k": {"items": s.n, "k": s.k, "replies": s.n * s.k, "max_new_tokens": s.max_new_tokens},
    }
    for suite in s.suites:
        if suite != "longcontext":
            suites[suite] = sizes[suite]
            continue
        conditions, dca = longcontext_conditions(name)
        if not conditions:
            suites[suite] = {"skipped": dca}
            continue
        try:
            lcs = longcontext_settings(ckpt, s, conditions)
        except ConfigError as e:
            suites[suite] = {"unresolved": str(e)}
            continue
        suites[suite] = {"trained_length": lcs.trained_length, "lengths": list(lcs.eval_lengths),
                         "variants": list(lcs.variants), "conditions": list(conditions), "dca": dca,
                         "items_per_condition": lc.items_per_condition(lcs)}
    return {
        "checkpoint": checkpoint,
        "path": str(ckpt.path) if ckpt.path else f"{ckpt.hub_id}: not in the hub cache (the run downloads it)",
        "backend": {"requested": backend, "chosen": name, "why": why},
        "template": template or {"renderer": "the checkpoint's chat template (apply_chat_template)"},
        "device": device, "dtype": str(torch_dtype(dtype, device)).removeprefix("torch."),
        "out": str(out) if out else None, "suites": suites, "settings": s.to_dict(),
    }


# ----------------------------------------------------------------------------- the run
def run_hf_eval(checkpoint: str, out_dir: str | Path, settings: HFEvalSettings, *, backend: str = "auto",
                device: str = "cpu", dtype: str = "auto",
                log: Callable[[str], None] | None = stderr_log) -> dict[str, Any]:
    """Run `settings.suites` on the checkpoint; write metrics.json, summary.md and the plots to `out_dir`."""
    log = log or (lambda line: None)
    ckpt = resolve_checkpoint(checkpoint, download=True)
    name, why, template = choose_backend(backend, ckpt, device)
    t_load = time.perf_counter()
    be = load_backend(name, ckpt, device=device, dtype=torch_dtype(dtype, device), settings=settings)
    log(f"[eval-hf] {checkpoint}: {name} backend ({why}), loaded in {time.perf_counter() - t_load:.1f}s")
    if name != "ours":  # the template the run uses is the checkpoint's: how it compares with ours
        template = {"renderer": "the checkpoint's chat template (apply_chat_template)"}
        try:
            ours = Tokenizer.load(ckpt.path)
        except ValueError:  # not a Qwen3 tokenizer: nothing of ours to compare with
            template["checked"] = "no: the tokenizer does not load as ours"
        else:
            template.update(compare_templates(_chat_render_ids(ours), be.prompt_ids),
                            checked="the checkpoint's chat template vs chat.render, token ids of the probe chats")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {
        "eval": "eval-hf", "complete": False, "checkpoint": checkpoint, "path": str(ckpt.path),
        "backend": {"requested": backend, "chosen": name, "why": why}, "device": device,
        "dtype": str(torch_dtype(dtype, device)).removeprefix("torch."), "template": template,
        "settings": settings.to_dict(), "sampling": pinned_settings(settings.thinking_config()),
        "scoring": "task verifier (exact match after normalisation) on the answer's last \\boxed{} when it has one, "
                   "else on the whole answer after the think block",
        "suites": {}, "skipped": {}, "seconds": {},
    }
    ctx = Context(be, ckpt, settings, out, log)
    for suite in settings.suites:
        t0 = time.perf_counter()
        try:
            metrics["suites"][suite] = RUNNERS[suite](ctx)
        except SuiteUnavailable as e:
            metrics["skipped"][suite] = str(e)
            log(f"[eval-hf] {suite}: skipped ({e})")
            continue
        metrics["seconds"][suite] = round(time.perf_counter() - t0, 1)
        write_json_atomic(out / METRICS_FILE, metrics)
        log(f"[eval-hf] {suite}: {headline(suite, metrics['suites'][suite])} ({metrics['seconds'][suite]}s)")
    metrics["plots"] = write_plots(metrics, out)
    metrics["complete"] = True
    write_json_atomic(out / METRICS_FILE, metrics)
    text = summary_markdown(metrics)
    atomic_write(out / SUMMARY_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    log(f"[eval-hf] wrote {out / METRICS_FILE} and {out / SUMMARY_FILE}")
    return metrics


# ----------------------------------------------------------------------------- reporting
def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def headline(suite: str, r: Mapping[str, Any]) -> str:
    """One line per suite, for the log and the summary."""
    if suite == "thinkfollow":
        return f"ThinkFollow {_pct(r['thinkfollow'])} (n={r['n']})"
    if suite == "modes":
        return (f"thinking {_pct(r['thinking']['accuracy'])} vs non-thinking {_pct(r['non_thinking']['accuracy'])} "
                f"(n={r['thinking']['n']})")
    if suite == "budget":
        curve = ", ".join(f"{x['budget']}: {_pct(x['accuracy'])}" for x in r["runs"])
        return f"accuracy by budget {curve}; non-thinking {_pct(r['non_thinking_baseline'])}"
    if suite == "pass-at-k":
        k = r["k"]
        return f"pass@1 {_pct(r['metrics']['pass@1'])}, pass@{k} {_pct(r['metrics'][f'pass@{k}'])}"
    if suite == "longcontext":
        parts = []
        for variant, rows in r["summary"].items():
            for cond, s in rows.items():
                longest = max(int(k[3:]) for k in s if k.startswith("at_") and k[3:].isdigit())
                parts.append(f"{variant} {cond} {_pct(s[f'at_{longest}'])} at {longest}")
        return "; ".join(parts)
    return ""


def write_plots(metrics: Mapping[str, Any], out: Path) -> list[str]:
    """The suites' plots (the long-context ones are written by its runner)."""
    suites = metrics["suites"]
    written = []
    if "budget" in suites:
        plot_budget(suites["budget"], out / "budget.png")
        written.append("budget.png")
    if "thinkfollow" in suites and "modes" in suites:
        plot_fusion(suites["thinkfollow"], suites["modes"], out / "thinkfollow_modes.png")
        written.append("thinkfollow_modes.png")
    if "pass-at-k" in suites:
        plot_pass_at_k(suites["pass-at-k"], out / "pass_at_k.png")
        written.append("pass_at_k.png")
    if "longcontext" in suites:
        written += suites["longcontext"]["plots"]
    return written


def plot_pass_at_k(result: Mapping[str, Any], path: Path) -> Path:
    """pass@1 per task family, with the overall pass@1 and pass@k."""
    m, k = result["metrics"], result["k"]
    labels = ["all: pass@1", f"all: pass@{k}"] + [key.split("/", 1)[1] for key in m if key.startswith("pass@1/")]
    values = [m["pass@1"], m[f"pass@{k}"]] + [v for key, v in m.items() if key.startswith("pass@1/")]
    with plotting.figure(path, figsize=(max(5.0, 0.8 * len(labels)), 3.6)) as (fig, axes):
        ax = axes[0, 0]
        ax.bar(range(len(values)), [100 * v for v in values], color=["tab:blue", "tab:orange"] + ["tab:grey"] *
               (len(values) - 2))
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("held-out items solved (%)")
        ax.set_title(f"pass@1 and pass@{k} (n={result['n']}; per family: pass@1)")
    return path


def summary_markdown(metrics: Mapping[str, Any]) -> str:
    """summary.md: the run's settings and one section per suite."""
    s, suites = metrics["settings"], metrics["suites"]
    b = metrics["backend"]
    lines = [f"# Evaluation of `{metrics['checkpoint']}`", "",
             f"- backend: **{b['chosen']}** ({b['why']}); device {metrics['device']}, {metrics['dtype']}",
             f"- prompts: {metrics['template'].get('renderer')}"
             + (f"; same tokens as chat.render on {metrics['template']['matching']}/{metrics['template']['probes']} "
                "probe chats" if "probes" in metrics["template"] else ""),
             f"- items: held-out synthetic task items (n={s['n']} per suite), instruction appended: "
             f"{json.dumps(s['instruction'])}",
             f"- scoring: {metrics['scoring']}", ""]
    if "thinkfollow" in suites:
        r = suites["thinkfollow"]
        lines += ["## ThinkFollow", "", f"{headline('thinkfollow', r)}; report: {REPORT_THINKFOLLOW}.", "",
                  "| case | follows |", "|---|---|"]
        lines += [f"| {k} | {_pct(v)} |" for k, v in r["by_kind"].items()]
        lines += [f"| asked {k} | {_pct(v)} |" for k, v in r["by_expected"].items()] + [""]
    if "modes" in suites:
        r = suites["modes"]
        lines += ["## Thinking vs non-thinking", "", "| mode | accuracy | easy | medium | hard |",
                  "|---|---|---|---|---|"]
        for mode in ("thinking", "non_thinking"):
            rel = r[mode]["by_relative_difficulty"]
            lines.append(f"| {mode.replace('_', '-')} | {_pct(r[mode]['accuracy'])} | "
                         + " | ".join(_pct(rel[k]) for k in ("easy", "medium", "hard")) + " |")
        lines += ["", f"Mean thinking tokens {r['thinking']['mean_thinking_tokens']:.0f}; {r['thinking']['truncated']} "
                      f"thinking replies cut at {r['max_new_tokens']['thinking']} tokens.", ""]
    if "budget" in suites:
        r = suites["budget"]
        s1 = r["s1"]
        lines += ["## Accuracy vs thinking budget", "", f"Report: {REPORT_BUDGET}.", "",
                  "| budget | accuracy | mean thinking tokens | forced | within budget |", "|---|---|---|---|---|"]
        lines += [f"| {x['budget']} | {_pct(x['accuracy'])} | {x['mean_thinking_tokens']:.0f} | "
                  f"{_pct(x['budget_hit_share'])} | {_pct(x['within_budget_share'])} |" for x in r["runs"]]
        scaling = "n/a" if s1["scaling"] is None else f"{s1['scaling']:.2f}"
        lines += ["", f"Non-thinking baseline {_pct(r['non_thinking_baseline'])}. s1: Control {_pct(s1['control'])}, "
                      f"Scaling {scaling} points per 100 thinking tokens, Performance {_pct(s1['performance'])}.", ""]
    if "pass-at-k" in suites:
        r = suites["pass-at-k"]
        lines += ["## pass@k", "", headline("pass-at-k", r) + ".", "", "| family | pass@1 |", "|---|---|"]
        lines += [f"| {key.split('/', 1)[1]} | {_pct(v)} |" for key, v in r["metrics"].items()
                  if key.startswith("pass@1/")]
        lines.append("")
    if "longcontext" in suites:
        r = suites["longcontext"]
        lines += ["## Long-context retrieval", "",
                  f"Trained length {r['trained_length']} tokens; DCA: {r['dca']}.", ""]
        for variant, grids in r["retrieval"].items():
            lengths = next(iter(grids.values()))["lengths"]
            lines += [f"**{variant}**", "", "| condition | " + " | ".join(map(str, lengths)) + " |",
                      "|---" * (len(lengths) + 1) + "|"]
            lines += [f"| {c}: {CONDITION_MEANING[c]} | " + " | ".join(_pct(a) for a in g["accuracy_by_length"])
                      + " |" for c, g in grids.items()]
            lines.append("")
    for suite, why in metrics["skipped"].items():
        lines += [f"## {suite}: skipped", "", why, ""]
    if metrics.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in metrics["plots"]] + [""]
    return "\n".join(lines)


__all__ = ["BACKENDS", "BOXED_INSTRUCTION", "Checkpoint", "HFEvalSettings", "SUITES", "SuiteUnavailable",
           "balanced_items", "boxed_answer", "choose_backend", "compare_templates", "final_answer", "load_backend",
           "ours_support", "plan", "probe_chats", "resolve_checkpoint", "retrieval_on_backend", "run_hf_eval",
           "score_query", "score_task", "summary_markdown", "trained_length"]
