"""GPU check of the full-scale path, prepared to run in one <= 10-minute slot on a single GPU.

    python full/gpu_check.py --out gpu_check.json          (from the repository root, venv with .[full])

What it measures (each part is timed and bounded; results go to --out as JSON and to stdout):

1. nanotron under NCCL: nanotron's own `ParallelContext` (NCCL backend, world size 1) and our Qwen3 on its
   parallel layers (`build_qwen3`) train the tiny model `tiny-student` for --steps steps with our loop on
   that context (nanotron's `DistributedTrainer` imports flash-attn through its Llama module; we record
   whether it imports). The same data, initial weights, AdamW settings and WSD schedule train the plain
   `Qwen3` through our own trainer (`qwen3repro.train.loop.train`). Both in fp32 with TF32 off; the loss
   curves must agree: mean |Δloss| <= 0.02 and |Δ final loss| <= 0.05.
2. flash-attn vs SDPA (only when flash_attn imports): the same bf16 nanotron model, packed documents,
   loss and q/k/v-projection gradient compared between the two kernels (|Δloss| <= 2e-2, gradient cosine >= 0.999).
3. MFU of `qwen3-0.6b` training steps in bf16 (random init, sequence 4096, micro-batch 4, flash-attn if present
   else SDPA): seconds per step and MFU against 989 TFLOP/s (H100/H200 dense bf16) and against this GPU's
   measured bf16 matmul peak.
4. nanotron's real `DistributedTrainer`, through our entry point (`python -m torch.distributed.run ...
   qwen3repro.nanotron.launch`), TP=1 on one GPU: `qwen3-0.6b` S1 as `make full` generates it (sequence 4,096,
   its planned micro-batch), 9 steps with a checkpoint every 3, on random-token documents. An uncut run, and a
   run killed (SIGKILL) once its first checkpoint exists, then restarted: it must resume from `latest.txt` and
   end with the uncut run's weights. The final checkpoint is converted to Hugging Face layout and loaded by
   transformers: its logits must equal nanotron's own model loaded from the checkpoint. The peak memory the
   trainer's GPU held (`peak_memory.json`) is set against the plan's estimate for the same layout. Without
   flash-attn, nanotron's trainer module still imports it (through its Llama model, which we do not use): a stub
   package then satisfies those imports, every stubbed function raises if called, and our model runs SDPA.
5. The CPU scales on the GPU: `qwen3repro pipeline micro --device cuda` end to end (every stage, the engine's
   PyTorch path, the evaluations, the claims and the MoE experiment) as a subprocess, bounded by
   --micro-timeout seconds (killed past it; the stages it finished are still reported). Recorded: its exit
   status, each stage's seconds and the device its `timing.json` names, and the claims table's rows. It
   passes when the run ends cleanly and every stage ran on the GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DATASHEET_TFLOPS = 989.0
DEV = torch.device("cuda")  # --cpu-smoke switches to CPU/gloo to test this script's logic without a GPU


def _env_single_process() -> None:
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def _data(vocab: int, n: int, batch: int, seq: int, seed: int = 0):
    """Learnable, deterministic token streams: a fixed random bigram chain with 10% noise, packed documents."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab, (vocab,), generator=g)
    out = []
    for _ in range(n):
        x = torch.empty(batch, seq + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, seq + 1):
            nxt = table[x[:, t - 1]]
            noise = torch.rand(batch, generator=g) < 0.1
            x[:, t] = torch.where(noise, torch.randint(0, vocab, (batch,), generator=g), nxt)
        pos = torch.arange(seq).repeat(batch, 1)
        pos[:, seq // 2:] = torch.arange(seq - seq // 2)  # two documents per row
        out.append({"input_ids": x[:, :-1], "labels": x[:, 1:], "position_ids": pos})
    return out


def check_loss_curve(pc, steps: int, result: dict) -> None:
    from qwen3repro.losses import masked_cross_entropy
    from qwen3repro.models.qwen3 import Qwen3
    from qwen3repro.models.registry import get_model_config
    from qwen3repro.nanotron.convert import load_state_dict_into
    from qwen3repro.nanotron.model import Qwen3NTConfig, build_qwen3, pipeline_inputs, segment_ids_from_positions
    from qwen3repro.train.loop import TrainConfig, train
    from qwen3repro.train.schedule import WSDSchedule

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = get_model_config("tiny-student")
    batches = _data(cfg.vocab_size, steps, batch=16, seq=128)
    torch.manual_seed(0)
    ref = Qwen3(cfg).to(DEV)
    init = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    tc = TrainConfig(steps=steps, lr=3e-3, weight_decay=0.0, warmup_steps=20, decay_fraction=0.2, min_lr_ratio=0.1,
                     clip_grad_norm=1.0, log_every=max(1, steps // 10), device=DEV.type, precision="fp32")

    def loss_fn(model, b):
        out = model(b["input_ids"], position_ids=b["position_ids"],
                    segment_ids=segment_ids_from_positions(b["position_ids"]))
        return masked_cross_entropy(out.logits, b["labels"]), {}

    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        summary = train(ref, batches, loss_fn, tc, d, resume=None, printer=lambda s: None)
    ours = [summary["losses"][k] for k in sorted(summary["losses"])]
    t_ours = time.time() - t0

    nt = build_qwen3(Qwen3NTConfig.from_model_config(cfg, attn_implementation="sdpa"), pc, device=DEV)
    load_state_dict_into(nt, {k: v.cpu() for k, v in init.items()}, cfg)
    params = list({id(p): p for p in nt.parameters()}.values())
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tc.betas, eps=tc.eps, weight_decay=0.0)
    sched = WSDSchedule(tc.lr, steps, tc.warmup_steps, tc.decay_fraction, None, None, tc.min_lr_ratio, tc.decay_shape)
    losses = []
    t0 = time.time()
    for step, b in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = sched.lr(step)
        mb = {"input_ids": b["input_ids"].to(DEV), "position_ids": b["position_ids"].to(DEV),
              "label_ids": b["labels"].to(DEV), "label_mask": torch.ones_like(b["labels"], dtype=torch.bool).to(DEV)}
        loss = nt(**pipeline_inputs(nt, mb))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.clip_grad_norm)
        opt.step()
        losses.append(float(loss))
    t_nt = time.time() - t0
    diffs = [abs(a - b) for a, b in zip(ours, losses)]
    mean_diff, final_diff = sum(diffs) / len(diffs), abs(ours[-1] - losses[-1])
    result["loss_curve"] = {
        "model": "tiny-student", "steps": steps, "ours_first_last": [ours[0], ours[-1]],
        "nanotron_first_last": [losses[0], losses[-1]], "mean_abs_diff": mean_diff, "final_abs_diff": final_diff,
        "ours_every_10": ours[::10], "nanotron_every_10": losses[::10], "seconds_ours": t_ours,
        "seconds_nanotron": t_nt, "pass": mean_diff <= 0.02 and final_diff <= 0.05 and losses[-1] < losses[0] - 1.0,
    }


def check_flash_vs_sdpa(pc, result: dict) -> None:
    try:
        import flash_attn  # noqa: F401
    except ImportError as e:
        result["flash_vs_sdpa"] = {"skipped": f"flash_attn not importable: {e}"}
        return
    from qwen3repro.models.registry import get_model_config
    from qwen3repro.nanotron.model import Qwen3NTConfig, build_qwen3, pipeline_inputs

    cfg = get_model_config("tiny-flagship")
    b = _data(cfg.vocab_size, 1, batch=4, seq=512)[0]
    mb = {"input_ids": b["input_ids"].cuda(), "position_ids": b["position_ids"].cuda(),
          "label_ids": b["labels"].cuda(), "label_mask": torch.ones_like(b["labels"], dtype=torch.bool).cuda()}
    out = {}
    state = None
    for impl in ("sdpa", "flash_attention_2"):
        m = build_qwen3(Qwen3NTConfig.from_model_config(cfg, attn_implementation=impl), pc,
                        dtype=torch.bfloat16, device=torch.device("cuda"))
        if state is None:
            torch.manual_seed(0)
            m.init_model_randomly()
            state = {k: v.detach().clone() for k, v in m.state_dict().items()}
        else:
            m.load_state_dict(state)
        loss = m(**pipeline_inputs(m, mb))["loss"]
        loss.backward()
        g = m.decoder[0].pp_block.self_attn.qkv_proj.weight.grad.float().flatten()
        out[impl] = (float(loss), g)
    cos = float(torch.nn.functional.cosine_similarity(out["sdpa"][1], out["flash_attention_2"][1], dim=0))
    dl = abs(out["sdpa"][0] - out["flash_attention_2"][0])
    result["flash_vs_sdpa"] = {"loss_sdpa": out["sdpa"][0], "loss_flash": out["flash_attention_2"][0],
                               "abs_loss_diff": dl, "qkv_grad_cosine": cos, "pass": dl <= 2e-2 and cos >= 0.999}


def check_mfu(pc, result: dict, steps: int = 10) -> None:
    from qwen3repro.models.registry import get_model_config
    from qwen3repro.nanotron.model import Qwen3NTConfig, build_qwen3, pipeline_inputs
    from qwen3repro.perf import matmul_peak_flops, train_step_flops

    cfg = get_model_config("qwen3-0.6b").replace(rope_theta=1e4, max_position_embeddings=4096)
    bsz, seq = 4, 4096
    m = build_qwen3(Qwen3NTConfig.from_model_config(cfg), pc, dtype=torch.bfloat16, device=torch.device("cuda"))
    m.init_model_randomly()
    params = list({id(p): p for p in m.parameters()}.values())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (bsz, seq + 1), device="cuda")
    mb = {"input_ids": ids[:, :-1], "position_ids": torch.arange(seq, device="cuda").repeat(bsz, 1),
          "label_ids": ids[:, 1:], "label_mask": torch.ones(bsz, seq, dtype=torch.bool, device="cuda")}
    times = []
    for i in range(steps + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = m(**pipeline_inputs(m, mb))["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    flops = train_step_flops(cfg, bsz, seq)
    peak = matmul_peak_flops(torch.bfloat16, n=8192, repeats=10, device="cuda")
    from qwen3repro.nanotron.model import _use_flash

    x = torch.zeros(1, device="cuda", dtype=torch.bfloat16)
    result["mfu_qwen3_0_6b"] = {
        "batch": bsz, "seq": seq, "attention": "flash_attention_2" if _use_flash("auto", x) else "sdpa",
        "seconds_per_step_median": step_s, "tokens_per_s": bsz * seq / step_s, "model_tflops_per_step": flops / 1e12,
        "mfu_vs_989_tflops": flops / step_s / (DATASHEET_TFLOPS * 1e12),
        "measured_bf16_matmul_tflops": peak / 1e12, "mfu_vs_measured_peak": flops / step_s / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss),
    }


# ------------------------------------------------------------------------------------ 4. the real trainer
TRAINER_STEPS, TRAINER_CKPT_EVERY = 9, 3


def flash_attn_stub(root: Path) -> Path:
    """A `flash_attn` package whose modules give, for any name, a function that raises when called: what
    nanotron's trainer needs to import its Llama model (which we never build). Returns the folder to put first on
    PYTHONPATH."""
    body = ('def __getattr__(name):\n'
            '    if name.startswith("__"):\n        raise AttributeError(name)\n'
            '    def unavailable(*args, **kwargs):\n'
            '        raise RuntimeError(f"flash_attn.{name}: flash-attn is not installed (a stub satisfies imports only)")\n'
            '    return unavailable\n')
    for module in ("__init__", "bert_padding", "flash_attn_interface", "layers/__init__", "layers/rotary",
                   "ops/__init__", "ops/triton/__init__", "ops/triton/layer_norm"):
        path = root / "flash_attn" / f"{module}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    return root


def trainer_stage_config(run_dir: Path, steps: int) -> tuple[Path, object]:
    """qwen3-0.6b S1 on one GPU as `make full` writes it, shortened to `steps` steps (a checkpoint every
    TRAINER_CKPT_EVERY), attention on SDPA (flash-attn may be a stub here)."""
    import yaml

    from qwen3repro.nanotron.config_gen import build_stage_spec, write_stage_config

    spec = build_stage_spec("s1", "qwen3-0.6b", nodes=1, gpus_per_node=1, run_dir=run_dir)
    yaml_path, _ = write_stage_config(spec, run_dir)
    d = spec.nanotron_dict()
    d["model"]["model_config"]["attn_implementation"] = "sdpa"
    d["tokens"]["train_steps"] = steps
    d["tokens"]["batch_accumulation_per_replica"] = 2  # not S1's thousands of micro-batches per step
    d["checkpoints"]["checkpoint_interval"] = TRAINER_CKPT_EVERY
    d["optimizer"]["learning_rate_scheduler"]["lr_warmup_steps"] = 2
    d["optimizer"]["learning_rate_scheduler"]["lr_decay_starting_step"] = steps
    yaml_path.write_text(yaml.safe_dump(d, sort_keys=False))
    return yaml_path, spec


def random_documents(path: Path, vocab: int, n: int = 256) -> Path:
    import datasets

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(200, 3000, (n,), generator=g)
    docs = [torch.randint(0, vocab, (int(k),), generator=g).tolist() for k in lengths]
    datasets.Dataset.from_dict({"input_ids": docs}).save_to_disk(str(path))
    return path


def launch_trainer(yaml_path: Path, data: Path, env: dict, kill_at_checkpoint: bool = False) -> dict:
    """Our entry point under torch's launcher; with `kill_at_checkpoint`, SIGKILL the run once `latest.txt`
    names its first checkpoint (a crash mid-stage)."""
    import signal
    import subprocess

    ckpts = yaml_path.parent / "qwen3-0.6b" / "s1" / "checkpoints"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--nnodes=1",
           "-m", "qwen3repro.nanotron.launch", "--config-file", str(yaml_path), "--data", str(data)]
    log = open(yaml_path.with_suffix(".log"), "ab")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed_after = None
    if kill_at_checkpoint:
        while proc.poll() is None:
            latest = ckpts / "latest.txt"
            if latest.is_file() and latest.read_text().strip():
                killed_after = int(latest.read_text())
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    rc = proc.wait(timeout=600)
    return {"returncode": rc, "killed_after_checkpoint": killed_after,
            "latest": (ckpts / "latest.txt").read_text().strip() if (ckpts / "latest.txt").is_file() else None}


def check_trainer(pc, result: dict, workdir: Path) -> None:
    from qwen3repro.models.registry import get_model_config
    from qwen3repro.nanotron.convert import nanotron_to_hf, read_nanotron_weights
    from qwen3repro.nanotron.launch import PEAK_MEMORY_FILE

    out: dict = {}
    result["trainer"] = out
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None), env.pop("MASTER_PORT", None)
    src = str(Path(__file__).resolve().parents[1] / "src")
    paths = [src]
    try:
        import flash_attn  # noqa: F401

        out["flash_attn"] = "installed"
    except ImportError:
        paths.insert(0, str(flash_attn_stub(workdir / "stub")))
        out["flash_attn"] = "stub (imports only; attention on SDPA)"
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    data = random_documents(workdir / "docs", get_model_config("qwen3-0.6b").vocab_size)

    t0 = time.time()
    uncut_yaml, spec = trainer_stage_config(workdir / "uncut", TRAINER_STEPS)
    out["uncut"] = launch_trainer(uncut_yaml, data, env)
    cut_yaml, _ = trainer_stage_config(workdir / "cut", TRAINER_STEPS)
    out["cut_first"] = launch_trainer(cut_yaml, data, env, kill_at_checkpoint=True)
    out["cut_resumed"] = launch_trainer(cut_yaml, data, env)
    out["seconds"] = time.time() - t0
    final = f"qwen3-0.6b/s1/checkpoints/{TRAINER_STEPS}"
    a = read_nanotron_weights(workdir / "uncut" / final)
    b = read_nanotron_weights(workdir / "cut" / final)
    diffs = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a}
    out["resume_max_abs_weight_diff"] = max(diffs.values())
    out["resume_pass"] = (a.keys() == b.keys() and out["resume_max_abs_weight_diff"] <= 1e-3
                          and out["cut_first"]["killed_after_checkpoint"] is not None)

    # Conversion of the trainer's own checkpoint, loaded by transformers, against nanotron's model of it.
    from transformers import AutoModelForCausalLM
    from nanotron.serialize import load_weights

    from qwen3repro.nanotron.model import Qwen3NTConfig, build_qwen3, pipeline_inputs

    hf_dir = nanotron_to_hf(workdir / "uncut" / final, workdir / "hf")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).to(DEV).eval()
    cfg = spec.model_config
    nt = build_qwen3(Qwen3NTConfig.from_model_config(cfg, attn_implementation="sdpa"), pc, dtype=torch.float32,
                     device=DEV)
    load_weights(nt, pc, workdir / "uncut" / final)
    ids = torch.randint(0, cfg.vocab_size, (1, 65), device=DEV)
    with torch.no_grad():
        want = hf(ids[:, :-1]).logits.float()
        mb = {"input_ids": ids[:, :-1], "position_ids": torch.arange(64, device=DEV)[None],
              "label_ids": ids[:, 1:], "label_mask": torch.ones(1, 64, dtype=torch.bool, device=DEV)}
        loss_nt = float(nt(**pipeline_inputs(nt, mb))["loss"])
        loss_hf = float(torch.nn.functional.cross_entropy(want[0], ids[0, 1:]))
    out["hf_vs_nanotron_loss"] = [loss_hf, loss_nt]
    out["conversion_pass"] = abs(loss_hf - loss_nt) <= 1e-3 * max(1.0, abs(loss_nt))

    peak_file = uncut_yaml.with_name(PEAK_MEMORY_FILE)
    if peak_file.is_file():
        peak = json.loads(peak_file.read_text())
        planned = spec.plan().memory()["total"] / 2**30
        out["memory"] = {"planned_gib": planned, "max_allocated_gib": peak["max_allocated_gib"],
                         "max_reserved_gib": peak["max_reserved_gib"],
                         "allocated_over_plan": peak["max_allocated_gib"] / planned}
    out["pass"] = bool(out["resume_pass"] and out["conversion_pass"])


# ------------------------------------------------------------------------------------ 5. the CPU scales on the GPU
MICRO_TIMEOUT_S = 300  # the micro pipeline takes 2-4 min on two CPU cores; parts 1-4 need the rest of the slot


def micro_pipeline_summary(root: Path) -> dict:
    """What a micro pipeline run left in `root` (= <out>/micro): every finished stage's seconds and device (from
    its `timing.json`, so a run cut by the timeout still shows how far it got), and the claims table's rows."""
    stages = {}
    for timing in sorted(root.glob("**/timing.json")):
        record = json.loads(timing.read_text())
        stages[str(timing.parent.relative_to(root))] = {"seconds": record.get("seconds"),
                                                         "device": record.get("device")}
    claims_file = root / "claims" / "claims.json"
    rows = json.loads(claims_file.read_text()) if claims_file.is_file() else []
    pipeline_file = root / "pipeline.json"
    total = json.loads(pipeline_file.read_text()).get("total_seconds") if pipeline_file.is_file() else None
    return {"stages": stages, "total_seconds": total,
            "claims": [{"name": r["name"], "measured": r["measured"], "reproduced": r["reproduced"]} for r in rows]}


def check_micro_pipeline(result: dict, workdir: Path, timeout: float) -> None:
    import signal
    import subprocess

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # part 1's process group
        env.pop(name, None)
    cmd = [sys.executable, "-m", "qwen3repro.cli", "pipeline", "micro", "--device", "cuda", "--out", str(workdir)]
    log_path = workdir / "micro.log"
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and any process it started
            proc.wait()
            rc = None
    out = {"command": " ".join(cmd[1:]), "returncode": rc, "timed_out": rc is None, "timeout_s": timeout,
           "seconds": time.time() - t0, **micro_pipeline_summary(workdir / "micro")}
    if rc != 0:
        out["log_tail"] = log_path.read_text(errors="replace")[-3000:]
    devices = {stage["device"] for stage in out["stages"].values()}
    out["pass"] = rc == 0 and bool(out["stages"]) and devices == {"cuda"} and bool(out["claims"])
    result["micro_pipeline"] = out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--skip", nargs="*", default=[], choices=["loss", "flash", "mfu", "trainer", "micro"])
    ap.add_argument("--micro-timeout", type=float, default=MICRO_TIMEOUT_S,
                    help="seconds the micro pipeline (part 5) may run before it is killed")
    ap.add_argument("--cpu-smoke", action="store_true", help="run part 1 on CPU/gloo (tests this script, measures nothing)")
    args = ap.parse_args()
    global DEV
    _env_single_process()
    from qwen3repro.nanotron import compat

    compat.import_nanotron()
    if args.cpu_smoke:
        DEV = torch.device("cpu")
        args.skip = ["flash", "mfu", "trainer", "micro"]
        compat.init_gloo(0, 1, int(os.environ["MASTER_PORT"]))
        pc = compat.cpu_parallel_context()
    elif not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU (or --cpu-smoke)")
    else:
        pc = compat.gpu_parallel_context()  # nanotron's own ParallelContext: NCCL
    import torch.distributed as dist

    result = {"device": torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu", "torch": torch.__version__,
              "nanotron": compat.nanotron_version(), "backend": dist.get_backend()}
    try:
        from nanotron.trainer import DistributedTrainer  # noqa: F401

        result["distributed_trainer_imports"] = True
    except Exception as e:  # flash-attn missing or incompatible
        result["distributed_trainer_imports"] = f"no: {type(e).__name__}: {e}"
    for name, fn in (("loss", lambda: check_loss_curve(pc, args.steps, result)),
                     ("flash", lambda: check_flash_vs_sdpa(pc, result)),
                     ("mfu", lambda: check_mfu(pc, result)),
                     ("trainer", lambda: check_trainer(pc, result, Path(tempfile.mkdtemp(prefix="trainer-check-")))),
                     ("micro", lambda: check_micro_pipeline(result, Path(tempfile.mkdtemp(prefix="micro-check-")),
                                                            args.micro_timeout))):
        if name in args.skip:
            continue
        t0 = time.time()
        try:
            fn()
        except Exception as e:  # keep the other measurements
            result[f"{name}_error"] = f"{type(e).__name__}: {e}"
        result[f"{name}_seconds"] = time.time() - t0
        print(json.dumps({k: v for k, v in result.items()}, indent=1, default=str)[-2000:], flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    ok = all(result.get(k, {}).get("pass", True)
             for k in ("loss_curve", "flash_vs_sdpa", "trainer", "micro_pipeline")
             if isinstance(result.get(k), dict))
    print("GPU CHECK", "PASSED" if ok and not any(k.endswith("_error") for k in result) else "FAILED")


if __name__ == "__main__":
    main()
