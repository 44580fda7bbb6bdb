"""Losses: the clipped policy-gradient loss (with exact micro-batch aggregation) and
the SDPO self-distillation loss. Formulas and defaults: ``docs/methods.md``."""

from amrsd_jax.losses.policy import (
    AGGREGATION_MODES,
    PolicyLossConfig,
    aggregate_token_losses,
    loss_normalizer,
    pairwise_sum,
    per_token_policy_loss,
    policy_gradient_loss,
)
from amrsd_jax.losses.sdpo import (
    DISTILL_MODES,
    SDPOConfig,
    generalized_jsd_from_log_probs,
    kl_from_log_probs,
    sdpo_distillation_loss,
    sdpo_per_token_loss,
    sdpo_sampled_token_loss,
    sdpo_token_divergence,
    sdpo_total_loss,
    topk_support_log_probs,
)

__all__ = [
    "AGGREGATION_MODES",
    "DISTILL_MODES",
    "PolicyLossConfig",
    "SDPOConfig",
    "aggregate_token_losses",
    "generalized_jsd_from_log_probs",
    "kl_from_log_probs",
    "loss_normalizer",
    "pairwise_sum",
    "per_token_policy_loss",
    "policy_gradient_loss",
    "sdpo_distillation_loss",
    "sdpo_per_token_loss",
    "sdpo_sampled_token_loss",
    "sdpo_token_divergence",
    "sdpo_total_loss",
    "topk_support_log_probs",
]
