"""Full-scale RL and on-policy distillation on verl 0.9.1 (imported by verl itself only in its own environment).

config_gen (stage x model Hydra overrides, checks, launch) · plan (GPUs, memory, time) · tools (verl tool adapters
over `qwen3repro.tools`) · data and reward (verl-schema parquet, the `compute_score` entry).
"""
