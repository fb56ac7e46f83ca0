"""Can a model copy from its context? A diagnostic the claims' diagnoses rest on.

Pass-key retrieval, restating a problem's operands inside a worked solution and following a flag
set turns earlier are all in-context copying ("induction": find where the current text occurred
before and continue it). A model that can copy predicts the second occurrence of a repeated span far
better than the first; one that cannot pays about the same both times. The probe repeats held-out
prose spans (`data.synthetic.heldout_text`, never trained on) back to back and reports the mean
next-token NLL on each copy, and their difference, the copy gain. Deterministic for a checkpoint.
Which gain counts as copying is the claims' call (`evals/claims.toml`, [copy_probe]).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..data.synthetic import heldout_text
from ..devices import model_device
from ..models.qwen3 import Qwen3
from ..tokenizer import Tokenizer

# Span lengths vary so that attending at one fixed distance back does not pass for copying.
SPAN_TOKENS = (24, 30, 36, 42, 48)
N_SPANS = 20


@torch.inference_mode()
def copy_probe(model: Any, tokenizer: Any = None, *, span_tokens: Sequence[int] = SPAN_TOKENS,
               n_spans: int = N_SPANS, device: str = "cpu") -> dict[str, Any]:
    """{"first_nll", "second_nll", "copy_gain", "spans", "span_tokens"} over `n_spans` held-out spans repeated
    back to back. `model` is a checkpoint directory (then the tokenizer is read from it too, and the model
    loaded on `device`) or a callable returning an object with `.logits`, with `tokenizer` given."""
    if isinstance(model, (str, Path)):
        tokenizer = tokenizer or Tokenizer.load(model)
        model = Qwen3.from_pretrained(model, device=device).eval()
    on = model_device(model)  # a loaded model's device (the CPU for a callable without parameters)
    first_sum = second_sum = 0.0
    first_n = second_n = spans = 0
    for doc in heldout_text(n_per_language=n_spans):  # every language, in turn
        n = span_tokens[spans % len(span_tokens)]
        ids = tokenizer.encode(doc["text"])
        if len(ids) < n:
            continue
        x = torch.tensor([ids[:n] + ids[:n]], device=on)
        logp = torch.log_softmax(model(x[:, :-1]).logits.float(), -1)
        nll = -logp.gather(-1, x[:, 1:, None])[0, :, 0]
        first_sum += float(nll[: n - 1].sum())
        second_sum += float(nll[n:].sum())  # the second copy's targets, its first token excluded
        first_n, second_n, spans = first_n + n - 1, second_n + n - 1, spans + 1
        if spans == n_spans:
            break
    if not spans:
        raise ValueError("copy_probe: no held-out document is long enough")
    first, second = first_sum / first_n, second_sum / second_n
    gain = first - second
    return {"first_nll": first, "second_nll": second, "copy_gain": gain, "spans": spans,
            "span_tokens": list(span_tokens)}


__all__ = ["N_SPANS", "SPAN_TOKENS", "copy_probe"]
