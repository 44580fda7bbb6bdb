"""Token-level credit assignment: pure, jit-compatible functions of arrays.

Every method maps GRPO's sequence advantages ``A [B]`` (plus method-specific per-token
signals) to per-token advantages ``Ahat [B, T]`` for the policy loss in
:mod:`amrsd_jax.losses`. Formulas and defaults: ``docs/methods.md``.
"""

from amrsd_jax.credit.amr_sd import (
    IHAT_QUANTILES,
    AMRSDConfig,
    amr_sd_token_advantages,
    annealed_coefficients,
    annealing_factor,
    asymmetric_gate,
    ihat_quantiles,
)
from amrsd_jax.credit.cig import causal_information_gain
from amrsd_jax.credit.grpo import (
    ADVANTAGE_SCALES,
    grpo_advantages,
    grpo_advantages_from_group_ids,
    grpo_token_advantages,
)
from amrsd_jax.credit.hapo import HAPOConfig, hapo_token_advantages, token_entropy
from amrsd_jax.credit.oar import (
    OARConfig,
    oar_gradient_importance,
    oar_perturbation_importance,
    oar_reshape_weights,
    oar_token_advantages,
)
from amrsd_jax.credit.rlsd import (RLSDConfig, rlsd_lambda, rlsd_token_advantages,
                                   rlsd_token_weights)

__all__ = [
    "ADVANTAGE_SCALES",
    "AMRSDConfig",
    "HAPOConfig",
    "IHAT_QUANTILES",
    "OARConfig",
    "RLSDConfig",
    "amr_sd_token_advantages",
    "annealed_coefficients",
    "annealing_factor",
    "asymmetric_gate",
    "causal_information_gain",
    "grpo_advantages",
    "grpo_advantages_from_group_ids",
    "grpo_token_advantages",
    "hapo_token_advantages",
    "ihat_quantiles",
    "oar_gradient_importance",
    "oar_perturbation_importance",
    "oar_reshape_weights",
    "oar_token_advantages",
    "rlsd_lambda",
    "rlsd_token_advantages",
    "rlsd_token_weights",
    "token_entropy",
]
