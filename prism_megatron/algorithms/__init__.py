"""RL / alignment maths: advantages (spec §4, §6.1), losses (§3.4, §6), DAPO sampling (§6.3)."""

from prism_megatron.algorithms.advantages import (
    broadcast_to_tokens,
    group_normalize,
    grpo_advantages,
    prism_advantages,
)
from prism_megatron.algorithms.losses import (
    AGG_MODES,
    aggregate,
    aggregation_denominator,
    discriminator_loss,
    kl_penalty,
    pairwise_accuracy,
    policy_loss,
    tis_weights,
)
from prism_megatron.algorithms.sampling import keep_informative_groups, overlong_penalty

__all__ = [
    "AGG_MODES",
    "aggregate",
    "aggregation_denominator",
    "broadcast_to_tokens",
    "discriminator_loss",
    "group_normalize",
    "grpo_advantages",
    "keep_informative_groups",
    "kl_penalty",
    "overlong_penalty",
    "pairwise_accuracy",
    "policy_loss",
    "prism_advantages",
    "tis_weights",
]
