"""HAPO: entropy-capacity, sign-preserving reallocation of the sequence advantage.

Math: :func:`amrsd_jax.credit.hapo.hapo_token_advantages` (our form of the principle; no
reference code was published): by default a reallocation that keeps each sequence's
credit mass, the original specification's additive form as ``form=bonus``; the Four-Quadrant
decomposition is
logged. Needs the old policy's per-token entropy, which the old-policy scoring pass
returns alongside its log-probs (no extra forward).
"""

from __future__ import annotations

from ..credit.hapo import HAPOConfig, hapo_token_advantages
from .base import Method, register


@register
class HAPO(Method):
    name = "hapo"
    config_type = HAPOConfig
    fields = ("entropy",)  # filled by the old-policy pass (the scorer returns it alongside)
    description = "entropy-capacity sign-preserving reallocation (our form of the principle)"

    def token_advantages(self, advantages, batch, mask, step):
        return hapo_token_advantages(advantages, batch.entropy, mask, self.config)
