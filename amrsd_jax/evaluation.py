"""Held-out evaluation: pass@1 (greedy), pass@1 (sampled) and unbiased pass@k.

:func:`evaluate` renders each example with ``render`` (default
:func:`~amrsd_jax.data.arithmetic.render_prompt`), applies the chat template, drops (or
truncates) prompts longer than ``max_prompt_tokens``, generates with the jitted sampler and
scores every response against ``example["answer"]`` with the exception-safe
:func:`~amrsd_jax.rewards.math_verifier.score_batch`.

Shapes: ``batch_size`` is the number of *rows* per ``generate`` call. A greedy call holds
``batch_size`` questions; a sampled call holds ``max(1, batch_size // num_samples)``
questions, each repeated ``num_samples`` times (rows are independent given the key). The
last call of each kind is padded up to the same row count by repeating its last prompt
(the padding rows' results are dropped), and all prompts share one width (the longest kept
prompt, bucketed), so a run compiles at most one greedy and one sampled program.

Determinism: sampled call ``b`` uses ``jax.random.fold_in(key, b)``; the same key, examples,
model and settings give the same report.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np

from .data.arithmetic import render_prompt
from .distributed import to_host
from .rewards.math_verifier import extract_answer
from .rollout.prompts import encode_chat
from .rollout.records import verify
from .rollout.sampler import SamplingConfig, generate, resolve_pad_id, resolve_stop_ids

__all__ = ["EvalReport", "EvalSettings", "evaluate", "pass_at_k"]


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k estimate from ``num_correct`` of ``num_samples`` (Chen et al. 2021).

    ``1 - C(n - c, k) / C(n, k)`` computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, which
    never forms the (huge) binomials.
    """
    n, c = int(num_samples), int(num_correct)
    if n < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not 0 <= c <= n:
        raise ValueError(f"num_correct must be in [0, {n}], got {num_correct}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, num_samples={n}], got {k}")
    if n - c < k:  # every size-k subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What :func:`evaluate` runs.

    num_samples: samples per question at ``temperature``/``top_p`` (the ``k`` of pass@k);
      0 evaluates greedy only.
    batch_size: rows per ``generate`` call (see the module docstring).
    max_prompt_tokens / on_long_prompt: prompt budget; ``"skip"`` drops longer prompts,
      ``"truncate"`` keeps their last tokens.
    reward: a registered reward name (or a reward callable).
    success_threshold: a response counts as correct iff its reward is ``>=`` this.
    greedy: also run argmax decoding (``pass@1_greedy``).
    system_prompt: passed to the chat template (``None``: the template's default).
    """

    num_samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    batch_size: int = 64
    max_prompt_tokens: int = 192
    on_long_prompt: str = "skip"
    reward: str | Callable[..., Any] = "math"
    success_threshold: float = 1.0
    greedy: bool = True
    system_prompt: str | None = None

    def __post_init__(self):
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")
        if not self.greedy and self.num_samples == 0:
            raise ValueError("nothing to evaluate: greedy=False and num_samples=0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.on_long_prompt not in ("skip", "truncate"):
            raise ValueError(f"on_long_prompt must be 'skip' or 'truncate', "
                             f"got {self.on_long_prompt!r}")
        if not 0.0 < self.success_threshold <= 1.0:
            raise ValueError(f"success_threshold must be in (0, 1], got {self.success_threshold}")
        # validates max_new_tokens / temperature / top_p with the sampler's own messages
        self.sampling_config(greedy=False)

    def sampling_config(self, *, greedy: bool) -> SamplingConfig:
        if greedy:
            return SamplingConfig(max_new_tokens=self.max_new_tokens, greedy=True)
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p)


@dataclasses.dataclass
class EvalReport:
    """Aggregate ``metrics`` and one record per evaluated question (input order).

    Record keys: ``id``, ``question``, ``gold``, ``prompt_truncated``; with greedy decoding
    ``greedy_response``, ``greedy_reward``, ``greedy_correct``, ``greedy_finished`` (a stop
    token was produced, i.e. not cut at ``max_new_tokens``); with sampling ``num_samples``,
    ``n_correct``, ``sampled_responses``, ``sampled_rewards``, ``sampled_correct``,
    ``sampled_finished``. ``skipped_ids`` lists the ids of prompts dropped for length.
    """

    metrics: dict[str, float]
    records: list[dict]
    skipped_ids: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Decoded:
    responses: list[str]
    lengths: list[int]
    finished: list[bool]


def _decode(tokenizer, tokens: np.ndarray, lengths: np.ndarray, stops: set[int],
            rows: int) -> _Decoded:
    """Text of the first ``rows`` rows; ``lengths`` counts the stop token, which is dropped."""
    out = _Decoded([], [], [])
    for i in range(rows):
        n = int(lengths[i])
        finished = n > 0 and int(tokens[i, n - 1]) in stops
        body = tokens[i, :n - 1] if finished else tokens[i, :n]
        out.responses.append(tokenizer.decode(body.tolist(), skip_special_tokens=True))
        out.lengths.append(n)
        out.finished.append(finished)
    return out


def _batch_rows(batch_size: int, per_question: int, mesh) -> tuple[int, int]:
    """(questions per call, rows per call) for ``per_question`` rows per question."""
    questions = max(1, batch_size // per_question)
    rows = questions * per_question
    if mesh is not None:  # pad rows so the batch splits evenly over the data axes
        d = int(mesh.shape.get("data", 1)) * int(mesh.shape.get("fsdp", 1))
        rows = -(-rows // d) * d
    return questions, rows


def _run(model, ids: np.ndarray, mask: np.ndarray, key: jax.Array, config: SamplingConfig,
         per_question: int, batch_size: int, stops: list[int], pad_id, mesh, tokenizer,
         bar) -> _Decoded:
    """Generate ``per_question`` rows for every prompt, in fixed-size padded calls."""
    num = ids.shape[0]
    q_per_call, rows = _batch_rows(batch_size, per_question, mesh)
    stop_set = set(stops)
    result = _Decoded([], [], [])
    pending = None  # one call in flight while the previous one is decoded

    def finish(item):
        out, real = item
        d = _decode(tokenizer, to_host(out.tokens), to_host(out.lengths), stop_set, real)
        result.responses += d.responses
        result.lengths += d.lengths
        result.finished += d.finished
        bar.update(real // per_question)  # questions, not padded rows

    for b, start in enumerate(range(0, num, q_per_call)):
        idx = np.arange(start, min(start + q_per_call, num))
        idx = np.repeat(idx, per_question)
        real = idx.size
        idx = np.concatenate([idx, np.full(rows - real, idx[-1])])
        out = generate(model, ids[idx], mask[idx], jax.random.fold_in(key, b), config,
                       stop_tokens=stops, pad_id=pad_id, mesh=mesh)
        if pending is not None:
            finish(pending)
        pending = (out, real)
    if pending is not None:
        finish(pending)
    return result


def _mean(xs) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs else float("nan")


def evaluate(model, tokenizer, examples: Sequence[dict], key: jax.Array,
             settings: EvalSettings = EvalSettings(), *,
             render: Callable[[dict], str] = render_prompt, mesh=None,
             progress: bool = False) -> EvalReport:
    """Evaluate ``model`` on ``examples`` (dicts with ``question``/``answer``, optional ``id``).

    Metrics: ``pass@1_greedy`` (if ``settings.greedy``), ``pass@1_sampled`` (mean fraction of
    correct samples) and ``pass@{k}`` (unbiased, ``k = num_samples``) when sampling,
    ``num_questions`` (evaluated), ``skipped_long_prompts``, ``truncated_long_prompts``,
    ``response_length_mean`` (generated tokens incl. the stop token, over every greedy and
    sampled response), ``clipped_frac`` (responses cut at ``max_new_tokens``),
    ``no_answer_frac`` (responses where no final answer can be extracted) and
    ``reward_errors`` (reward calls that raised or returned an invalid value; they count as
    incorrect). Rates are NaN when no question was evaluated.
    """
    from tqdm.auto import tqdm

    examples = list(examples)
    texts = [render(ex) for ex in examples]
    enc = encode_chat(tokenizer, texts, max_tokens=settings.max_prompt_tokens,
                      system_prompt=settings.system_prompt, on_long=settings.on_long_prompt)
    kept = list(enc.kept)
    kept_set = set(kept)
    skipped_ids = [ex.get("id", i) for i, ex in enumerate(examples) if i not in kept_set]
    golds = [examples[i].get("answer") for i in kept]
    num_q, k = len(kept), settings.num_samples

    stops = resolve_stop_ids(tokenizer, model.config)
    pad_id = resolve_pad_id(tokenizer)
    runs = []  # (name, per_question, config, key)
    if settings.greedy:
        runs.append(("greedy", 1, settings.sampling_config(greedy=True), key))
    if k:
        runs.append(("sampled", k, settings.sampling_config(greedy=False), key))
    decoded: dict[str, _Decoded] = {}
    # one pass over the questions per decoding mode (greedy, then sampled); leave=None: the
    # bar stays unless it sits below another one (the training run's)
    with tqdm(total=num_q * len(runs), desc=f"eval {runs[0][0]}", unit="question",
              disable=not progress, dynamic_ncols=True, leave=None) as bar:
        for name, per_q, config, run_key in runs:
            bar.set_description(f"eval {name}")
            if num_q:
                decoded[name] = _run(model, enc.ids, enc.mask, run_key, config, per_q,
                                     settings.batch_size, stops, pad_id, mesh, tokenizer, bar)

    errors = 0
    scored: dict[str, tuple[list[float], list[bool]]] = {}
    for name, per_q, _, _ in runs:
        if not num_q:
            continue
        d = decoded[name]
        # each process verifies its share of the rows; every process gets all verdicts
        verified = verify(d.responses, [g for g in golds for _ in range(per_q)],
                          reward=settings.reward)
        errors += verified.errors
        rewards = [float(r.reward) for r in verified.results]
        scored[name] = (rewards, [r >= settings.success_threshold for r in rewards])

    truncated_rows = set()
    if enc.truncated:  # encode_chat truncates exactly the kept prompts longer than the budget
        lens = tokenizer([texts[i] for i in kept], add_special_tokens=False)["input_ids"]
        truncated_rows = {j for j, row in enumerate(lens) if len(row) > settings.max_prompt_tokens}

    records = []
    for j, i in enumerate(kept):
        ex = examples[i]
        rec: dict[str, Any] = {"id": ex.get("id", i), "question": ex.get("question"),
                               "gold": golds[j], "prompt_truncated": j in truncated_rows}
        if "greedy" in scored:
            rewards, correct = scored["greedy"]
            d = decoded["greedy"]
            rec.update(greedy_response=d.responses[j], greedy_reward=rewards[j],
                       greedy_correct=correct[j], greedy_finished=d.finished[j])
        if "sampled" in scored:
            rewards, correct = scored["sampled"]
            d = decoded["sampled"]
            sl = slice(j * k, (j + 1) * k)
            rec.update(num_samples=k, n_correct=int(sum(correct[sl])),
                       sampled_responses=d.responses[sl], sampled_rewards=rewards[sl],
                       sampled_correct=correct[sl], sampled_finished=d.finished[sl])
        records.append(rec)

    metrics: dict[str, float] = {}
    if settings.greedy:
        metrics["pass@1_greedy"] = _mean(r["greedy_correct"] for r in records)
    if k:
        metrics["pass@1_sampled"] = _mean(r["n_correct"] / k for r in records)
        metrics[f"pass@{k}"] = _mean(pass_at_k(k, r["n_correct"], k) for r in records)
    all_decoded = list(decoded.values())
    responses = [s for d in all_decoded for s in d.responses]
    metrics.update({
        "num_questions": float(num_q),
        "skipped_long_prompts": float(enc.skipped),
        "truncated_long_prompts": float(enc.truncated),
        "response_length_mean": _mean(n for d in all_decoded for n in d.lengths),
        "clipped_frac": _mean(not f for d in all_decoded for f in d.finished),
        "no_answer_frac": _mean(_no_answer(s) for s in responses),
        "reward_errors": float(errors),
    })
    return EvalReport(metrics, records, skipped_ids)


def _no_answer(response: str) -> bool:
    try:
        return extract_answer(response) is None
    except Exception:  # never let a metric crash evaluation
        return True
