"""Checkpoint conversion against what nanotron's trainer writes and what transformers loads (CPU, fp32).

1. Trainer checkpoint -> Hugging Face. A checkpoint written by the code path of nanotron 0.4's
   `DistributedTrainer.save_checkpoint`, with nanotron's own functions wherever they run on CPU:
   `config.get_config_from_file` (the stage YAML from `config_gen`, with our model-config class, as the trainer
   loads it), `helpers._vocab_size_with_padding`, `helpers.init_optimizer_and_grad_accumulator`,
   `helpers.lr_scheduler_builder`, `serialize.save` (config.yaml through `Config.save_as_yaml`, model/ through
   `save_weights`, optimizer/, lr_scheduler/, checkpoint_metadata.json through `save_meta`, and its sanity
   checks) and `serialize.save_random_states`; latest.txt and model_config.json (`json.dumps(asdict(...))`)
   are written as `save_checkpoint` writes them. Not nanotron's, because they need CUDA on 0.4: the trainer's
   model building (`build_qwen3` does the same: `build_model`, then the parameter ties), `init_random_states`
   (broadcasts through CUDA; at TP=1 it returns the current random state, which is what is saved here) and the
   FP32 gradient accumulator (allocates on CUDA; `accumulate_grad_in_fp32` is off here).
   Then `nanotron_to_hf` -> `transformers.AutoModelForCausalLM.from_pretrained` (transformers' own Qwen3 /
   Qwen3Moe class) gives the nanotron model's logits, dense and MoE.

2. Released model -> a stage's first checkpoint (`init_from_hf`). A Hugging Face checkpoint built and saved by
   transformers (`AutoModelForCausalLM.from_config(...).save_pretrained`, in bf16 as the releases are) with the
   real shapes of qwen3-0.6b (real vocabulary, tied) and of qwen3-30b-a3b (real widths: hidden 2048, 32/4
   heads of 128, expert width 768, top-8), each at one layer. For the MoE model, two more reductions keep the
   test within a CPU's memory (the real 128 experts at one layer are 0.6B parameters, its untied 151,936-row
   embedding and head another 0.6B): 16 experts (still twice the top-8; each expert converts by the same
   per-expert copy, so their number changes no code path) and a 4,096-token vocabulary (the vocabulary only
   sets the row count of two matrices that convert by renaming; the dense case keeps the real one).
   `init_from_hf` -> nanotron `load_weights` into `Qwen3ForTraining` (a 1-process gloo context) gives
   transformers' logits; the folder holds exactly what the trainer reads, and nanotron's own `save_weights`
   writes back the same files and tensors. A config that is not the registry's model is an error naming every
   differing field with both values.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("nanotron")

from gloo_helpers import free_port  # noqa: E402
transformers = pytest.importorskip("transformers")

from qwen3repro.config import ConfigError  # noqa: E402
from qwen3repro.models.registry import get_model_config  # noqa: E402
from qwen3repro.nanotron import convert  # noqa: E402
from qwen3repro.nanotron.convert import (  # noqa: E402
    init_from_hf, nanotron_to_hf, read_checkpoint_config, resolve_hf_source,
)

RTOL, ATOL = 1e-4, 1e-5  # fp32; the only differences are the kernels' summation orders
STEP = 3  # the training step the trainer checkpoint is saved at




def _spawn(worker, *args) -> None:
    """One gloo process (nanotron's parallel context needs torch.distributed; the test process stays clean)."""
    torch.multiprocessing.spawn(worker, args=(free_port(), *args), nprocs=1, join=True)


def _ids(vocab_size: int, batch: int = 2, seq: int = 10) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _nanotron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a built `Qwen3ForTraining` (TP=1, PP=1: its LM head's "sharded" logits are the whole vocabulary)."""
    out = model.embedding(input_ids=ids, position_ids=torch.arange(ids.shape[1]).repeat(ids.shape[0], 1))
    for block in model.decoder:
        out = block(**out)
    hidden = model.final_norm(hidden_states=out["hidden_states"])["hidden_states"]
    return model.lm_head(hidden_states=hidden)["sharded_logits"]


@torch.no_grad()
def _perturb_norms(named_parameters, seed: int = 1) -> None:
    """Norm weights away from 1, as after training: a q_norm/k_norm/layer-norm mix-up must change the logits."""
    g = torch.Generator().manual_seed(seed)
    for name, p in named_parameters:
        if name.endswith("norm.weight"):
            p.add_((0.1 * torch.randn(p.shape, generator=g)).to(p.dtype))


def _load_transformers(path: Path, architecture: str):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers reported loading problems: {problems}"
    # transformers' own class, not ours
    assert type(model).__name__ == architecture and type(model).__module__.startswith("transformers.models.")
    return model.eval()


# ============================================================ 1. trainer checkpoint -> Hugging Face
def _trainer_checkpoint_worker(rank, port, cfg_name, tmpdir):
    """Train-less `DistributedTrainer`: load the stage YAML, build, then `save_checkpoint`'s steps (module doc)."""
    import yaml

    from qwen3repro.nanotron import compat

    torch.set_num_threads(1)
    compat.init_gloo(rank, 1, port)
    compat.import_nanotron()
    import nanotron.distributed as dist
    from nanotron.config import Config, get_config_from_file
    from nanotron.helpers import _vocab_size_with_padding, init_optimizer_and_grad_accumulator, lr_scheduler_builder
    from nanotron.random import RandomStates, get_current_random_state
    from nanotron.serialize import save, save_random_states

    from qwen3repro.nanotron.config_gen import build_stage_spec
    from qwen3repro.nanotron.model import Qwen3NTConfig, build_qwen3

    tmp = Path(tmpdir)
    cfg = get_model_config(cfg_name)
    # Every nanotron-only field away from its default, so the checkpoint's config carries each of them.
    nt_cfg = Qwen3NTConfig.from_model_config(cfg, attn_implementation="sdpa", recompute_layers=True,
                                             lbl_layers="pooled")
    run = build_stage_spec("s1", "qwen3-0.6b").nanotron_dict()  # the generated YAML, with our tiny model
    run["model"]["model_config"] = dataclasses.asdict(nt_cfg)
    run["model"]["dtype"] = "float32"  # the logits are compared in fp32
    run["parallelism"].update(dp=1, tp=1, pp=1)
    run["checkpoints"]["checkpoints_path"] = str(tmp / "checkpoints")
    run["optimizer"]["accumulate_grad_in_fp32"] = False  # 0.4's FP32 gradient accumulator allocates on CUDA
    (tmp / "stage.yaml").write_text(yaml.safe_dump(run, sort_keys=False))

    # DistributedTrainer.__init__ and init_model
    config = get_config_from_file(str(tmp / "stage.yaml"), config_class=Config, model_config_class=Qwen3NTConfig)
    model_config = config.model.model_config
    assert isinstance(model_config, Qwen3NTConfig)
    pc = compat.cpu_parallel_context()
    model_config.vocab_size = _vocab_size_with_padding(
        model_config.vocab_size, pg_size=pc.tp_pg.size(),
        make_vocab_size_divisible_by=config.model.make_vocab_size_divisible_by)
    model_config.max_position_embeddings = config.tokens.sequence_length  # what init_model does on random init
    random_states = RandomStates({"tp_synced": get_current_random_state()})
    model = build_qwen3(model_config, pc, config.parallelism, dtype=torch.float32, device=torch.device("cpu"))
    model.init_model_randomly(config=config)
    _perturb_norms(model.named_parameters())
    optimizer, _ = init_optimizer_and_grad_accumulator(model=model, optimizer_args=config.optimizer,
                                                       parallel_context=pc)
    lr_scheduler = lr_scheduler_builder(optimizer=optimizer, lr_scheduler_args=config.optimizer.learning_rate_scheduler,
                                        total_training_steps=config.tokens.train_steps)

    # DistributedTrainer.save_checkpoint at step STEP
    checkpoints_path = config.checkpoints.checkpoints_path
    checkpoint_path = checkpoints_path / f"{STEP}"
    checkpoint_path.mkdir(parents=True, exist_ok=True)
    consumed = STEP * config.tokens.micro_batch_size * config.tokens.batch_accumulation_per_replica
    config.general.step, config.general.consumed_train_samples = STEP, consumed
    save(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, should_save_model=True,
         should_save_optimizer=True, should_save_lr_scheduler=True, should_save_config=True, parallel_context=pc,
         root_folder=checkpoint_path, checkpoint_metadata={"last_train_step": STEP, "consumed_train_samples": consumed},
         config=config)
    save_random_states(random_states=random_states, parallel_context=pc, root_folder=checkpoint_path)
    (checkpoints_path / "latest.txt").write_text(f"{STEP}")
    assert not hasattr(model_config, "to_json_file")  # so the trainer takes its asdict branch
    (checkpoint_path / "model_config.json").write_text(json.dumps(dataclasses.asdict(model_config)))

    ids = _ids(cfg.vocab_size)
    torch.save({"ids": ids, "logits": _nanotron_logits(model, ids)}, tmp / "nanotron_logits.pt")
    dist.destroy_process_group()


# The trainer's files (module doc of convert), relative to the checkpoints folder.
TRAINER_FILES = {
    "latest.txt", f"{STEP}/config.yaml", f"{STEP}/model_config.json", f"{STEP}/checkpoint_metadata.json",
    f"{STEP}/lr_scheduler/lr_scheduler.pt", f"{STEP}/optimizer/optimizer_config.json",
    f"{STEP}/optimizer/optimizer_pp-0-of-1_dp-0-of-1_tp-0-of-1_exp-0-of-1.pt",
    f"{STEP}/random/tp-0-of-1_dp-0-of-1_pp-0-of-1.pt",
}


@pytest.mark.parametrize("cfg_name, architecture",
                         [("micro", "Qwen3ForCausalLM"), ("micro-moe", "Qwen3MoeForCausalLM")], ids=["dense", "moe"])
def test_trainer_checkpoint_to_transformers(tmp_path, cfg_name, architecture):
    _spawn(_trainer_checkpoint_worker, cfg_name, str(tmp_path))
    checkpoints = tmp_path / "checkpoints"
    written = {str(p.relative_to(checkpoints)) for p in checkpoints.rglob("*") if p.is_file()}
    assert {f for f in written if not f.startswith(f"{STEP}/model/")} == TRAINER_FILES

    # Both config files of the trainer's checkpoint name the same model: the registry's (the vocabulary needs no
    # padding at TP=1; the trainer sets the context to the stage's sequence length).
    ckpt = checkpoints / f"{STEP}"
    config = read_checkpoint_config(ckpt)
    yaml_only = tmp_path / "yaml_only"
    yaml_only.mkdir()
    shutil.copy(ckpt / "config.yaml", yaml_only / "config.yaml")
    assert read_checkpoint_config(yaml_only) == config
    assert config == get_model_config(cfg_name).replace(max_position_embeddings=config.max_position_embeddings)

    nanotron_to_hf(ckpt, tmp_path / "hf")
    hf = _load_transformers(tmp_path / "hf", architecture)
    saved = torch.load(tmp_path / "nanotron_logits.pt")
    with torch.no_grad():
        got = hf(input_ids=saved["ids"]).logits
    torch.testing.assert_close(got, saved["logits"], rtol=RTOL, atol=ATOL)

    # The command line takes the checkpoints folder too (the step its latest.txt names).
    assert convert.main(["to-hf", str(checkpoints), str(tmp_path / "hf_cli")]) == 0
    weights = "model.safetensors"
    assert (tmp_path / "hf_cli" / weights).read_bytes() == (tmp_path / "hf" / weights).read_bytes()


def test_checkpoint_config_fields(tmp_path):
    """Every field `Qwen3NTConfig` writes is read (the set derives from NANOTRON_FIELDS); anything else is an
    error naming the file and the key; our own older model_config.json (ModelConfig's fields) still reads."""
    from qwen3repro.nanotron.model import Qwen3NTConfig

    cfg = get_model_config("micro-moe")
    nt_fields = {f.name for f in dataclasses.fields(Qwen3NTConfig)}
    assert nt_fields <= convert.MODEL_FIELDS | convert.nanotron_only_fields()
    assert convert.nanotron_only_fields() == nt_fields - convert.MODEL_FIELDS

    (tmp_path / "model_config.json").write_text(json.dumps(dataclasses.asdict(Qwen3NTConfig.from_model_config(cfg))))
    assert read_checkpoint_config(tmp_path) == cfg
    (tmp_path / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    assert read_checkpoint_config(tmp_path) == cfg
    (tmp_path / "model_config.json").write_text(json.dumps({**cfg.to_dict(), "attn_impl": "sdpa"}))
    with pytest.raises(ConfigError, match=r"model_config\.json: unknown model config key\(s\) \['attn_impl'\]"):
        read_checkpoint_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model/ folder"):
        nanotron_to_hf(tmp_path, tmp_path / "hf")


# ============================================================ 2. released model -> first checkpoint
DENSE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps")
MOE_FIELDS = DENSE_FIELDS + ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                             "decoder_sparse_step", "mlp_only_layers")
RELEASES = {  # registry model -> (the reductions, module doc), transformers' model type and architecture
    "qwen3-0.6b": (dict(num_hidden_layers=1), "qwen3", "Qwen3ForCausalLM"),
    "qwen3-30b-a3b": (dict(num_hidden_layers=1, num_experts=16, vocab_size=4096), "qwen3_moe", "Qwen3MoeForCausalLM"),
}


def _transformers_config(model_config, model_type: str):
    """transformers' own config class, given the registry's numbers (its defaults fill the rest, e.g. RoPE base
    and context length, which the registry check must not compare)."""
    fields = MOE_FIELDS if model_type == "qwen3_moe" else DENSE_FIELDS
    values = {f: getattr(model_config, f) for f in fields}
    if "mlp_only_layers" in values:
        values["mlp_only_layers"] = list(values["mlp_only_layers"])
    return transformers.AutoConfig.for_model(model_type, **values)


def _release(path: Path, model_config, model_type: str) -> None:
    """A Hugging Face checkpoint written by transformers, in bf16 as the released ones."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_transformers_config(model_config, model_type))
    _perturb_norms(model.named_parameters())
    model.to(torch.bfloat16).save_pretrained(path)


def _init_worker(rank, port, out, config_dict, tmpdir):
    """nanotron's `load_weights` into `Qwen3ForTraining` (fp32: logits; bf16, the trainer's dtype: `save_weights`
    writes the same files and tensors back)."""
    from safetensors import safe_open

    from qwen3repro.config import ModelConfig
    from qwen3repro.nanotron import compat

    torch.set_num_threads(1)
    compat.init_gloo(rank, 1, port)
    compat.import_nanotron()
    import nanotron.distributed as dist
    from nanotron.constants import CHECKPOINT_VERSION
    from nanotron.serialize import load_weights, save_weights
    from nanotron.serialize.metadata import TensorMetadata, load_meta

    from qwen3repro.nanotron.model import build_qwen3

    out, tmp = Path(out), Path(tmpdir)
    config = ModelConfig.from_dict(config_dict)
    pc = compat.cpu_parallel_context()
    meta = load_meta(parallel_context=pc, root_folder=out)
    assert meta.version == CHECKPOINT_VERSION and meta.metas["last_train_step"] == 0

    model = build_qwen3(config, pc, dtype=torch.float32, device=torch.device("cpu"))
    load_weights(model=model, parallel_context=pc, root_folder=out)
    ids = _ids(config.vocab_size)
    torch.save({"ids": ids, "logits": _nanotron_logits(model, ids)}, tmp / "nanotron_logits.pt")
    del model

    model = build_qwen3(config, pc, dtype=torch.bfloat16, device=torch.device("cpu"))
    load_weights(model=model, parallel_context=pc, root_folder=out)
    save_weights(model=model, parallel_context=pc, root_folder=tmp / "resaved")
    ours = {p.relative_to(out / "model") for p in (out / "model").rglob("*") if p.is_file()}
    theirs = {p.relative_to(tmp / "resaved" / "model") for p in (tmp / "resaved" / "model").rglob("*") if p.is_file()}
    assert ours == theirs, (ours ^ theirs)
    for rel in sorted(ours):
        with safe_open(str(out / "model" / rel), "pt") as a, safe_open(str(tmp / "resaved" / "model" / rel), "pt") as b:
            assert a.get_tensor("data").dtype == torch.bfloat16, rel  # the release's dtype is kept
            torch.testing.assert_close(a.get_tensor("data"), b.get_tensor("data"), rtol=0, atol=0, msg=str(rel))
            if b.metadata():  # sharded: both cover the same unsharded tensor
                assert (TensorMetadata.from_str_dict(a.metadata()).unsharded_shape
                        == TensorMetadata.from_str_dict(b.metadata()).unsharded_shape), rel
    shutil.rmtree(tmp / "resaved")
    dist.destroy_process_group()


@pytest.mark.parametrize("name", list(RELEASES), ids=["dense", "moe"])
def test_init_from_hf_matches_transformers(tmp_path, name):
    reductions, model_type, architecture = RELEASES[name]
    expected = get_model_config(name).replace(**reductions)
    release, out = tmp_path / "release", tmp_path / "init"
    _release(release, expected, model_type)
    hf = _load_transformers(release, architecture)
    ids = _ids(expected.vocab_size)
    with torch.no_grad():
        want = hf(input_ids=ids).logits
    del hf

    # Against the registry's own entry, the reduced checkpoint is refused before anything is written.
    with pytest.raises(ConfigError) as err:
        init_from_hf(release, name, out)
    for field, value in reductions.items():
        registry = getattr(get_model_config(name), field)
        assert f"{field}: {name} has {registry!r}, the checkpoint has {value!r}" in str(err.value)
    assert not out.exists()

    assert init_from_hf(release, expected, out) == out
    shutil.rmtree(release)  # the disk of a CPU runner is small
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint_metadata.json", "model", "model_config.json"]
    # The folder records the release's own config: the registry's architecture, transformers' RoPE base (the
    # registry check does not compare it; a stage's config sets its own).
    found = read_checkpoint_config(out)
    assert {f: getattr(found, f) for f in convert.ARCHITECTURE_FIELDS} == {
        f: getattr(expected, f) for f in convert.ARCHITECTURE_FIELDS}
    assert found.rope_theta == _transformers_config(expected, model_type).rope_parameters["rope_theta"]

    _spawn(_init_worker, str(out), found.to_dict(), str(tmp_path))
    got = torch.load(tmp_path / "nanotron_logits.pt")
    assert torch.equal(got["ids"], ids)
    torch.testing.assert_close(got["logits"], want, rtol=RTOL, atol=ATOL)


def test_init_registry_mismatch_names_every_field(tmp_path, capsys):
    """A qwen3-0.6b-shaped config given as qwen3-8b: every differing field, both values; the CLI says the same."""
    small = get_model_config("qwen3-0.6b")
    _transformers_config(small, "qwen3").save_pretrained(tmp_path / "release")  # config.json only: checked first
    with pytest.raises(ConfigError) as err:
        init_from_hf(tmp_path / "release", "qwen3-8b", tmp_path / "out")
    big = get_model_config("qwen3-8b")
    differing = [f for f in convert.ARCHITECTURE_FIELDS if getattr(big, f) != getattr(small, f)]
    assert set(differing) == {"hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers",
                              "tie_word_embeddings"}
    for f in differing:
        assert f"{f}: qwen3-8b has {getattr(big, f)!r}, the checkpoint has {getattr(small, f)!r}" in str(err.value)
    assert not (tmp_path / "out").exists()

    rc = convert.main(["init", "--model", "qwen3-8b", "--source", str(tmp_path / "release"),
                       "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "hidden_size: qwen3-8b has 4096, the checkpoint has 1024" in capsys.readouterr().err


def test_init_refuses_incomplete_weights(tmp_path):
    """A release whose config is right but whose weights lack a tensor fails before anything is written, naming
    the directory and the tensor."""
    from safetensors.torch import load_file, save_file

    release = tmp_path / "release"
    _release(release, get_model_config("micro-moe"), "qwen3_moe")
    tensors = load_file(release / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, release / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"release: .*missing tensor\(s\): model\.layers\.1\.mlp\.experts\.3\.up_proj"):
        init_from_hf(release, "micro-moe", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_hub_id_downloads_only_config_safetensors_tokenizer(tmp_path, monkeypatch):
    """A hub id goes through `huggingface_hub.snapshot_download` (replaced here: nothing is downloaded) with
    patterns that take the config, safetensors and tokenizer and never pickle-based weights; the snapshot's
    commit is recorded in the checkpoint metadata."""
    import huggingface_hub

    snapshot = tmp_path / "hub" / "snapshots" / "0123abcd"
    _release(snapshot, get_model_config("micro"), "qwen3")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(dict(repo_id=repo_id, **kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = init_from_hf("Qwen/Qwen3-Micro-Base", "micro", tmp_path / "init", revision="main")
    # The config first (a wrong model fails before its weights are downloaded), then the checkpoint.
    config_call, call = calls
    assert config_call["allow_patterns"] == ["config.json"]
    for c in calls:
        assert c["repo_id"] == "Qwen/Qwen3-Micro-Base" and c["revision"] == "main"
    patterns = call["allow_patterns"]

    def taken(name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) for p in patterns)

    for name in ("config.json", "model.safetensors", "model-00001-of-00005.safetensors", "model.safetensors.index.json",
                 "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert taken(name), name
    for name in ("pytorch_model.bin", "model.pt", "training_args.bin", "README.md", "optimizer.pt"):
        assert not taken(name), name
    metas = json.loads((out / "checkpoint_metadata.json").read_text())["metas"]
    assert metas["converted_from"] == "Qwen/Qwen3-Micro-Base" and metas["revision"] == "0123abcd"

    # A local directory is used as it is; neither a directory nor a hub id is an error naming it.
    assert resolve_hf_source(snapshot) == snapshot
    with pytest.raises(ValueError, match="not a hub id"):
        resolve_hf_source(str(tmp_path / "missing" / "dir"))
    assert len(calls) == 2
    # An existing folder is not overwritten unless asked.
    with pytest.raises(FileExistsError, match="already holds files"):
        init_from_hf(snapshot, "micro", out)
    assert init_from_hf(snapshot, "micro", out, overwrite=True) == out


def test_cli_help():
    cases = (([], ("init", "to-hf")), (["init"], ("--model", "--source", "--out")), (["to-hf"], ("ckpt", "out")))
    for args, mentions in cases:
        run = subprocess.run([sys.executable, "-m", "qwen3repro.nanotron.convert", *args, "--help"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert "usage: python -m qwen3repro.nanotron.convert" in run.stdout
        for word in mentions:
            assert word in run.stdout, (args, word)
