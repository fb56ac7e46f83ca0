"""Evaluation logic for the claim-by-claim report.

The logic of each evaluation suite lives in a module here; the pinned settings of a suite
(lengths, items per cell, conditions, ...) and the claims' thresholds live in the repository's
top-level `evals/` folder (`SETTINGS_DIR`), read by the module. The command line is
`qwen3repro eval <suite>` (see `cli.py`).

* `longcontext` — Qwen3 report §3.2: YaRN + Dual Chunk Attention give "a four-fold increase in
  sequence length capacity during inference"; retrieval by (length, depth) and loss by position for
  S2, S3, S3 + YaRN and S3 + YaRN + DCA.
* `reasoning` — held-out reasoning accuracy of a pretrained model (S2 vs its control).
* `posttrain` — the cold-start models' own outputs (Filtering) and the RL stage's records.
* `pass_at_k` — held-out pass@1 / pass@k of a policy (reasoning RL evaluates itself with it).
* `thinking` — ThinkFollow, accuracy by mode, accuracy vs thinking budget (the fused model).
* `copying` — can a model copy from its context (the probe behind the "cannot copy" diagnoses).
* `reward_model` — a Bradley–Terry reward model's pairwise and best-of-4 accuracy against length and
  bag-of-words baselines, and best-of-N reranking of the policy's samples (the reward-model stage).
* `claims` — the report's claims: each reads the checkpoints a pipeline wrote, runs the
  measurements above and judges them with the thresholds of `evals/claims.toml`.
* `report` — `REPORT.md` from the claims' rows and the stages' records.

Measurement modules never import `claims`: data flows from the stages' checkpoints through the
measurements to the claims and the report, never back.
"""
from pathlib import Path

# The repository's top-level `evals/` folder (src/qwen3repro/evals/ -> repository root).
SETTINGS_DIR = Path(__file__).resolve().parents[3] / "evals"
