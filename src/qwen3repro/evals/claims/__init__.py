"""The report's claims, measured on a pipeline's checkpoints, and `REPORT.md`.

Each claim (one module each) reads the checkpoints the stages wrote through the pipeline's `Plan`
(which roles ran a stage, where its output is, the scale's evaluation settings), runs its
evaluation with pinned settings (the measurement modules of `evals`), writes
`runs/<scale>/claims/<name>.json` and returns rows for the claims table (`ClaimRow`): the
report's claim, the report's figure, our measurement, and whether it reproduced (with a diagnosis
when it did not). A claim whose inputs are missing (a stage not run) is reported as "not measured"
rather than silently dropped. Thresholds and the report's figures: `evals/claims.toml`
(`settings`).

    s2_reasoning   S2 vs the S1 control (roles with `s1-control`)           s2_reasoning.py
    longcontext    S3 + ABF, YaRN + DCA x4 (rows s3_abf, yarn_dca)          longcontext.py
    moe_balance    global- vs micro-batch load balancing                   moe.py
    filtering      filtered vs unfiltered cold start                       filtering.py
    grpo           reasoning RL's held-out pass@1 and entropy              grpo.py
    fusion         ThinkFollow, thinking vs non-thinking                   fusion.py
    budget         accuracy vs thinking budget                             budget.py
    reward_model   the reward model vs length and bag-of-words baselines   reward_model.py
    general_rl     ThinkFollow, IFEval, tool calls, reasoning kept         general_rl.py

`registry.run_claims` measures them, adds the copy-probe diagnoses (`copy_probe`) and writes
`claims.json` and `REPORT.md`.
"""
from .registry import CLAIMS, load_rows, run_claims
from .row import ClaimRow

__all__ = ["CLAIMS", "ClaimRow", "load_rows", "run_claims"]
