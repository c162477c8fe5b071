"""Pure RL math (torch, numpy, stdlib only): advantages, policy losses, their config.

Each function's docstring gives its formula and source (arXiv id). The trainer calls
`compute_advantages` once per batch and `compute_policy_loss` once per micro-batch,
with the (mini)batch's `loss_denominators`.
"""

from algorithms.advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from algorithms.config import AlgorithmConfig
from algorithms.losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    LossDenominators,
    PolicyLossInputs,
    PolicyLossOutput,
    aggregate,
    compute_policy_loss,
    loss_denominators,
)
from algorithms.tree import TREE_ADVANTAGES, TreeAdvantage, shared_prefix_mask, tree_advantages

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "POLICY_LOSSES",
    "TREE_ADVANTAGES",
    "AlgorithmConfig",
    "LossDenominators",
    "PolicyLossInputs",
    "PolicyLossOutput",
    "TreeAdvantage",
    "aggregate",
    "compute_advantages",
    "compute_policy_loss",
    "loss_denominators",
    "shared_prefix_mask",
    "tree_advantages",
]
