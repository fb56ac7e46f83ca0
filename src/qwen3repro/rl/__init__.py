"""Reasoning RL (Qwen3 report §4.2): query–verifier selection, GRPO rollouts, entropy control.

* `selection` — pick the RL queries by the report's four criteria (unused in the cold start,
  learnable by the cold-start model, as hard as possible, spread over sub-domains), with a counted
  reason for every dropped candidate and a pass-rate table by domain and difficulty.
* `rollout` — prompts in thinking mode, G samples per query with their log-probs, rewards from
  the verifier registry, group advantages, dynamic sampling (groups whose accuracy is all equal are
  dropped and the batch is refilled), and the log-prob/entropy forward the loss needs.
* `entropy` — per-token entropy at the sampling temperature and the entropy controller (fixed
  bonus, or an adaptive coefficient that holds entropy at its starting value).

The training loop itself is `qwen3repro.stages.grpo`.
"""
