"""Built-in offline task: deterministic arithmetic word problems in five difficulty levels.

Levels (every answer is a non-negative integer; division is always exact):

0. one-digit two-number addition: ``"What is 3 + 5?"`` and the word forms of level 1 (the
   bundled 135M model's starting point: about 10-30% pass@1 at temperature 1);
1. two-digit two-number addition: ``"What is 23 + 58?"`` and word forms (``"Tom has 23 apples and buys
   58 more. How many apples does Tom have now?"``);
2. two-number addition or subtraction, up to three digits, mostly word problems;
3. one multiplication, or two steps of addition/subtraction;
4. three steps, e.g. buy, give away, then share equally (exact division).

Each example is a dict::

    {"id": "arith-L2-1f0c...",        # stable, derived from the level and the question text
     "question": "Ana had 412 stickers and gave 37 to Omar. How many ...?",
     "answer": "375",                 # canonical integer string
     "solution": "Stickers left: 412 - 37 = 375.\\n#### 375",
     "level": 2,
     "expression": "412 - 37"}        # the computation, numbers in the order of the question

``solution`` has one line per arithmetic step (``"<a> <op> <b> = <c>"``, ops ``+ - × ÷``)
followed by ``#### <answer>``. ``expression`` is a plain arithmetic expression (``+ - * /``
and parentheses) that evaluates to the answer.

Determinism and splits: candidates are drawn from one ``random.Random`` stream seeded from
``sha256(seed, levels)``; a candidate belongs to the held-out split iff
``sha256(question)`` falls below ``test_fraction``, else to the train split. The two splits
are therefore disjoint by construction (same question text -> same split), identical across
runs, processes and machines (no use of Python's salted ``hash()``), and item ``i`` does not
depend on ``size`` (a bigger task extends a smaller one). Duplicate questions within a split
are dropped.

The instruction appended when a question is rendered as a prompt is :data:`PROMPT_SUFFIX`
(configurable per task or per call of :func:`render_prompt`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "LEVELS",
    "PROMPT_SUFFIX",
    "TEST_FRACTION",
    "ArithmeticTask",
    "render_prompt",
    "split_of",
]

PROMPT_SUFFIX = "Give the final answer after 'Answer:'."
"""Default instruction appended to a question when it is rendered as a prompt."""

TEST_FRACTION = 0.1
"""Default fraction of the question space assigned to the held-out ("test") split."""

LEVELS = (0, 1, 2, 3, 4)

_SPLIT_SALT = b"amrsd-arith-split|"
_SPLITS = ("train", "test")

_NAMES = ("Tom", "Ana", "Priya", "Omar", "Lena", "Kenji", "Maria", "Sam", "Zoe", "Ravi",
          "Noah", "Mei", "Lucas", "Amara", "Ivan", "Sofia")
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "books", "shells", "stamps",
          "cards", "oranges", "balloons", "crayons")


def render_prompt(question: str | dict, suffix: str | None = PROMPT_SUFFIX) -> str:
    """``question`` (or ``example["question"]``) followed by ``suffix`` on a new line.

    ``suffix=None`` or ``""`` returns the question unchanged.
    """
    text = question["question"] if isinstance(question, dict) else question
    return f"{text}\n{suffix}" if suffix else text


# ----------------------------------------------------------------------------- problems


_SYMBOL_TO_PY = {"+": "+", "-": "-", "×": "*", "÷": "/"}


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        if b > a:
            raise AssertionError(f"negative intermediate {a} - {b}")
        return a - b
    if op == "×":
        return a * b
    if op == "÷":
        if b == 0 or a % b:
            raise AssertionError(f"inexact division {a} ÷ {b}")
        return a // b
    raise ValueError(op)


@dataclass(frozen=True)
class _Problem:
    question: str
    expression: str  # "*" and "/" for multiplication and (exact) division
    steps: tuple[tuple[str, int, str, int], ...]  # (lead text or "", a, op, b)

    def solution_and_answer(self) -> tuple[str, int]:
        lines, value = [], None
        for lead, a, op, b in self.steps:
            value = _apply(a, op, b)
            eq = f"{a} {op} {b} = {value}."
            lines.append(f"{lead}: {eq}" if lead else eq)
        assert value is not None
        lines.append(f"#### {value}")
        return "\n".join(lines), value


def _ask(expr: str) -> str:
    return f"What is {expr}?"


def _py(expr: str) -> str:
    for sym, py in _SYMBOL_TO_PY.items():
        expr = expr.replace(f" {sym} ", f" {py} ")
    return expr


def _numeric(expr: str, steps) -> _Problem:
    return _Problem(_ask(expr), _py(expr), tuple(("", a, op, b) for a, op, b in steps))


def _level0(rng: random.Random) -> _Problem:
    return _addition(rng, 1, 9)


def _level1(rng: random.Random) -> _Problem:
    return _addition(rng, 10, 99)


def _addition(rng: random.Random, lo: int, hi: int) -> _Problem:
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    n, m = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    expr = f"{a} + {b}"
    form = rng.randrange(5)
    if form == 0:
        return _numeric(expr, [(a, "+", b)])
    if form == 1:
        q = (f"{n} has {a} {item} and buys {b} more. "
             f"How many {item} does {n} have now?")
        lead = f"{item.capitalize()} after buying more"
    elif form == 2:
        q = (f"{n} has {a} {item}. {m} gives {n} {b} more {item}. "
             f"How many {item} does {n} have now?")
        lead = f"{item.capitalize()} after the gift"
    elif form == 3:
        q = (f"There are {a} {item} in a box and {b} {item} in a bag. "
             f"How many {item} are there in total?")
        lead = f"Total {item}"
    else:
        q = (f"{n} collected {a} {item} on Monday and {b} {item} on Tuesday. "
             f"How many {item} did {n} collect altogether?")
        lead = f"{item.capitalize()} collected"
    return _Problem(q, expr, ((lead, a, "+", b),))


def _level2(rng: random.Random) -> _Problem:
    n, m = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    form = rng.randrange(6)
    if form < 3:  # addition
        a, b = rng.randint(10, 500), rng.randint(10, 500)
        expr = f"{a} + {b}"
        if form == 0:
            return _numeric(expr, [(a, "+", b)])
        if form == 1:
            q = (f"A shop had {a} {item} and received a delivery of {b} more. "
                 f"How many {item} does the shop have now?")
            lead = f"{item.capitalize()} in the shop"
        else:
            q = (f"{n} has {a} {item} and {m} has {b} {item}. "
                 f"How many {item} do they have together?")
            lead = f"{item.capitalize()} together"
        return _Problem(q, expr, ((lead, a, "+", b),))
    a = rng.randint(20, 999)
    b = rng.randint(1, a - 1)
    expr = f"{a} - {b}"
    if form == 3:
        return _numeric(expr, [(a, "-", b)])
    if form == 4:
        q = (f"{n} had {a} {item} and gave {b} to {m}. "
             f"How many {item} does {n} have left?")
        lead = f"{item.capitalize()} left"
    else:
        q = (f"A shop had {a} {item} and sold {b} of them. "
             f"How many {item} are left in the shop?")
        lead = f"{item.capitalize()} left in the shop"
    return _Problem(q, expr, ((lead, a, "-", b),))


def _level3(rng: random.Random) -> _Problem:
    n, m = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    form = rng.randrange(6)
    if form < 3:  # one multiplication
        a, b = rng.randint(2, 12), rng.randint(2, 25)
        if form == 0:
            return _numeric(f"{a} × {b}", [(a, "×", b)])
        if form == 1:
            q = (f"{n} has {a} boxes with {b} {item} in each box. "
                 f"How many {item} does {n} have in total?")
        else:
            q = (f"{n} buys {a} packs of {item}. Each pack has {b} {item}. "
                 f"How many {item} does {n} buy?")
        return _Problem(q, f"{a} * {b}", ((f"Total {item}", a, "×", b),))
    if form in (3, 4):  # add, then subtract
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        c = rng.randint(1, a + b - 1)
        steps = [(a, "+", b), (a + b, "-", c)]
        expr = f"{a} + {b} - {c}"
        if form == 3:
            return _numeric(expr, steps)
        q = (f"{n} has {a} {item}, buys {b} more, and then gives {c} to {m}. "
             f"How many {item} does {n} have now?")
        leads = (f"{item.capitalize()} after buying more",
                 f"{item.capitalize()} after giving some to {m}")
    else:  # subtract, then add
        a = rng.randint(20, 99)
        b, c = rng.randint(1, a - 1), rng.randint(10, 99)
        steps = [(a, "-", b), (a - b, "+", c)]
        expr = f"{a} - {b} + {c}"
        if rng.random() < 0.5:
            return _numeric(expr, steps)
        q = (f"{n} had {a} {item}, lost {b} of them, and then found {c} more. "
             f"How many {item} does {n} have now?")
        leads = (f"{item.capitalize()} after losing some",
                 f"{item.capitalize()} after finding more")
    return _Problem(q, expr, tuple((lead, *s) for lead, s in zip(leads, steps)))


def _level4(rng: random.Random) -> _Problem:
    n, m = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    form = rng.randrange(5)
    if form < 2:  # buy, give away, share
        k, share = rng.randint(2, 9), rng.randint(2, 20)
        rest = k * share
        c = rng.randint(1, 40)
        total = rest + c
        margin = max(1, total // 5)  # keep both addends away from 0
        b = rng.randint(margin, total - margin)
        a = total - b
        steps = [(a, "+", b), (total, "-", c), (rest, "÷", k)]
        if form == 0:
            return _numeric(f"({a} + {b} - {c}) ÷ {k}", steps)
        q = (f"{n} has {a} {item}. {n} buys {b} more and then gives {c} to {m}. "
             f"{n} shares the remaining {item} equally among {k} friends. "
             f"How many {item} does each friend get?")
        leads = (f"{item.capitalize()} after buying more",
                 f"{item.capitalize()} after giving some to {m}",
                 f"{item.capitalize()} for each friend")
        expr = f"({a} + {b} - {c}) / {k}"
    else:  # multiply, give away / spend, share
        a, b = rng.randint(2, 9), rng.randint(3, 25)
        product = a * b
        k = rng.randint(2, min(9, product - 1))
        share = rng.randint(1, (product - 1) // k)
        rest = k * share
        c = product - rest
        steps = [(a, "×", b), (product, "-", c), (rest, "÷", k)]
        if form == 2:
            return _numeric(f"({a} × {b} - {c}) ÷ {k}", steps)
        if form == 3:
            q = (f"{n} buys {a} packs of {item} with {b} {item} in each pack. "
                 f"{n} gives {c} {item} to {m} and shares the rest equally among {k} "
                 f"friends. How many {item} does each friend get?")
            leads = (f"{item.capitalize()} bought",
                     f"{item.capitalize()} after giving some to {m}",
                     f"{item.capitalize()} for each friend")
        else:
            q = (f"{n} earns {a} dollars a day for {b} days, spends {c} dollars on a gift, "
                 f"and splits the rest equally into {k} envelopes. "
                 f"How many dollars go into each envelope?")
            leads = ("Dollars earned", "Dollars after the gift", "Dollars per envelope")
        expr = f"({a} * {b} - {c}) / {k}"
    return _Problem(q, expr, tuple((lead, *s) for lead, s in zip(leads, steps)))


_GENERATORS: dict[int, Callable[[random.Random], _Problem]] = {
    0: _level0, 1: _level1, 2: _level2, 3: _level3, 4: _level4}


# ----------------------------------------------------------------------------- task


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def split_of(question: str, test_fraction: float = TEST_FRACTION) -> str:
    """The split (``"train"`` or ``"test"``) a question text belongs to."""
    u = int.from_bytes(_digest(_SPLIT_SALT + question.encode("utf-8"))[:8], "big") / 2.0**64
    return "test" if u < test_fraction else "train"


def _normalise_levels(level: int | Sequence[int]) -> tuple[int, ...]:
    levels = (level,) if isinstance(level, int) else tuple(level)
    if not levels:
        raise ValueError("level: need at least one level")
    for lv in levels:
        if isinstance(lv, bool) or not isinstance(lv, int) or lv not in _GENERATORS:
            raise ValueError(f"level must be one of {LEVELS} (or a sequence of them), "
                             f"got {level!r}")
    return tuple(sorted(set(levels)))


class GeneratedTask(Sequence):
    """A generated task's examples as a read-only sequence of fresh dicts, and its prompts.
    Subclasses fill ``_examples`` and set ``prompt_suffix``."""

    _examples: list[dict]
    prompt_suffix: str | None

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [dict(e) for e in self._examples[i]]
        return dict(self._examples[i])

    def __iter__(self):
        return (dict(e) for e in self._examples)

    def render(self, example: dict | str) -> str:
        """The prompt text for an example (question + this task's ``prompt_suffix``)."""
        return render_prompt(example, self.prompt_suffix)


class ArithmeticTask(GeneratedTask):
    """A deterministic list of arithmetic problems.

    Args:
        level: 0-4, or a sequence of levels (each example then draws its level uniformly).
        seed: selects the candidate stream; any int (or str) is fine.
        split: ``"train"`` or ``"test"`` (held out, disjoint from train for the same
            ``test_fraction``, whatever the seeds).
        size: number of examples.
        test_fraction: share of the question space reserved for ``"test"``; train and test
            tasks must use the same value for their disjointness guarantee.
        prompt_suffix: instruction appended by :meth:`render` / :meth:`prompt`
            (``None`` for none).
    """

    def __init__(self, level: int | Sequence[int] = 1, seed: int | str = 0,
                 split: str = "train", size: int = 1000, *,
                 test_fraction: float = TEST_FRACTION,
                 prompt_suffix: str | None = PROMPT_SUFFIX):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be a non-negative int, got {size!r}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        self.levels = _normalise_levels(level)
        self.level = level
        self.seed = seed
        self.split = split
        self.test_fraction = float(test_fraction)
        self.prompt_suffix = prompt_suffix
        self._examples = self._generate(size)

    def _generate(self, size: int) -> list[dict[str, Any]]:
        key = f"amrsd-arith|seed={self.seed!r}|levels={','.join(map(str, self.levels))}"
        rng = random.Random(int.from_bytes(_digest(key.encode("utf-8"))[:16], "big"))
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        max_attempts = 200 * size + 10_000
        for _ in range(max_attempts):
            if len(out) >= size:
                break
            lv = self.levels[0] if len(self.levels) == 1 else rng.choice(self.levels)
            problem = _GENERATORS[lv](rng)
            q = problem.question
            if q in seen or split_of(q, self.test_fraction) != self.split:
                continue
            seen.add(q)
            solution, answer = problem.solution_and_answer()
            out.append({
                "id": f"arith-L{lv}-{_digest(q.encode('utf-8')).hex()[:16]}",
                "question": q,
                "answer": str(answer),
                "solution": solution,
                "level": lv,
                "expression": problem.expression,
            })
        if len(out) < size:
            raise RuntimeError(f"could only generate {len(out)} distinct {self.split} problems "
                               f"of level(s) {self.levels} (asked for {size})")
        return out

    def prompt(self, i: int) -> str:
        """The prompt text of example ``i``."""
        return self.render(self._examples[i])

    def __repr__(self) -> str:
        return (f"ArithmeticTask(level={self.level!r}, seed={self.seed!r}, "
                f"split={self.split!r}, size={len(self)})")
