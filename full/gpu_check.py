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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--skip", nargs="*", default=[], choices=["loss", "flash", "mfu"])
    ap.add_argument("--cpu-smoke", action="store_true", help="run part 1 on CPU/gloo (tests this script, measures nothing)")
    args = ap.parse_args()
    global DEV
    _env_single_process()
    from qwen3repro.nanotron import compat

    compat.import_nanotron()
    if args.cpu_smoke:
        DEV = torch.device("cpu")
        args.skip = ["flash", "mfu"]
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
                     ("mfu", lambda: check_mfu(pc, result))):
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
    ok = all(result.get(k, {}).get("pass", True) for k in ("loss_curve", "flash_vs_sdpa") if isinstance(result.get(k), dict))
    print("GPU CHECK", "PASSED" if ok and not any(k.endswith("_error") for k in result) else "FAILED")


if __name__ == "__main__":
    main()
