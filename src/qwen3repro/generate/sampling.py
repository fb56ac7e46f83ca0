"""Sampling: how the engine picks each next token from a row's logits.

`SamplingParams` names the knobs and the report's presets (`THINKING_SAMPLING`,
`NON_THINKING_SAMPLING`, `GREEDY`). The filters are applied in the order vLLM uses for these knobs:

    presence penalty  subtract `presence_penalty` from every token already generated in this row
    temperature       divide the logits by T (T = 0 is greedy: the argmax)
    top-k             keep the k largest logits
    top-p (nucleus)   keep the smallest set of most likely tokens whose probability reaches p
    min-p             drop tokens whose probability is below min_p × the top token's

`sampling_logits` is the definition: the logits the draw is made from, as plain PyTorch filters
over the whole vocabulary. `sample`, which the engine calls at every step, draws from the same
distribution more cheaply: with top-k on, everything after the penalty runs on the k candidates
only, found by a two-pass top-k much cheaper than `torch.topk` over a whole vocabulary row; on a
CPU, top-k without min-p (the report's settings) is one call of a compiled kernel
(`qwen3repro.kernels`) doing the same arithmetic from the same noise draws.

The draw is an exponential race (argmax of p / E, E ~ Exp(1)), which equals sampling from p and
needs no normalised p, with an explicit `torch.Generator` so a seed reproduces a run.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .. import kernels

__all__ = [
    "SamplingParams",
    "THINKING_SAMPLING",
    "NON_THINKING_SAMPLING",
    "GREEDY",
    "apply_presence_penalty",
    "apply_top_k",
    "apply_top_p",
    "apply_min_p",
    "sampling_logits",
    "sample",
]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. top_k 0 and top_p 1 mean "off"; temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# The report's evaluation settings (Qwen3 technical report, "Evaluation settings"; the released
# generation_config.json has min_p 0).
THINKING_SAMPLING = SamplingParams(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
NON_THINKING_SAMPLING = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0, presence_penalty=1.5)
GREEDY = SamplingParams(temperature=0.0)


# ---------------------------------------------------------------------------- the filters
# Pure functions on logits [B, V] (float); filtered-out tokens become -inf. The top token is
# never removed, so every row keeps at least one candidate.
def apply_presence_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the logits of the tokens already generated (`seen` [B, V] bool)."""
    if penalty == 0.0:
        return logits
    return logits - penalty * seen.to(logits.dtype)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits of each row (ties broken by `torch.topk`); k <= 0 is off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, torch.topk(logits, k, dim=-1).indices, True)
    return logits.masked_fill(~keep, float("-inf"))


def _top_p_sorted(sorted_logits: torch.Tensor, p: float) -> torch.Tensor:
    """Top-p on logits already sorted in descending order along the last dimension."""
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass strictly before each token
    remove = before >= p
    remove[..., 0] = False
    return sorted_logits.masked_fill(remove, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    filtered = _top_p_sorted(sorted_logits, p)
    return torch.empty_like(logits).scatter_(-1, order, filtered)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p × the row's top probability; 0 is off."""
    if min_p <= 0.0:
        return logits
    log_probs = torch.log_softmax(logits, dim=-1)
    threshold = log_probs.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(min_p, dtype=logits.dtype))
    return logits.masked_fill(log_probs < threshold, float("-inf"))


def sampling_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The logits actually sampled from: penalty, temperature, top-k, top-p, min-p (in that order)."""
    x = logits.float()
    if params.presence_penalty and seen is not None:
        x = apply_presence_penalty(x, seen, params.presence_penalty)
    if params.temperature not in (0.0, 1.0):
        x = x / params.temperature
    x = apply_top_k(x, params.top_k)
    x = apply_top_p(x, params.top_p)
    x = apply_min_p(x, params.min_p)
    return x


# ------------------------------------------------------------------------------- the draw
def _race(logits: torch.Tensor, generator, keepdim: bool = False) -> torch.Tensor:
    """One draw per row from softmax(logits): argmax of p / E with E ~ Exp(1) (the exponential race)."""
    probs = torch.softmax(logits, dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1, keepdim=keepdim)


def _top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(x, k, dim=-1)` (values sorted in descending order, and their indices) for x [B, V],
    computed in two cheap passes instead of one expensive one (`topk` over a whole vocabulary row
    costs far more than over a few hundred entries).

    The vocabulary is split into V/c groups of c entries (group j holds j, j + V/c, j + 2V/c, ...).
    Every one of the k largest entries lies in a group whose maximum is at least the k-th largest
    value, and at most k groups have such a maximum, so the k groups with the largest maxima hold the
    whole top k: the answer is the top k of their c·k entries. (Ties at the k-th value may resolve to
    other, equal-valued entries than `torch.topk`'s.)
    """
    b, v = x.shape
    c = 1 << max(0, round(math.log2(max(v / max(k, 1), 1)) / 2))  # ≈ √(V/k): both passes about as short
    while c > 1 and v % c:
        c //= 2
    n = v // c
    if c < 4 or n < 2 * k:
        return torch.topk(x, k, dim=-1)
    groups = x.view(b, c, n)
    best = groups.amax(dim=1).topk(k, dim=-1, sorted=False).indices.unsqueeze(1)  # [B, 1, k] group ids
    members = (_group_offsets(v, n, x.device) + best).view(b, c * k)  # vocabulary ids
    values, j = x.gather(1, members).topk(k, dim=-1)
    return values, members.gather(1, j)


@functools.lru_cache(maxsize=16)
def _group_offsets(v: int, n: int, device) -> torch.Tensor:
    """[c, 1]: 0, n, 2n, ... (member r of group j is r·n + j); made once, not at every step."""
    return torch.arange(0, v, n, device=device)[:, None]


def sample(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None, generator) -> torch.Tensor:
    """The next token of each row [B] from logits [B, V]: the distribution of `sampling_logits`, computed
    on the top-k candidates only when top-k is on (no sort over the whole vocabulary). `seen` [B, V]
    marks the tokens each row has generated (for the presence penalty; None when it is off)."""
    k = params.top_k
    if params.greedy or not 0 < k < logits.shape[-1]:
        x = sampling_logits(logits, params, seen)
        return x.argmax(dim=-1) if params.greedy else _race(x, generator)
    x = logits.float()
    if params.presence_penalty and seen is not None:
        x = apply_presence_penalty(x, seen, params.presence_penalty)
    if params.min_p == 0.0 and x.device.type == "cpu" and k <= kernels.MAX_TOP_K:
        kernel = _sampling_kernel(*x.shape, params, torch.get_num_threads())
        if kernel is not None:  # `_draw_top_k` in one compiled call, with the same noise draws
            return _kernel_draw(kernel, x, params, generator)
    return _draw_top_k(x, params, generator)


def _kernel_draw(kernel, x: torch.Tensor, params: SamplingParams, generator) -> torch.Tensor:
    noise = torch.empty((x.shape[0], params.top_k), dtype=torch.float32).exponential_(generator=generator)
    return kernel(x, params.top_k, params.temperature, params.top_p, noise)


def _sampling_kernel(batch: int, vocab: int, params: SamplingParams, threads: int):
    """The compiled sampler, where it is faster than `_draw_top_k` for this shape on this machine
    (`kernels.faster`, measured once per machine and shape bucket; `QWEN3REPRO_KERNELS=1` always uses
    it), else None."""
    kernel = kernels.sampling_kernel()
    if kernel is None or kernels.mode() == "on":
        return kernel
    b = kernels.bucket(batch)
    key = (f"sample-top-k {kernel.name} batch={b} vocab={vocab} k={params.top_k} "
           f"top_p={'on' if params.top_p < 1.0 else 'off'} threads={threads}")

    def candidates():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, vocab, generator=g) * 4
        draws = 4  # per timing: several steps' worth, well above the timer's resolution
        return {"kernel": lambda: [_kernel_draw(kernel, x, params, g) for _ in range(draws)],
                "torch": lambda: [_draw_top_k(x, params, g) for _ in range(draws)]}

    return kernel if kernels.faster(key, candidates) == "kernel" else None


def _draw_top_k(x: torch.Tensor, params: SamplingParams, generator) -> torch.Tensor:
    """`sample` with top-k on, after the presence penalty, as PyTorch operations."""
    k = params.top_k
    values, index = _top_k(x, k)  # sorted, descending
    if params.temperature != 1.0:
        values = values / params.temperature
    if params.min_p > 0.0:  # filters on the logits, exactly as `sampling_logits` applies them
        if params.top_p < 1.0:
            values = _top_p_sorted(values, params.top_p)
        values = apply_min_p(values, params.min_p)
        return index.gather(-1, _race(values, generator, keepdim=True)).view(-1)
    # Without min-p, top-p can filter probabilities instead of logits, which saves a second softmax:
    # the race needs no renormalisation (argmax of p / E picks the same token for any positive
    # multiple of p). Same arithmetic as `_top_p_sorted`; before[:, 0] is 0 < p, so the top token stays.
    probs = torch.softmax(values, dim=-1)
    if params.top_p < 1.0:
        before = probs.cumsum(dim=-1).sub_(probs)
        probs = probs.masked_fill_(before >= params.top_p, 0.0)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return index.gather(-1, probs.div_(race).argmax(dim=-1, keepdim=True)).view(-1)
