"""One device for a whole pipeline run, and code that follows the model's device.

There is no GPU in CI, so the GPU path is checked two ways here:

* the device setting itself: `--device` is resolved and checked before any stage runs, recorded, and
  kept out of every lineage hash (a GPU is simulated by patching what torch reports, never used);
* device-following code, run with the model on PyTorch's "meta" device under `StrictDevices`, which
  fails any operation whose tensors sit on two devices. CUDA refuses such operations; the meta device
  does not, so without the mode a tensor built on the CPU and fed to a meta model would pass unseen.
  Meta tensors hold no values, so a run stops at its first host read (`.item()`, `.tolist()`, a copy
  to the CPU); each test checks that the model was reached with its inputs on its device first.

What this cannot show: CUDA kernels' own behaviour (SDPA, the fused DCA partials, sampling's random
draws), speed, and memory. `full/gpu_check.py` (part 5) runs the micro pipeline on a GPU for those.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from qwen3repro import perf
from qwen3repro.cli import main
from qwen3repro.config import ConfigError
from qwen3repro.data.synthetic import s2_eval_items
from qwen3repro.devices import model_device, pipeline_device, same_device
from qwen3repro.evals.copying import copy_probe
from qwen3repro.evals.longcontext import loss as lc_loss
from qwen3repro.evals.longcontext.settings import LongContextSettings, condition_config
from qwen3repro.evals.reasoning import solution_step_accuracy
from qwen3repro.experiments.moe_balance.heldout import route_documents
from qwen3repro.experiments.moe_balance.training import selection_counts
from qwen3repro.generate import GREEDY, generate
from qwen3repro.generate.dense import DenseDecodeStep
from qwen3repro.generate.engine import ModelForwardStep
from qwen3repro.generate.sampling import sample
from qwen3repro.models import dca
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.models.registry import get_model_config
from qwen3repro.models.reward import Qwen3RewardModel
from qwen3repro.models.rope import default_inv_freq
from qwen3repro.lineage import read_lineage
from qwen3repro.pipeline import build_plan, describe, expected_hash, run_pipeline
from qwen3repro.rewards.reward_model import RewardModelScorer
from qwen3repro.stages.common import StageContext
from qwen3repro.train import loop
from qwen3repro.train.checkpoint import read_trainer_state
from qwen3repro.train.loop import TrainConfig

META = torch.device("meta")
SRC = Path(__file__).resolve().parents[1] / "src" / "qwen3repro"
# A long-context suite at toy lengths: the S3 model is trained at 64 tokens, YaRN and DCA switch on beyond.
LONG = LongContextSettings(lengths=(32, 128), n_per_length=1, depth_bins=1, trained_length=64, loss_length=128,
                           loss_docs=1, loss_bucket=32, max_batch_tokens=256)
S3_CONFIG = get_model_config("micro").replace(max_position_embeddings=64, rope_theta=1e6)


# ----------------------------------------------------------------------------- helpers
class StrictDevices(TorchDispatchMode):
    """Fails every operation whose tensor operands are on different devices, as CUDA does. Exempt: copies
    between devices (what `.to` does) and 0-dim tensors (CUDA takes a CPU scalar tensor as an operand)."""

    COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()}
        if len(devices) > 1 and func not in self.COPIES:
            raise AssertionError(f"{func} mixes tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def until_host_read(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` under `StrictDevices`; None where it reads a meta tensor's value (which a meta
    tensor does not have), its result when it never does."""
    try:
        with StrictDevices():
            return fn(*args, **kwargs)
    except (RuntimeError, NotImplementedError) as e:
        if "meta" not in str(e):
            raise
        return None


def meta_model(cls=Qwen3, config=None):
    with torch.device("meta"):
        return cls(config or get_model_config("micro")).eval()


def input_devices(model: nn.Module) -> list[torch.device]:
    """The devices of the first positional input of every forward of `model` (recorded by a pre-hook)."""
    seen: list[torch.device] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].device))
    return seen


class StubTokenizer:
    """Enough of a tokenizer for the evaluations below: one id per character, in the micro vocabulary."""

    endoftext_id = 1

    def encode(self, text: str) -> list[int]:
        return [2 + ord(c) % 400 for c in text]


@pytest.fixture
def cuda_present(monkeypatch):
    """torch reports two GPUs (nothing is ever run on them: only the device checks read this)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


# ----------------------------------------------------------------------------- the run's device
def test_pipeline_device_resolves_what_the_machine_has():
    assert pipeline_device("cpu") == "cpu" and pipeline_device(" CPU ") == "cpu"
    assert pipeline_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="use one of cpu, cuda, cuda:N, auto"):
        pipeline_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_gpu_run_without_a_gpu_stops_before_any_stage(tmp_path):
    with pytest.raises(ConfigError, match="CUDA is not available on this machine.*--device cpu"):
        pipeline_device("cuda:0")
    result = CliRunner().invoke(main, ["pipeline", "micro", "--device", "cuda", "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert result.output.startswith("error: device 'cuda': CUDA is not available on this machine")
    assert not (tmp_path / "runs").exists()  # nothing was written: no lock, no stage directory


def test_gpu_numbers_are_checked_against_the_machine(cuda_present):
    assert pipeline_device("cuda") == "cuda" and pipeline_device("cuda:1") == "cuda:1"
    assert pipeline_device("auto") == "cuda"
    with pytest.raises(ConfigError, match="2 GPU"):
        pipeline_device("cuda:2")


def test_the_device_is_printed_and_is_not_part_of_any_lineage_hash(cuda_present):
    cpu, gpu = build_plan("micro"), build_plan("micro", device="cuda")
    assert (cpu.device, gpu.device) == ("cpu", "cuda")
    assert [n.key for n in cpu.nodes] == [n.key for n in gpu.nodes]
    for a, b in zip(cpu.nodes, gpu.nodes):
        assert a.config == b.config and expected_hash(a) == expected_hash(b), a.key
    text = describe(gpu)
    assert text.splitlines()[1].startswith("device: cuda")
    assert describe(cpu).replace("device: cpu", "device: cuda") == text
    result = CliRunner().invoke(main, ["pipeline", "micro", "--device", "cuda:1", "--dry-run"])
    assert result.exit_code == 0 and "\ndevice: cuda:1 " in result.output


def test_a_stage_table_may_not_set_the_device():
    for key, value in (("stages.s1.train.device", '"cuda"'), ("stages.reasoning-rl.device", '"cpu"'),
                       ("stages.cold-start.sft.train.device", '"cuda"'), ("roles.student.stages.s2.train.device",
                                                                           '"cuda"')):
        with pytest.raises(ConfigError, match=re.escape(key) + ": the device is set for the whole run"):
            build_plan("micro", overrides=[f"{key}={value}"])


def test_a_stage_runs_on_its_context_device(tmp_path):
    ctx = StageContext(tmp_path, tmp_path, printer=lambda _: None, device="cuda:1")
    assert ctx.device_for() == ctx.device_for("cuda:1") == "cuda:1"
    assert ctx.on_device(TrainConfig(steps=3)).device == "cuda:1"
    with pytest.raises(ConfigError, match="asks for device 'cuda' but the run is on 'cuda:1'"):
        ctx.on_device(TrainConfig(steps=3, device="cuda"))
    cpu = StageContext(tmp_path, tmp_path, printer=lambda _: None)
    assert cpu.on_device(TrainConfig(steps=3)) == TrainConfig(steps=3) and cpu.torch_device == torch.device("cpu")


def test_a_gpu_run_is_recorded_as_one(cuda_present, monkeypatch, tmp_path):
    """The plumbing of a `--device cuda` run, on the CPU: torch is made to report a GPU, and the training loop
    to place "cuda" on the CPU. The tokenizer and the flagship's S1 then train as a GPU run would record them:
    its device in timing.json, pipeline.json, stage.json and the trainer's own config, the GPU in the machine,
    and the lineage of the CPU plan."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Simulated GPU")
    monkeypatch.setattr(perf, "matmul_peak_flops", lambda *args, device="cpu", **kwargs: 1e12)
    placed: list[str] = []
    monkeypatch.setattr(loop, "resolve_device", lambda name: placed.append(name) or torch.device("cpu"))
    plan = run_pipeline("micro", out_root=tmp_path, printer=lambda _: None, claims=False, device="cuda",
                        only={"tokenizer", "flagship/s1"})
    assert placed == ["cuda"]  # the one training run of S1 (the tokenizer trains no model)
    s1 = plan.node("flagship/s1")
    assert json.loads((s1.out_dir / "timing.json").read_text())["device"] == "cuda"
    assert json.loads((s1.out_dir / "stage.json").read_text())["device"] == "cuda"
    assert read_trainer_state(str(s1.out_dir))["train_config"]["device"] == "cuda"
    summary = json.loads((plan.root / "pipeline.json").read_text())
    assert summary["device"] == "cuda" and summary["machine"]["gpu"] == "Simulated GPU"
    assert perf.describe_machine(summary["machine"]).endswith("; GPU Simulated GPU, fp32 matmul peak 1000 GFLOP/s")
    assert read_lineage(s1.out_dir).hash == expected_hash(build_plan("micro", out_root=tmp_path).node(s1.key))


def test_model_device_and_same_device():
    assert model_device(meta_model()) == META
    assert model_device(lambda x: x) == torch.device("cpu")  # a callable standing in for a model
    assert same_device(torch.device("cpu"), "cpu") and not same_device("cpu", META)


# ----------------------------------------------------------------------------- code follows the model's device
def test_the_strict_mode_catches_a_cpu_tensor_fed_to_a_model_elsewhere():
    with pytest.raises(AssertionError, match="mixes tensors on"):
        until_host_read(meta_model(), torch.zeros(1, 4, dtype=torch.long))


def test_model_forward_follows_its_device_with_and_without_yarn():
    for config in (S3_CONFIG, condition_config(S3_CONFIG, "S3+YaRN", 128, LONG)):
        model = meta_model(config=config)
        out = until_host_read(model, torch.zeros(2, 24, dtype=torch.long, device=META))
        assert out.logits.device == META
        assert model.inv_freq.device == META  # the RoPE table followed the input once
    reward = meta_model(Qwen3RewardModel)
    seen = input_devices(reward)
    scorer = RewardModelScorer(reward, StubTokenizer(), pad_id=0)
    until_host_read(scorer.score_ids, [[3, 4, 5], [6, 7]])  # padded on the CPU, moved to the model
    assert seen == [META]


def test_dual_chunk_attention_follows_the_query_device():
    """DCA with the RoPE frequencies where a model keeps them (the CPU) and q, k, v elsewhere."""
    q, k, v = (torch.zeros(1, 4, 96, 16, device=META), torch.zeros(1, 2, 96, 16, device=META),
               torch.zeros(1, 2, 96, 16, device=META))
    out = until_host_read(dca.dual_chunk_attention, q, k, v, inv_freq=default_inv_freq(16, 1e6), chunk_size=32,
                          local_size=8, q_positions=0, k_positions=0)
    assert out.device == META and out.shape == q.shape


def test_the_engine_decode_steps_follow_the_model_device():
    """The engine's PyTorch path (the C kernels are for CPU tensors only): the dense fast path with a padded
    prompt, and `model.forward` with a KV cache, each through a prefill, a greedy step and a row drop."""
    ids = torch.zeros(2, 8, dtype=torch.long, device=META)
    positions = torch.arange(8, device=META).expand(2, 8)
    for step_class, mask in ((DenseDecodeStep, torch.ones(2, 8, dtype=torch.bool, device=META)),
                             (ModelForwardStep, None)):
        def decode():
            step = step_class(meta_model(), 2, 16)
            token = sample(step.prefill(ids, positions, mask), GREEDY, None, None)
            logits = step(token, torch.full((2,), 8, device=META))
            step.reorder(torch.tensor([1], device=META))
            return logits

        with torch.inference_mode():
            assert until_host_read(decode).device == META, step_class.__name__


def test_generate_refuses_a_generator_on_another_device():
    with pytest.raises(ValueError, match="the generator is on cpu but the model on meta"):
        generate(meta_model(), [[3, 4, 5]], GREEDY, max_new_tokens=2, generator=torch.Generator())


def test_evaluations_build_their_inputs_on_the_model_device(monkeypatch):
    model = meta_model()
    seen = input_devices(model)
    until_host_read(copy_probe, model, StubTokenizer(), n_spans=1)
    until_host_read(solution_step_accuracy, model, StubTokenizer(), s2_eval_items(seed=0, n_per_cell=1)[:1])
    assert seen == [META, META]

    # Long context: the loss by position of S3 with YaRN beyond the trained length.
    source = MetaSource(S3_CONFIG)
    monkeypatch.setattr(lc_loss, "load_tokenizer", lambda tokenizer: tokenizer)
    until_host_read(lc_loss.loss_by_position, source, StubTokenizer(), "S3+YaRN", settings=LONG,
                    documents=[list(range(2, 130))], log=None)
    (yarn,) = source.built
    assert yarn.config.rope_type == "yarn" and source.inputs == [META]


class MetaSource:
    """A long-context `ModelSource` whose models are built on the meta device (their inputs recorded)."""

    def __init__(self, config) -> None:
        self.config, self.built, self.inputs = config, [], []

    def build(self, config) -> Qwen3:
        model = meta_model(config=config)
        model.register_forward_pre_hook(lambda module, args: self.inputs.append(args[0].device))
        self.built.append(model)
        return model


class MoEStub(nn.Module):
    """A router and a head over embeddings, shaped as `route_documents` reads a MoE model's outputs."""

    def __init__(self, experts: int = 4, vocab: int = 16) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_experts=experts, num_experts_per_tok=2)
        self.embed, self.head, self.router = nn.Embedding(vocab, 8), nn.Linear(8, vocab), nn.Linear(8, experts)

    def forward(self, x, output_router_logits=True):
        h = self.embed(x)
        return SimpleNamespace(logits=self.head(h), router_logits=(self.router(h).flatten(0, 1),))


def test_the_moe_experiment_follows_the_model_device():
    logits = [torch.zeros(4 * 6, 8, device=META) for _ in range(2)]
    counts = until_host_read(selection_counts, logits, 4, 2)
    assert counts.device == META and counts.shape == (4, 2, 8)
    with torch.device("meta"):
        stub = MoEStub()
    seen = input_devices(stub)
    until_host_read(route_documents, stub, [[1, 2, 3, 4], [5, 6, 7]])
    assert seen == [META]


# ----------------------------------------------------------------------------- what only runs on the CPU
# `torch.Generator()` makes a CPU generator, and sampling with it on GPU tensors fails; `.numpy()` fails on a
# GPU tensor. Each use below is on the CPU by design, and says why. The full-scale packages (nanotron/, verl/)
# are not part of the CPU scales' pipeline and place their tensors themselves.
HOST_ONLY = {
    (r"torch\.Generator\(\)", "stages/grpo.py"): 1,      # the mini-batch order: CPU indices, moved afterwards
    (r"torch\.Generator\(\)", "generate/sampling.py"): 1,  # timing the CPU sampling kernel on CPU tensors
}
FULL_SCALE = ("nanotron", "verl")


def test_cpu_only_generators_and_host_reads_are_the_intended_ones():
    found: dict[tuple[str, str], int] = {}
    patterns = {r"torch\.Generator\(\)", r"(?<!\.cpu\(\))\.numpy\(\)"}
    for path in SRC.rglob("*.py"):
        if path.relative_to(SRC).parts[0] in FULL_SCALE:
            continue
        text = path.read_text()
        for pattern in patterns:
            n = len(re.findall(pattern, text))
            if n:
                found[pattern, str(path.relative_to(SRC))] = n
    assert found == HOST_ONLY
