"""Rewards: the reward protocol and registry, rule-based rewards, reward models, remote rewards, weighting.

A reward is any callable ``f(prompts, completions, **columns) -> list[float | None]`` (TRL's convention; see
:mod:`rewards.protocol`). Built-in names (:func:`get_reward`): ``accuracy``, ``format``, ``overlong``,
``language_consistency``, ``code_exec``, ``reward_model``, ``remote``; any ``"pkg.module:func"`` works too.
:func:`combine` builds a weighted rubric returning a :class:`RewardOutput` with a per-component breakdown.

Importing this package imports neither torch nor ray: :mod:`rewards.reward_model` (and its names below) load on
first use.
"""

import importlib
from typing import Any

from rewards.code_exec import CodeExecReward, extract_code
from rewards.combine import COMBINE_MODES, RewardOutput, RewardSpec, WeightedReward, combine, zscore
from rewards.language import LanguageConsistencyReward
from rewards.protocol import (
    RewardError,
    RewardFn,
    StepRewards,
    call_reward,
    completion_text,
    completion_texts,
    step_ends,
)
from rewards.registry import REWARDS, get_reward, register_reward, reward_factory
from rewards.remote import RemoteReward, RemoteRewardConfig
from rewards.rules import AccuracyReward, OverlongReward, accuracy, format_reward
from rewards.sandbox import Sandbox, SandboxConfig, SandboxResult

_LAZY = {
    name: "rewards.reward_model"
    for name in ("RewardModel", "RewardModelReward", "RewardModelActor", "bradley_terry_loss",
                 "load_reward_model_reward")
} | {name: "rewards.rm_train" for name in ("RewardModelTrainConfig", "train_reward_model", "pairwise_accuracy")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rewards' has no attribute {name!r}")


__all__ = [
    "COMBINE_MODES", "REWARDS", "AccuracyReward", "CodeExecReward", "LanguageConsistencyReward", "OverlongReward",
    "RemoteReward",
    "RemoteRewardConfig", "RewardError", "RewardFn", "RewardOutput", "RewardSpec", "Sandbox", "SandboxConfig",
    "SandboxResult", "StepRewards", "WeightedReward", "accuracy", "call_reward", "combine", "completion_text",
    "completion_texts", "extract_code", "format_reward", "get_reward", "register_reward", "reward_factory",
    "step_ends", "zscore", *_LAZY,
]
