"""Fault injection: the micro pipeline killed (SIGKILL) at seeded points and resumed with the same command
ends with the same weights, metrics and evaluations as a run that was never cut.

The uncut reference run records its file events (`faulty_pipeline.py`: every rename into the run
directory, named by its destination, i.e. each file a run commits). The kill points are drawn from the
events that happen once in it, with `random.Random(SEED)`: the list is split into `CUTS` consecutive
parts of equal length and one event is drawn uniformly from each, so the cuts spread over the whole run
(pretraining, post-training, the claims' MoE runs) and come in the order the run reaches them. The
second run is killed just before the rename of the first point's file (written, not committed); the
same command is run again and killed at the next point, and so on; the last run goes to the end. The
points are printed (`pytest -s`) and named in every failure.

Compared, for every file outside `checkpoints/`: each `model.safetensors` byte for byte, and each
`metrics.jsonl` and `eval.json` byte for byte except the values of the wall-clock fields (`TIMING_KEYS`).
Afterwards no temporary checkpoint directory of a killed run is left behind.

The micro scale's reasoning RL learns nothing (its cold start solves no query, so every group's rewards
are equal and dynamic sampling drops them all): the run here keeps those groups, adds a fixed entropy
bonus and checkpoints every step (`RL_SETTINGS`), so that RL steps change the weights, and one more kill
point (`RL_POINT`, before the commit of its last checkpoint) always makes RL resume from a checkpoint in
the middle of its run.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "faulty_pipeline.py"
SEED = 1729
CUTS = 4
RL_SETTINGS = ["--set", "stages.reasoning-rl.dynamic_sampling=false",
               "--set", 'stages.reasoning-rl.entropy_control="bonus"',
               "--set", "stages.reasoning-rl.entropy_coef=0.01",
               "--set", "stages.reasoning-rl.ckpt_every=1"]
RL_POINT = "flagship/reasoning-rl/checkpoints/step_000002"
COMMAND = ["pipeline", "micro", "--set", "pipeline.threads=1", *RL_SETTINGS]
TIMING_KEYS = ("elapsed_s", "tokens_per_s")
# What a stage publishes that must not depend on where it was cut: its weights, its log, its evaluation.
COMPARED = ("model.safetensors", "metrics.jsonl", "eval.json")
_TIMING_VALUE = re.compile(r'("(?:%s)": )[^,}]+' % "|".join(TIMING_KEYS))
_TEMPORARY = (".tmp-", ".old-", ".trash-")


def run_pipeline(out: Path, log: Path, *driver_args: str) -> int:
    """The micro pipeline into `out` through the fault driver; its return code (-9: killed)."""
    with open(log, "a") as f:
        f.write(f"\n$ faulty_pipeline {' '.join(driver_args)}\n")
        f.flush()
        process = subprocess.run(
            [sys.executable, str(DRIVER), "--root", str(out / "micro"), *driver_args, "--",
             *COMMAND, "--out", str(out)],
            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")},
            stdout=f, stderr=subprocess.STDOUT, timeout=600)
    return process.returncode


def kill_points(events: list[str], seed: int, cuts: int, always: str) -> list[str]:
    """One event drawn uniformly from each of `cuts` consecutive equal parts of the events that happen once,
    and `always`, in the order the run reaches them."""
    once = [e for e in events if events.count(e) == 1]
    rng = random.Random(seed)
    drawn = {rng.choice(once[i * len(once) // cuts:(i + 1) * len(once) // cuts]) for i in range(cuts)}
    return sorted(drawn | {always}, key=once.index)


def outputs(root: Path) -> dict[str, str]:
    """Each stage output's weights, metrics and evaluation outside `checkpoints/`: its path -> sha256 (the
    wall-clock values masked)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if "checkpoints" in rel.parts or path.name not in COMPARED:
            continue
        data = path.read_bytes()
        if path.name != "model.safetensors":
            data = _TIMING_VALUE.sub(r"\1<time>", data.decode()).encode()
        found[rel.as_posix()] = hashlib.sha256(data).hexdigest()
    return found


def test_micro_pipeline_cut_at_seeded_points_ends_identical_to_an_uncut_run(tmp_path):
    reference, cut, events = tmp_path / "reference", tmp_path / "cut", tmp_path / "events.txt"
    log = tmp_path / "pipeline.log"
    assert run_pipeline(reference, log, "--record", str(events)) == 0, log.read_text()[-3000:]
    expected = outputs(reference / "micro")
    assert len(expected) >= 3 * 13  # every stage and MoE run: weights, metrics and (stages) evaluation
    rl, cold_start = (expected[f"flagship/{stage}/model.safetensors"] for stage in ("reasoning-rl", "cold-start"))
    assert rl != cold_start, "the RL steps changed no weight: their resume would not be tested"

    points = kill_points(events.read_text().splitlines(), SEED, CUTS, RL_POINT)
    print(f"kill points (seed {SEED}): {points}")
    for n, point in enumerate(points, 1):
        code = run_pipeline(cut, log, "--kill-at", point)
        assert code == -signal.SIGKILL, (f"cut {n} of {points}: the run was to be killed at {point} and ended "
                                         f"with {code}\n{log.read_text()[-3000:]}")
    assert run_pipeline(cut, log) == 0, f"resuming after {points}:\n{log.read_text()[-3000:]}"

    got = outputs(cut / "micro")
    differing = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
    assert not differing, f"cut at {points}, these differ from the uncut run: {differing}"
    left = [p for p in (cut / "micro").rglob("*") if p.name.startswith(_TEMPORARY)]
    assert not left, f"cut at {points}, temporaries left behind: {left}"
