"""Our RL and on-policy distillation datasets as verl 0.9.1 parquet (the schema `RLHFDataset` reads).

    python -m qwen3repro.verl.data --stage reasoning-rl --model qwen3-32b [--out DIR] [--n N] [--n-val N]
                                   [--tokenizer DIR] [--used-queries used_queries.json]

writes `train.parquet` and `val.parquet` (default folder `runs/full/<model>/<stage>/verl-data`) and
`meta.json` (row counts per data source, and prompt lengths in tokens when `--tokenizer` is given, for
`data.max_prompt_length`). One row per prompt:

    data_source   "qwen3repro/<kind>/<name>": kind "reasoning" (reasoning RL, name = task family),
                  "general" (general RL, name = the task of `data.general_tasks`), "distill" (on-policy
                  distillation, name = task family). `qwen3repro.verl.reward.compute_score` dispatches on it.
    prompt        the chat as our stages prompt it: a list of {role, content}, with the /think or /no_think
                  flag where the stage puts one (reasoning RL: none, thinking is the template's default;
                  general RL: drawn per prompt like the stage, in the user turn or a system message;
                  distillation: one row per mode, the flag after the question). Tool schemas are not in the
                  messages: verl's tool agent loop renders them into the system turn, as our template does.
    ability       the task's domain ("math", "code", "tool_use", ...).
    reward_model  {style: "rule" | "model", ground_truth: JSON text}. The ground truth is JSON rather than a
                  parquet struct because references differ in shape from task to task, and parquet would
                  merge them into one struct with null fields. It holds everything the reward needs:
                  {"reward": registered reward name, "reference": its keyword arguments} and, for general RL,
                  "thinking" (the mode the flags ask for), "tools" (the tools offered) and "shaping" (the
                  recipe's format gate, malformed-call penalty and valid-call bonus).
    extra_info    {index, split, uid, task, mode, thinking} and, for general RL, the keys verl's tool agent
                  loop reads: `tools_kwargs` ({tool: {"create_kwargs": {...}}}), `need_tools_kwargs`, and
                  `tool_selection` (the per-sample tools `ToolAgentLoop` keeps), plus `judge` (the recipe's
                  judge settings; the server's URL comes at run time).
    agent_name    "tool_agent" for prompts that offer tools, else "single_turn_agent" (verl picks the agent
                  loop per row from this column).

What verl cannot express is left out, and said so in `meta.json`'s "notes": reasoning RL's query selection
measures the cold-start model's pass rate on each candidate, which needs that model's rollouts; the rows are
the unscreened training-partition pool (minus the cold start's used queries when `--used-queries` is given),
and DAPO's dynamic sampling (verl's `filter_groups` on `acc`) drops the groups that selection would have
dropped as unlearnable, at rollout time. General RL draws a prompt's mode once per row, not once per step.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ..chat import render
from ..data import general_tasks
from ..data.queries import Query
from ..data.world import build_world
from ..recipes import load_recipe, repo_root, split_recipe
from ..stages.general_rl import FLAG_NO_THINK, FLAG_THINK, GeneralRLConfig, draw_mode, heldout_queries
from ..stages.general_rl import training_queries as general_training_queries
from ..stages.grpo import GRPOConfig, candidate_queries, eval_queries
from ..stages.onpolicy_distill import OnPolicyDistillConfig
from ..stages.onpolicy_distill import training_queries as distill_training_queries
from ..stages.teacher_outputs import FLAGS
from ..tokenizer import Tokenizer

__all__ = ["STAGES", "DATA_SOURCE_PREFIX", "data_source", "split_data_source", "stage_rows", "write_stage",
           "prompt_text", "main"]

DATA_SOURCE_PREFIX = "qwen3repro"
# The stage names of `make full` -> (the recipe they are generated from, the data_source kind).
STAGES: dict[str, tuple[str, str]] = {
    "reasoning-rl": ("reasoning-rl", "reasoning"),
    "general-rl": ("general-rl", "general"),
    "distill-online": ("onpolicy-distill", "distill"),
}
# The recipe's own name is accepted too.
_ALIASES = {"onpolicy-distill": "distill-online"}
KINDS = tuple(kind for _, kind in STAGES.values())

# Default sizes. Reasoning RL: the report's 3,995 query-verifier pairs (§4.2); the others are sized to give
# a full-scale run several epochs' worth of distinct prompts. Validation: held-out items only.
DEFAULT_TRAIN = {"reasoning-rl": 3995, "general-rl": 8192, "distill-online": 4096}
DEFAULT_VAL = {"reasoning-rl": 512, "general-rl": 16, "distill-online": 512}
"""For general RL, held-out prompts per task; for the others, held-out items."""

AGENT_TOOLS, AGENT_SINGLE_TURN = "tool_agent", "single_turn_agent"


def data_source(kind: str, name: str) -> str:
    """The data_source of a row: "qwen3repro/<kind>/<name>"."""
    if kind not in KINDS:
        raise ValueError(f"unknown data_source kind {kind!r}; known: {KINDS}")
    return f"{DATA_SOURCE_PREFIX}/{kind}/{name}"


def split_data_source(value: str) -> tuple[str, str]:
    """(kind, name) of a data_source `data_source` wrote; ValueError naming the expected form otherwise."""
    parts = value.split("/") if isinstance(value, str) else []
    if len(parts) != 3 or parts[0] != DATA_SOURCE_PREFIX or parts[1] not in KINDS or not parts[2]:
        raise ValueError(f"data_source {value!r} is not one of ours: expected "
                         f"'{DATA_SOURCE_PREFIX}/<{'|'.join(KINDS)}>/<task>'")
    return parts[1], parts[2]


def _stage_config(stage: str):
    """The stage's config class built from its recipe (scale-free settings; sizes are set by the caller)."""
    recipe, _ = STAGES[stage]
    settings = split_recipe(load_recipe(recipe))[1]
    cls = {"reasoning-rl": GRPOConfig, "general-rl": GeneralRLConfig, "distill-online": OnPolicyDistillConfig}[stage]
    return cls.from_dict(settings, where=f"recipes/{recipe}.toml")


def _ground_truth(reward: str, reference: Mapping[str, Any], **more: Any) -> str:
    # sort_keys: the same reference always gives the same text (rows can be compared and deduplicated).
    return json.dumps({"reward": reward, "reference": dict(reference), **more}, sort_keys=True, ensure_ascii=False)


def _row(kind: str, name: str, query: Query, messages: list[dict], *, split: str, index: int, mode: str,
         thinking: bool, style: str = "rule", ground_truth: str | None = None, agent: str = AGENT_SINGLE_TURN,
         extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    if query.verifier is None:
        raise ValueError(f"query {query.uid} has no verifier: nothing could reward it")
    return {
        "data_source": data_source(kind, name),
        "prompt": messages,
        "ability": query.domain if kind != "general" else general_tasks.GENERAL_TASKS[name].domain,
        "reward_model": {"style": style,
                         "ground_truth": ground_truth or _ground_truth(query.verifier, query.reference)},
        "extra_info": {"index": index, "split": split, "uid": query.uid, "task": name, "mode": mode,
                       "thinking": thinking, **(extra or {})},
        "agent_name": agent,
    }


# ----------------------------------------------------------------------------- reasoning RL
def _reasoning_rows(cfg, n: int, n_val: int, used: set[str]) -> dict[str, list[dict]]:

    # The stage's own pool: training-partition items of the recipe's families, drawn by its seeded generator,
    # with the cold start's used queries left out as the stage's selection leaves them out.
    pool = [q for q in candidate_queries(dataclasses.replace(cfg, n_candidates=n + len(used))) if q.uid not in used][:n]
    heldout = eval_queries(dataclasses.replace(cfg, eval_items=n_val))
    out = {}
    for split, queries in (("train", pool), ("val", heldout)):
        # Thinking mode without a flag: `rl.rollout.prompt_ids` and the pass@k evaluation prompt this way.
        out[split] = [_row("reasoning", q.domain, q, [{"role": "user", "content": q.question}], split=split, index=i,
                           mode="unflagged", thinking=True) for i, q in enumerate(queries)]
    return out


# ----------------------------------------------------------------------------- on-policy distillation
def _distill_rows(cfg, n: int, n_val: int) -> dict[str, list[dict]]:
    train = []
    for q in distill_training_queries(dataclasses.replace(cfg, n_queries=n)):
        # The stage asks every query in each mode of the recipe, the flag after the question (`prompt_ids`).
        for mode in cfg.modes:
            train.append(_row("distill", q.domain, q, [{"role": "user", "content": f"{q.question} {FLAGS[mode]}"}],
                              split="train", index=len(train), mode=mode, thinking=mode == "think"))
    # Validation as the stage evaluates: held-out items, thinking mode without a flag (pass@k).
    val = [_row("distill", q.domain, q, [{"role": "user", "content": q.question}], split="val", index=i,
                mode="unflagged", thinking=True)
           for i, q in enumerate(eval_queries(dataclasses.replace(cfg, eval_items=n_val)))]
    return {"train": train, "val": val}


# ----------------------------------------------------------------------------- general RL
def general_messages(query: Query, mode: str, in_system: bool) -> tuple[list[dict], str, bool]:
    """(messages, mode, thinking) for a general-RL query, exactly as `stages.general_rl.build_prompt` builds
    them: the format tasks carry their own flags; the others get the drawn flag in the user turn or a system
    message (none when unflagged)."""

    if isinstance(query.reference.get("thinking"), bool):
        mode, in_system, flag = ("think" if query.reference["thinking"] else "no_think"), False, None
    else:
        flag = {"think": FLAG_THINK, "no_think": FLAG_NO_THINK}.get(mode)
    messages: list[dict] = []
    if flag and in_system:
        messages.append({"role": "system", "content": flag})
    messages.append({"role": "user", "content": f"{query.question} {flag}" if flag and not in_system
                     else query.question})
    return messages, mode, mode != "no_think"


def _general_row(cfg, query: Query, mode: str, in_system: bool, *, split: str, index: int) -> dict[str, Any]:
    task = query.domain  # `general_rl.training_queries` / `heldout_queries` put the task's name there
    spec = general_tasks.GENERAL_TASKS[task]
    messages, mode, thinking = general_messages(query, mode, in_system)
    shaping = {"format_gate": cfg.format_gate, "malformed_call_penalty": cfg.malformed_call_penalty,
               "valid_call_bonus": cfg.valid_call_bonus}
    ground_truth = _ground_truth(query.verifier, query.reference, thinking=thinking, tools=list(query.tools),
                                 shaping=shaping)
    # Every row holds the same tools_kwargs (each tool's world seed): parquet stores one struct type per
    # column, and rows with different keys would read back with null entries that verl's tool loop would
    # then look up. `tool_selection` is what limits a row to its own tools.
    tools_kwargs = {name: {"create_kwargs": {"world_seed": cfg.world_seed}} for name in general_tasks.TOOL_NAMES}
    judge = {"model": cfg.judge_model, "base_url": cfg.judge_base_url, "max_tokens": cfg.judge_max_tokens,
             "timeout": cfg.judge_timeout, "retries": cfg.judge_retries, "concurrency": cfg.judge_concurrency}
    extra = {"tools_kwargs": tools_kwargs, "need_tools_kwargs": bool(query.tools),
             "tool_selection": list(query.tools), "judge": judge}
    return _row("general", task, query, messages, split=split, index=index, mode=mode, thinking=thinking,
                style="rule" if spec.kind == "rule" else "model", ground_truth=ground_truth,
                agent=AGENT_TOOLS if query.tools else AGENT_SINGLE_TURN, extra=extra)


def _general_rows(cfg, n: int, n_val: int) -> dict[str, list[dict]]:
    # The recipe gives no task table at full scale, so every named task takes part at its default weight.
    train_queries = general_training_queries(dataclasses.replace(cfg, n_queries=n))
    val_queries = heldout_queries(dataclasses.replace(cfg, eval_per_task=n_val))
    out = {}
    for split, queries in (("train", train_queries), ("val", val_queries)):
        # One mode per row, drawn as the stage draws it for each prompt (seeded per split).
        rng = random.Random(f"verl-general-rl-modes|{cfg.seed}|{split}")
        out[split] = [_general_row(cfg, q, *draw_mode(rng, cfg), split=split, index=i) for i, q in enumerate(queries)]
    return out


# ----------------------------------------------------------------------------- the stages
def stage_rows(stage: str, n: int | None = None, n_val: int | None = None,
               used_queries: Sequence[str] = ()) -> dict[str, list[dict]]:
    """{"train": rows, "val": rows} of `stage` (a `STAGES` name), `n` training rows (distillation: `n` queries,
    one row per mode) and `n_val` validation items (general RL: per task)."""
    stage = _ALIASES.get(stage, stage)
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; verl stages: {', '.join(STAGES)}")
    n = DEFAULT_TRAIN[stage] if n is None else n
    n_val = DEFAULT_VAL[stage] if n_val is None else n_val
    for key, value in (("n", n), ("n_val", n_val)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    cfg = _stage_config(stage)
    if stage == "reasoning-rl":
        return _reasoning_rows(cfg, n, n_val, set(used_queries))
    if used_queries:
        raise ValueError("--used-queries applies to reasoning-rl only (the cold start's queries are left out of "
                         "reasoning RL's pool)")
    if stage == "general-rl":
        return _general_rows(cfg, n, n_val)
    return _distill_rows(cfg, n, n_val)


def prompt_text(row: Mapping[str, Any], tool_schemas: Sequence[Mapping] | None = None) -> str:
    """A row's prompt rendered with our chat template up to the assistant header, as verl's agent loop renders
    it with our tokenizer (the offered tools' schemas go in `tool_schemas`)."""
    return render(list(row["prompt"]), tools=list(tool_schemas) if tool_schemas else None, add_generation_prompt=True)


def _tool_schemas(row: Mapping[str, Any]) -> list[dict] | None:
    names = row["extra_info"].get("tool_selection") or []
    if not names:
        return None

    env = general_tasks.tool_environment(build_world(row["extra_info"]["tools_kwargs"][names[0]]["create_kwargs"]
                                                     ["world_seed"]))
    return env.schemas(list(names))


def write_stage(stage: str, out: str | Path, *, n: int | None = None, n_val: int | None = None,
                tokenizer: str | Path | None = None, used_queries: Sequence[str] = ()) -> dict[str, Any]:
    """Write `train.parquet`, `val.parquet` and `meta.json` of `stage` into `out`; returns the meta."""
    rows = stage_rows(stage, n, n_val, used_queries)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = None
    if tokenizer is not None:

        tok = Tokenizer.load(tokenizer)
    meta: dict[str, Any] = {"stage": _ALIASES.get(stage, stage), "recipe": STAGES[_ALIASES.get(stage, stage)][0],
                            "files": {}, "notes": NOTES}
    for split, split_rows in rows.items():
        path = out / f"{split}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_pylist(split_rows), tmp)
        tmp.replace(path)  # a reader never sees half a file
        info: dict[str, Any] = {"rows": len(split_rows),
                                "data_sources": dict(sorted(Counter(r["data_source"] for r in split_rows).items()))}
        if tok is not None:
            lengths = [len(tok.encode(prompt_text(r, _tool_schemas(r)))) for r in split_rows]
            info["prompt_tokens"] = {"max": max(lengths), "mean": round(sum(lengths) / len(lengths), 1)}
        meta["files"][path.name] = info
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


NOTES = [
    "reasoning-rl: the rows are the unscreened training-partition pool; the stage's pass-rate selection needs the "
    "cold-start model's rollouts, and verl's dynamic sampling (filter_groups on acc) drops unlearnable groups "
    "at rollout time instead",
    "general-rl: each prompt's /think | /no_think mode is drawn once per row, not once per step",
    "reward_model.ground_truth is JSON text: {reward, reference[, thinking, tools, shaping]}",
]


def default_out(model: str, stage: str) -> Path:
    return repo_root() / "runs" / "full" / model / _ALIASES.get(stage, stage) / "verl-data"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen3repro.verl.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", required=True, choices=[*STAGES, *_ALIASES])
    parser.add_argument("--model", default=None, help="real model name (for the default output folder)")
    parser.add_argument("--out", default=None, help="output folder (default runs/full/<model>/<stage>/verl-data)")
    parser.add_argument("--n", type=int, default=None, help="training rows (distill-online: queries, one row per mode)")
    parser.add_argument("--n-val", type=int, default=None, help="validation items (general-rl: per task)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder: prompt lengths go into meta.json")
    parser.add_argument("--used-queries", default=None,
                        help="reasoning-rl: a JSON list of uids the cold start used (left out of the pool)")
    args = parser.parse_args(argv)
    if args.out is None and args.model is None:
        parser.error("give --out or --model (the default folder is runs/full/<model>/<stage>/verl-data)")
    used: list[str] = []
    if args.used_queries:
        used = json.loads(Path(args.used_queries).read_text(encoding="utf-8"))
        if not isinstance(used, list) or not all(isinstance(u, str) for u in used):
            parser.error(f"{args.used_queries}: expected a JSON list of query uids")
    out = Path(args.out) if args.out else default_out(args.model, args.stage)
    try:
        meta = write_stage(args.stage, out, n=args.n, n_val=args.n_val, tokenizer=args.tokenizer, used_queries=used)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, info in meta["files"].items():
        print(f"{out / name}: {info['rows']} rows, {len(info['data_sources'])} data sources"
              + (f", prompts up to {info['prompt_tokens']['max']} tokens" if "prompt_tokens" in info else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
