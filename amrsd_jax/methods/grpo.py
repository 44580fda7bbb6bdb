"""GRPO: the group-relative sequence advantage on every token (the base behaviour).

Recipe: TRL's and verl's GRPO (group-normalised rewards, clipped ratio loss); this method
adds nothing to :class:`~amrsd_jax.methods.base.Method`'s defaults.
"""

from __future__ import annotations

from .base import Method, register


@register
class GRPO(Method):
    name = "grpo"
    description = "group-relative advantage, the same for every token"
