"""Weight decay on matrices only, for nanotron's optimizer (norms and embeddings are not decayed).

nanotron 0.4 builds its optimizer in `helpers.init_optimizer_and_grad_accumulator` from one flat list of named
parameters and one `weight_decay`, so every norm gain and the embedding table would be decayed towards zero.
The tiny trainer decays only matrices (`train.loop.parameter_groups`: nothing with fewer than two dimensions,
no embedding table unless `decay_embeddings`), and the full scale must train the same way.

nanotron's optimizer stack already carries parameter groups end to end: `ZeroDistributedOptimizer` accepts
`[{"named_params": [...], **group options}]`, keeps each group's options through the fp32 gradient accumulator
(`OptimizerFromGradientAccumulator`) and `NamedOptimizer` down to torch's `AdamW`, which honours a group's own
`weight_decay`. So `weight_decay_groups()` swaps the ZeRO optimizer class that nanotron's builder instantiates
for `DecayGroupedZeroOptimizer`, which splits the flat list into a decayed and a non-decayed group by name;
everything else (sharding over DP, fp32 accumulation, checkpoint format) is nanotron's own. The generated
configs always use ZeRO-1 (`config_gen`), the path this covers; `weight_decay_groups` refuses ZeRO-0 rather than
silently decaying everything.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from .compat import import_nanotron

import_nanotron()

from nanotron import helpers as nanotron_helpers  # noqa: E402
from nanotron.optim.zero import ZeroDistributedOptimizer  # noqa: E402


# Our model's embedding table (`model.Qwen3ForTraining`: the `embedding` block's `token_embedding`). nanotron names
# a tied LM head by its first tie target, this one, on every pipeline rank.
EMBEDDING_SUFFIX = "token_embedding.weight"


def decays(name: str, param, decay_embeddings: bool = False) -> bool:
    """Whether a parameter gets weight decay: matrices yes; vectors (norm gains) no; the embedding table (and a
    tied LM head, the same tensor) only with `decay_embeddings` — `train.loop.parameter_groups`' rule."""
    if param.ndim < 2:
        return False
    return decay_embeddings or not name.endswith(EMBEDDING_SUFFIX)


def split_by_decay(named_params: list[tuple[str, Any]], decay_embeddings: bool = False) -> list[dict]:
    """nanotron named parameter groups: [decayed (the optimizer's weight decay), not decayed (0)]."""
    decayed = [(n, p) for n, p in named_params if decays(n, p, decay_embeddings)]
    plain = [(n, p) for n, p in named_params if not decays(n, p, decay_embeddings)]
    return [{"named_params": decayed}, {"named_params": plain, "weight_decay": 0.0}]


@contextlib.contextmanager
def weight_decay_groups(zero_stage: int, decay_embeddings: bool = False) -> Iterator[None]:
    """While active, nanotron's optimizer builder gives norms and embeddings no weight decay (module doc). Wrap
    the trainer's construction: `with weight_decay_groups(cfg.optimizer.zero_stage): trainer = ...`."""
    if zero_stage < 1:
        raise ValueError("weight_decay_groups covers the ZeRO-1 optimizer path; the generated configs use zero_stage 1")

    class DecayGroupedZeroOptimizer(ZeroDistributedOptimizer):
        def __init__(self, named_params_or_groups, optimizer_builder, dp_pg):
            named = list(named_params_or_groups)
            if named and not isinstance(named[0], dict):
                named = split_by_decay(named, decay_embeddings)
            super().__init__(named_params_or_groups=named, optimizer_builder=optimizer_builder, dp_pg=dp_pg)

    original = nanotron_helpers.ZeroDistributedOptimizer
    nanotron_helpers.ZeroDistributedOptimizer = DecayGroupedZeroOptimizer
    try:
        yield
    finally:
        nanotron_helpers.ZeroDistributedOptimizer = original


__all__ = ["EMBEDDING_SUFFIX", "decays", "split_by_decay", "weight_decay_groups"]
