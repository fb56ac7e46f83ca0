"""The whole experiment: both arms for every seed, measured on held-out documents, judged, plotted
and written to `moe_balance.json`."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

from ...config import config_hash
from ...files import write_json_atomic
from ...tokenizer import Tokenizer
from .data import training_domains
from .heldout import heldout_documents, measure_run
from .plots import plot_routing, plot_summary, plot_training
from .settings import CLAIM, MODES, MoEExperimentSettings
from .training import train_arm
from .verdict import claim_parts, judge, mean_summary, summarise


def run_moe_experiment(settings: Mapping[str, Any] | MoEExperimentSettings, tokenizer_dir: Path, out_dir: Path,
                       cache_dir: Path, printer: Callable[[str], None] = print,
                       device: str = "cpu") -> dict[str, Any]:
    """Train the MoE with micro- and global-batch LBL for every seed, measure, write `moe_balance.json` and plots.

    settings: the scale file's `[experiments.moe]` table (`MoEExperimentSettings` fields).
    tokenizer_dir: a directory holding the tokenizer (and no model). Runs resume when cut.
    device: where the arms train and are measured (not part of a run's identity).
    Returns {"claim", "micro", "global" (mean summaries), "per_seed" ({mode: {seed: summary}}),
    "reproduced", "parts", "parts_per_seed", "diagnosis", "domains", "settings", "steps", "wall_s", "files"}.
    """
    s = settings if isinstance(settings, MoEExperimentSettings) else MoEExperimentSettings.from_mapping(settings)
    out_dir, cache_dir, tokenizer_dir = Path(out_dir), Path(cache_dir), Path(tokenizer_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.load(tokenizer_dir)
    t0 = time.time()
    names, domain_docs, shares = training_domains(s, tokenizer, cache_dir)
    printer(f"moe experiment: {s.model}, {s.steps} steps x {s.micro_batches_per_step} domain-pure micro-batches x "
            f"{s.micro_batch_size} x {s.seq_len}, aux coef {s.router_aux_loss_coef} ({s.lbl_layers} LBL), seeds {list(s.seeds)}; domains "
            + ", ".join(f"{n} {100 * w:.0f}%" for n, w in zip(names, shares)))
    run_dirs: dict[tuple[str, int], Path] = {}
    wall: dict[tuple[str, int], float] = {}
    for seed in s.seeds:
        for mode in MODES:
            run_dir = out_dir / f"{mode}-seed{seed}-{config_hash(s.run_identity(mode, seed))[:8]}"
            t = time.time()
            run_dirs[mode, seed] = train_arm(s, mode, seed, domain_docs, shares, tokenizer, tokenizer_dir, run_dir,
                                             printer, device)
            wall[mode, seed] = time.time() - t
    docs = heldout_documents(s)
    printer(f"moe experiment: measuring routing on {len(docs)} held-out documents")
    results = {key: measure_run(d, docs, tokenizer, s.seq_len, names, shares, device) for key, d in run_dirs.items()}
    per_seed = {mode: {seed: summarise(results[mode, seed]) for seed in s.seeds} for mode in MODES}
    parts_per_seed = {seed: claim_parts(results["micro", seed], results["global", seed], s.loss_tolerance)
                      for seed in s.seeds}
    micro_mean, glob_mean = mean_summary(list(per_seed["micro"].values())), mean_summary(list(per_seed["global"].values()))
    ok, parts, diagnosis = judge(micro_mean, glob_mean, s.loss_tolerance, parts_per_seed)

    plot_summary(per_seed, out_dir / "moe_summary.png")
    plot_training(run_dirs, out_dir / "moe_training.png")
    first = s.seeds[0]
    for mode in MODES:
        r = results[mode, first]
        plot_routing(r, f"Routing share by domain, {mode}-batch LBL, seed {first} "
                         f"(I(domain; expert) {r['specialisation']['mutual_information']:.3f} nats)",
                      out_dir / f"moe_routing_{mode}.png")
    files = ["moe_balance.json", "moe_summary.png", "moe_training.png", "moe_routing_micro.png", "moe_routing_global.png"]
    summary = {
        "claim": CLAIM,
        "micro": micro_mean,
        "global": glob_mean,
        "per_seed": per_seed,
        "reproduced": ok,
        "parts": parts,
        "parts_per_seed": parts_per_seed,
        "diagnosis": diagnosis,
        "domains": dict(zip(names, shares)),
        "details": {f"{mode}-seed{seed}": {**{k: v for k, v in results[mode, seed].items() if not k.startswith("_")},
                                           "train_wall_s": wall[mode, seed]} for mode, seed in results},
        "settings": asdict(s),
        "steps": s.steps,
        "wall_s": time.time() - t0,
        "files": files,
    }
    write_json_atomic(out_dir / "moe_balance.json", summary)
    printer("moe experiment: " + ("REPRODUCED" if ok else "NOT reproduced") + "\n" + diagnosis)
    return summary


__all__ = ["run_moe_experiment"]
