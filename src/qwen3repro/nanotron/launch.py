"""Launching a full-scale stage: the training entry point (run on every GPU) and the launchers.

* `python -m qwen3repro.nanotron.launch --config-file runs/full/<model>/<stage>/<stage>.yaml --data <shards>`
  is what torchrun starts on each GPU: nanotron's `DistributedTrainer` with our model class and model-config
  class, fed by our packing loader (pre-tokenised shards with an `input_ids` column, from the stage's mixture).
  For MoE models each optimizer step first counts expert selections over its micro-batches (the global-batch
  load-balancing loss, see model.py).
* `launch_command(spec, yaml)` builds the torchrun line for one node; `slurm_script(spec, yaml)` fills
  `full/launch.slurm.template` for several nodes.

The trainer imports flash-attn (through nanotron's Llama module), so the entry point needs a GPU machine with
flash-attn installed; the CPU test suite checks everything up to it (configs, model, conversion).
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from .config_gen import StageSpec

ENV = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "OMP_NUM_THREADS": "8"}


def entry_args(yaml_path: Path, data: str | None) -> list[str]:
    args = ["-m", "qwen3repro.nanotron.launch", "--config-file", str(yaml_path)]
    if data:
        args += ["--data", data]
    return args


def launch_command(spec: StageSpec, yaml_path: Path, data: str | None = None) -> list[str]:
    """torchrun on this node (NODES=1)."""
    env = [f"{k}={v}" for k, v in ENV.items()]
    return ["env", *env, "torchrun", f"--nproc_per_node={spec.layout.gpus_per_node}", "--nnodes=1",
            *entry_args(yaml_path, data)]


def slurm_script(spec: StageSpec, yaml_path: Path, data: str | None = None, template: Path | None = None) -> str:
    from ..recipes import repo_root

    template = template or repo_root() / "full" / "launch.slurm.template"
    text = template.read_text()
    values = {
        "JOB_NAME": f"{spec.model}-{spec.stage}", "NODES": str(spec.layout.nodes),
        "GPUS_PER_NODE": str(spec.layout.gpus_per_node), "CONFIG": str(yaml_path),
        "ENTRY_ARGS": " ".join(shlex.quote(a) for a in entry_args(yaml_path, data)),
        "LOG_DIR": str(spec.run_dir / spec.model / spec.stage / "logs"),
    }
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


# ------------------------------------------------------------------------------ entry point (GPU)
def _batches(loader, model):
    """PackingLoader batches -> the dicts our nanotron model takes (labels -100 become masked 0s)."""
    from .model import pipeline_inputs

    while True:
        for batch in loader:
            labels = batch["labels"]
            mask = labels != -100
            yield pipeline_inputs(model, {
                "input_ids": batch["input_ids"].cuda(), "position_ids": batch["position_ids"].cuda(),
                "label_ids": labels.clamp(min=0).cuda(), "label_mask": mask.cuda(),
            })


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train one full-scale stage with nanotron (run under torchrun).")
    parser.add_argument("--config-file", required=True, help="generated <stage>.yaml")
    parser.add_argument("--data", required=True, help="tokenised shards (parquet/arrow with an input_ids column)")
    args = parser.parse_args(argv)

    from .compat import import_nanotron

    import_nanotron()
    import nanotron.distributed as dist
    from nanotron.trainer import DistributedTrainer

    from ..data.packing import PackingLoader, load_documents
    from .model import Qwen3ForTraining, Qwen3NTConfig, count_experts

    class Qwen3Trainer(DistributedTrainer):
        def training_step(self, dataloader):
            if self.unwrapped_model.model_config.is_moe:  # phase 1 of the global-batch LBL
                mbs = [next(dataloader) for _ in range(self.n_micro_batches_per_batch)]
                count_experts(self.unwrapped_model, mbs)
                dataloader = iter(mbs)
            return super().training_step(dataloader)

    trainer = Qwen3Trainer(args.config_file, model_config_class=Qwen3NTConfig, model_class=Qwen3ForTraining)
    cfg = trainer.config
    pc = trainer.parallel_context
    mc = cfg.model.model_config
    # Each data-parallel rank packs its own shard of the documents (TP/PP ranks of a replica see the same data).
    docs = load_documents(args.data).shard(num_shards=pc.dp_pg.size(), index=dist.get_rank(pc.dp_pg), contiguous=False)
    loader = PackingLoader(
        docs, seq_len=cfg.tokens.sequence_length, batch_size=cfg.tokens.micro_batch_size,
        eot_id=mc.bos_token_id, seed=cfg.data.seed, document_masking=True, too_long="split", drop_last=True,
    )
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model  # DDP-wrapped or not
    trainer.train(_batches(loader, model))


if __name__ == "__main__":
    main()
