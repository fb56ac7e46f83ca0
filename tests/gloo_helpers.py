"""Shared by the tests that spawn gloo process groups: a free port for the rendezvous and the micro-batches the
nanotron model and the plain model are compared on."""
from __future__ import annotations

import socket

import torch


def free_port() -> int:
    """A TCP port nothing listens on now (the spawned processes' MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def packed_batches(cfg, n_micro: int = 2, b: int = 2, s: int = 12, seed: int = 1) -> list[dict]:
    """Micro-batches with a packed document boundary (row 1 holds two documents) and a loss mask (row 0's first
    three targets do not count, as a prompt's); each counts the same number of tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_micro):
        ids = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g)
        pos = torch.arange(s).repeat(b, 1)
        pos[1, 7:] = torch.arange(s - 7)
        mask = torch.ones(b, s, dtype=torch.bool)
        mask[0, :3] = False
        out.append(dict(input_ids=ids[:, :-1], position_ids=pos, label_ids=ids[:, 1:], label_mask=mask))
    return out


def reference_backward(ref, cfg, mbs, lbl_layers: str = "per_layer") -> float:
    """The plain model's loss over the micro-batches (each weighted 1/len(mbs); for MoE plus the load-balancing
    loss with the step's expert counts, taken first over every micro-batch), backpropagated; returns the loss.
    What a nanotron step over the same micro-batches must equal."""
    from qwen3repro.losses import ExpertCounts, load_balancing_loss, masked_cross_entropy
    from qwen3repro.nanotron.model import segment_ids_from_positions

    def fwd(mb):
        return ref(mb["input_ids"], position_ids=mb["position_ids"],
                   segment_ids=segment_ids_from_positions(mb["position_ids"]), output_router_logits=True)

    e, k = cfg.num_experts, cfg.num_experts_per_tok
    step_counts = None
    if cfg.is_moe:
        with torch.no_grad():
            for mb in mbs:
                counts = ExpertCounts.of(fwd(mb).router_logits, e, k, layers=lbl_layers)
                step_counts = counts if step_counts is None else step_counts + counts
    total = 0.0
    for mb in mbs:
        out = fwd(mb)
        loss = masked_cross_entropy(out.logits, mb["label_ids"], mb["label_mask"])
        if step_counts is not None:
            loss = loss + cfg.router_aux_loss_coef * load_balancing_loss(out.router_logits, e, k, layers=lbl_layers,
                                                                           step_counts=step_counts)
        loss = loss / len(mbs)
        loss.backward()
        total += float(loss.detach())
    return total
