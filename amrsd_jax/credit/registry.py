"""The method registry: a config's ``method`` name -> the pieces the trainer and step need.

Every method composes GRPO's sequence advantage ``A [B]`` with a per-token shaping term, so
the update step is the same program for all of them; a :class:`Method` only says

- which scoring passes the trainer must run before the step (``passes``), so nothing else
  is computed;
- which teacher context and teacher weights it uses (SPEC.md);
- how ``Ahat [B, N]`` is formed from ``A`` and the scored arrays of the batch;
- whether it adds SDPO's distillation loss inside the step.

Adding a method: one file with its pure functions and config dataclass, plus one
:func:`register` call below.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Mapping

import jax

from .amr_sd import AMRSDConfig, amr_sd_token_advantages
from .grpo import grpo_token_advantages
from .hapo import HAPOConfig, hapo_token_advantages
from .oar import OARConfig, oar_token_advantages
from .rlsd import RLSDConfig, rlsd_token_advantages

# scoring passes a method can ask for
PASSES = ("old", "teacher", "reference", "entropy", "outcome_gradient", "outcome_perturbation")
TEACHER_CONTEXTS = ("reflection", "reference_solution", "reprompt")
TEACHER_WEIGHTS = ("live", "ema", "frozen")

TokenAdvantageFn = Callable[[jax.Array, Mapping[str, jax.Array], jax.Array, Any, jax.Array],
                            tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Method:
    """How one credit-assignment method plugs into scoring and the update step.

    ``token_advantages(A [B], batch, mask [B, N], config, step) -> (Ahat [B, N], diagnostics)``
    reads the batch keys named by ``passes`` (``teacher_logprobs``, ``entropy``,
    ``importance`` ...).
    """

    name: str
    token_advantages: TokenAdvantageFn
    config_type: type | None = None
    passes: frozenset[str] = frozenset({"old"})
    teacher_context: str | None = None
    teacher_weights: str | None = None
    distillation: bool = False
    description: str = ""

    def __post_init__(self):
        unknown = set(self.passes) - set(PASSES)
        if unknown:
            raise ValueError(f"method {self.name}: unknown scoring passes {sorted(unknown)}")
        if self.teacher_context not in (None, *TEACHER_CONTEXTS):
            raise ValueError(f"method {self.name}: unknown teacher context {self.teacher_context}")
        if self.teacher_weights not in (None, *TEACHER_WEIGHTS):
            raise ValueError(f"method {self.name}: unknown teacher weights {self.teacher_weights}")

    def default_config(self):
        return self.config_type() if self.config_type is not None else None

    @property
    def needs_teacher(self) -> bool:
        return self.teacher_context is not None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name is an error naming the nearest."""
    try:
        return METHODS[name]
    except KeyError:
        near = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown method {name!r}{hint}; available: {sorted(METHODS)}") from None


def _grpo(A, batch, mask, cfg, step):
    return grpo_token_advantages(A, mask), {}


register(Method(
    "grpo", _grpo, description="group-relative advantage, the same for every token"))

register(Method(
    "amr_sd",
    lambda A, b, m, cfg, step: amr_sd_token_advantages(A, b["teacher_logprobs"],
                                                       b["old_logprobs"], m, cfg, step),
    config_type=AMRSDConfig, passes=frozenset({"old", "teacher"}),
    teacher_context="reflection", teacher_weights="live",
    description="self-written hint/critique as teacher context; asymmetric ReLU gate on the "
                "clipped causal information gain, annealed to GRPO"))

register(Method(
    "rlsd",
    lambda A, b, m, cfg, step: rlsd_token_advantages(A, b["teacher_logprobs"],
                                                     b["old_logprobs"], m, cfg),
    config_type=RLSDConfig, passes=frozenset({"old", "teacher"}),
    teacher_context="reference_solution", teacher_weights="frozen",
    description="reference solution as teacher context; clipped sign-aware likelihood ratio"))

register(Method(
    "hapo",
    lambda A, b, m, cfg, step: hapo_token_advantages(A, b["entropy"], m, cfg),
    config_type=HAPOConfig, passes=frozenset({"old", "entropy"}),
    description="entropy-capacity sign-preserving reallocation (our form of the principle)"))

register(Method(
    "oar_g",
    lambda A, b, m, cfg, step: oar_token_advantages(A, b["importance"], m, cfg),
    config_type=OARConfig, passes=frozenset({"old", "outcome_gradient"}),
    description="outcome-grounded reshaping, importance from one gradient w.r.t. embeddings"))

register(Method(
    "oar_p",
    lambda A, b, m, cfg, step: oar_token_advantages(A, b["importance"], m, cfg),
    config_type=OARConfig, passes=frozenset({"old", "outcome_perturbation"}),
    description="outcome-grounded reshaping, importance from pad-substitution forwards"))


def _sdpo_config_type():
    from ..losses.sdpo import SDPOConfig

    return SDPOConfig


register(Method(
    "sdpo", _grpo, config_type=_sdpo_config_type(), passes=frozenset({"old"}),
    teacher_context="reprompt", teacher_weights="ema", distillation=True,
    description="GRPO policy loss plus distillation toward the reprompted EMA teacher"))
