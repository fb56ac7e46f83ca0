"""Launching a full-scale stage: the training entry point (run on every GPU) and the launchers.

* `python -m qwen3repro.nanotron.launch --config-file runs/full/<model>/<stage>/<stage>.yaml --data <shards>`
  is what torchrun starts on each GPU: nanotron's `DistributedTrainer` with our model class and model-config
  class, fed by our loaders: pretraining stages pack pre-tokenised shards (an `input_ids` column, from the
  stage's mixture); the SFT stages (cold start, fusion, off-policy distillation) read the masked conversation
  shards of `sft_data`, so the loss counts assistant tokens only. The sidecar next to the YAML says which.
  For MoE models each optimizer step first counts expert selections over its micro-batches (the global-batch
  load-balancing loss, see model.py).
* `launch_command(spec, yaml)` builds the torchrun line for one node; `slurm_script(spec, yaml)` fills
  `full/launch.slurm.template` for several nodes.

The trainer imports flash-attn (through nanotron's Llama module), so the entry point needs a GPU machine with
flash-attn installed; the CPU test suite checks everything up to it (configs, model, conversion).
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import torch

from ..data.packing import DataError, PackingLoader, load_documents
from ..recipes import repo_root
from .compat import import_nanotron
from .config_gen import StageSpec
from .sft_data import MaskedShardLoader, is_masked_shards

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
def nanotron_batches(loader, model, device):
    """Loader batches -> the dicts our nanotron model takes, forever (epoch after epoch).

    Both loaders give `labels` (the next token, or -100 where nothing is trained: padding, document ends, and
    for the SFT shards everything that is not the assistant's). The model's loss block takes the target and a
    mask instead: label_mask = labels != -100 and label_ids = labels with the -100s made valid ids (masked
    out). Packed documents or conversations are told apart by `position_ids` restarting at 0."""
    from .model import pipeline_inputs

    while True:
        for batch in loader:
            labels = batch["labels"]
            yield pipeline_inputs(model, {
                "input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device),
                "label_ids": labels.clamp(min=0).to(device), "label_mask": (labels != -100).to(device),
            })


def read_sidecar(yaml_path: str | Path) -> dict:
    """The sidecar config_gen writes next to the YAML: the stage's kind ('pretrain' or 'sft'), document masking,
    data sources, ..."""
    side = Path(yaml_path).with_name(Path(yaml_path).stem + ".qwen3repro.json")
    if not side.is_file():
        raise FileNotFoundError(f"{side} not found: generate the stage's config with `make full ... DRY_RUN=1`")
    return json.loads(side.read_text())


def make_loader(kind: str, data: str, *, seq_len: int, micro_batch_size: int, seed: int, dp_rank: int,
                dp_size: int, eot_id: int, vocab_size: int | None = None, document_masking: bool = True):
    """This data-parallel rank's loader: masked conversation shards for SFT stages, packed documents otherwise.

    The kind of data must match the stage: SFT on unmasked token shards would train on the prompts too, and
    pretraining on SFT shards would train on assistant tokens only."""
    masked = is_masked_shards(data)
    if kind == "sft":
        if not masked:
            raise DataError(f"this stage trains on assistant tokens only, and {data} holds no masked conversation "
                            "shards (manifest.json); write them with `python -m qwen3repro.nanotron.sft_data`")
        return MaskedShardLoader(data, seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                                 dp_size=dp_size, seed=seed, vocab_size=vocab_size)
    if masked:
        raise DataError(f"{data} holds SFT conversation shards, but this is a pretraining stage (every token counts)")
    # Each data-parallel rank packs its own shard of the documents (TP/PP ranks of a replica see the same data).
    docs = load_documents(data).shard(num_shards=dp_size, index=dp_rank, contiguous=False)
    return PackingLoader(docs, seq_len=seq_len, batch_size=micro_batch_size, eot_id=eot_id, seed=seed,
                         document_masking=document_masking, too_long="split", drop_last=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train one full-scale stage with nanotron (run under torchrun).")
    parser.add_argument("--config-file", required=True, help="generated <stage>.yaml")
    parser.add_argument("--data", required=True, help="pretraining: token shards (parquet/arrow with an input_ids "
                        "column); SFT stages: the masked shard folder written by qwen3repro.nanotron.sft_data")
    args = parser.parse_args(argv)
    sidecar = read_sidecar(args.config_file)  # before the (slow) trainer start, so a wrong --data fails fast
    kind = sidecar["kind"]

    import_nanotron()
    import nanotron.distributed as dist
    from nanotron.trainer import DistributedTrainer

    from .model import Qwen3ForTraining, Qwen3NTConfig, count_experts, weight_by_tokens

    by_tokens = kind == "sft"  # the SFT loss is the mean over the step's assistant tokens (as the tiny stage)

    class Qwen3Trainer(DistributedTrainer):
        def training_step(self, dataloader):
            moe = self.unwrapped_model.model_config.is_moe
            if moe or by_tokens:  # both need the whole step's micro-batches before the first backward
                mbs = [next(dataloader) for _ in range(self.n_micro_batches_per_batch)]
                if moe:  # phase 1 of the global-batch LBL
                    count_experts(self.unwrapped_model, mbs)
                if by_tokens:
                    weight_by_tokens(self.unwrapped_model, mbs)
                dataloader = iter(mbs)
            return super().training_step(dataloader)

    trainer = Qwen3Trainer(args.config_file, model_config_class=Qwen3NTConfig, model_class=Qwen3ForTraining)
    cfg = trainer.config
    pc = trainer.parallel_context
    mc = cfg.model.model_config
    loader = make_loader(kind, args.data, seq_len=cfg.tokens.sequence_length, micro_batch_size=cfg.tokens.micro_batch_size,
                         seed=cfg.data.seed, dp_rank=dist.get_rank(pc.dp_pg), dp_size=pc.dp_pg.size(),
                         eot_id=mc.bos_token_id, vocab_size=mc.vocab_size,
                         document_masking=sidecar["document_masking"])
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model  # DDP-wrapped or not
    trainer.train(nanotron_batches(loader, model, torch.device("cuda")))


if __name__ == "__main__":
    main()
