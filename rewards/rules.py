"""Rule-based rewards: ``accuracy`` (strict or lenient answer checking), ``format`` and ``overlong`` (DAPO's soft
length penalty).

Each follows the reward protocol ``f(prompts, completions, **columns) -> list[float | None]``; completions may be
strings or chat-message lists.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model.tokenizer import ANSWER_CLOSE, ANSWER_OPEN, TAG_TOKENS, THINK_CLOSE, THINK_OPEN
from rewards.answers import answers_match, check_answer_mode, extract_answer, gold_answer
from rewards.protocol import column_value, completion_texts


@dataclass(frozen=True)
class AccuracyReward:
    """1.0 when the completion's final answer equals the ``answer`` column, else 0.0.

    The answer is extracted as :func:`rewards.answers.extract_answer` does in ``mode``: ``strict`` (the R1
    format: ``<answer>`` tags, ``\\boxed{}``, GSM8K's ``#### n`` or a reply that is only a number) or ``lenient``
    (also an answer stated in free text: "the answer is 159", "80 + 79 = 159", a last number), and compared up to
    mathematical equivalence (``\\boxed{3/4}`` matches ``0.75``). A completion without an extractable answer
    scores 0.0. A row whose ``answer`` is ``None`` or empty (a prompt with nothing to check, e.g. a chat request
    mixed into a math dataset) scores ``None``: no opinion, so the other rewards decide (see
    :mod:`rewards.combine`). In a recipe: ``{name: accuracy, kwargs: {mode: lenient}}``.

    Example:
        >>> accuracy(["q", "q", "q"], ["<answer>\\\\frac{1}{2}</answer>", "no idea", "hi"],
        ...          answer=["0.5", "0.5", None])
        [1.0, 0.0, None]
        >>> AccuracyReward("lenient")(["q"], ["80 + 79 = 159"], answer=["159"])
        [1.0]

    Raises:
        KeyError: without an ``answer`` column.
    """

    mode: str = "strict"

    def __post_init__(self) -> None:
        check_answer_mode(self.mode)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        texts = completion_texts(completions)
        scores: list[float | None] = []
        for i, text in enumerate(texts):
            reference = column_value(columns, "answer", i, len(texts))
            if reference is None or str(reference).strip() == "":
                scores.append(None)
                continue
            predicted = extract_answer(text, self.mode)
            scores.append(1.0 if predicted is not None and answers_match(predicted, gold_answer(reference)) else 0.0)
        return scores

    @property
    def __name__(self) -> str:
        return "accuracy"


accuracy = AccuracyReward()
"""The strict ``accuracy`` reward (see :class:`AccuracyReward`)."""


_FORMAT = re.compile(rf"\s*{THINK_OPEN}(?P<think>.*?){THINK_CLOSE}\s*{ANSWER_OPEN}(?P<answer>.*?){ANSWER_CLOSE}\s*",
                     re.DOTALL)


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
    """1.0 when the completion is exactly ``<think>...</think><answer>...</answer>``, else 0.0.

    Whitespace is allowed around and between the two blocks; nothing else is. Each tag must appear exactly once
    and the answer must not be empty.

    Example:
        >>> format_reward(["q"] * 3, ["<think>a</think> <answer>1</answer>", "<answer>1</answer>",
        ...                           "<think>a</think><answer>1</answer> extra"])
        [1.0, 0.0, 0.0]
    """
    scores: list[float | None] = []
    for text in completion_texts(completions):
        match = _FORMAT.fullmatch(text)
        ok = match is not None and all(text.count(tag) == 1 for tag in TAG_TOKENS) and match["answer"].strip() != ""
        scores.append(1.0 if ok else 0.0)
    return scores


format_reward.__name__ = "format"


@dataclass(frozen=True)
class OverlongReward:
    """DAPO's soft overlong penalty.

    With ``L = max_length`` and ``C = cache_length``, a completion of length ``n`` scores ``0`` when
    ``n <= L - C``, ``((L - C) - n) / C`` (linear from 0 to -1) when ``L - C < n <= L``, and ``-1`` when
    ``n > L``.

    Length is counted in tokens when the batch has a ``completion_ids`` column (TRL passes one) or when a
    ``tokenizer`` is configured (``tokenizer.encode(text, add_special_tokens=False)``); otherwise in characters
    of the completion text.

    Attributes:
        max_length: ``L``, the length beyond which the penalty is -1.
        cache_length: ``C``, the width of the soft window (0 makes it a hard cut at ``L``).
        tokenizer: Optional tokenizer to count tokens.

    Example:
        >>> OverlongReward(max_length=10, cache_length=4)(["q"] * 3, ["x" * 6, "x" * 8, "x" * 11])
        [0.0, -0.5, -1.0]
    """

    max_length: int
    cache_length: int
    tokenizer: Any = None
    name: str = "overlong"

    def __post_init__(self) -> None:
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"overlong: max_length must be a positive integer, got {self.max_length!r}")
        if (isinstance(self.cache_length, bool) or not isinstance(self.cache_length, int)
                or not 0 <= self.cache_length <= self.max_length):
            raise ValueError(
                f"overlong: cache_length must be an integer in [0, max_length={self.max_length}], "
                f"got {self.cache_length!r}"
            )
        if self.tokenizer is not None and not hasattr(self.tokenizer, "encode"):
            raise TypeError(f"overlong: tokenizer must have an encode() method, got {type(self.tokenizer).__name__}")

    def penalty(self, length: int) -> float:
        """The penalty of a completion of ``length`` tokens (or characters)."""
        soft_start = self.max_length - self.cache_length
        if length <= soft_start:
            return 0.0
        if length <= self.max_length:
            return (soft_start - length) / self.cache_length
        return -1.0

    def lengths(self, completions: Sequence[Any], columns: dict[str, Any]) -> list[int]:
        """Length of each completion: ``completion_ids``, else the tokenizer, else characters."""
        if "completion_ids" in columns:
            return [len(column_value(columns, "completion_ids", i, len(completions))) for i in range(len(completions))]
        texts = completion_texts(completions)
        if self.tokenizer is not None:
            return [len(self.tokenizer.encode(t, add_special_tokens=False)) for t in texts]
        return [len(t) for t in texts]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        return [self.penalty(n) for n in self.lengths(completions, columns)]
