"""The suite runner: every condition of the settings on the same held-out items, one result file.

`run_longcontext_eval` builds the retrieval items and loss documents once, evaluates each
condition (retrieval per variant, then loss by position), rewrites `longcontext.json` after each
condition (`"complete": false` until the end), summarises accuracy by length and draws the plots.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ...config import ConfigError
from ...files import write_json_atomic
from ...progress import format_duration
from ...tokenizer import Tokenizer
from .loss import loss_by_position, loss_documents
from .models import ModelSource, flops_progress, forward_flops, load_tokenizer, model_source, stderr_log
from .plots import write_plots
from .retrieval import retrieval_grid, settings_items
from .settings import CONDITIONS, LongContextSettings

RESULT_FILE = "longcontext.json"


def run_longcontext_eval(
    checkpoints: Mapping[str, str | os.PathLike | ModelSource],
    out_dir: str | os.PathLike,
    settings: LongContextSettings,
    *,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    num_threads: int = 0,
    log: Callable[[str], None] | None = stderr_log,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate every condition of `settings` and write `longcontext.json` and PNG plots to `out_dir`.

    `checkpoints` maps "S2" and "S3" (case-insensitive) to checkpoint directories (loaded on `device`) or
    `ModelSource`s; only those the conditions need are required. The tokenizer defaults to the S3
    directory (its `tokenizer.json`). `num_threads` > 0 sets torch's intra-op threads for the run.
    """
    ckpts = {k.upper(): v for k, v in checkpoints.items()}
    needed = sorted({CONDITIONS[c].checkpoint for c in settings.conditions})
    missing = [k for k in needed if k not in ckpts]
    if missing:
        raise ConfigError(f"conditions {list(settings.conditions)} need checkpoint(s) {missing}")
    if tokenizer is None:
        if "S3" not in ckpts or not isinstance(ckpts["S3"], (str, os.PathLike)):
            raise ConfigError("pass tokenizer= (no S3 checkpoint directory to read it from)")
        tokenizer = ckpts["S3"]
    tok = load_tokenizer(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    try:
        sources = {k: model_source(ckpts[k], device) for k in needed}
        t0 = time.perf_counter()
        items = {v: settings_items(tok, v, settings) for v in settings.variants}
        documents = loss_documents(tok, settings.loss_tokens, settings.loss_docs, settings.seed, settings.world_seed)
        if log:
            log(f"[longcontext] built {sum(map(len, items.values()))} retrieval items and {len(documents)} loss "
                f"documents in {time.perf_counter() - t0:.1f}s")
        work = 0.0
        for c in settings.conditions:
            cfg = sources[CONDITIONS[c].checkpoint].config
            work += sum(forward_flops(cfg, len(tok.encode(it["prompt"])))
                        for v in settings.variants for it in condition_items(c, items[v], settings))
            work += sum(forward_flops(cfg, len(d)) for d in documents)
        progress = flops_progress(work)
        results: dict[str, Any] = {
            "eval": "longcontext",
            "claim": "Qwen3 report §3.2: YaRN + DCA give a four-fold increase in sequence length capacity "
                     "during inference",
            "complete": False,
            "settings": settings.resolved(),
            "notes": notes(settings),
            "checkpoints": {k: str(getattr(v, "path", v)) for k, v in ckpts.items() if k in needed},
            "tokenizer": str(tokenizer) if not isinstance(tokenizer, Tokenizer) else repr(tokenizer),
            "torch_threads": torch.get_num_threads(),
            "retrieval": {v: {} for v in settings.variants},
            "loss_by_position": {},
        }
        for c in settings.conditions:
            source = sources[CONDITIONS[c].checkpoint]
            for v in settings.variants:
                results["retrieval"][v][c] = retrieval_grid(source, tok, c, variant=v, settings=settings,
                                                            items=condition_items(c, items[v], settings),
                                                            progress=progress, log=log)
            results["loss_by_position"][c] = loss_by_position(source, tok, c, settings=settings, documents=documents,
                                                              progress=progress, log=log)
            write_json_atomic(out / RESULT_FILE, results)
        results["summary"] = summarize(results, settings)
        results["seconds"] = round(time.perf_counter() - t0, 1)
        results["complete"] = True
        results["plots"] = write_plots(results, out)
        write_json_atomic(out / RESULT_FILE, results)
        if log:
            log(f"[longcontext] done in {format_duration(results['seconds'])}: {out / RESULT_FILE}")
        return results
    finally:
        torch.set_num_threads(previous_threads)


def condition_items(condition: str, items: list[dict], settings: LongContextSettings) -> list[dict]:
    """The retrieval items a condition is evaluated on: all, but S2's stop at the trained length when
    `s2_up_to_trained` is set."""
    if condition == "S2" and settings.s2_up_to_trained:
        return [it for it in items if int(it["length"]) <= settings.trained_length]
    return items


def items_per_condition(settings: LongContextSettings) -> dict[str, int]:
    """How many retrieval items each condition of `settings` is evaluated on (all variants)."""
    lengths = [{"length": n} for n in settings.eval_lengths]
    return {c: len(condition_items(c, lengths, settings)) * settings.n_per_length * len(settings.variants)
            for c in settings.conditions}


def notes(settings: LongContextSettings) -> list[str]:
    """The protocol choices of a run, in words (written into the result file)."""
    t = settings.trained_length
    return [
        (f"YaRN is applied only to inputs longer than the trained length ({t} tokens): the model is rebuilt "
         f"without rope scaling for lengths <= {t} and with it beyond (static YaRN hurts at short lengths; "
         "Qwen's docs advise enabling it only for long inputs).")
        if settings.yarn_only_beyond_trained else
        "YaRN is applied at every length of its conditions (static YaRN).",
        (f"DCA is applied only to inputs longer than {t} tokens." if settings.dca_only_beyond_trained else
         "DCA is applied at every length of its condition (identity for queries within one chunk)."),
        (f"As in vLLM, DCA rotates with the base RoPE frequencies (YaRN's interpolation does not apply under "
         f"DCA) and takes YaRN's temperature as its dynamic key temperature (original_max_position_embeddings "
         f"= {t}: logits x (0.1 ln(L/{t}) + 1)^2 beyond {t} tokens)."),
        "Retrieval: greedy decoding, exact match of the first word of the completion with the pass key "
        "(synthetic.check_retrieval); depth = fraction of the context before the target needle.",
        "Loss by position: mean next-token NLL in nats; bucket_start is the first predicted position of a bucket.",
    ] + ([f"S2 retrieval is evaluated only up to the trained length ({t} tokens)."] if settings.s2_up_to_trained else [])


def summarize(results: Mapping[str, Any], settings: LongContextSettings) -> dict[str, Any]:
    """Accuracy at every evaluated length (`at_<n>`), at the trained length, per variant and condition."""
    out: dict[str, Any] = {}
    for variant, grids in results["retrieval"].items():
        out[variant] = {}
        for cond, g in grids.items():
            by_len = dict(zip(g["lengths"], g["accuracy_by_length"]))
            longest = max(g["lengths"])
            out[variant][cond] = {
                **{f"at_{n}": acc for n, acc in by_len.items()},
                "at_trained_length": by_len.get(settings.trained_length),
                "extension": longest / settings.trained_length,
            }
    return out


__all__ = ["RESULT_FILE", "condition_items", "items_per_condition", "notes", "run_longcontext_eval", "summarize"]
