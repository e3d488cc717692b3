"""Language consistency of the chain of thought (DeepSeek-R1's language-mixing reward), by script detection.

The chain of thought is the text inside the first ``<think>...</think>`` (an unclosed ``<think>`` runs to the
end), else the whole completion. Its letters are split into *units*: a run of letters of a space-separated script
(Latin, Cyrillic, Greek, Arabic, Hebrew, Devanagari, Hangul) is one unit (a word), each character of an
unspaced script (Han, Hiragana, Katakana, Thai) is one unit. Digits, punctuation, symbols and spaces are
neutral. The reward is the share of units written in the target language's scripts; a chain of thought with no
letters at all scores ``None`` (no opinion).

This is script detection, not language identification: English and French are both "Latin", Chinese and the
Kanji in Japanese are both "Han".
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model.tokenizer import THINK_CLOSE, THINK_OPEN
from rewards.protocol import completion_texts

LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    **{code: frozenset({"latin"}) for code in (
        "en", "fr", "de", "es", "it", "pt", "nl", "sv", "da", "no", "fi", "pl", "cs", "ro", "hu", "tr", "vi",
        "id", "ms", "latin")},
    "zh": frozenset({"han"}),
    "ja": frozenset({"han", "hiragana", "katakana"}),
    "ko": frozenset({"hangul", "han"}),
    "ru": frozenset({"cyrillic"}), "uk": frozenset({"cyrillic"}), "cyrillic": frozenset({"cyrillic"}),
    "el": frozenset({"greek"}), "ar": frozenset({"arabic"}), "he": frozenset({"hebrew"}),
    "hi": frozenset({"devanagari"}), "th": frozenset({"thai"}),
    "cjk": frozenset({"han", "hiragana", "katakana", "hangul"}),
}
"""Language code (or script family name) -> the scripts it is written in."""

_UNSPACED = frozenset({"han", "hiragana", "katakana", "thai"})
_NAME_PREFIXES = (
    ("CJK UNIFIED IDEOGRAPH", "han"), ("CJK COMPATIBILITY IDEOGRAPH", "han"), ("HIRAGANA", "hiragana"),
    ("KATAKANA", "katakana"), ("HANGUL", "hangul"), ("LATIN", "latin"), ("CYRILLIC", "cyrillic"),
    ("GREEK", "greek"), ("ARABIC", "arabic"), ("HEBREW", "hebrew"), ("DEVANAGARI", "devanagari"),
    ("THAI", "thai"),
)
_THINK = re.compile(rf"{THINK_OPEN}(.*?)(?:{THINK_CLOSE}|$)", re.DOTALL)


@functools.lru_cache(maxsize=65536)
def script_of(char: str) -> str | None:
    """The script of a letter (``"latin"``, ``"han"``, ...), ``"other"`` for a letter of another script, or
    ``None`` for a non-letter (digit, punctuation, symbol, space)."""
    if not char.isalpha():
        return None
    name = unicodedata.name(char, "")
    for prefix, script in _NAME_PREFIXES:
        if name.startswith(prefix):
            return script
    return "other"


def script_units(text: str) -> list[str]:
    """The script of each unit (word of a spaced script, character of an unspaced one) of ``text``.

    Example:
        >>> script_units("Hello 世界, ok")
        ['latin', 'han', 'han', 'latin']
    """
    units: list[str] = []
    previous: str | None = None
    for char in text:
        script = script_of(char)
        if script is not None and (script in _UNSPACED or script != previous):
            units.append(script)
        previous = script
    return units


def chain_of_thought(text: str) -> str:
    """The text inside the first ``<think>`` block, else the whole text."""
    match = _THINK.search(text)
    return match.group(1) if match else text


def language_share(text: str, language: str) -> float | None:
    """Share of the units of ``text`` written in ``language``'s scripts; ``None`` without any letter."""
    scripts = scripts_for(language)
    units = script_units(text)
    return sum(u in scripts for u in units) / len(units) if units else None


def scripts_for(language: str) -> frozenset[str]:
    """The scripts of a language code (``"en"``, ``"zh"``, ...).

    Raises:
        ValueError: for an unknown code, listing the known ones.
    """
    key = str(language).lower().split("-")[0].split("_")[0]
    if key not in LANGUAGE_SCRIPTS:
        raise ValueError(f"unknown language {language!r}; known: {', '.join(sorted(LANGUAGE_SCRIPTS))}")
    return LANGUAGE_SCRIPTS[key]


@dataclass(frozen=True)
class LanguageConsistencyReward:
    """Share of the chain of thought written in the target language (see the module docstring).

    The target comes from the ``language`` column (one code per sample) when the batch has one, else from the
    ``language`` field.

    Attributes:
        language: Default target language code (e.g. ``"en"``, ``"zh"``).

    Example:
        >>> LanguageConsistencyReward("en")(["q"] * 2, ["<think>add two 加 三</think>5", "<think>12+3</think>"])
        [0.5, None]
    """

    language: str | None = None
    name: str = "language_consistency"

    def __post_init__(self) -> None:
        if self.language is not None:
            scripts_for(self.language)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        texts = completion_texts(completions)
        targets = columns.get("language")
        if targets is None:
            if self.language is None:
                raise ValueError("language_consistency needs a 'language' column or a language= setting")
            targets = [self.language] * len(texts)
        elif isinstance(targets, str) or len(targets) != len(texts):
            raise ValueError(f"column 'language' must be a list with one code per sample ({len(texts)}), "
                             f"got {targets!r:.80}")
        return [language_share(chain_of_thought(t), lang) for t, lang in zip(texts, targets)]
