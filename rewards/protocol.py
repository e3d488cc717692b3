"""The reward protocol: how a reward function is called, checked and made robust.

A reward is any callable ``f(prompts, completions, **columns) -> list[float | None]`` (TRL's convention, so TRL
reward functions plug in unchanged). ``completions[i]`` is either a string or a chat-message list
``[{"role": "assistant", "content": ...}]``; ``columns`` are the dataset columns of the batch (lists of length
``B``) plus whatever the caller adds (TRL adds ``completion_ids`` and ``trainer_state``). ``None`` means "no
opinion" for that sample. ``async def`` rewards (or any callable returning an awaitable) are awaited.

:func:`call_reward` is the one entry point that calls a reward: it awaits async results, checks the output (a
sequence of ``B`` real numbers or ``None``, no NaN or infinity) and applies the error policy:

* ``on_error="raise"`` (default): a :class:`RewardError` naming the reward, the first failing sample and the
  exception;
* ``on_error="zero"``: failing samples score ``0.0``;
* ``on_error="skip"``: failing samples score ``None``.

When a batched call raises, the batch is re-run one sample at a time to find the failing sample(s); samples that
succeed alone keep their score.

Example:
    >>> def length(prompts, completions, **_):
    ...     return [float(len(completion_text(c))) for c in completions]
    >>> call_reward(length, ["q"], [[{"role": "assistant", "content": "abc"}]], name="length")
    [3.0]
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

OnError = Literal["raise", "zero", "skip"]
ON_ERROR_POLICIES: tuple[str, ...] = ("raise", "zero", "skip")

Scores = list[float | None]


class RewardFn(Protocol):
    """A reward: scores ``B`` completions of ``B`` prompts; ``None`` marks "no opinion"."""

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> Sequence[Any]: ...


@dataclass(frozen=True)
class StepRewards:
    """A process reward for one completion: one score per reasoning step (DeepSeekMath's process supervision).

    A process reward function returns one of these (or ``None``: no steps) per completion instead of a number;
    the trainer then needs ``advantage: process`` and gives token ``t`` the sum of the group-normalised scores
    of the steps that end at or after it.

    Attributes:
        scores: One finite reward per step, in order.
        ends: Where each step ends in the completion text: the character offset one past its last character
            (non-decreasing, ``>= 1``). :func:`step_ends` gives the ends of newline-separated steps.

    Example:
        >>> text = "2 + 3 = 5\\nso x = 5\\n"
        >>> StepRewards(scores=(1.0, 0.0), ends=tuple(step_ends(text)))
        StepRewards(scores=(1.0, 0.0), ends=(9, 18))
    """

    scores: tuple[float, ...]
    ends: tuple[int, ...]

    def __post_init__(self) -> None:
        scores, ends = tuple(self.scores), tuple(self.ends)
        if len(scores) != len(ends):
            raise ValueError(f"StepRewards: {len(scores)} scores but {len(ends)} ends (one end per step)")
        for i, value in enumerate(scores):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"StepRewards.scores[{i}]: expected a finite number, got {value!r}")
        for i, end in enumerate(ends):
            if isinstance(end, bool) or not isinstance(end, numbers.Integral) or end < 1:
                raise ValueError(f"StepRewards.ends[{i}]: expected a character offset >= 1, got {end!r}")
            if i and end < ends[i - 1]:
                raise ValueError(f"StepRewards.ends must be non-decreasing, got {ends[i - 1]} then {end} at {i}")
        object.__setattr__(self, "scores", tuple(float(v) for v in scores))
        object.__setattr__(self, "ends", tuple(int(e) for e in ends))

    @property
    def mean(self) -> float:
        """The mean step score (0.0 without steps): what reward metrics report for this completion."""
        return sum(self.scores) / len(self.scores) if self.scores else 0.0


def step_ends(text: str, sep: str = "\n") -> list[int]:
    """Character offsets one past the last non-blank character of each non-blank step of ``text``, steps
    separated by ``sep`` (trailing whitespace is left out: tokenizers often attach it to the next token)."""
    if not sep:
        raise ValueError("step_ends: sep must be a non-empty string")
    ends, start = [], 0
    while start < len(text):
        cut = text.find(sep, start)
        end = len(text) if cut < 0 else cut + len(sep)
        step = text[start:end].rstrip()
        if step.strip():
            ends.append(start + len(step))
        start = end
    return ends


class RewardError(RuntimeError):
    """A reward failed or returned something that is not ``B`` numbers.

    Attributes:
        reward: Name of the reward.
        index: Index of the failing sample in the batch, or ``None`` when it concerns the whole batch.
        message: What went wrong.
    """

    def __init__(self, reward: str, message: str, index: int | None = None) -> None:
        where = f" at sample {index}" if index is not None else ""
        super().__init__(f"reward {reward!r} failed{where}: {message}")
        self.reward = reward
        self.index = index
        self.message = message


# ----------------------------------------------------------------------------------------------- text
def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # multimodal parts: [{"type": "text", "text": ...}, ...]
        parts = [p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type", "text") == "text"]
        return "".join(parts)
    raise TypeError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def completion_text(completion: Any) -> str:
    """Returns the text of a completion given as a string, a message, or a chat-message list.

    A message list contributes the concatenated content of its ``assistant`` messages (all messages when none
    has a role).

    Raises:
        TypeError: if ``completion`` is none of these forms.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _content_text(completion.get("content", ""))
    if isinstance(completion, Sequence) and all(isinstance(m, Mapping) for m in completion):
        roles = [m.get("role") for m in completion]
        chosen = [m for m in completion if m.get("role") == "assistant"] if "assistant" in roles else completion
        return "".join(_content_text(m.get("content", "")) for m in chosen)
    raise TypeError(
        f"a completion must be a string or a list of chat messages {{'role', 'content'}}, "
        f"got {type(completion).__name__}"
    )


def completion_texts(completions: Sequence[Any]) -> list[str]:
    """:func:`completion_text` of each completion; the error names the failing index."""
    texts = []
    for i, c in enumerate(completions):
        try:
            texts.append(completion_text(c))
        except TypeError as exc:
            raise TypeError(f"completions[{i}]: {exc}") from None
    return texts


def prompt_messages(prompt: Any) -> list[dict[str, str]]:
    """Returns a prompt as chat messages: a string becomes one ``user`` message; a message list is copied."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
        return [{"role": str(m.get("role", "user")), "content": _content_text(m.get("content", ""))} for m in prompt]
    raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


def column_value(columns: Mapping[str, Any], key: str, index: int, batch_size: int) -> Any:
    """Returns ``columns[key][index]``, checking that the column exists and has one value per sample.

    Raises:
        KeyError: naming the missing column and the available ones.
        ValueError: if the column is not a sequence of length ``batch_size``.
    """
    if key not in columns:
        raise KeyError(f"column {key!r} is required; got columns: {', '.join(sorted(columns)) or '(none)'}")
    value = columns[key]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != batch_size:
        raise ValueError(f"column {key!r} must be a list with one value per sample ({batch_size}), got {value!r:.80}")
    return value[index]


# ----------------------------------------------------------------------------------------------- calling
def _run_awaitable(awaitable: Any) -> Any:
    """Runs an awaitable to completion, in a helper thread when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_as_coroutine(awaitable))
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(_as_coroutine(awaitable))
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="reward-async")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


async def _as_coroutine(awaitable: Any) -> Any:
    return await awaitable


def _invoke(fn: Callable[..., Any], prompts: list[Any], completions: list[Any], columns: Mapping[str, Any]) -> Any:
    result = fn(prompts, completions, **columns)
    if inspect.isawaitable(result):
        result = _run_awaitable(result)
    return result


def _check_scores(name: str, result: Any, batch_size: int, offset: int = 0) -> Scores:
    """Checks ``result`` is ``batch_size`` finite reals or ``None`` and returns them as floats."""
    if hasattr(result, "tolist") and not isinstance(result, list):  # tensors and arrays
        result = result.tolist()
    if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Sequence):
        raise RewardError(name, f"must return a list of {batch_size} numbers or None, got {type(result).__name__}")
    if len(result) != batch_size:
        raise RewardError(name, f"returned {len(result)} scores for {batch_size} completions")
    scores: Scores = []
    for i, value in enumerate(result):
        if value is None:
            scores.append(None)
            continue
        if not isinstance(value, numbers.Real) and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            value = value.item()  # a 0-d tensor or array
        if not isinstance(value, numbers.Real):
            raise RewardError(name, f"score must be a real number or None, got {value!r:.60}", offset + i)
        value = float(value)
        if not math.isfinite(value):
            raise RewardError(name, f"score must be finite, got {value}", offset + i)
        scores.append(value)
    return scores


def _slice_columns(columns: Mapping[str, Any], index: int, batch_size: int) -> dict[str, Any]:
    """Columns for sample ``index`` alone: per-sample lists are sliced, anything else is passed unchanged."""
    out = {}
    for key, value in columns.items():
        per_sample = isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == batch_size
        out[key] = value[index : index + 1] if per_sample else value
    return out


def call_reward(
    fn: Callable[..., Any],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    name: str | None = None,
    on_error: OnError = "raise",
    **columns: Any,
) -> Scores:
    """Calls a reward on a batch and returns ``B`` checked scores (floats or ``None``).

    Args:
        fn: The reward (sync or async).
        prompts: ``B`` prompts (strings or message lists).
        completions: ``B`` completions (strings or message lists).
        name: Name used in errors (defaults to the function's name).
        on_error: ``"raise"``, ``"zero"`` (a failing sample scores 0.0) or ``"skip"`` (it scores ``None``).
        **columns: Dataset columns, one value per sample, passed to ``fn`` unchanged.

    Returns:
        ``B`` scores.

    Raises:
        RewardError: when ``fn`` raises (policy ``"raise"``), or returns the wrong number of scores or a value
            that is not a finite real number or ``None`` (whatever the policy: that is a bug in the reward).
        ValueError: for an unknown ``on_error`` or ``len(prompts) != len(completions)``.
    """
    if on_error not in ON_ERROR_POLICIES:
        raise ValueError(f"on_error must be one of {ON_ERROR_POLICIES}, got {on_error!r}")
    name = name or getattr(fn, "__name__", None) or type(fn).__name__
    prompts, completions = list(prompts), list(completions)
    if len(prompts) != len(completions):
        raise ValueError(f"reward {name!r}: got {len(prompts)} prompts but {len(completions)} completions")
    batch_size = len(completions)
    if batch_size == 0:
        return []
    try:
        result = _invoke(fn, prompts, completions, columns)
    except Exception as batch_exc:
        return _score_one_by_one(fn, name, prompts, completions, columns, on_error, batch_exc)
    return _check_scores(name, result, batch_size)


def _score_one_by_one(
    fn: Callable[..., Any],
    name: str,
    prompts: list[Any],
    completions: list[Any],
    columns: Mapping[str, Any],
    on_error: OnError,
    batch_exc: Exception,
) -> Scores:
    """After a failed batched call: scores each sample alone so the failing ones can be named (or replaced)."""
    batch_size = len(completions)
    scores: Scores = []
    for i in range(batch_size):
        try:
            result = _invoke(fn, prompts[i : i + 1], completions[i : i + 1], _slice_columns(columns, i, batch_size))
        except Exception as exc:
            if on_error == "raise":
                raise RewardError(name, f"{type(exc).__name__}: {exc}", i) from exc
            scores.append(0.0 if on_error == "zero" else None)
            continue
        scores.extend(_check_scores(name, result, 1, offset=i))
    if on_error == "raise":  # every sample passed alone: the failure depends on the batch as a whole
        raise RewardError(
            name, f"{type(batch_exc).__name__}: {batch_exc} (the batch failed but every sample succeeded alone)"
        ) from batch_exc
    return scores
