"""What a method is to the loop: a small object with hooks, registered by name.

A :class:`Method` is built from its settings (``method_config.<name>`` of the run) and is
asked, in this order, by the training loop and the update step:

host side, once per iteration (``ctx``: a :class:`MethodContext` the loop hands over)
  ``teacher_inputs(ctx, rollouts) -> TeacherInputs | None``
      the privileged context its teacher sees (reflections, a reference solution, a
      reprompt), already tokenised;
  ``score(ctx, rollouts, teacher, batch) -> (batch, metrics)``
      the extra scoring passes it needs, written into the optional fields of the
      :class:`~amrsd_jax.batch.UpdateBatch` it declared in ``fields``;

traced, inside the one jitted update step
  ``token_advantages(A [B], batch, mask [B, N], step) -> (Ahat [B, N], diagnostics)``;
  ``extra_loss(...)`` an additive loss term besides the policy gradient (SDPO);
  ``refresh_teacher(teacher, params, finite, step)`` the teacher weights after the step
      (an EMA, or a frozen teacher's periodic copy of the policy; ``TeacherPolicy``);

and at build time
  ``init_teacher(params)`` its own teacher weight copy (``None``: the live policy);
  ``extra_programs(build)`` jitted programs of its own (OAR's importance pass), built once
  with the others by :func:`amrsd_jax.programs.build_programs`.

Defaults make plain GRPO: every hook a method does not override is a no-op.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..batch import UpdateBatch, validate_fields
from ..config import build
from ..credit.grpo import grpo_token_advantages
from ..rollout.prompts import encode_teacher_prompts


TEACHER_WEIGHTS = ("live", "ema", "frozen")


@dataclasses.dataclass(frozen=True)
class TeacherPolicy:
    """Which weights a method's teacher scores with (docs/methods.md, "Teacher weights").

    weights: ``live`` -- the policy itself (no copy); ``ema`` -- an exponential moving
      average ``teacher <- (1 - ema_rate) teacher + ema_rate policy`` after every applied
      step; ``frozen`` -- the initial policy, copied again from the policy after every
      ``refresh_every``-th step (0: never).
    """

    weights: str = "live"
    ema_rate: float = 0.05
    refresh_every: int = 0

    def __post_init__(self):
        if self.weights not in TEACHER_WEIGHTS:
            raise ValueError(f"teacher.weights must be one of {TEACHER_WEIGHTS}, got "
                             f"{self.weights!r}")
        if not 0.0 < self.ema_rate <= 1.0:
            raise ValueError(f"teacher.ema_rate must be in (0, 1], got {self.ema_rate}")
        if self.refresh_every < 0:
            raise ValueError(f"teacher.refresh_every must be >= 0, got {self.refresh_every}")

    def overridden(self, **values) -> "TeacherPolicy":
        """This policy with the given non-``None`` values replaced."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})


@dataclasses.dataclass(frozen=True)
class TeacherInputs:
    """Tokenised teacher prompts for some rows of the step.

    ids, mask: ``[R, Pt]`` left-padded teacher prompts, one per entry of ``padded_rows``.
    valid: ``[R]`` whether that row has a teacher context (``False``: it reuses its student
      prompt and carries no teacher signal).
    rows: ``[n]`` the step's rows that have a teacher prompt (``n <= R``).
    padded_rows: ``[R]`` ``rows`` padded to a compiled bucket size (repeats of ``rows[0]``).
    reflections: ``[B]`` the text written for each row (``None``: not reflected on).
    metrics / counts: host metrics of this phase, and increments of the run's counters.
    """

    ids: np.ndarray
    mask: np.ndarray
    valid: np.ndarray
    rows: np.ndarray
    padded_rows: np.ndarray
    reflections: list | None = None
    metrics: dict = dataclasses.field(default_factory=dict)
    counts: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class MethodContext:
    """What the loop hands a method for one iteration.

    config: the run's ``TrainConfig`` (read-only; methods use ``reflection``, ``rollout``,
      ``model.system_prompt``).
    programs: the run's :class:`~amrsd_jax.programs.Programs` (``sample``,
      ``continue_``, ``score``, ``extra``).
    params / teacher_params: live policy weights and the method's own teacher copy.
    step: the optimizer step the coming update will be (``TrainState.step``).
    teacher_key / score_key: PRNG keys of the teacher-input and scoring phases.
    bucket_rows: ``rows -> padded rows`` (a compiled bucket size that shards evenly).
    static_shapes: row subsets and prompts are padded to their largest shapes
      (``TrainConfig.static_shapes``): :meth:`min_width` gives the width to pad to.
    """

    config: Any
    tokenizer: Any
    programs: Any
    params: Any
    teacher_params: Any
    step: int
    teacher_key: jax.Array
    score_key: jax.Array
    bucket_rows: Callable[[np.ndarray], np.ndarray]
    static_shapes: bool = False

    def min_width(self, max_tokens: int) -> int:
        """The least width of a batch of prompts of at most ``max_tokens`` tokens: all of it
        with static shapes (the programs see one shape), else 0 (the longest prompt's
        bucket)."""
        return max_tokens if self.static_shapes else 0

    @property
    def teacher_weights(self):
        """The weights the method's teacher scores with: its copy, or the live policy."""
        return self.params if self.teacher_params is None else self.teacher_params


def every_row_teacher_inputs(ctx: MethodContext, rollouts, messages: list, *, cut: int,
                             rows: np.ndarray) -> TeacherInputs:
    """Teacher inputs with one prompt per row of the step (``messages[i] is None``: row
    ``i`` has no teacher context and reuses its student prompt); ``cut`` counts the rows
    whose privileged part was already cut to fit, ``rows`` the rows the method's own
    scoring pass scores (none when the teacher scores inside the update step)."""
    run = ctx.config
    ids, mask, valid, truncated = encode_teacher_prompts(
        ctx.tokenizer, messages, rollouts.prompt_ids, rollouts.prompt_mask,
        max_tokens=run.reflection.max_teacher_prompt_tokens,
        system_prompt=run.model.system_prompt)
    return TeacherInputs(ids, mask, valid, rows, rows,
                         metrics={"teacher_valid_frac": float(valid.mean())},
                         counts={"truncated_teacher_prompts": truncated + cut})


class Method:
    """Base class: GRPO's behaviour. Subclasses override what they change."""

    name: ClassVar[str] = ""
    config_type: ClassVar[type | None] = None
    #: optional :class:`UpdateBatch` fields this method fills (``score``) and reads
    fields: ClassVar[tuple[str, ...]] = ()
    #: run counters this method reports (``TeacherInputs.counts``), logged from step 1
    counters: ClassVar[tuple[str, ...]] = ()
    #: the method's teacher weights by default (its authors' recipe); ``None``: no teacher
    teacher: ClassVar[TeacherPolicy | None] = None
    description: ClassVar[str] = ""

    def __init__(self, config=None, *, teacher: TeacherPolicy | None = None):
        if self.config_type is not None:
            config = self.config_type() if config is None else config
            if not isinstance(config, self.config_type):
                raise TypeError(f"method {self.name!r} takes a {self.config_type.__name__}, "
                                f"got {type(config).__name__}")
        elif config is not None:
            raise TypeError(f"method {self.name!r} takes no settings, got {config!r}")
        self.config = config
        if teacher is not None and type(self).teacher is None:
            raise ValueError(f"method {self.name!r} has no teacher; teacher settings do not "
                             "apply to it")
        self.teacher_policy = teacher if teacher is not None else type(self).teacher

    @classmethod
    def from_run(cls, run) -> "Method":
        """This method as a training run configures it: ``method_config.<name>`` and the
        ``teacher`` section (values left ``None`` keep the method's recipe)."""
        overrides = dataclasses.asdict(run.teacher)
        if cls.teacher is None:
            if any(v is not None for v in overrides.values()):
                raise ValueError(f"method {cls.name!r} has no teacher; remove the teacher.* "
                                 "settings")
            return cls(run.method_settings())
        return cls(run.method_settings(), teacher=cls.teacher.overridden(**overrides))

    @classmethod
    def check_run(cls, run) -> None:
        """Reject a run configuration this method cannot train (before any model loads)."""

    # hashable by (class, attributes): the update step is a static function of its method
    def _key(self):
        return type(self), tuple(sorted(vars(self).items()))

    def __eq__(self, other):
        return isinstance(other, Method) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        attrs = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()))
        return f"{type(self).__name__}({attrs})"

    # ---------------------------------------------------------------- build time
    def init_teacher(self, params):
        """This method's teacher weights (a copy), or ``None`` to use the live policy."""
        policy = self.teacher_policy
        if policy is None or policy.weights == "live":
            return None
        return jax.tree.map(jnp.copy, params)

    def extra_programs(self, build) -> dict[str, Callable]:
        """Jitted programs of this method's own; ``build`` is the
        :class:`~amrsd_jax.programs.ProgramBuilder` (graphdef, mesh, run config)."""
        return {}

    def sampling_passes(self, run) -> dict:
        """Sampling calls of its own per step, for the dry run: ``name -> (prompt tokens,
        SamplingConfig)``."""
        return {}

    def scoring_passes(self, run) -> dict[str, int]:
        """``programs.score`` calls of its own per step, for the dry run: ``name -> prompt
        tokens`` (each scores every row's response after that prompt)."""
        return {}

    def uses_rollout_cache(self, run_config) -> bool:
        """Whether ``teacher_inputs`` continues the rollouts' KV cache."""
        return False

    # ---------------------------------------------------------------- host side
    def teacher_inputs(self, ctx: MethodContext, rollouts) -> TeacherInputs | None:
        return None

    def score(self, ctx: MethodContext, rollouts, teacher: TeacherInputs | None,
              batch: UpdateBatch) -> tuple[UpdateBatch, dict]:
        return batch, {}

    # ---------------------------------------------------------------- traced
    def token_advantages(self, advantages, batch: UpdateBatch, mask, step):
        """``Ahat [B, N]`` and diagnostics from ``A [B]``; GRPO: ``A`` on every token."""
        return grpo_token_advantages(advantages, mask), {}

    def extra_loss_normalizer(self, batch: UpdateBatch, aggregation: str):
        """A global normaliser of :meth:`extra_loss`, computed on the whole batch."""
        return None

    def extra_loss(self, model, teacher, micro: UpdateBatch, policy_loss, aggregation: str,
                   normalizer, *, temperature: float = 1.0):
        """``(total loss, summed statistics)`` of one micro-batch; the policy loss alone by
        default. ``teacher``: the teacher model (stop-gradient weights) or ``None``;
        ``temperature``: the sampling temperature every log-prob is taken at."""
        return policy_loss, {}

    def refresh_teacher(self, teacher, params, finite, step):
        """Teacher weights after optimizer step ``step`` (0-based; ``finite``: the step was
        applied), traced inside the update step: the EMA, or a frozen teacher's periodic
        copy of the policy."""
        policy = self.teacher_policy
        if teacher is None or policy is None:
            return teacher
        if policy.weights == "ema":
            updated = optax.incremental_update(params, teacher, policy.ema_rate)
            return jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, teacher)
        if policy.weights == "frozen" and policy.refresh_every:
            due = (step + 1) % policy.refresh_every == 0
            return jax.tree.map(lambda new, old: jnp.where(due, new, old), params, teacher)
        return teacher


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method=<cls.name>``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is already registered")
    validate_fields(cls.fields)
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The registered method class ``name``; an unknown name is an error naming the nearest."""
    try:
        return METHODS[name]
    except KeyError:
        near = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown method {name!r}{hint}; available: {sorted(METHODS)}") from None


def method_settings(name: str, section: dict | None):
    """Method ``name``'s settings dataclass from a ``method_config.<name>`` mapping (or
    ``None`` for a method without settings); unknown keys are errors naming the nearest."""
    cls = get_method(name)
    section = {} if section is None else section
    if not isinstance(section, dict):
        raise ValueError(f"method_config.{name} must be a mapping of {name}'s settings")
    if cls.config_type is None:
        if section:
            raise ValueError(f"method {name!r} takes no settings, got method_config.{name} = "
                             f"{section}")
        return None
    return build(cls.config_type, section, prefix=f"method_config.{name}.")


def make_method(name: str, settings=None) -> Method:
    """An instance of method ``name`` with ``settings`` (its config dataclass or ``None``)."""
    return get_method(name)(settings)
