"""Verifiable problem families: generators, step-by-step traces, answer checking.

The S2 reasoning stage (report §3.2: more STEM, code, reasoning and synthetic data) and the
post-training stages (long-CoT cold start, reasoning RL, thinking-mode fusion, §4.1-4.3) all use
problems with a verifiable answer. They share this one module, so the S2 corpus teaches exactly
the problem families and trace style that post-training later renders as chats
(question → ``<think>`` trace ``</think>`` answer) and rewards by exact match.

Families (difficulty in brackets):

* ``add`` — k-digit + k-digit [k]; trace least-significant digit first, one step per digit
  (each step needs only its two digits and the carry before it), then the assembled sum.
* ``mul`` — k-digit × 1-digit [k]; same LSD-first style with carries.
* ``expr`` — a chain of n operations over +, −, × by one digit [n]; each operation is worked
  digit by digit (carries/borrows), then the rewritten expression.
* ``code`` — trace a tiny program (assignments, a ``for`` loop, an ``if``) [number of statements
  grows with difficulty]; the answer is what ``print`` writes.
* ``order`` — a height-ordering puzzle over n named people [n]; the clues form a chain, so the
  answer is unique; the trace normalises each clue and assembles the order.

Every item is a :class:`TaskItem` {family, difficulty, question, trace_steps, answer}.
:func:`verify_trace` re-derives the answer from the trace alone, checking every step's arithmetic
or logic, so a flawed trace is detected; :func:`check_answer` compares a model's answer with the
reference after normalisation. Pure Python, no model, deterministic in (family, seed, difficulty).
"""
from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

from .world import NAME_SYLLABLES

# The share of every family's question space reserved for evaluation (by question hash). Training
# generators never emit a reserved item and evaluation sets contain only reserved items, so the two
# are disjoint for any seeds and sizes (see `is_heldout`).
HELDOUT_PERMILLE = 100  # 10%


@dataclass(frozen=True)
class TaskItem:
    """One problem with its reference reasoning trace and answer."""

    family: str
    difficulty: int
    question: str
    trace_steps: tuple[str, ...]
    answer: str

    @property
    def uid(self) -> str:
        return item_uid(self.family, self.question)

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "difficulty": self.difficulty,
            "question": self.question,
            "trace_steps": list(self.trace_steps),
            "answer": self.answer,
            "uid": self.uid,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TaskItem":
        return cls(d["family"], int(d["difficulty"]), d["question"], tuple(d["trace_steps"]), d["answer"])


def item_uid(family: str, question: str) -> str:
    """A stable 16-hex-digit id of a problem (its family and question, not its trace)."""
    return hashlib.sha1(f"{family}|{question}".encode()).hexdigest()[:16]


def is_heldout(uid: str) -> bool:
    """Whether an id falls in the evaluation partition (``HELDOUT_PERMILLE`` of all ids)."""
    return int(uid[:8], 16) % 1000 < HELDOUT_PERMILLE


def render_trace(item: TaskItem) -> str:
    """The trace as text, one step per line (what goes between ``<think>`` and ``</think>``)."""
    return "\n".join(item.trace_steps)


# ============================================================================ digit-level steps
def _digits_lsd(n: int, width: int) -> list[int]:
    return [(n // 10**i) % 10 for i in range(width)]


def _add_steps(a: int, b: int) -> list[str]:
    width = max(len(str(a)), len(str(b)))
    da, db, carry, steps = _digits_lsd(a, width), _digits_lsd(b, width), 0, []
    for x, y in zip(da, db):
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}, write {s % 10} carry {s // 10}")
        carry = s // 10
    if carry:
        steps.append(f"final carry {carry}, write {carry}")
    return steps


def _mul_steps(a: int, d: int) -> list[str]:
    carry, steps = 0, []
    for x in _digits_lsd(a, len(str(a))):
        s = x * d + carry
        steps.append(f"{x}*{d}+{carry}={s}, write {s % 10} carry {s // 10}")
        carry = s // 10
    if carry:
        steps.append(f"final carry {carry}, write {carry}")
    return steps


def _sub_steps(a: int, b: int) -> list[str]:
    width = len(str(a))
    da, db, borrow, steps = _digits_lsd(a, width), _digits_lsd(b, width), 0, []
    for x, y in zip(da, db):
        r = x - y - borrow
        if r < 0:
            steps.append(f"{x + 10}-{y}-{borrow}={r + 10}, write {r + 10} borrow 1")
            borrow = 1
        else:
            steps.append(f"{x}-{y}-{borrow}={r}, write {r} borrow 0")
            borrow = 0
    return steps


_DIGIT_STEP = re.compile(r"^(\d+)([+*-])(\d+)[+-](\d)=(\d+), write (\d) (carry|borrow) (\d)$")
_FINAL_CARRY = re.compile(r"^final carry (\d), write (\d)$")


def _replay_digit_steps(steps: list[str], a: int, b: int, op: str) -> int:
    """Check each digit step of ``a op b`` against the operands and return the assembled number."""
    written: list[int] = []
    carry = 0
    if op == "*":
        da = _digits_lsd(a, len(str(a)))
        db = [b] * len(da)
    else:
        width = max(len(str(a)), len(str(b)))
        da, db = _digits_lsd(a, width), _digits_lsd(b, width)
    i = 0
    for step in steps:
        m = _FINAL_CARRY.match(step)
        if m:
            if op == "-" or int(m.group(1)) != carry or int(m.group(2)) != carry or i != len(da):
                raise TraceError(f"bad final carry step {step!r}")
            written.append(carry)
            carry = 0
            continue
        m = _DIGIT_STEP.match(step)
        if not m or m.group(2) != op:
            raise TraceError(f"unparseable digit step {step!r}")
        x, y, c_in, s, w, c_out = (int(m.group(k)) for k in (1, 3, 4, 5, 6, 8))
        if i >= len(da) or c_in != carry or y != db[i] or x not in (da[i], da[i] + 10):
            raise TraceError(f"step {step!r} does not follow from the operands or the previous carry")
        if op == "+":
            ok = s == x + y + c_in and w == s % 10 and c_out == s // 10
        elif op == "*":
            ok = s == x * y + c_in and w == s % 10 and c_out == s // 10
        else:  # subtraction: x is the digit, or digit + 10 when it borrows
            borrowed = x == da[i] + 10
            ok = s == x - y - c_in and 0 <= s <= 9 and w == s and c_out == int(borrowed)
        if not ok:
            raise TraceError(f"arithmetic error in step {step!r}")
        written.append(w)
        carry = c_out
        i += 1
    if i != len(da) or carry:
        raise TraceError(f"digit steps for {a}{op}{b} are incomplete")
    return int("".join(str(d) for d in reversed(written)) or "0")


class TraceError(ValueError):
    """A trace step is malformed or wrong."""


# ============================================================================ families
def _rng(family: str, seed: int, difficulty: int) -> random.Random:
    return random.Random(f"task|{family}|{difficulty}|{seed}")


def _k_digit(rng: random.Random, k: int) -> int:
    return rng.randint(10 ** (k - 1) if k > 1 else 0, 10**k - 1)


def gen_add(seed: int, difficulty: int) -> TaskItem:
    rng = _rng("add", seed, difficulty)
    a, b = _k_digit(rng, difficulty), _k_digit(rng, difficulty)
    steps = _add_steps(a, b) + [f"{a}+{b}={a + b}"]
    return TaskItem("add", difficulty, f"{a}+{b}=", tuple(steps), str(a + b))


def gen_mul(seed: int, difficulty: int) -> TaskItem:
    rng = _rng("mul", seed, difficulty)
    a, d = _k_digit(rng, difficulty), rng.randint(2, 9)
    steps = _mul_steps(a, d) + [f"{a}*{d}={a * d}"]
    return TaskItem("mul", difficulty, f"{a}*{d}=", tuple(steps), str(a * d))


def gen_expr(seed: int, difficulty: int) -> TaskItem:
    """A left-to-right chain of `difficulty` operations, parenthesised where precedence needs it."""
    rng = _rng("expr", seed, difficulty)
    value = rng.randint(2, 99)
    text, last_op = str(value), None
    steps: list[str] = []
    for _ in range(difficulty):
        op = rng.choice("+-*")
        if op == "*" and value * 9 >= 10_000:
            op = "-"
        if op == "-" and value < 2:
            op = "+"
        if op == "+":
            y = rng.randint(2, 99)
            new, sub = value + y, _add_steps(value, y)
        elif op == "-":
            y = rng.randint(1, min(value, 99))
            new, sub = value - y, _sub_steps(value, y)
        else:
            y = rng.randint(2, 9)
            new, sub = value * y, _mul_steps(value, y)
        if op == "*" and last_op in ("+", "-"):
            text = f"({text})"
        text = f"{text}{op}{y}"
        steps.append(f"{value}{op}{y}:")
        steps.extend(sub)
        steps.append(f"{value}{op}{y}={new}")
        value, last_op = new, op
    return TaskItem("expr", difficulty, f"{text}=", tuple(steps), str(value))


# ---- code tracing: a tiny straight-line program with one loop and one branch
_VARS = ("a", "b", "c", "x", "y", "n", "s", "t")


def gen_code(seed: int, difficulty: int) -> TaskItem:
    """A program of assignments, a ``for`` loop and an ``if``; the trace records every update."""
    rng = _rng("code", seed, difficulty)
    names = rng.sample(_VARS, 3)
    env: dict[str, int] = {}
    lines: list[str] = []
    steps: list[str] = []

    def assign(var: str, indent: str = "") -> None:
        if not env or rng.random() < 0.3:
            val = rng.randint(0, 9)
            lines.append(f"{indent}{var} = {val}")
            steps.append(f"{var} = {val}")
        else:
            src = rng.choice(sorted(env))
            op = rng.choice("+-")
            k = rng.randint(1, 9)
            if op == "-" and env[src] - k < 0:
                op = "+"
            val = env[src] + k if op == "+" else env[src] - k
            lines.append(f"{indent}{var} = {src} {op} {k}")
            steps.append(f"{var} = {src} {op} {k} = {env[src]} {op} {k} = {val}")
        env[var] = val

    for var in names[:2]:
        assign(var)
    for _ in range(max(0, difficulty - 2)):
        assign(rng.choice(names))
    # A loop that accumulates: acc = acc + <loop var or constant>.
    acc = names[2]
    if acc not in env:
        env[acc] = 0
        lines.append(f"{acc} = 0")
        steps.append(f"{acc} = 0")
    reps = rng.randint(2, 2 + min(difficulty, 3))
    step_src = rng.choice(("i", names[0]))
    lines.append(f"for i in range({reps}):")
    lines.append(f"    {acc} = {acc} + {step_src}")
    for i in range(reps):
        add = i if step_src == "i" else env[names[0]]
        steps.append(f"i = {i}: {acc} = {env[acc]} + {add} = {env[acc] + add}")
        env[acc] += add
    # A branch on a comparison.
    var, k = rng.choice(names), rng.randint(0, 20)
    lines.append(f"if {var} > {k}:")
    tgt, d = rng.choice(names), rng.randint(1, 5)
    lines.append(f"    {tgt} = {tgt} * 2")
    lines.append("else:")
    lines.append(f"    {tgt} = {tgt} + {d}")
    cond = env[var] > k
    steps.append(f"{var} > {k} is {env[var]} > {k} = {cond}")
    if cond:
        steps.append(f"{tgt} = {tgt} * 2 = {env[tgt]} * 2 = {env[tgt] * 2}")
        env[tgt] *= 2
    else:
        steps.append(f"{tgt} = {tgt} + {d} = {env[tgt]} + {d} = {env[tgt] + d}")
        env[tgt] += d
    p, q = rng.sample(names, 2)
    lines.append(f"print({p} + {q})")
    out = env[p] + env[q]
    steps.append(f"print({p} + {q}) = {env[p]} + {env[q]} = {out}")
    program = "\n".join(lines)
    return TaskItem("code", difficulty, f"What does this program print?\n{program}", tuple(steps), str(out))


def program_of(item: TaskItem) -> str:
    """The program text of a ``code`` item (its question without the instruction line)."""
    return item.question.split("\n", 1)[1]


# ---- logic: height ordering with a unique answer
_ORDINALS = ("tallest", "2nd tallest", "3rd tallest", "4th tallest", "5th tallest", "6th tallest", "7th tallest", "8th tallest")


def _person_names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(NAME_SYLLABLES) for _ in range(2)).capitalize()
        if name not in names:
            names.append(name)
    return names


def gen_order(seed: int, difficulty: int) -> TaskItem:
    """`difficulty` people; n-1 shuffled clues about adjacent pairs determine the whole order."""
    rng = _rng("order", seed, difficulty)
    n = max(2, difficulty)
    order = _person_names(rng, n)  # tallest first
    pairs = [(order[i], order[i + 1]) for i in range(n - 1)]
    rng.shuffle(pairs)
    clues, steps = [], []
    for hi, lo in pairs:
        if rng.random() < 0.5:
            clues.append(f"{hi} is taller than {lo}.")
        else:
            clues.append(f"{lo} is shorter than {hi}.")
        steps.append(f"{clues[-1][:-1]}, so {hi}>{lo}")
    pos = rng.randrange(n)
    ask = "shortest" if pos == n - 1 and rng.random() < 0.5 else _ORDINALS[pos]
    steps.append(f"{order[0]} is never shorter, so {order[0]} is the tallest")
    chain = order[0]
    for i in range(1, n):
        chain += f">{order[i]}"
        steps.append(f"{order[i - 1]}>{order[i]}, order {chain}")
    steps.append(f"the {ask} is {order[pos]}")
    question = " ".join(clues) + f" Who is the {ask}?"
    return TaskItem("order", difficulty, question, tuple(steps), order[pos])


@dataclass(frozen=True)
class Family:
    name: str
    generate: Callable[[int, int], TaskItem]
    # Difficulty range used for training; evaluation may go one beyond to test generalisation.
    min_difficulty: int
    max_difficulty: int
    kind: str  # "math" | "code" | "logic"


FAMILIES: dict[str, Family] = {
    # k 2..6: a worked problem at k = 6 (~150 tokens by `approx_count_tokens`) fits the 256-token S2 rows.
    "add": Family("add", gen_add, 2, 6, "math"),
    "mul": Family("mul", gen_mul, 2, 6, "math"),
    "expr": Family("expr", gen_expr, 2, 4, "math"),
    "code": Family("code", gen_code, 1, 4, "code"),
    "order": Family("order", gen_order, 3, 6, "logic"),
}


def generate(family: str, seed: int, difficulty: int) -> TaskItem:
    """The item for (family, seed, difficulty); the same arguments always give the same item."""
    try:
        fam = FAMILIES[family]
    except KeyError:
        raise KeyError(f"unknown task family {family!r}; known: {', '.join(FAMILIES)}") from None
    return fam.generate(seed, difficulty)


def sample_item(rng: random.Random, *, heldout: bool, families: tuple[str, ...] | None = None, max_tries: int = 10_000) -> TaskItem:
    """A random item from the training (``heldout=False``) or evaluation partition."""
    names = families or tuple(FAMILIES)
    for _ in range(max_tries):
        fam = FAMILIES[rng.choice(names)]
        item = fam.generate(rng.getrandbits(48), rng.randint(fam.min_difficulty, fam.max_difficulty))
        if is_heldout(item.uid) == heldout:
            return item
    raise RuntimeError(f"no {'held-out' if heldout else 'training'} item found in {max_tries} tries")


# ============================================================================ checking
def normalize_answer(text: str) -> str:
    """Canonical form: stripped, no trailing full stop; integers without signs/zeros/separators;
    names lower-cased."""
    t = text.strip().rstrip(".").strip()
    compact = t.replace(",", "").replace(" ", "").replace("_", "")
    if re.fullmatch(r"[+-]?\d+", compact):
        return _canonical_integer(compact)
    return t.lower()


def _canonical_integer(numeral: str) -> str:
    """`str(int(numeral))` for a sign and decimal digits of any script, without the conversion to an
    int: that one raises past 4,300 digits (Python's guard against its quadratic cost), and a model's
    answer can be that long."""
    sign = "-" if numeral[0] == "-" else ""
    digits = numeral.lstrip("+-")
    if not digits.isascii():
        digits = "".join(str(unicodedata.decimal(d)) for d in digits)
    magnitude = digits.lstrip("0") or "0"
    return magnitude if magnitude == "0" else sign + magnitude


def check_answer(reference: TaskItem | str, prediction: str) -> bool:
    """Exact match after :func:`normalize_answer`."""
    ref = reference.answer if isinstance(reference, TaskItem) else reference
    return normalize_answer(ref) == normalize_answer(prediction)


_ASSEMBLE = re.compile(r"^(\d+)([+*-])(\d+)=(\d+)$")


def _verify_arith(steps: list[str], op_expected: str | None) -> int:
    """Replay blocks of digit steps closed by ``a op b = r`` lines; return the last result."""
    block: list[str] = []
    result = None
    for step in steps:
        if step.endswith(":"):
            block = []
            continue
        m = _ASSEMBLE.match(step)
        if m:
            a, op, b, r = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            if op_expected and op != op_expected:
                raise TraceError(f"unexpected operation in {step!r}")
            if result is not None and a != result:
                raise TraceError(f"{step!r} does not start from the previous result {result}")
            if _replay_digit_steps(block, a, b, op) != r:
                raise TraceError(f"digit steps do not assemble to {r} in {step!r}")
            result, block = r, []
        else:
            block.append(step)
    if result is None or block:
        raise TraceError("trace has no closing result line")
    return result


_EQ_CHAIN = re.compile(r"= (\d+) ([+*-]) (\d+) = (\d+)$")


def _verify_code(item: TaskItem) -> str:
    out = None
    for step in item.trace_steps:
        m = _EQ_CHAIN.search(step)
        if m:
            a, op, b, r = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            if {"+": a + b, "-": a - b, "*": a * b}[op] != r:
                raise TraceError(f"arithmetic error in step {step!r}")
            out = r
        elif " is " in step:
            m2 = re.search(r"is (\d+) > (\d+) = (True|False)$", step)
            if not m2 or (int(m2.group(1)) > int(m2.group(2))) != (m2.group(3) == "True"):
                raise TraceError(f"wrong comparison in step {step!r}")
    if not item.trace_steps[-1].startswith("print(") or out is None:
        raise TraceError("code trace must end with the print step")
    return str(out)


def _verify_order(item: TaskItem) -> str:
    pairs = set()
    for step in item.trace_steps:
        m = re.search(r", so (\w+)>(\w+)$", step)
        if m:
            pairs.add((m.group(1), m.group(2)))
    # The clue steps must restate the question's clues faithfully.
    for clue in re.findall(r"(\w+) is (taller|shorter) than (\w+)\.", item.question):
        pair = (clue[0], clue[2]) if clue[1] == "taller" else (clue[2], clue[0])
        if pair not in pairs:
            raise TraceError(f"clue {clue} is not restated in the trace")
    chains = [s.split("order ", 1)[1] for s in item.trace_steps if ", order " in s]
    if not chains:
        raise TraceError("order trace has no chain")
    order = chains[-1].split(">")
    for hi, lo in zip(order, order[1:]):
        if (hi, lo) not in pairs:
            raise TraceError(f"chain step {hi}>{lo} is not a clue")
    m = re.search(r"Who is the (.+)\?$", item.question)
    ask = m.group(1) if m else ""
    pos = len(order) - 1 if ask == "shortest" else _ORDINALS.index(ask)
    final = item.trace_steps[-1]
    if final != f"the {ask} is {order[pos]}":
        raise TraceError(f"final step {final!r} does not read the chain")
    return order[pos]


def answer_from_trace(item: TaskItem) -> str:
    """Re-derive the answer from the trace alone, checking every step (raises TraceError)."""
    steps = list(item.trace_steps)
    if item.family in ("add", "mul"):
        op = "+" if item.family == "add" else "*"
        result = _verify_arith(steps, op)
        if steps[-1].split("=")[0] + "=" != item.question:
            raise TraceError("the result line does not restate the question")
        return str(result)
    if item.family == "expr":
        return str(_verify_arith(steps, None))
    if item.family == "code":
        return _verify_code(item)
    if item.family == "order":
        return _verify_order(item)
    raise KeyError(f"unknown task family {item.family!r}")


def verify_trace(item: TaskItem) -> bool:
    """True when the trace is step-by-step correct and ends in the item's answer."""
    try:
        return check_answer(item, answer_from_trace(item))
    except TraceError:
        return False
