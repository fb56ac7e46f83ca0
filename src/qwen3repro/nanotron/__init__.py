"""Full-scale backend on the pinned nanotron 0.4 (imported only when the full-scale path is used).

compat (import fix, CPU test hooks) · model (Qwen3 on nanotron's parallel layers) · config_gen (stage x model
YAMLs) · plan (parallel layout, memory, time) · convert (nanotron <-> Hugging Face checkpoints) · launch/cli.
"""
