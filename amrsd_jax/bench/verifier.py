r"""``python run.py bench verifier``: accuracy, false positives and cost of the math verifiers.

Every path judges the same labelled cases (JSONL: ``gold``, ``prediction``, ``correct`` =
a careful human grader's verdict, ``kind``, ``strict`` = whether the prompt asked for a
marked answer). The shipped files are
``amrsd_jax/rewards/cases/verifier_cases.jsonl`` (written while building the combined
verifier) and ``verifier_holdout.jsonl`` (written before measuring on it; its first
results are recorded in the README).

Paths:

- ``math_verify``: Hugging Face math-verify 0.9.0 alone, ``verify(parse(gold),
  parse(prediction))`` with its default extraction (TRL's call);
- ``math_verify_verl``: the same with the gold wrapped in ``\boxed{}`` first (verl's call);
- ``combined``: ``reward.name=math`` with ``reward.strict`` resolved per case
  (``strict=case["strict"]``), what a trainer uses;
- ``combined_lenient`` / ``combined_strict``: the combined verifier with strict mode off /
  on for every case (for reference: lenient accepts unmarked and truncated outputs, strict
  rejects every unmarked answer).

A false positive (FP) is a wrong answer judged correct: the reward-hacking signal. Cost:
each case is called ``--repeats`` times per path, interleaved (case by case, path by path,
in one process), with parse caches cleared before every call (cold calls: in training a
gold repeats across its group and hits the cache); the per-case median is summarised by
its median over the cases with a numeric gold (the fast path) and over the others. The
math-verify paths run inline without timeouts (their cheapest form); the combined paths
run as in training (default ``timeout_s=1.0``: a symbolic comparison runs in a bounded
worker thread).
"""

from __future__ import annotations

import json
import statistics
import time
from importlib import resources
from pathlib import Path
from typing import Callable

from ..rewards import is_numeric_gold, safe_reward, verify_math
from ..rewards.symbolic import clear_caches, load, math_verify_alone
from .harness import format_table, progress, write_results

CASE_FILES = ("verifier_cases.jsonl", "verifier_holdout.jsonl")


def _mv(gold: str, prediction: str, wrap: bool) -> bool:
    try:
        return math_verify_alone(gold, prediction, wrap_gold=wrap, timeout_s=None)
    except Exception:
        return False


def _ours(fn, case: dict, **kw) -> bool:
    """A reward's verdict; an error (e.g. a gold it cannot read) counts as rejected."""
    return safe_reward(fn, case["prediction"], case["gold"], **kw).correct


PATHS: dict[str, tuple[str, Callable[[dict], bool]]] = {
    "math_verify": ("math-verify alone, TRL call",
                    lambda c: _mv(c["gold"], c["prediction"], False)),
    "math_verify_verl": ("math-verify alone, gold in \\boxed{} (verl)",
                         lambda c: _mv(c["gold"], c["prediction"], True)),
    "combined": ("reward.name=math, strict as the prompt asks",
                 lambda c: _ours(verify_math, c, strict=c["strict"])),
    "combined_lenient": ("combined, strict off", lambda c: _ours(verify_math, c)),
    "combined_strict": ("combined, strict on", lambda c: _ours(verify_math, c, strict=True)),
}


def shipped_case_files() -> list[Path]:
    root = resources.files("amrsd_jax.rewards") / "cases"
    return [Path(str(root / name)) for name in CASE_FILES]


def load_cases(paths) -> list[dict]:
    """Cases of the JSONL files ``paths``, each tagged with its file's stem as ``set``."""
    cases = []
    for path in paths:
        path = Path(path)
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                case = json.loads(line)
                missing = {"gold", "prediction", "correct", "kind"} - set(case)
                if missing:
                    raise ValueError(f"{path}:{n}: case lacks {sorted(missing)}")
                case.setdefault("strict", False)
                case.setdefault("id", f"{path.stem}-{n}")
                case["set"] = path.stem
                cases.append(case)
    return cases


def run(cases: list[dict], paths: list[str], repeats: int) -> dict[str, dict]:
    """Verdicts and per-case median seconds of every path (interleaved, cold caches)."""
    load()  # import math-verify / sympy outside the timing
    out = {p: {"verdicts": [], "seconds": []} for p in paths}
    for i, case in enumerate(cases):
        for p in paths:
            fn = PATHS[p][1]
            times, verdict = [], None
            for _ in range(max(1, repeats)):
                clear_caches()
                t0 = time.perf_counter()
                verdict = bool(fn(case))
                times.append(time.perf_counter() - t0)
            out[p]["verdicts"].append(verdict)
            out[p]["seconds"].append(statistics.median(times))
        if (i + 1) % 100 == 0:
            progress("verifier", f"{i + 1}/{len(cases)} cases")
    return out


def _score(cases, verdicts, index) -> dict:
    n = len(index)
    ok = sum(verdicts[i] == cases[i]["correct"] for i in index)
    fp = sum(verdicts[i] and not cases[i]["correct"] for i in index)
    fn = sum(not verdicts[i] and cases[i]["correct"] for i in index)
    return {"cases": n, "accuracy": ok / n if n else float("nan"), "false_positives": fp,
            "false_negatives": fn}


def _median_us(seconds, index) -> float:
    return statistics.median(seconds[i] for i in index) * 1e6 if index else float("nan")


def _numeric(gold: str) -> bool:
    try:
        return is_numeric_gold(gold)
    except (ValueError, TypeError):
        return False


def summarize(cases: list[dict], measured: dict[str, dict]) -> dict:
    numeric = [_numeric(c["gold"]) for c in cases]
    groups = {"all": list(range(len(cases)))}
    for key in sorted({c["set"] for c in cases}):
        groups[f"set:{key}"] = [i for i, c in enumerate(cases) if c["set"] == key]
    groups["gold:numeric"] = [i for i in range(len(cases)) if numeric[i]]
    groups["gold:symbolic"] = [i for i in range(len(cases)) if not numeric[i]]
    for kind in sorted({c["kind"] for c in cases}):
        groups[f"kind:{kind}"] = [i for i, c in enumerate(cases) if c["kind"] == kind]
    summary = {}
    for p, m in measured.items():
        v, s = m["verdicts"], m["seconds"]
        summary[p] = {
            "description": PATHS[p][0],
            "groups": {g: _score(cases, v, idx) for g, idx in groups.items()},
            "us_per_call_median": {g: _median_us(s, groups[g])
                                   for g in ("all", "gold:numeric", "gold:symbolic")},
            "disagreements": [{"id": cases[i]["id"], "correct": cases[i]["correct"],
                               "verdict": v[i]} for i in range(len(cases))
                              if v[i] != cases[i]["correct"]],
        }
    return summary


def tables(summary: dict) -> str:
    paths = list(summary)
    rows = [["path", "accuracy", "FP", "FN", "us/call numeric gold", "us/call other gold"]]
    for p in paths:
        a = summary[p]["groups"]["all"]
        us = summary[p]["us_per_call_median"]
        rows.append([p, f"{a['accuracy']:.3f}", str(a["false_positives"]),
                     str(a["false_negatives"]), f"{us['gold:numeric']:,.0f}",
                     f"{us['gold:symbolic']:,.0f}"])
    groups = [g for g in summary[paths[0]]["groups"] if g != "all"]
    by_group = [["cases: accuracy / FP", "n", *paths]]
    for g in groups:
        n = summary[paths[0]]["groups"][g]["cases"]
        by_group.append([g, str(n), *(
            f"{summary[p]['groups'][g]['accuracy']:.3f} / {summary[p]['groups'][g]['false_positives']}"
            for p in paths)])
    return format_table(rows) + "\n\n" + format_table(by_group)


def main(args) -> int:
    files = args.cases or shipped_case_files()
    cases = load_cases(files)
    if args.limit:
        cases = cases[: args.limit]
    paths = [p.strip() for p in args.paths.split(",")] if args.paths else list(PATHS)
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise SystemExit(f"unknown path(s) {unknown}; choose from {list(PATHS)}")
    progress("verifier", f"{len(cases)} cases from {', '.join(str(f) for f in files)}; "
             f"paths {', '.join(paths)}; {args.repeats} calls each")
    t0 = time.perf_counter()
    measured = run(cases, paths, args.repeats)
    summary = summarize(cases, measured)
    print(tables(summary))
    write_results({"bench": "verifier", "case_files": [str(f) for f in files],
                   "cases": len(cases), "repeats": args.repeats, "paths": summary,
                   "wall_s": time.perf_counter() - t0}, args.out)
    return 0

