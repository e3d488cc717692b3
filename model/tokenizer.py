"""A small character-level tokenizer (plus tag tokens) with a chat template, for the embedded tiny task.

Every printable ASCII character, newline and tab is one token, so arithmetic text such as ``(12+3)*4=60`` needs
no merges; ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` are single tokens that survive
``skip_special_tokens`` decoding, and ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>`` and the role markers
``<|system|>``, ``<|user|>``, ``<|assistant|>`` are special tokens. The chat template renders::

    <bos><|system|>...<eos><|user|>...<eos><|assistant|>...<eos>

and with ``add_generation_prompt=True`` ends with ``<|assistant|>``, so generation stops at ``<eos>``.

Example:
    >>> tok = build_tokenizer()
    >>> tok.decode(tok("<answer>12</answer>")["input_ids"])
    '<answer>12</answer>'
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAG_TOKENS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
"""The reasoning format's markers (``<think>...</think><answer>...</answer>``, as DeepSeek-R1 writes): single
tokens of the tiny tokenizer, read by the ``format``/``accuracy`` rewards and written by the built-in tasks."""
BASE_CHARACTERS = tuple(c for c in string.printable if c not in "\r\x0b\x0c")  # 95 printable + \t \n

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + '; expected system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer(corpus: Iterable[str] | None = None, extra_tokens: Sequence[str] = (),
                    model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """Builds the character-level tokenizer.

    Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then the role markers, the tag tokens,
    ``extra_tokens``, the base characters, and any further characters found in ``corpus`` (sorted).

    Args:
        corpus: Texts whose characters outside printable ASCII should get their own tokens (else ``<unk>``).
        extra_tokens: More multi-character tokens, matched whole (non-special, kept when decoding).
        model_max_length: Recorded in ``tokenizer_config.json``.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``chat_template`` set; ``save_pretrained`` writes
        ``tokenizer.json`` and ``tokenizer_config.json`` that ``AutoTokenizer.from_pretrained`` reads back.
    """
    specials = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]
    words = [*TAG_TOKENS, *extra_tokens]
    seen_chars = set(BASE_CHARACTERS)
    extra_chars = sorted({ch for text in (corpus or ()) for ch in text} - seen_chars)
    vocab: dict[str, int] = {}
    for token in (*specials, *words, *BASE_CHARACTERS, *extra_chars):
        if token in vocab:
            raise ValueError(f"extra_tokens: {token!r} duplicates an existing token")
        vocab[token] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    tok.add_tokens(words)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS), chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length, padding_side="left", clean_up_tokenization_spaces=False,
    )
