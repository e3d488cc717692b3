"""Chat messages: the one shape prompts and completions take between datasets, chat templates and rewards."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def to_messages(x: str | Sequence[Mapping[str, str]], role: str = "user") -> list[dict[str, str]]:
    """A prompt or response as a list of chat messages: a string becomes one message of ``role``.

    Example:
        >>> to_messages("What is 2 + 2?")
        [{'role': 'user', 'content': 'What is 2 + 2?'}]
    """
    if isinstance(x, str):
        return [{"role": role, "content": x}]
    return [dict(m) for m in x]
