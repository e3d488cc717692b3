"""Render conversations through a tokenizer's chat template and mask everything but the assistant's tokens.

Three ways to find the assistant's tokens, picked per tokenizer and template:

* ``generation``: the template marks assistant text with ``{% generation %}`` blocks; transformers returns the
  mask (``return_assistant_tokens_mask``). Whatever the template puts inside the block is learned.
* ``diff`` (any other template): for the assistant turn at index ``i``, render ``messages[:i]`` with the
  generation prompt and ``messages[:i + 1]`` without it, tokenise both, and label the token ids that the
  second adds to the first. The assistant header (the generation prompt) stays masked; the content and
  whatever the template closes the turn with (an end-of-turn or eos token) are labelled. Every rendering must
  be a token prefix of the next and of the whole conversation; when it is not (a template that rewrites
  earlier turns, or a tokenizer that merges across the boundary) a :class:`FormattingError` says so instead of
  guessing.
* ``plain`` (a tokenizer without a chat template, e.g. a base model's): a prompt/completion pair is the prompt's
  tokens (``tokenizer(prompt)``, special tokens included, exactly what :func:`grpo.trainer.encode_prompt` sends
  the engine at RL time) followed by the completion's tokens, which are labelled. Only one user turn followed by
  one assistant turn can be written this way; anything else needs a chat template.

The eos after the final assistant turn is labelled: the template's own when it writes one right after the
turn, else one appended when the turn ends the sequence (unless ``add_eos=False``), so a trained model learns
to stop.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from model.registry import Registry
from sft.messages import to_messages

IGNORE_INDEX = -100
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class FormattingError(ValueError):
    """A conversation cannot be rendered and masked reliably with this tokenizer and template."""


@dataclass(frozen=True)
class TokenizedExample:
    """One tokenised conversation.

    Attributes:
        input_ids: Token ids of the rendered conversation.  # [T]
        labels: ``input_ids`` where the token is the assistant's, ``IGNORE_INDEX`` elsewhere.  # [T]
    """

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_labels(self) -> int:
        """Number of labelled (assistant) tokens."""
        return sum(label != IGNORE_INDEX for label in self.labels)


def row_to_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """The conversation of a dataset row: its ``messages``, or its ``prompt`` followed by its ``completion``.

    A string prompt becomes one user message, a string completion one assistant message.

    Raises:
        FormattingError: if the row has neither ``messages`` nor ``prompt`` and ``completion``.
    """
    if row.get("messages") is not None:
        return to_messages(row["messages"])
    if row.get("prompt") is None or row.get("completion") is None:
        raise FormattingError(f"a row needs 'messages' or 'prompt' and 'completion'; it has {sorted(row)}")
    return to_messages(row["prompt"], "user") + to_messages(row["completion"], "assistant")


def _template(tokenizer: Any, chat_template: str | None) -> str | None:
    """The template to render with; None (plain text) when the tokenizer has none."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    if not isinstance(template, str):
        raise FormattingError("the tokenizer has several named chat templates; pass chat_template= to pick one")
    return template


def _render_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]], template: str, gen_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=gen_prompt
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _is_prefix(prefix: list[int], ids: list[int]) -> bool:
    return len(prefix) <= len(ids) and ids[: len(prefix)] == prefix


def _mask_by_diff(tokenizer: Any, messages: Sequence[Mapping[str, str]], template: str) -> TokenizedExample:
    ids = _render_ids(tokenizer, messages, template, gen_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise FormattingError(
                "the conversation opens with an assistant turn, so nothing marks where the template's preamble "
                "ends; put the prompt before it or use a template with {% generation %} blocks"
            )
        before = _render_ids(tokenizer, messages[:i], template, gen_prompt=True)
        upto = _render_ids(tokenizer, messages[: i + 1], template, gen_prompt=False)
        if not _is_prefix(before, upto) or not _is_prefix(upto, ids):
            raise FormattingError(
                f"assistant turn {i}: the rendering of the messages before it (with the generation "
                f"prompt) is not a token prefix of the rendering that includes it, or that is not a prefix "
                f"of the whole conversation; this template rewrites earlier turns or the tokenizer merges "
                f"tokens across turns. Use a template with {{% generation %}} blocks"
            )
        labels[len(before) : len(upto)] = ids[len(before) : len(upto)]
    return TokenizedExample(ids, labels)


def _mask_by_generation_blocks(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], template: str
) -> TokenizedExample:
    out = tokenizer.apply_chat_template(
        list(messages),
        chat_template=template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    return TokenizedExample(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)])


MASKERS: Registry[Callable[[Any, Sequence[Mapping[str, str]], str], TokenizedExample]] = Registry("mask method")
MASKERS.add("diff", _mask_by_diff)
MASKERS.add("generation", _mask_by_generation_blocks)


def mask_method(template: str | None) -> str:
    """``"plain"`` without a template, ``"generation"`` when it has ``{% generation %}`` blocks, else ``"diff"``."""
    if template is None:
        return "plain"
    return "generation" if _GENERATION_TAG.search(template) else "diff"


def encode_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt: chat messages go through the chat template with the generation prompt; a plain
    string does too when the tokenizer has a chat template (as a single user turn), else it is tokenised as is."""
    if isinstance(prompt, str):
        if getattr(tokenizer, "chat_template", None) is None:
            return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        prompt = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _plain(tokenizer: Any, messages: Sequence[Mapping[str, str]], template: str | None) -> TokenizedExample:
    roles = [m["role"] for m in messages]
    if roles != ["user", "assistant"]:
        raise FormattingError(
            f"the tokenizer has no chat_template, so a conversation is written as plain prompt + completion text, "
            f"which needs exactly one user turn then one assistant turn; got roles {roles}. Set "
            f"tokenizer.chat_template (or pass chat_template) for other conversations")
    prompt = encode_prompt(tokenizer, messages[0]["content"])  # no template: the prompt's tokens, as RL sends them
    completion = list(tokenizer(messages[1]["content"], add_special_tokens=False)["input_ids"])
    return TokenizedExample(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)


MASKERS.add("plain", _plain)


def _with_eos(example: TokenizedExample, eos_id: int | None) -> TokenizedExample:
    """Makes sure an eos closes the final assistant turn and is labelled.

    If the final labelled span holds an eos, nothing changes; if the token right after it is an eos, that
    token is labelled; if the span ends the sequence, a labelled eos is appended. Otherwise (the template
    closes the turn with something else and the conversation goes on) nothing changes.
    """
    labelled = [k for k, label in enumerate(example.labels) if label != IGNORE_INDEX]
    if eos_id is None or not labelled:
        return example
    end = labelled[-1] + 1
    start = end
    while start > 0 and example.labels[start - 1] != IGNORE_INDEX:
        start -= 1
    if eos_id in example.labels[start:end]:
        return example
    if end < len(example) and example.input_ids[end] == eos_id:
        labels = list(example.labels)
        labels[end] = eos_id
        return TokenizedExample(example.input_ids, labels)
    if end == len(example):
        return TokenizedExample([*example.input_ids, eos_id], [*example.labels, eos_id])
    return example


def tokenize_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    *,
    chat_template: str | None = None,
    max_length: int | None = None,
    add_eos: bool = True,
) -> TokenizedExample:
    """Renders and tokenises a conversation, labelling only the assistant's tokens.

    Args:
        tokenizer: A transformers tokenizer, with a chat template (a fast one for ``{% generation %}`` templates)
            or without one (plain prompt + completion, see the module docstring).
        messages: The conversation, ``[{"role": ..., "content": ...}, ...]``, with at least one assistant
            turn.
        chat_template: A template to use instead of ``tokenizer.chat_template``.
        max_length: Keep at most this many tokens (the end is cut off).
        add_eos: Append a labelled eos when the template closes the final assistant turn without one.

    Returns:
        The token ids and the labels (``IGNORE_INDEX`` outside assistant turns).  # [T], [T]

    Raises:
        FormattingError: with no assistant turn, a conversation that plain text cannot write (no template), or
            when the diff method finds no clean prefix.
    """
    if not any(m.get("role") == "assistant" for m in messages):
        raise FormattingError("the conversation has no assistant turn, so no token would be learned")
    template = _template(tokenizer, chat_template)
    example = MASKERS.get(mask_method(template))(tokenizer, messages, template)
    if add_eos:
        example = _with_eos(example, getattr(tokenizer, "eos_token_id", None))
    if max_length is not None and len(example) > max_length:
        example = TokenizedExample(example.input_ids[:max_length], example.labels[:max_length])
    return example


def tokenize_rows(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    chat_template: str | None = None,
    max_length: int | None = None,
    add_eos: bool = True,
) -> tuple[list[TokenizedExample], int]:
    """Tokenises dataset rows (see :func:`row_to_messages`), dropping those left with no labelled token.

    Returns:
        The examples and how many rows were dropped (all their assistant tokens lay past ``max_length``).
    """
    examples, dropped = [], 0
    for row in rows:
        ex = tokenize_conversation(
            tokenizer,
            row_to_messages(row),
            chat_template=chat_template,
            max_length=max_length,
            add_eos=add_eos,
        )
        if ex.n_labels:
            examples.append(ex)
        else:
            dropped += 1
    return examples, dropped
