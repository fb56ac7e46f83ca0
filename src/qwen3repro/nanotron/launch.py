"""Launching a full-scale stage: the training entry point (run on every GPU) and the launchers.

* `python -m qwen3repro.nanotron.launch --config-file runs/full/<model>/<stage>/<stage>.yaml --data <shards>`
  is what torchrun starts on each GPU: nanotron's `DistributedTrainer` with our model class and model-config
  class, fed by our loaders: pretraining stages pack pre-tokenised shards (an `input_ids` column, from the
  stage's mixture); the SFT stages (cold start, fusion, off-policy distillation) read the masked conversation
  shards of `sft_data`, so the loss counts assistant tokens only. The sidecar next to the YAML says which.
  For MoE models each optimizer step first counts expert selections over its micro-batches (the global-batch
  load-balancing loss, see model.py).
* `launch_command(spec, yaml)` builds the launcher line for one node: `python -m torch.distributed.run` with
  the same interpreter that runs `make full` (the project's `.venv`), never a `torchrun` found on PATH, which
  may belong to another environment; `slurm_script(spec, yaml)` fills `full/launch.slurm.template` for several
  nodes the same way.
* `preflight(gpus)` names every missing GPU dependency before any rank starts (CUDA GPUs, NCCL, flash-attn,
  which nanotron's trainer imports at module level, and nanotron itself); `make full` and every rank run it.
* Resume: the generated config's `resume_checkpoint_path` is the stage's own checkpoint folder, so nanotron
  restores weights, optimizer, LR schedule, step and consumed samples from its `latest.txt`; the entry point
  then moves our loader past the samples this data-parallel rank already trained on
  (`skip_consumed`), so a restarted stage continues with the next batch instead of repeating the first ones.
* Weight decay: matrices only (`optimizer.weight_decay_groups`), as the tiny trainer.

The CPU test suite checks everything up to the trainer (configs, model, conversion, resume through nanotron's
own checkpoint functions); `full/gpu_check.py` runs the trainer itself on a GPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import shlex
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from ..data.packing import DataError, PackingLoader, load_documents
from ..recipes import repo_root
from .compat import import_nanotron
from .config_gen import StageSpec
from .pretrain_data import PackedShardLoader, is_packed_shards
from .sft_data import MaskedShardLoader, is_masked_shards

ENV = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "OMP_NUM_THREADS": "8"}
# What launching needs beyond the CPU install, and how to get it (full/README.md, "Installing the GPU extras").
FLASH_ATTN_HINT = ("pip install flash-attn --no-build-isolation (needs the CUDA toolkit matching torch; "
                   "full/README.md, 'Installing the GPU extras')")


def preflight(gpus: int) -> list[str]:
    """Every missing piece a launch of `gpus` GPUs per node would hit, each with what to do (empty: ready).

    Checked before any rank starts, because nanotron's trainer imports flash-attn at module level and NCCL and
    CUDA are only touched once every rank has started: one missing piece would otherwise cost a full queue
    wait and a crash per attempt."""
    problems = []
    if not torch.cuda.is_available():
        problems.append(f"no CUDA GPU is visible (torch {torch.__version__}, CUDA build: "
                        f"{torch.version.cuda or 'no, a CPU-only wheel'}); install a CUDA build of torch")
    elif torch.cuda.device_count() < gpus:
        problems.append(f"{gpus} GPUs per node are planned and {torch.cuda.device_count()} are visible "
                        "(CUDA_VISIBLE_DEVICES, or --gpus-per-node)")
    if not (tdist.is_available() and tdist.is_nccl_available()):
        problems.append("torch.distributed has no NCCL backend (a CUDA build of torch has it)")
    if importlib.util.find_spec("flash_attn") is None:
        problems.append(f"flash-attn is not installed (nanotron's trainer imports it): {FLASH_ATTN_HINT}")
    if importlib.util.find_spec("nanotron") is None:
        problems.append("nanotron is not installed: pip install -e '.[full]'")
    return problems


def entry_args(yaml_path: Path, data: str | None) -> list[str]:
    args = ["-m", "qwen3repro.nanotron.launch", "--config-file", str(yaml_path)]
    if data:
        args += ["--data", data]
    return args


def launcher(python: str | None = None) -> list[str]:
    """torch's launcher run by this interpreter (what `torchrun` is), so the ranks use this environment."""
    return [python or sys.executable, "-m", "torch.distributed.run"]


def launch_command(spec: StageSpec, yaml_path: Path, data: str | None = None) -> list[str]:
    """The launcher on this node (NODES=1)."""
    env = [f"{k}={v}" for k, v in ENV.items()]
    return ["env", *env, *launcher(), f"--nproc_per_node={spec.layout.gpus_per_node}", "--nnodes=1",
            *entry_args(yaml_path, data)]


def slurm_script(spec: StageSpec, yaml_path: Path, data: str | None = None, template: Path | None = None) -> str:
    template = template or repo_root() / "full" / "launch.slurm.template"
    text = template.read_text()
    values = {
        "JOB_NAME": f"{spec.model}-{spec.stage}", "NODES": str(spec.layout.nodes),
        "GPUS_PER_NODE": str(spec.layout.gpus_per_node), "CONFIG": str(yaml_path),
        "LAUNCHER": " ".join(shlex.quote(a) for a in launcher()),
        "ENTRY_ARGS": " ".join(shlex.quote(a) for a in entry_args(yaml_path, data)),
        "LOG_DIR": str(log_dir(spec)),
    }
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def log_dir(spec: StageSpec) -> Path:
    """Slurm's output folder: it must exist before `sbatch`, since Slurm opens the output file before the
    script (and any `mkdir` in it) runs; `make full` creates it when it writes the script."""
    return (spec.run_dir / spec.model / spec.stage / "logs").resolve()


# ------------------------------------------------------------------------------ entry point (GPU)
def forever(loader):
    """The loader's epochs, one after another."""
    while True:
        yield from loader


def skip_consumed(loader, samples: int, micro_batch_size: int):
    """This rank's batches, forever, past `samples` already-trained samples (a resumed stage, module doc): the
    loader's own `skip(samples)` when it has one (no data read), else its first micro-batches dropped (across
    epochs when a stage ran longer than one)."""
    if samples % micro_batch_size:
        raise ValueError(f"{samples} consumed samples is not a whole number of micro-batches of {micro_batch_size}")
    if samples and hasattr(loader, "skip"):
        loader.skip(samples)
        return forever(loader)
    return itertools.islice(forever(loader), samples // micro_batch_size, None)


def nanotron_batches(loader, model, device, consumed_samples: int = 0, micro_batch_size: int = 1):
    """Loader batches -> the dicts our nanotron model takes, forever (epoch after epoch).

    Both loaders give `labels` (the next token, or -100 where nothing is trained: padding, document ends, and
    for the SFT shards everything that is not the assistant's). The model's loss block takes the target and a
    mask instead: label_mask = labels != -100 and label_ids = labels with the -100s made valid ids (masked
    out). Packed documents or conversations are told apart by `position_ids` restarting at 0."""
    from .model import pipeline_inputs

    for batch in skip_consumed(loader, consumed_samples, micro_batch_size):
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
    """This data-parallel rank's loader: masked conversation shards for SFT stages; for pretraining stages the
    packed rows the pretraining data job writes (`pretrain_data`), or tokenised documents packed here.

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
    if is_packed_shards(data):  # rows packed by the pretraining data job (`pretrain_data`)
        return PackedShardLoader(data, micro_batch_size, dp_rank, dp_size, seed, seq_len=seq_len,
                                 vocab_size=vocab_size, document_masking=document_masking)
    if eot_id is None:
        raise DataError("the model config has no bos_token_id (<|endoftext|> in the released Qwen3 configs), "
                        "which separates packed documents")
    # Each data-parallel rank packs its own shard of the documents (TP/PP ranks of a replica see the same data).
    docs = load_documents(data).shard(num_shards=dp_size, index=dp_rank, contiguous=False)
    return PackingLoader(docs, seq_len=seq_len, batch_size=micro_batch_size, eot_id=eot_id, seed=seed,
                         document_masking=document_masking, too_long="split", drop_last=True)


PEAK_MEMORY_FILE = "peak_memory.json"  # next to the stage's YAML: what the GPUs held, against the plan


def write_peak_memory(path: Path, rank: int) -> None:
    """Every rank's peak allocated and reserved GiB, gathered into one JSON file (rank 0 writes it), so a run's
    real memory can be set against the plan's estimate (`plan.RunPlan.memory`)."""
    mine = [rank, torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30]
    everyone = [None] * tdist.get_world_size()
    tdist.all_gather_object(everyone, mine)
    if rank == 0:
        rows = sorted(everyone)
        path.write_text(json.dumps({
            "max_allocated_gib": max(r[1] for r in rows), "max_reserved_gib": max(r[2] for r in rows),
            "per_rank": [{"rank": r, "allocated_gib": a, "reserved_gib": b} for r, a, b in rows],
        }, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train one full-scale stage with nanotron (run under torchrun).")
    parser.add_argument("--config-file", required=True, help="generated <stage>.yaml")
    parser.add_argument("--data", required=True, help="pretraining: the packed shard folder written by "
                        "qwen3repro.nanotron.pretrain_data (or tokenised documents: parquet/arrow with an input_ids "
                        "column); SFT stages: the masked shard folder written by qwen3repro.nanotron.sft_data")
    args = parser.parse_args(argv)
    sidecar = read_sidecar(args.config_file)  # before the (slow) trainer start, so a wrong --data fails fast
    kind = sidecar["kind"]
    problems = preflight(gpus=1)  # this rank's own GPU; `make full` checked the whole node before starting
    if problems:
        sys.exit("cannot start training:\n  " + "\n  ".join(problems))

    import_nanotron()
    import nanotron.distributed as dist
    from nanotron.trainer import DistributedTrainer

    from .model import Qwen3ForTraining, Qwen3NTConfig, count_experts, weight_by_tokens
    from .optimizer import weight_decay_groups

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

    import yaml

    # The optimizer groups cover the ZeRO path; the stage's own config says whether it takes it.
    zero_stage = int(yaml.safe_load(Path(args.config_file).read_text())["optimizer"]["zero_stage"])
    with weight_decay_groups(zero_stage=zero_stage, decay_embeddings=bool(sidecar.get("decay_embeddings", False))):
        trainer = Qwen3Trainer(args.config_file, model_config_class=Qwen3NTConfig, model_class=Qwen3ForTraining)
    cfg = trainer.config
    pc = trainer.parallel_context
    mc = cfg.model.model_config
    mbs, dp = cfg.tokens.micro_batch_size, pc.dp_pg.size()
    loader = make_loader(kind, args.data, seq_len=cfg.tokens.sequence_length, micro_batch_size=mbs,
                         seed=cfg.data.seed, dp_rank=dist.get_rank(pc.dp_pg), dp_size=dp,
                         eot_id=mc.bos_token_id, vocab_size=mc.vocab_size,
                         document_masking=sidecar["document_masking"])
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model  # DDP-wrapped or not
    # Resumed: nanotron counts samples over all DP ranks; each rank trained on its own equal share.
    consumed = trainer.consumed_train_samples // dp
    torch.cuda.reset_peak_memory_stats()
    trainer.train(nanotron_batches(loader, model, torch.device("cuda"), consumed, mbs))
    write_peak_memory(Path(args.config_file).with_name(PEAK_MEMORY_FILE), dist.get_rank(pc.world_pg))


if __name__ == "__main__":
    main()
