"""Held-out reasoning accuracy of a pretrained model (the S2 claim).

Each held-out problem of the S2 families (`data.synthetic.s2_eval_items`: add, mul, expr, code,
order; never generated for training) is given as the pretraining format's prompt,
`Problem: {question}\\nSolution:\\n`, and the model writes its worked solution greedily until it
prints `Answer: X`; X must equal the reference after normalisation. Greedy decoding, so the
number is deterministic for a checkpoint.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import plotting
from ..data import tasks
from ..data.synthetic import s2_eval_items
from ..devices import model_device
from ..generate import GREEDY, generate
from ..models.qwen3 import Qwen3
from ..tokenizer import Tokenizer

ANSWER = re.compile(r"Answer:\s*([^\n]*)")


def problem_prompt(item: tasks.TaskItem) -> str:
    return f"Problem: {item.question}\nSolution:\n"


def extract_answer(completion: str) -> str | None:
    m = ANSWER.search(completion)
    return m.group(1).strip() if m else None


@torch.inference_mode()
def solution_step_accuracy(model: Qwen3, tok: Tokenizer, items: Sequence[tasks.TaskItem]) -> dict[str, float]:
    """Teacher-forced view of the same problems: given the question and the reference solution so far,
    how often is the model's most likely next token the reference one (over the solution and answer
    tokens), and the mean NLL of the reference solution. A graded measure that still moves when
    exact-match accuracy of whole generated solutions sits at its floor."""
    model.eval()
    device = model_device(model)
    hits = total = 0
    nll = 0.0
    for item in items:
        prompt = tok.encode(problem_prompt(item))
        solution = tok.encode("\n".join(item.trace_steps) + f"\nAnswer: {item.answer}") + [tok.endoftext_id]
        ids = torch.tensor([prompt + solution], device=device)
        logits = model(ids[:, :-1]).logits[0, len(prompt) - 1:]
        target = ids[0, len(prompt):]
        hits += int((logits.argmax(-1) == target).sum())
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        total += len(target)
    return {"step_token_accuracy": hits / max(total, 1), "solution_nll": nll / max(total, 1)}


def reasoning_accuracy(model_dir: str | Path, *, n_per_cell: int, max_new_tokens: int, batch_size: int = 32,
                       seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Accuracy on held-out S2 problems, overall and by family and difficulty (greedy generation),
    plus the teacher-forced step accuracy and solution NLL on the same items; the model on `device`."""
    model = Qwen3.from_pretrained(model_dir, device=device)
    tok = Tokenizer.load(model_dir)
    items = s2_eval_items(seed=seed, n_per_cell=n_per_cell)
    # Problems end with their answer line and then the document separator.
    stop = [tok.endoftext_id]
    correct: list[bool] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        outs = generate(model, [tok.encode(problem_prompt(it)) for it in chunk], GREEDY,
                        max_new_tokens=max_new_tokens, stop_token_ids=stop, tokenizer=tok)
        for item, out in zip(chunk, outs):
            answer = extract_answer(tok.decode(out.token_ids))
            correct.append(answer is not None and tasks.check_answer(item, answer))
    by_family: dict[str, list[bool]] = defaultdict(list)
    by_difficulty: dict[str, list[bool]] = defaultdict(list)
    for item, ok in zip(items, correct):
        by_family[item.family].append(ok)
        by_difficulty[f"{item.family}/{item.difficulty}"].append(ok)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {
        **solution_step_accuracy(model, tok, items),
        "accuracy": mean(correct),
        "n": len(correct),
        "by_family": {k: mean(v) for k, v in sorted(by_family.items())},
        "by_difficulty": {k: mean(v) for k, v in sorted(by_difficulty.items())},
        "settings": {"decoding": "greedy", "n_per_cell": n_per_cell, "max_new_tokens": max_new_tokens,
                     "seed": seed, "prompt": "Problem: {question}\\nSolution:\\n"},
    }


def plot_reasoning_by_family(results: dict[str, dict], out: Path) -> str:
    """Held-out accuracy by task family, one bar per evaluated model (`reasoning_accuracy` results)."""
    families = sorted({f for r in results.values() for f in r["by_family"]})
    width = 0.8 / max(len(results), 1)
    with plotting.figure(out, figsize=(7, 3.5)) as (fig, axes):
        ax = axes[0, 0]
        for i, (stage, r) in enumerate(results.items()):
            ax.bar([j + i * width for j in range(len(families))], [r["by_family"].get(f, 0) for f in families],
                   width=width, label=f"{stage} ({r['accuracy']:.0%})")
        ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(families))], families)
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1)
        ax.set_title("Reasoning after S1, S2 and the S1 control (greedy)")
        ax.legend()
    return str(out)
