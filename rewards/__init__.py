"""Rewards: the plug-in API (:mod:`rewards.api`), the isolated runner (:mod:`rewards.runner`),
built-in verifiers (:mod:`rewards.builtin`) and the code sandbox (:mod:`rewards.sandbox`).

Standard library and math-verify only: no torch, vLLM, DeepSpeed, Ray or Hydra. See
``docs/rewards.md`` for a walk-through.
"""

from rewards.api import (
    FAILURE_KINDS,
    RewardResult,
    RewardSignatureError,
    RewardSpec,
    RewardSpecError,
    ScoredSample,
    check_reward_signature,
    register_reward,
    registered_rewards,
    resolve_reward,
)
from rewards.runner import (
    RewardAlarmError,
    RewardConfig,
    RewardFailureError,
    RewardFunctionConfig,
    RewardProbeError,
    RewardRequest,
    RewardRunner,
    RewardWorkerError,
)

__all__ = [
    "FAILURE_KINDS",
    "RewardAlarmError",
    "RewardConfig",
    "RewardFailureError",
    "RewardFunctionConfig",
    "RewardProbeError",
    "RewardRequest",
    "RewardResult",
    "RewardRunner",
    "RewardSignatureError",
    "RewardSpec",
    "RewardSpecError",
    "RewardWorkerError",
    "ScoredSample",
    "check_reward_signature",
    "register_reward",
    "registered_rewards",
    "resolve_reward",
]
