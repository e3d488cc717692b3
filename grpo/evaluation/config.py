"""How to evaluate: :class:`EvalConfig` and the error every unusable input raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rewards.answers import ANSWER_MODES
from rollout.base import ENGINES


class EvalError(ValueError):
    """Unusable evaluation input (checkpoint, data, reward or setting); the message says what and why."""


# ----------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate.

    Attributes:
        n: Sampled completions per prompt for pass@k and maj@k (0: greedy completions only).
        k: Subset sizes of pass@k and maj@k, each in ``[1, n]``.
        temperature: Sampling temperature of the ``n`` samples.
        top_p: Nucleus mass of the ``n`` samples.
        max_new_tokens: Most new tokens per completion (greedy and sampled).
        rewards: Rule-based rewards by registry name or dotted path (``pkg.module:func``), averaged over the
            greedy completions.
        reward_models: Reward-model checkpoint folders, averaged over the greedy completions and used for win
            rates.
        accuracy: Whether the rows carry reference answers (greedy accuracy, pass@k, maj@k); without, only
            rewards, format rate and lengths are measured.
        answer_mode: How final answers are found (accuracy, answer rate, maj@k votes): ``strict`` (the R1
            format: ``<answer>`` tags, ``\\boxed{}``, ``####``, a reply that is only a number) or ``lenient`` (also
            an answer in free text, for models not trained on that format); see :mod:`rewards.answers`.
        batch_size: Prompts per generation call.
        seed: Base seed of the sampled completions.
        engine: Rollout engine for checkpoint folders (``torch`` or ``vllm``).
        device: Where a checkpoint folder is loaded (``None``: CUDA when available, else CPU); an in-memory model
            stays where it is.
        progress: Whether to show a progress bar.
    """

    n: int = 4
    k: tuple[int, ...] = (1, 4)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    rewards: tuple[str, ...] = ()
    reward_models: tuple[str, ...] = ()
    accuracy: bool = True
    answer_mode: str = "strict"
    batch_size: int = 16
    seed: int = 0
    engine: str = "torch"
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", tuple(self.k))
        object.__setattr__(self, "rewards", tuple(self.rewards))
        object.__setattr__(self, "reward_models", tuple(str(p) for p in self.reward_models))
        checks = [
            ("n", _is_int(self.n) and self.n >= 0, "an integer >= 0 (0: greedy only)"),
            ("temperature", self.temperature > 0, "a float > 0 (the greedy pass always runs separately)"),
            ("top_p", 0 < self.top_p <= 1, "a float in (0, 1]"),
            ("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("batch_size", _is_int(self.batch_size) and self.batch_size >= 1, "an integer >= 1"),
            ("k", self.n == 0 or (len(self.k) > 0 and all(_is_int(k) and 1 <= k <= self.n for k in self.k)),
             f"a non-empty list of integers in [1, n={self.n}] (raise n or lower k)"),
            ("rewards", all(isinstance(r, str) and r for r in self.rewards), "names or dotted paths"),
            ("answer_mode", self.answer_mode in ANSWER_MODES, f"one of {list(ANSWER_MODES)}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise EvalError(f"EvalConfig.{name} must be {expected}, got {getattr(self, name)!r}")
        if self.engine not in ENGINES:
            raise EvalError(f"EvalConfig.engine must be one of {', '.join(ENGINES.names())}, got {self.engine!r}")
        object.__setattr__(self, "k", tuple(sorted(set(self.k))) if self.n else ())


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
