"""The nanotron Qwen3 model against our plain model on CPU, 2 gloo processes (tiny configs).

For TP=2 (our loop on nanotron's parallel context) and PP=2 (nanotron's AllForwardAllBackward pipeline engine,
with per-layer activation recomputation on), dense (RoPE base 1e4) and MoE (base 1e6 with YaRN; the load-balancing
loss per layer and pooled), with two micro-batches per step, a packed document boundary and a loss mask: the step's
loss and every parameter gradient (each rank's shard) equal those of `Qwen3` with the same weights, where the
reference adds the global-scope load-balancing loss through `losses.load_balancing_loss`. Tolerance: fp32, rtol 1e-4
/ atol 1e-6 (the only differences are summation order across shards).

Also: nanotron `save_weights` at TP=2 or PP=2 -> `nanotron_to_hf` -> `Qwen3.from_pretrained` gives the reference
logits, and `hf_to_nanotron` -> nanotron `load_weights` gives back every rank's shards.
"""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("nanotron")

from gloo_helpers import free_port, packed_batches, reference_backward  # noqa: E402

RTOL, ATOL = 1e-4, 1e-6






def _reference(cfg, mbs, lbl_layers):
    from qwen3repro.models.qwen3 import Qwen3

    torch.manual_seed(0)
    ref = Qwen3(cfg)
    return ref, reference_backward(ref, cfg, mbs, lbl_layers)


def _worker(rank, world, port, mode, tmpdir):
    from qwen3repro.nanotron import compat

    torch.set_num_threads(1)
    compat.init_gloo(rank, world, port)
    compat.import_nanotron()
    import nanotron.distributed as dist

    tp, pp = (2, 1) if mode == "tp" else (1, 2)
    pc = compat.cpu_parallel_context(tp=tp, pp=pp)
    for cfg_name, lbl_layers in (("micro", "per_layer"), ("micro-moe", "per_layer"), ("micro-moe", "pooled")):
        _check(pc, mode, cfg_name, lbl_layers, f"{tmpdir}/{cfg_name}-{lbl_layers}")
    dist.barrier()
    dist.destroy_process_group()


def _check(pc, mode, cfg_name, lbl_layers, tmpdir):
    from qwen3repro.models.qwen3 import Qwen3
    from qwen3repro.models.registry import get_model_config
    from qwen3repro.nanotron.convert import (
        hf_to_nanotron, load_state_dict_into, local_shard, nanotron_to_hf, ours_to_nt, tied_name,
    )

    import nanotron.distributed as dist
    from nanotron.parallel.pipeline_parallel.engine import AllForwardAllBackwardPipelineEngine
    from nanotron.parallel.tied_parameters import sync_tied_weights_gradients
    from nanotron.serialize import load_weights, save_weights

    from qwen3repro.nanotron.model import Qwen3NTConfig, build_qwen3, count_experts, pipeline_inputs

    rank = dist.get_rank(pc.world_pg)
    cfg = get_model_config(cfg_name)
    if cfg.is_moe:  # a large LBL coefficient (a wrong gradient cannot hide in the tolerance), and YaRN RoPE
        cfg = cfg.replace(router_aux_loss_coef=0.5, rope_theta=1e6,
                          rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8})
    mbs = packed_batches(cfg)
    ref, ref_loss = _reference(cfg, mbs, lbl_layers)

    # PP runs with per-layer activation recomputation, TP without: both must give the same gradients.
    nt_cfg = Qwen3NTConfig.from_model_config(cfg, recompute_layers=(mode == "pp"), attn_implementation="sdpa",
                                             lbl_layers=lbl_layers)
    model = build_qwen3(nt_cfg, pc, device=torch.device("cpu"))
    # the plan's pipeline placement is nanotron's
    from qwen3repro.nanotron.plan import pipeline_assignment

    blocks = [model.embedding, *model.decoder, model.final_norm, model.lm_head, model.loss]
    assert [b.rank for b in blocks] == pipeline_assignment(cfg, pc.pp_pg.size())
    load_state_dict_into(model, {k: v.detach() for k, v in ref.state_dict().items()}, cfg)
    count_experts(model, mbs)
    inputs = [pipeline_inputs(model, mb) for mb in mbs]
    if mode == "tp":
        losses = []
        for inp in inputs:
            loss = model(**inp)["loss"] / len(inputs)
            loss.backward()
            losses.append(loss)
    else:
        engine = AllForwardAllBackwardPipelineEngine()
        losses = [o["loss"] for o in engine.train_batch_iter(model, pg=pc.pp_pg, batch=iter(inputs),
                                                              nb_microbatches=len(inputs), grad_accumulator=None)]
    sync_tied_weights_gradients(model, pc, None)

    if dist.get_rank(pc.pp_pg) == model.loss.rank:
        got = float(sum(l.detach() for l in losses))
        assert abs(got - ref_loss) <= RTOL * abs(ref_loss), (got, ref_loss)
    ref_grads = ours_to_nt({k: p.grad for k, p in ref.named_parameters()}, cfg)
    if cfg.tie_word_embeddings:
        ref_grads["lm_head.pp_block.linear.weight"] = ref_grads["embedding.pp_block.token_embedding.weight"]
    n = 0
    for name, p in model.named_parameters():
        key = name if name in ref_grads else tied_name(model, name)
        want = local_shard(p, ref_grads[key])
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
        n += 1
    assert n > 0

    # ---- save (nanotron) -> convert -> from_pretrained, and back
    ckpt, hf_dir, back = f"{tmpdir}/nt", f"{tmpdir}/hf", f"{tmpdir}/nt_back"
    from pathlib import Path

    save_weights(model, pc, Path(ckpt))
    dist.barrier()
    if rank == 0:
        nanotron_to_hf(ckpt, hf_dir, config=cfg)
        loaded = Qwen3.from_pretrained(hf_dir)
        mb = mbs[0]
        with torch.no_grad():
            a = ref(mb["input_ids"], position_ids=mb["position_ids"]).logits
            b = loaded(mb["input_ids"], position_ids=mb["position_ids"]).logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        hf_to_nanotron(hf_dir, back)
    dist.barrier()
    fresh = build_qwen3(cfg, pc, device=torch.device("cpu"))
    load_weights(fresh, pc, Path(back))
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    dist.barrier()


@pytest.mark.parametrize("mode", ["tp", "pp"])
def test_nanotron_matches_plain_model(mode, tmp_path):
    """Dense (micro) and MoE (micro-moe) in one pair of processes per layout (process start-up dominates)."""
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), mode, str(tmp_path)), nprocs=2, join=True)
