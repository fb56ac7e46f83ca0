"""Pipeline stages. Each is `run(cfg, parent, ctx) -> Path` over checkpoint directories."""
