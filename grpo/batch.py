"""One RL step's data between the trainer's phases: the scores of the sampled completions (:class:`Scores`) and
the padded tensors the log-prob and update passes read (:class:`Trajectories`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from grpo.steps import step_groups_flat
from rewards import StepRewards


@dataclass(frozen=True)
class Scores:
    """The rewards of ``N`` completions (the ``G`` samples of a prompt contiguous).

    Attributes:
        total: The total reward of each completion (a reward's ``None``, no opinion, counts as 0); with process
            supervision, the mean of its step scores. ``[N]``
        breakdown: Component name -> its score of each completion (``None`` where it has no opinion). ``[N]`` each
        steps: With process supervision, each completion's :class:`rewards.StepRewards`; else None. ``[N]``
    """

    total: list[float]
    breakdown: dict[str, list[Any]] = field(default_factory=dict)
    steps: list[StepRewards] | None = None

    def select(self, index: slice) -> Scores:
        """The scores of the completions at ``index``."""
        return Scores(self.total[index], {k: v[index] for k, v in self.breakdown.items()},
                      None if self.steps is None else self.steps[index])

    def is_flat(self, index: slice) -> bool:
        """Whether the group at ``index`` carries no signal: all totals (or all step scores) equal."""
        if self.steps is not None:
            return step_groups_flat(self.steps[index])
        group = self.total[index]
        return max(group) == min(group)

    @staticmethod
    def concat(parts: Sequence[Scores]) -> Scores:
        """The scores of several batches, one after the other."""
        names = list(dict.fromkeys(k for p in parts for k in p.breakdown))
        with_steps = any(p.steps is not None for p in parts)
        return Scores([t for p in parts for t in p.total],
                      {k: [v for p in parts for v in p.breakdown.get(k, [None] * len(p.total))] for k in names},
                      [s for p in parts for s in (p.steps or [])] if with_steps else None)


@dataclass(frozen=True)
class Trajectories:
    """One step's sampled sequences, padded into tensors (``N = B * G`` rows, prompt left-padded, completion
    right-padded; ``L = P + T``).

    Attributes:
        input_ids: ``[N, L]`` prompt + completion token ids.
        attention_mask: ``[N, L]`` 1 at real tokens.
        completion_mask: ``[N, T]`` 1 at completion tokens that carry loss.
        advantages: ``[N]`` per-sequence advantages (``[N, T]`` per-token with process supervision).
        rewards: ``[N]`` total rewards.
        old_logp: ``[N, T]`` log-probs under the sampling policy (None until computed).
        ref_logp: ``[N, T]`` log-probs under the reference policy (None when β = 0).
        engine_logp: ``[N, T]`` the rollout engine's log-probs of the sampled tokens (None when it gave none).
        pg_weight: ``[N, T]`` the rollout correction's weights (:mod:`grpo.correction`; None: computed per
            micro-batch from the current log-probs, or no correction).
        routing: ``[N, L, M, K]`` the engine's expert choices per position and MoE layer, for router replay and
            the routing mismatch (-1 where the engine ran no token); None when the engine recorded none.
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    advantages: Tensor
    rewards: Tensor
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    engine_logp: Tensor | None = None
    pg_weight: Tensor | None = None
    routing: Tensor | None = None

    @property
    def completion_len(self) -> int:
        return self.completion_mask.shape[1]

    def select(self, idx: Tensor) -> Trajectories:
        pick = (lambda t: None if t is None else t[idx])  # noqa: E731
        return Trajectories(*(pick(getattr(self, f)) for f in self.__dataclass_fields__))

    def replace(self, **kw: Any) -> Trajectories:
        values = {f: getattr(self, f) for f in self.__dataclass_fields__}
        values.update(kw)
        return Trajectories(**values)


def pad_trajectories(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pads prompts and right-pads completions into ``input_ids [N, P+T]``, ``attention_mask [N, P+T]``
    and ``completion_mask [N, T]`` (T >= 1 even when every completion is empty)."""
    p_len = max(len(p) for p in prompts)
    t_len = max(1, max(len(c) for c in completions))
    n = len(prompts)
    ids = torch.full((n, p_len + t_len), pad_id, dtype=torch.long)
    attn = torch.zeros((n, p_len + t_len), dtype=torch.long)
    comp = torch.zeros((n, t_len), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, p_len - len(p):p_len] = torch.as_tensor(list(p), dtype=torch.long)
        ids[i, p_len:p_len + len(c)] = torch.as_tensor(list(c), dtype=torch.long)
        attn[i, p_len - len(p):p_len + len(c)] = 1
        comp[i, :len(c)] = 1
    return ids, attn, comp


def pad_routing(rollouts: Sequence[Any], prompt_width: int, width: int) -> Tensor | None:
    """``[N, L, M, K]`` (``L = width``) the rollouts' ``routing`` laid out as :func:`pad_trajectories`' tensors
    (prompts left-padded to ``prompt_width``, completions right-padded), -1 where the engine ran nothing; None
    when some rollout carries no routing."""
    if any(getattr(r, "routing", None) is None for r in rollouts):
        return None
    m, k = rollouts[0].routing.shape[1:]
    out = torch.full((len(rollouts), width, m, k), -1, dtype=torch.long)
    for i, r in enumerate(rollouts):
        first = prompt_width - len(r.prompt_ids)
        out[i, first:first + r.routing.shape[0]] = torch.as_tensor(r.routing)
    return out


def pad_engine_logprobs(rollouts: Sequence[Any], width: int) -> Tensor | None:
    """``[N, T]`` (``T = width``) the engine's log-probs of the sampled tokens, right-padded with 0; None when it
    gave none for some rollout."""
    if any(len(r.logprobs) != len(r.completion_ids) for r in rollouts):
        return None
    out = torch.zeros(len(rollouts), width)
    for i, r in enumerate(rollouts):
        out[i, :len(r.logprobs)] = torch.tensor(r.logprobs, dtype=torch.float32)
    return out
