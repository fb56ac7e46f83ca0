"""The nanotron Qwen3 model under layouts beyond plain TP=2 / PP=2, on CPU with gloo (spawned processes, tiny
configs, fp32).

* Initialisation (2 processes): `init_model_randomly`, called as nanotron's trainer calls it (after
  `set_random_seed`, which seeds every rank alike), gives the same weights whatever the layout. TP=2's shards,
  gathered, and PP=2's stages equal the TP=1/PP=1 weights of the same seed exactly, the two TP ranks' shards
  differ, and the replicated parameters are the same on every rank. Checked for dense and MoE (`Experts`).
* TP=2 x PP=2 (4 processes, nanotron's 1F1B engine, which the generated configs use): the loss and every
  gradient (each rank's shard) equal those of the plain `Qwen3` with the same weights, dense and MoE.
* DP=2 with ZeRO-1 (2 processes): nanotron's `init_optimizer_and_grad_accumulator` builds the optimizer
  (`ZeroDistributedOptimizer` over torch AdamW). Each DP rank trains on half of the batch. Gradients are averaged
  over DP by nanotron's trainer mechanism for this setting: with `accumulate_grad_in_fp32: false` and DP > 1 the
  trainer wraps the model in torch `DistributedDataParallel` over the DP group. The fp32 gradient accumulator,
  which the generated configs use, allocates on CUDA and requires half-precision weights, so it cannot run here.
  After each of two optimizer steps, the averaged gradients and then the parameters equal those of the plain
  model trained with torch AdamW on the whole (doubled) batch. Both halves count the same number of tokens, so
  the mean of the two halves' losses is the loss of the doubled batch. AdamW divides each gradient element by
  its running magnitude, so an element whose gradient sits at the summation-order noise floor moves by a
  noise-dependent amount of up to ~lr: lr 1e-4 and eps 1e-6 keep that far below the tolerance while one step
  (~lr per element) is still well above it; the gradients, which carry the DP averaging, are checked first.

Tolerance as in test_nanotron_parallel: fp32, rtol 1e-4 / atol 1e-6 (the only differences are summation order).
"""
from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("nanotron")

from gloo_helpers import free_port, packed_batches, reference_backward  # noqa: E402

RTOL, ATOL = 1e-4, 1e-6
SEED = 1234
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------- helpers


def _spawn(worker, nprocs: int, *args) -> None:
    torch.multiprocessing.spawn(worker, args=(nprocs, free_port(), *args), nprocs=nprocs, join=True)


def _start(rank: int, world: int, port: int) -> None:
    from qwen3repro.nanotron import compat

    torch.set_num_threads(1)
    compat.init_gloo(rank, world, port)
    compat.import_nanotron()


def _finish() -> None:
    import nanotron.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def _config(name: str):
    """A tiny registry model; MoE with a large load-balancing coefficient (a wrong gradient cannot hide)."""
    from qwen3repro.models.registry import get_model_config

    cfg = get_model_config(name)
    return cfg.replace(router_aux_loss_coef=0.5) if cfg.is_moe else cfg


def _nt_config(cfg):
    from qwen3repro.nanotron.model import Qwen3NTConfig

    return Qwen3NTConfig.from_model_config(cfg, attn_implementation="sdpa")






def _reference_model(cfg):
    from qwen3repro.models.qwen3 import Qwen3

    torch.manual_seed(0)
    return Qwen3(cfg)


def _nt_grads(ref, cfg):
    """The plain model's gradients under nanotron's (unsharded) names; the tied LM head shares the embedding's."""
    from qwen3repro.nanotron.convert import ours_to_nt

    grads = ours_to_nt({k: p.grad for k, p in ref.named_parameters()}, cfg)
    if cfg.tie_word_embeddings:
        grads["lm_head.pp_block.linear.weight"] = grads["embedding.pp_block.token_embedding.weight"]
    return grads


def _assert_local_shards(model, full, what: str, rtol=RTOL, atol=ATOL, grad: bool = False) -> int:
    """Every parameter (or its gradient) of this rank equals its slice of the unsharded tensors `full`."""
    from qwen3repro.nanotron.convert import local_shard, tied_name

    n = 0
    for name, p in model.named_parameters():
        key = name if name in full else tied_name(model, name)
        got = p.grad if grad else p.detach()
        assert got is not None, f"{what}: {name} has no gradient"
        torch.testing.assert_close(got, local_shard(p, full[key]), rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{what}: {name}: {m}")
        n += 1
    return n


# ----------------------------------------------------------------------------------- initialisation
def _trainer_config(seed: int, std: float):
    """What nanotron's trainer passes as `init_model_randomly(config=...)`: its whole `Config`, of which the
    initialisation reads `general.seed` and `model.init_method`."""
    from nanotron.config import GeneralArgs, RandomInit

    return types.SimpleNamespace(general=GeneralArgs(project="test", run="init", seed=seed),
                                 model=types.SimpleNamespace(init_method=RandomInit(std=std)))


def _init_as_trainer(cfg, pc, seed: int = SEED):
    """Seed every rank alike, build, tie and initialise, in the trainer's order."""
    from nanotron.random import set_random_seed

    from qwen3repro.nanotron.model import build_qwen3

    set_random_seed(seed)
    model = build_qwen3(_nt_config(cfg), pc, device=CPU)
    model.init_model_randomly(config=_trainer_config(seed, cfg.initializer_range))
    return model


def _init_worker(rank, world, port):
    _start(rank, world, port)
    import nanotron.distributed as dist

    from qwen3repro.models.attention import RMSNorm
    from qwen3repro.nanotron import compat
    from qwen3repro.nanotron.convert import tied_name

    contexts = {"tp1": compat.cpu_parallel_context(dp=2), "tp2": compat.cpu_parallel_context(tp=2),
                "pp2": compat.cpu_parallel_context(pp=2)}
    for cfg_name in ("micro", "micro-moe"):
        cfg = _config(cfg_name)
        # TP=1, PP=1 (the two processes are two DP replicas): the whole model on each rank.
        whole = _init_as_trainer(cfg, contexts["tp1"])
        full = {tied_name(whole, n): p.detach().clone() for n, p in whole.named_parameters()}
        for name, module in whole.named_modules():  # transformers' init: norms at 1, weights normal(0, std)
            for pname, p in module.named_parameters(recurse=False):
                w, where = p.detach(), f"{cfg_name}: {name}.{pname}"
                if isinstance(module, RMSNorm):
                    assert torch.equal(w, torch.ones_like(w)), where
                elif w.numel() >= 2000:
                    assert abs(float(w.std()) / cfg.initializer_range - 1) < 0.1, f"{where}: std {float(w.std())}"
                    assert abs(float(w.mean())) < 0.1 * cfg.initializer_range, f"{where}: mean {float(w.mean())}"
        # Deterministic given the seed, whatever the global RNG did since; another seed gives other weights.
        torch.rand(100)
        whole.init_model_randomly(config=_trainer_config(SEED, cfg.initializer_range))
        _assert_local_shards(whole, full, f"{cfg_name} re-init", rtol=0, atol=0)
        whole.init_model_randomly(config=_trainer_config(SEED + 1, cfg.initializer_range))
        qkv = "decoder.0.pp_block.self_attn.qkv_proj.weight"
        assert not torch.equal(whole.get_parameter(qkv).detach(), full[qkv]), "another seed gave the same weights"
        # The DP replicas agree.
        for key, t in full.items():
            copies = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(copies, t, group=contexts["tp1"].dp_pg)
            assert all(torch.equal(c, copies[0]) for c in copies), f"{cfg_name}: {key} differs between DP replicas"

        for layout in ("tp2", "pp2"):
            pc = contexts[layout]
            model = _init_as_trainer(cfg, pc)
            n = _assert_local_shards(model, full, f"{cfg_name} {layout}", rtol=0, atol=0)
            assert n > 0
            if layout != "tp2":
                continue
            sharded = 0
            for name, p in model.named_parameters():
                shards = [torch.empty_like(p) for _ in range(pc.tp_pg.size())]
                dist.all_gather(shards, p.detach().contiguous(), group=pc.tp_pg)
                if p.is_sharded:
                    assert not torch.equal(shards[0], shards[1]), f"{cfg_name}: TP ranks hold the same shard of {name}"
                    sharded += 1
                else:
                    assert torch.equal(shards[0], shards[1]), f"{cfg_name}: replicated {name} differs across TP"
            assert sharded > 0
            if cfg.is_moe:
                assert any(n.endswith("experts.gate_up_proj") and p.is_sharded for n, p in model.named_parameters())
    _finish()


def test_init_is_layout_independent():
    """TP=2 shards (gathered) and PP=2 stages equal TP=1's initial weights; TP ranks' shards differ."""
    _spawn(_init_worker, 2)


# ------------------------------------------------------------------------------------------ TP x PP
def _tp_pp_worker(rank, world, port):
    _start(rank, world, port)
    import nanotron.distributed as dist
    from nanotron.parallel.pipeline_parallel.engine import OneForwardOneBackwardPipelineEngine
    from nanotron.parallel.tied_parameters import sync_tied_weights_gradients

    from qwen3repro.nanotron import compat
    from qwen3repro.nanotron.convert import load_state_dict_into
    from qwen3repro.nanotron.model import build_qwen3, count_experts, pipeline_inputs

    pc = compat.cpu_parallel_context(tp=2, pp=2)
    for cfg_name in ("micro", "micro-moe"):
        cfg = _config(cfg_name)
        mbs = packed_batches(cfg)
        ref = _reference_model(cfg)
        ref_loss = reference_backward(ref, cfg, mbs)

        model = build_qwen3(_nt_config(cfg), pc, device=CPU)
        load_state_dict_into(model, {k: v.detach() for k, v in ref.state_dict().items()}, cfg)
        count_experts(model, mbs)
        outputs = OneForwardOneBackwardPipelineEngine().train_batch_iter(
            model, pg=pc.pp_pg, batch=iter([pipeline_inputs(model, mb) for mb in mbs]), nb_microbatches=len(mbs),
            grad_accumulator=None)
        sync_tied_weights_gradients(model, pc, None)

        if dist.get_rank(pc.pp_pg) == model.loss.rank:
            got = float(sum(o["loss"] for o in outputs))
            assert abs(got - ref_loss) <= RTOL * abs(ref_loss), (cfg_name, got, ref_loss)
        assert _assert_local_shards(model, _nt_grads(ref, cfg), f"{cfg_name} grad", grad=True) > 0
    _finish()


def test_tp2_pp2_matches_plain_model():
    """tp=2 x pp=2 (4 processes): loss and every gradient shard equal the plain model's, dense and MoE."""
    _spawn(_tp_pp_worker, 4)


# ------------------------------------------------------------------------------------- DP + ZeRO-1
ADAM = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
STEPS = 2


def _optimizer_args():
    from nanotron.config import LRSchedulerArgs, OptimizerArgs

    return OptimizerArgs(
        zero_stage=1, weight_decay=ADAM["weight_decay"], clip_grad=None, accumulate_grad_in_fp32=False,
        adam_eps=ADAM["eps"], adam_beta1=ADAM["betas"][0], adam_beta2=ADAM["betas"][1], torch_adam_is_fused=False,
        learning_rate_scheduler=LRSchedulerArgs(learning_rate=ADAM["lr"], lr_warmup_style="linear"),
    )


def _dp_worker(rank, world, port):
    _start(rank, world, port)
    import nanotron.distributed as dist
    from nanotron.helpers import init_optimizer_and_grad_accumulator
    from nanotron.optim.zero import ZeroDistributedOptimizer
    from nanotron.parallel.pipeline_parallel.engine import OneForwardOneBackwardPipelineEngine
    from nanotron.parallel.tied_parameters import sync_tied_weights_gradients
    from torch.nn.parallel import DistributedDataParallel

    from qwen3repro.nanotron import compat
    from qwen3repro.nanotron.convert import load_state_dict_into, ours_to_nt
    from qwen3repro.nanotron.model import build_qwen3, count_experts, pipeline_inputs

    pc = compat.cpu_parallel_context(dp=2)
    dp_rank = dist.get_rank(pc.dp_pg)
    for cfg_name in ("micro", "micro-moe"):
        cfg = _config(cfg_name)
        ref = _reference_model(cfg)
        ref_opt = torch.optim.AdamW(ref.parameters(), foreach=False, **ADAM)

        model = build_qwen3(_nt_config(cfg), pc, device=CPU)
        load_state_dict_into(model, {k: v.detach() for k, v in ref.state_dict().items()}, cfg)
        # What the trainer does for DP > 1 without the fp32 gradient accumulator (module doc).
        ddp = DistributedDataParallel(model, process_group=pc.dp_pg, broadcast_buffers=False)
        optimizer, grad_accumulator = init_optimizer_and_grad_accumulator(ddp, _optimizer_args(), pc)
        assert isinstance(optimizer, ZeroDistributedOptimizer) and grad_accumulator is None
        # ZeRO-1: this rank's optimizer updates only its part of the parameters.
        mine = sum(int(e) - int(s) for offsets in optimizer.param_name_to_dp_rank_offsets.values()
                   for r, (s, e) in offsets.items() if r == dp_rank)
        total = sum(p.numel() for p in model.parameters())
        assert 0 < mine < total, (mine, total)
        engine = OneForwardOneBackwardPipelineEngine()

        for step in range(STEPS):
            halves = packed_batches(cfg, n_micro=2, seed=10 + step)  # the step's doubled batch, one half per DP rank
            doubled = {k: torch.cat([h[k] for h in halves]) for k in halves[0]}
            ref_opt.zero_grad()
            reference_backward(ref, cfg, [doubled])

            mb = halves[dp_rank]
            count_experts(model, [mb])  # expert counts summed over DP: the doubled batch's
            engine.train_batch_iter(ddp, pg=pc.pp_pg, batch=iter([pipeline_inputs(model, mb)]), nb_microbatches=1,
                                    grad_accumulator=grad_accumulator)
            sync_tied_weights_gradients(model, pc, grad_accumulator)
            _assert_local_shards(model, _nt_grads(ref, cfg), f"{cfg_name} step {step} grad", grad=True)
            optimizer.step()
            optimizer.zero_grad()
            ref_opt.step()
            want = ours_to_nt({k: v.detach() for k, v in ref.state_dict().items()}, cfg)
            if cfg.tie_word_embeddings:
                want["lm_head.pp_block.linear.weight"] = want["embedding.pp_block.token_embedding.weight"]
            _assert_local_shards(model, want, f"{cfg_name} step {step} params")
    _finish()


def test_dp2_zero1_matches_doubled_batch():
    """DP=2 + ZeRO-1 AdamW (DDP-averaged gradients): two steps equal AdamW on the doubled batch, dense and MoE."""
    _spawn(_dp_worker, 2)
