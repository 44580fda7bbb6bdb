"""Reading a compiled program's HLO text: its collectives and what they move.

``compiled.as_text()`` of a partitioned program (CPU or TPU compiler) lists one device's
instructions; a collective's result shape is what that device receives. Used by the dry
run (collective bytes per program), ``bench scale`` and the tests that assert where
collectives may appear (none per decoded token in the rollout layout).

- :func:`collectives`: every collective instruction of the program, with its computation
  and result bytes;
- :func:`decode_loop_collectives`: the collectives executed per iteration of the sampler's
  token loop (the ``while`` loop traced under ``jax.named_scope(TOKEN_LOOP)``), nested
  loops multiplied by their trip count where the compiler states it. XLA:CPU does; the TPU
  compiler's text does not, so there a layer scan inside the token loop counts once (a
  lower bound, exact when it is 0).
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|collective-permute|"
                        r"reduce-scatter)(-start)?\(")
SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([0-9,]*)\]")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
# computations an instruction runs: while body/condition, fusion / call / reduce bodies
_CALLED = re.compile(r"\b(?:body|condition|calls|to_apply)=%?([\w.\-]+)")
_CALLED_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_WHILE = re.compile(r"\bwhile\(.*?\bbody=%?([\w.\-]+)")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# the name scope the sampler traces its token loop under
TOKEN_LOOP = "token_loop"


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str  # all-gather, all-reduce, ...
    computation: str
    bytes: int  # of its result on one device


def _result_bytes(line: str, op_match: re.Match) -> int:
    lhs = line[:op_match.start()].split("=", 1)[-1]  # the result type(s) before the op
    return sum(DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in SHAPE.findall(lhs))


def computations(text: str) -> dict[str, list[str]]:
    """``{computation name: its instruction lines}`` of an HLO module's text."""
    out: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        header = _HEADER.match(line) if not line.startswith(" ") else None
        if header:
            name = header.group(1)
            out[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            out[name].append(line)
    return out


def collectives(text: str) -> list[Collective]:
    """Every collective instruction of the program (``-start`` ops of async pairs once)."""
    out = []
    for name, lines in computations(text).items():
        for line in lines:
            m = COLLECTIVE.search(line)
            if m:
                out.append(Collective(m.group(1), name, _result_bytes(line, m)))
    return out


def _trip_count(line: str) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
    return int(m.group(1)) if m else None


def _per_iteration(comps: dict[str, list[str]], root: str, seen: frozenset) -> tuple[int, int]:
    """(collectives, bytes) one run of computation ``root`` executes, nested loops with a
    known trip count multiplied by it."""
    if root in seen or root not in comps:
        return 0, 0
    seen = seen | {root}
    count = nbytes = 0
    for line in comps[root]:
        m = COLLECTIVE.search(line)
        if m:
            count, nbytes = count + 1, nbytes + _result_bytes(line, m)
        loop = _WHILE.search(line)
        called = _CALLED.findall(line)
        for group in _CALLED_LISTS.findall(line):
            called += [n.strip().lstrip("%") for n in group.split(",") if n.strip()]
        for name in called:
            c, b = _per_iteration(comps, name, seen)
            times = (_trip_count(line) or 1) if loop and name == loop.group(1) else 1
            count, nbytes = count + times * c, nbytes + times * b
    return count, nbytes


def decode_loop_collectives(text: str, scope: str = TOKEN_LOOP) -> dict[str, int]:
    """Collectives per iteration of the ``while`` loops traced under
    ``jax.named_scope(scope)`` (the sampler's token loop), body and condition, summed over
    such loops: ``{"loops", "collectives", "bytes"}``."""
    comps = computations(text)
    loops = count = nbytes = 0
    for lines in comps.values():
        for line in lines:
            loop, op_name = _WHILE.search(line), _OP_NAME.search(line)
            if not loop or not op_name or not op_name.group(1).endswith(f"{scope}/while"):
                continue
            loops += 1
            cond = re.search(r"\bcondition=%?([\w.\-]+)", line)
            for name in [loop.group(1)] + ([cond.group(1)] if cond else []):
                c, b = _per_iteration(comps, name, frozenset())
                count, nbytes = count + c, nbytes + b
    return {"loops": loops, "collectives": count, "bytes": nbytes}


def summary(text: str) -> dict[str, int]:
    """Collectives of a whole program (each instruction once, loops not multiplied):
    ``{"collectives", "collective_bytes"}``."""
    found = collectives(text)
    return {"collectives": len(found), "collective_bytes": sum(c.bytes for c in found)}


__all__ = ["TOKEN_LOOP", "Collective", "collectives", "computations",
           "decode_loop_collectives", "summary"]
