"""Process supervision in the trainer: a process reward's step scores, and where its steps end in tokens.

A process reward returns one :class:`rewards.StepRewards` per completion (scores, and the character offset where
each step ends in the completion text). :func:`grpo.advantages.process_advantages` needs the completion-token
index where each step ends: :func:`token_step_ends` finds, for each offset ``c``, the first token whose decoded
prefix reaches ``c`` (a binary search over decoded prefixes, so it agrees with how the engine decoded the text,
characters split across tokens included).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rewards.protocol import StepRewards

__all__ = ["check_step_rewards", "step_groups_flat", "token_step_ends"]


def check_step_rewards(out: Any, n: int) -> list[StepRewards]:
    """Checks a process reward's output: ``n`` items, each :class:`StepRewards` or ``None`` (no steps).

    Raises:
        ValueError: naming the first bad item, or when the reward returned numbers instead of step rewards.
    """
    if hasattr(out, "total") or isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
        raise ValueError(f"advantage 'process' needs a process reward returning one StepRewards per completion, "
                         f"got {type(out).__name__}")
    if len(out) != n:
        raise ValueError(f"the process reward returned {len(out)} items for {n} completions")
    steps = []
    for i, item in enumerate(out):
        if item is None:
            item = StepRewards((), ())
        if not isinstance(item, StepRewards):
            raise ValueError(f"completion {i}: advantage 'process' needs StepRewards (or None) from the reward, "
                             f"got {type(item).__name__} {item!r:.60}")
        steps.append(item)
    return steps


def step_groups_flat(steps: Sequence[StepRewards]) -> bool:
    """True when every step score of a group is the same (or there are none): its advantages are all 0."""
    values = [v for s in steps for v in s.scores]
    return not values or max(values) == min(values)


def token_step_ends(decode: Callable[[list[int]], str], completion_ids: Sequence[int], char_ends: Sequence[int]
                    ) -> list[int]:
    """The completion-token index (0-based, inclusive) where each step ends.

    Args:
        decode: Token ids -> text, as the engine decoded the completion.
        completion_ids: The completion's tokens.
        char_ends: Character offsets one past each step's end (non-decreasing).

    Returns:
        For each offset ``c``, the smallest ``t`` with ``len(decode(ids[:t + 1])) >= c``; offsets past the text
        give the last token (0 for an empty completion).
    """
    ids = list(completion_ids)
    reach: dict[int, int] = {}

    def length(t: int) -> int:
        if t not in reach:
            reach[t] = len(decode(ids[: t + 1]))
        return reach[t]

    out = []
    for c in char_ends:
        lo, hi = 0, max(0, len(ids) - 1)
        while lo < hi:
            mid = (lo + hi) // 2
            if length(mid) >= c:
                hi = mid
            else:
                lo = mid + 1
        out.append(lo)
    return out
