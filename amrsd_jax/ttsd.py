"""Test-time self-distillation (TTSD, docs/methods.md, "TTSD").

For one hard question with a binary verifier::

    for round r = 0 .. max_rounds - 1:
        sample k attempts (key fold_in(key, r))
        if any attempt is correct: stop              (attempts-to-first-success recorded)
        else: one SDPO update step on this question, every attempt distilled toward the
              teacher = the same model re-prompted with that attempt's verifier feedback
              (not after the last round: that step could not change the outcome)

With every attempt failed the GRPO advantages are all 0, so the step is driven by SDPO's
distillation loss (``distill_weight = 1`` by default) toward the feedback-conditioned
teacher. The pieces are the library's own: the jitted sampler, the verifier
(:func:`amrsd_jax.rollout.records.verify`), the SDPO reprompt (``sdpo_teacher_prompt``
with no peer solution), and the programs of :func:`amrsd_jax.programs.build_programs` for
the :class:`~amrsd_jax.methods.sdpo.SDPO` method (old-policy scorer, the one update step,
the same :class:`~amrsd_jax.batch.UpdateBatch` the trainer builds, and the update phase
the trainer runs). The teacher weights follow SDPO (EMA of the policy, rate 0.05, refreshed
inside the step after every finite step).

``update=False`` in :class:`TTSDSettings` is the best-of-k baseline: the same rounds with
the same sampling keys, no updates (round 0 of both is therefore the same sample).

Attempts are counted in sampling order: the first success at index ``j`` of round ``r``
is attempt ``r * k + j + 1``; a question without a success is censored at
``max_rounds * k`` attempts.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .batch import UpdateBatch, abstract_batch, make_batch
from .distributed import to_host
from .losses.policy import PolicyLossConfig
from .losses.sdpo import SDPOConfig
from .methods.base import TeacherPolicy
from .methods.sdpo import SDPO
from .models import load_model
from .programs import build_programs
from .reflection.contexts import sdpo_teacher_prompt
from .rollout.prompts import encode_chat, encode_teacher_prompts
from .rollout.records import decode_responses, verify
from .rollout.sampler import SamplingConfig, resolve_pad_id, resolve_stop_ids
from .sharding import shard_model, single_device_mesh
from .train.phases import update_phase
from .update import OptimizerConfig, StepConfig, make_optimizer

FEEDBACK_MODES = ("own", "round")
TEACHER_WEIGHTS = ("ema", "frozen")


@dataclasses.dataclass(frozen=True)
class TTSDSettings:
    """Budget, sampling, verifier and the SDPO step of one TTSD run.

    Attributes:
      k: attempts per round (the SDPO group).
      max_rounds: rounds before giving up (budget ``k * max_rounds`` attempts).
      update: ``False`` = best-of-k baseline (same rounds and keys, no SDPO steps).
      learning_rate / max_grad_norm / weight_decay: AdamW of the step (fresh per question).
      steps_per_round: SDPO steps on each failed round's batch (default 1).
      ema_rate / teacher_weights: SDPO's EMA teacher (``frozen`` = the initial model).
      feedback: ``own`` (SDPO: each attempt's teacher sees that attempt's feedback) or
        ``round`` (each teacher sees the distinct feedback of all ``k`` attempts).
      reward: a registered reward name or a callable ``(response, gold, **kw) ->
        VerifierResult | float``; success is ``reward >= success_threshold`` (no error).
      min_prompt_width / min_teacher_prompt_width: prompts are left-padded to at least
        these widths (then to the sampler's length buckets), so questions of different
        lengths share one compiled sampler and update step (a new shape costs a compile of
        tens of seconds on CPU; the padding is masked out).
      score_old: ``old_logprobs`` from the scorer pass (as the trainer does); ``None``
        (auto) uses the sampler's own log-probs when they are the policy's (no top-p/top-k
        filter: both are of ``softmax(logits / temperature)``, equal up to float error) and
        saves that forward pass.
      ``question`` (of :meth:`TTSD.run`) is the full user message: no suffix is added here.
    """

    k: int = 8
    max_rounds: int = 6
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    update: bool = True
    learning_rate: float = 1e-5
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    steps_per_round: int = 1
    ema_rate: float = 0.05
    teacher_weights: str = "ema"
    feedback: str = "own"
    sdpo: SDPOConfig = SDPOConfig()
    policy: PolicyLossConfig = PolicyLossConfig()
    reward: str | Callable[..., Any] = "math"
    success_threshold: float = 1.0
    reward_timeout_s: float = 1.0
    max_prompt_tokens: int = 256
    max_teacher_prompt_tokens: int = 384
    system_prompt: str | None = None
    score_old: bool | None = None
    min_prompt_width: int = 96
    min_teacher_prompt_width: int = 128

    def __post_init__(self):
        if self.k < 2:
            raise ValueError(f"k={self.k}: an SDPO group needs at least 2 attempts")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")
        if self.steps_per_round < 1:
            raise ValueError(f"steps_per_round must be >= 1, got {self.steps_per_round}")
        if self.feedback not in FEEDBACK_MODES:
            raise ValueError(f"feedback must be one of {FEEDBACK_MODES}, got {self.feedback!r}")
        if self.teacher_weights not in TEACHER_WEIGHTS:
            raise ValueError(f"teacher_weights must be one of {TEACHER_WEIGHTS}, got "
                             f"{self.teacher_weights!r}")
        if not 0.0 < self.ema_rate <= 1.0:
            raise ValueError(f"ema_rate must be in (0, 1], got {self.ema_rate}")
        if self.policy.kl_beta > 0:
            raise ValueError("policy.kl_beta > 0 (a reference-model KL) is not supported by "
                             "TTSD; the SDPO step here has no reference pass")

    @property
    def uses_scorer_for_old(self) -> bool:
        if self.score_old is not None:
            return self.score_old
        return not (self.top_p == 1.0 and self.top_k == 0)

    @property
    def budget(self) -> int:
        return self.k * self.max_rounds

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["sdpo"] = dataclasses.asdict(self.sdpo)
        out["policy"] = dataclasses.asdict(self.policy)
        if callable(self.reward):
            out["reward"] = getattr(self.reward, "__name__", repr(self.reward))
        return out


@dataclasses.dataclass
class TTSDRound:
    """One round: ``k`` attempts, their verifier outcome and the update (if any)."""

    round: int
    rewards: list[float]
    correct: list[bool]
    responses: list[str]
    feedback: list[str | None]  # what each attempt's teacher was shown (None: no signal)
    updated: bool = False  # at least one finite SDPO step after this round
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    time_s: float = 0.0


@dataclasses.dataclass
class TTSDRecord:
    """The outcome of one question."""

    question: str
    answer: str
    method: str  # "ttsd" | "best_of_k"
    k: int
    max_rounds: int
    rounds: list[TTSDRound]
    success_round: int | None  # 0-based round of the first success
    attempts_to_success: int | None  # 1-based index of the first successful attempt
    updates: int  # SDPO steps taken (skipped non-finite steps excluded)
    time_s: float = 0.0

    @property
    def solved(self) -> bool:
        return self.success_round is not None

    @property
    def attempts_used(self) -> int:
        return self.attempts_to_success if self.solved else self.k * len(self.rounds)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(solved=self.solved, attempts_used=self.attempts_used,
                   budget=self.k * self.max_rounds)
        return out


def round_feedback(results, mode: str) -> list[str | None]:
    """The feedback text each failed attempt's teacher sees (``None``: no signal).

    ``own``: the attempt's own verifier feedback (SDPO). ``round``: the distinct feedback
    texts of every attempt of the round, one per line, for each attempt.
    """
    own = [(r.feedback or None) for r in results]
    if mode == "own":
        return own
    distinct = list(dict.fromkeys(f for f in own if f))
    joined = "\n".join(f"- {f}" for f in distinct) or None
    return [joined] * len(own)


class TTSD:
    """The compiled pieces of TTSD for one model (built once, reused across questions).

    ``run(question, answer, key)`` resets the policy, optimizer and teacher to the weights
    the model had when this object was built, runs the loop and (by default) restores them.
    """

    def __init__(self, model, tokenizer, settings: TTSDSettings = TTSDSettings(), *,
                 mesh=None):
        self.settings = s = settings
        self.mesh = mesh if mesh is not None else single_device_mesh()
        self.model = shard_model(model, self.mesh)
        self.tokenizer = tokenizer
        self.initial_params = jax.tree.map(jnp.copy, nnx.state(self.model, nnx.Param))
        # SDPO as the trainer runs it: EMA teacher (or frozen), distillation in the step
        self.method = SDPO(s.sdpo, teacher=TeacherPolicy(s.teacher_weights, ema_rate=s.ema_rate))
        optimizer = make_optimizer(OptimizerConfig(
            learning_rate=s.learning_rate, max_grad_norm=s.max_grad_norm,
            weight_decay=s.weight_decay))
        self.programs = build_programs(
            self.model, self.mesh, step=StepConfig(method=self.method, group_size=s.k,
                                                   policy=s.policy, temperature=s.temperature),
            optimizer=optimizer, batch=abstract_batch(self.method.fields, rows=s.k, prompt=1,
                                                      response=1),
            pad_id=resolve_pad_id(tokenizer),
            stop_ids=resolve_stop_ids(tokenizer, self.model.config))
        self.state = self.teacher_params = None

    @property
    def stop_ids(self) -> list[int]:
        return self.programs.stop_ids

    # ------------------------------------------------------------------ weights
    def reset(self) -> None:
        """Policy (and teacher) back to the initial weights, fresh optimizer state."""
        nnx.update(self.model, jax.tree.map(jnp.copy, self.initial_params))
        if not self.settings.update:
            self.state = None
            return
        self.teacher_params = self.method.init_teacher(self.initial_params)
        self.state = self.programs.init_state()

    def restore(self) -> None:
        """Put the initial weights back into the model (the adapted state is dropped)."""
        nnx.update(self.model, jax.tree.map(jnp.copy, self.initial_params))
        self.state = self.teacher_params = None

    # ------------------------------------------------------------------ pieces
    def encode(self, messages: list[str], max_tokens: int, min_width: int = 0):
        """Chat-encoded, left-padded ``(ids, mask)`` at least ``min_width`` wide."""
        enc = encode_chat(self.tokenizer, messages, max_tokens=max_tokens,
                          system_prompt=self.settings.system_prompt, on_long="truncate",
                          min_width=min_width)
        return enc.ids, enc.mask

    def sample(self, prompt_ids, prompt_mask, key):
        s = self.settings
        return self.programs.sample(nnx.state(self.model, nnx.Param), prompt_ids, prompt_mask,
                                    key, SamplingConfig(max_new_tokens=s.max_new_tokens,
                                                        temperature=s.temperature,
                                                        top_p=s.top_p, top_k=s.top_k))

    def teacher_tokens(self, messages: list[str | None], fallback_ids, fallback_mask):
        """Left-padded teacher prompts; rows without a context reuse the student prompt
        and are marked invalid (:func:`amrsd_jax.rollout.prompts.encode_teacher_prompts`)."""
        ids, mask, valid, _ = encode_teacher_prompts(
            self.tokenizer, messages, fallback_ids, fallback_mask,
            max_tokens=self.settings.max_teacher_prompt_tokens,
            system_prompt=self.settings.system_prompt,
            min_width=self.settings.min_teacher_prompt_width)
        return ids, mask, valid

    def sdpo_step(self, batch: UpdateBatch) -> tuple[dict[str, float], int]:
        """``steps_per_round`` SDPO steps on one round's batch; returns the last step's
        metrics and the number of finite (applied) steps."""
        metrics: dict[str, float] = {}
        applied = 0
        for _ in range(self.settings.steps_per_round):
            result = update_phase(self.programs, self.state, self.teacher_params, batch)
            self.state, self.teacher_params = result.state, result.teacher_params
            nnx.update(self.model, self.state.params)
            metrics, applied = result.metrics, applied + int(not result.skipped)
        return metrics, applied

    def response_logprob(self, question: str, response: str) -> float:
        """Diagnostic: summed log-prob of ``response`` (plus the end-of-turn token) as the
        assistant's reply to ``question`` under the model's current weights."""
        p_ids, p_mask = self.encode([question], self.settings.max_prompt_tokens,
                                    self.settings.min_prompt_width)
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        ids = list(ids) + ([eos] if eos is not None else self.stop_ids[:1])
        resp = np.array([ids], np.int32)
        lp, _ = self.programs.score(nnx.state(self.model, nnx.Param), p_ids, p_mask, resp,
                                    np.ones_like(resp))
        return float(to_host(lp).sum())

    # ------------------------------------------------------------------ the loop
    def run(self, question: str, answer: str, key: jax.Array, *, restore: bool = True,
            reward: str | Callable[..., Any] | None = None,
            on_round: Callable[[TTSDRound], None] | None = None) -> TTSDRecord:
        """TTSD (or best-of-k with ``settings.update=False``) on one question.

        ``question`` is the user message (e.g. the arithmetic question plus its
        "Give the final answer after 'Answer:'." suffix); ``answer`` the gold answer.
        ``key`` seeds the sampling of round ``r`` as ``fold_in(key, r)``. ``reward``
        overrides ``settings.reward`` for this question; ``on_round`` is called after each
        round (after its SDPO step, so the model holds the updated weights).
        """
        s = self.settings
        t_start = time.perf_counter()
        self.reset()
        q_ids, q_mask = self.encode([question], s.max_prompt_tokens, s.min_prompt_width)
        prompt_ids = np.repeat(q_ids, s.k, axis=0)
        prompt_mask = np.repeat(q_mask, s.k, axis=0)
        golds = [str(answer)] * s.k
        rounds: list[TTSDRound] = []
        success_round = attempts = None
        updates = 0
        try:
            for r in range(s.max_rounds):
                t0 = time.perf_counter()
                out = self.sample(prompt_ids, prompt_mask, jax.random.fold_in(key, r))
                texts = decode_responses(self.tokenizer, out.tokens, out.lengths)
                verified = verify(texts, golds, reward=s.reward if reward is None else reward,
                                  success_threshold=s.success_threshold,
                                  timeout_s=s.reward_timeout_s)
                correct = [bool(c) for c in verified.correct]
                rec = TTSDRound(r, [float(x) for x in verified.rewards], correct, texts,
                                [None] * s.k)
                rounds.append(rec)
                if any(correct):
                    success_round, attempts = r, r * s.k + correct.index(True) + 1
                elif s.update and r + 1 < s.max_rounds:  # no step after the last round
                    rec.feedback = round_feedback(verified.results, s.feedback)
                    messages = [sdpo_teacher_prompt(question, None, f) for f in rec.feedback]
                    t_ids, t_mask, t_valid = self.teacher_tokens(messages, prompt_ids,
                                                                 prompt_mask)
                    rec.feedback = [f if v else None for f, v in zip(rec.feedback, t_valid)]
                    if t_valid.any():
                        lp_old = out.logprobs
                        if s.uses_scorer_for_old:
                            lp_old, _ = self.programs.score(self.state.params, prompt_ids,
                                                            prompt_mask, out.tokens, out.mask)
                        batch = make_batch(
                            prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                            response_ids=out.tokens, response_mask=out.mask,
                            rewards=verified.rewards, sampler_logprobs=out.logprobs,
                            old_logprobs=lp_old, teacher_prompt_ids=t_ids,
                            teacher_prompt_mask=t_mask, teacher_valid=t_valid)
                        rec.metrics, applied = self.sdpo_step(batch)
                        rec.metrics["teacher_valid_frac"] = float(t_valid.mean())
                        rec.updated = applied > 0
                        updates += applied
                rec.time_s = time.perf_counter() - t0
                if on_round is not None:
                    on_round(rec)
                if success_round is not None:
                    break
        finally:
            if restore:
                self.restore()
        return TTSDRecord(question, str(answer), "ttsd" if s.update else "best_of_k", s.k,
                          s.max_rounds, rounds, success_round, attempts, updates,
                          time.perf_counter() - t_start)


def run_ttsd(model, tokenizer, question: str, answer: str,
             settings: TTSDSettings = TTSDSettings(), key: jax.Array | int = 0, *,
             restore: bool = True, mesh=None,
             on_round: Callable[[TTSDRound], None] | None = None) -> TTSDRecord:
    """TTSD on one question (see the module docstring); ``settings.update=False`` gives
    the best-of-k baseline. With ``restore=False`` the model keeps the adapted weights.

    Builds (and compiles) a :class:`TTSD`; to run many questions on one model, build a
    :class:`TTSD` once and call its ``run``.
    """
    if isinstance(key, int):
        key = jax.random.key(key)
    return TTSD(model, tokenizer, settings, mesh=mesh).run(question, answer, key,
                                                           restore=restore, on_round=on_round)


def summarize(records: list[TTSDRecord] | list[dict]) -> dict[str, Any]:
    """Solved fraction within the budget and attempts-to-first-success statistics.

    Unsolved questions are right-censored at the budget: ``median_attempts`` is the median
    with censored questions counted at the budget; it is exact when more than half of the
    questions are solved, otherwise only a lower bound and reported as the string
    ``">=<value> (censored)"``. ``mean_attempts_censored`` is the mean with censored
    questions at the budget (a lower bound of the true mean), ``mean_attempts_solved`` the
    mean over the solved ones.
    """
    rows = [r.to_dict() if isinstance(r, TTSDRecord) else r for r in records]
    if not rows:
        return {"questions": 0}
    budget = rows[0]["budget"]
    solved = [r for r in rows if r["solved"]]
    used = [r["attempts_to_success"] if r["solved"] else budget for r in rows]
    n = len(rows)
    median: float | str = float(np.median(used))
    if 2 * len(solved) <= n:
        median = f">={median:g} (censored)"
    return {
        "questions": n,
        "budget": budget,
        "solved": len(solved),
        "solved_frac": len(solved) / n,
        "median_attempts": median,
        "mean_attempts_censored": float(np.mean(used)),
        "mean_attempts_solved": float(np.mean([r["attempts_to_success"] for r in solved]))
        if solved else None,
        "updates_mean": float(np.mean([r["updates"] for r in rows])),
        "time_s_mean": float(np.mean([r["time_s"] for r in rows])),
    }


# ----------------------------------------------------------------------------- CLI


def settings_from_args(args, **overrides) -> TTSDSettings:
    """:class:`TTSDSettings` from the ``run.py ttsd`` / ``bench ttsd`` arguments."""
    kw = dict(k=args.k, max_rounds=args.max_rounds, max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, learning_rate=args.lr,
              steps_per_round=args.steps_per_round, feedback=args.feedback,
              teacher_weights=args.teacher_weights)
    kw.update(overrides)
    return TTSDSettings(**kw)


def main(args) -> int:
    """``python run.py ttsd --question ... --answer ...``: TTSD (or, with ``--best-of-k``,
    plain best-of-k sampling) on one question; prints each round, optionally writes JSON."""
    settings = settings_from_args(args, update=not args.best_of_k)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    question = args.question.strip()
    if args.prompt_suffix:
        question = f"{question}\n{args.prompt_suffix}"
    method = "best-of-k" if args.best_of_k else "TTSD"
    print(f"{method}: k={settings.k} attempts per round, at most {settings.max_rounds} rounds "
          f"({settings.budget} attempts)" + ("" if args.best_of_k else
                                             f", lr={settings.learning_rate:g}"))

    def show(rec: TTSDRound) -> None:
        n_ok = sum(rec.correct)
        line = f"round {rec.round}: {n_ok}/{len(rec.correct)} correct ({rec.time_s:.1f}s)"
        if rec.metrics:
            line += (f"; SDPO step: distill_loss={rec.metrics.get('distill_loss_mean', 0):.4f} "
                     f"grad_norm={rec.metrics.get('grad_norm', 0):.3f}"
                     + (" (skipped: non-finite)" if not rec.updated else ""))
        print(line, flush=True)
        if args.verbose:
            for text, ok, fb in zip(rec.responses, rec.correct, rec.feedback):
                print(f"  [{'ok' if ok else 'x '}] {text.strip()[:160]!r}"
                      + (f"  <- feedback: {fb!r}" if fb else ""))
        elif n_ok:
            print(f"  first success: {rec.responses[rec.correct.index(True)].strip()[:200]!r}")

    record = run_ttsd(model, tokenizer, question, args.answer, settings,
                      jax.random.key(args.seed), on_round=show)
    if record.solved:
        print(f"solved at attempt {record.attempts_to_success} (round {record.success_round}, "
              f"{record.updates} SDPO steps) in {record.time_s:.0f}s")
    else:
        print(f"not solved within {settings.budget} attempts ({record.updates} SDPO steps) "
              f"in {record.time_s:.0f}s")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"settings": settings.to_dict(), "model": str(args.model),
                                   "seed": args.seed, "record": record.to_dict()}, indent=2))
        print(f"wrote {out}")
    return 0
