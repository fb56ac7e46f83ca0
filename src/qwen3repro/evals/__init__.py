"""Evaluation logic for the claim-by-claim report.

The logic of each evaluation suite lives in a module here; the pinned settings of a suite
(lengths, items per cell, conditions, ...) live in the repository's top-level `evals/` folder, read
by the module. The command line is `qwen3repro eval <suite>` (see `cli.py`).

* `longcontext` — Qwen3 report §3.2: YaRN + Dual Chunk Attention give "a four-fold increase in
  sequence length capacity during inference"; retrieval by (length, depth) and loss by position for
  S2, S3, S3 + YaRN and S3 + YaRN + DCA.

Submodules are imported on use so that `qwen3repro --help` stays fast.
"""
