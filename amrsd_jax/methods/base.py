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
  ``refresh_teacher(teacher, params, finite)`` the teacher weights after the step (EMA);

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
import numpy as np

from ..batch import UpdateBatch, validate_fields
from ..config import build
from ..credit.grpo import grpo_token_advantages


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


class Method:
    """Base class: GRPO's behaviour. Subclasses override what they change."""

    name: ClassVar[str] = ""
    config_type: ClassVar[type | None] = None
    #: optional :class:`UpdateBatch` fields this method fills (``score``) and reads
    fields: ClassVar[tuple[str, ...]] = ()
    #: run counters this method reports (``TeacherInputs.counts``), logged from step 1
    counters: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    def __init__(self, config=None):
        if self.config_type is not None:
            config = self.config_type() if config is None else config
            if not isinstance(config, self.config_type):
                raise TypeError(f"method {self.name!r} takes a {self.config_type.__name__}, "
                                f"got {type(config).__name__}")
        elif config is not None:
            raise TypeError(f"method {self.name!r} takes no settings, got {config!r}")
        self.config = config

    @classmethod
    def from_run(cls, run) -> "Method":
        """This method as a training run configures it (``method_config.<name>`` and any
        run-level setting it reads)."""
        return cls(run.method_settings())

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
        return None

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
                   normalizer):
        """``(total loss, summed statistics)`` of one micro-batch; the policy loss alone by
        default. ``teacher``: the teacher model (stop-gradient weights) or ``None``."""
        return policy_loss, {}

    def refresh_teacher(self, teacher, params, finite):
        """Teacher weights after an optimizer step (``finite``: the step was applied)."""
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
