"""Pure RL math (torch, numpy, stdlib only): advantages, policy losses, their config.

Each function's docstring gives its formula and source (arXiv id). The trainer calls
`compute_advantages` once per batch and `compute_policy_loss` once per micro-batch.
"""

from algorithms.advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from algorithms.config import AlgorithmConfig
from algorithms.losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    PolicyLossInputs,
    PolicyLossOutput,
    aggregate,
    compute_policy_loss,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "POLICY_LOSSES",
    "AlgorithmConfig",
    "PolicyLossInputs",
    "PolicyLossOutput",
    "aggregate",
    "compute_advantages",
    "compute_policy_loss",
]
