"""Peer tests against verl 0.9.1, run in verl's own environment (`make verl-env` builds `.venv-verl`; verl pins
transformers < 5.11, so it cannot share the main environment). Skipped while that environment is absent.

One subprocess runs every check of `tests/verl_peer/peer_checks.py` (verl takes ~13 s to import) and reports
each check's outcome; each test below asserts one of them:

* reward_manager: `qwen3repro.verl.reward.compute_score` through verl's `NaiveRewardManager` (the legacy one
  and the reward loop's) equals direct calls, on responses of every data-source kind (a stub judge server);
* rlhf_dataset: verl's `RLHFDataset` reads our parquet with a tokenizer built here, and its chat template
  (ours, exported) renders the rows' prompts exactly as our `chat.render` does;
* hermes_parser: verl's Hermes tool parser and our `chat.parse` read the same calls from our template's turns;
* grpo_loss: `losses.grpo_loss` == verl's `core_algos.compute_policy_loss_vanilla` (loss and gradient,
  hypothesis tensors, asymmetric clipping; dapo/bnpo <-> token-mean, grpo <-> seq-mean-token-mean,
  dr_grpo <-> seq-mean-token-sum-norm);
* distill_k1: `losses.reverse_kl_pg_loss` == verl's distillation loss k1 with use_policy_gradient (loss and
  gradient).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERL_PYTHON = ROOT / ".venv-verl" / "bin" / "python"
SCRIPT = Path(__file__).with_name("verl_peer") / "peer_checks.py"

pytestmark = [
    pytest.mark.slow,  # about a minute: verl's import and the hypothesis cases
    pytest.mark.skipif(not VERL_PYTHON.exists(), reason="the verl environment is absent (make verl-env)"),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("verl-peer")
    proc = subprocess.run([str(VERL_PYTHON), str(SCRIPT), str(work)], capture_output=True, text=True, timeout=900,
                          cwd=ROOT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PEER-RESULTS ")), None)
    if line is None:
        pytest.fail(f"the peer script reported nothing (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("PEER-RESULTS "):])


@pytest.mark.parametrize("check", ["reward_manager", "rlhf_dataset", "hermes_parser", "grpo_loss", "distill_k1"])
def test_verl_peer(results, check):
    outcome = results[check]
    assert outcome["ok"], outcome["detail"]
