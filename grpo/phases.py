"""The phases of a run, by name: the one set the pipeline, the recipe, the evaluation and the report use.

A run goes ``sft -> rl_reason -> rm -> rl_pref -> eval`` (a recipe may run a subset, in this order). The policy
checkpoints it evaluates are ``base`` (the starting model) and those of the policy phases.
"""

from __future__ import annotations

SFT, RL_REASON, RM, RL_PREF, EVAL = "sft", "rl_reason", "rm", "rl_pref", "eval"
BASE = "base"
PHASES: tuple[str, ...] = (SFT, RL_REASON, RM, RL_PREF, EVAL)
"""Every phase, in run order."""
RL_PHASES: tuple[str, ...] = (RL_REASON, RL_PREF)
"""The GRPO stages: stage 1 (reasoning) and stage 2 (preference)."""
POLICY_PHASES: tuple[str, ...] = (SFT, RL_REASON, RL_PREF)
"""The phases that train the policy and leave a policy checkpoint."""
POLICY_CHECKPOINTS: tuple[str, ...] = (BASE, *POLICY_PHASES)
"""The policy checkpoints of a run, in order: what the ``eval`` phase measures."""
RM_PREFIX = "rm:"
"""A reward named ``rm:NAME`` is a reward model: in a recipe, the one named ``NAME`` that the ``rm`` phase trains;
in an evaluation, the one in the folder labelled ``NAME``."""


def reward_model_name(reward: str) -> str | None:
    """``NAME`` for a reward named ``rm:NAME``, else None."""
    return reward[len(RM_PREFIX) :] if reward.startswith(RM_PREFIX) else None
