"""Final-answer extraction and equivalence for math-style rewards.

Extraction (:func:`extract_answer`) tries, in order, and takes the first that matches:

1. the last complete ``<answer>...</answer>`` block; inside it the last ``\\boxed{...}`` if there is one, else
   the block's text;
2. the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced, possibly nested, braces;
3. GSM8K's ``#### n``: the rest of the last such line;
4. a bare number: the whole text (stripped, an optional trailing period removed) is an integer, a decimal, a
   fraction ``a/b`` or uses thousands separators (``1,234``), as in the arithmetic toy task.

Anything else has no extractable answer (``None``) in the default ``strict`` mode, which is the R1 format's
contract: a model is rewarded for putting its answer where the format says. The ``lenient`` mode (for real models
answering in free text: "80 + 79 = 159", "The answer is 159.") tries the strict rules first, then:

5. a stated answer: the last "the (final) answer is X", "answer: X" or "answer = X";
6. math-verify's own extraction over the whole text (the last LaTeX or plain expression it can parse, which
   covers "... = 159" and "so 3/4 of them");
7. the last number in the text.
 Equivalence (:func:`answers_match`) first compares exact
numbers (``Fraction``: ``0.5 == 1/2``), then asks ``math-verify`` (LaTeX and expressions:
``\\frac{3}{4} == 0.75``, ``2\\sqrt{2} == \\sqrt{8}``). math-verify guards its parsing with ``SIGALRM`` timeouts,
which only work in the main thread; elsewhere they are disabled.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

from math_verify import parse, verify

from model.tokenizer import ANSWER_CLOSE, ANSWER_OPEN

_ANSWER_BLOCK = re.compile(rf"{ANSWER_OPEN}(.*?){ANSWER_CLOSE}", re.DOTALL)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K = re.compile(r"####\s*([^\n]*)")
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*[+-]?\d+)?|[+-]?\.\d+")
MATH_VERIFY_TIMEOUT_S = 5


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, or ``None``.

    Example:
        >>> last_boxed(r"so \\boxed{\\frac{1}{2}} and \\boxed{x^{2}}")
        'x^{2}'
    """
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[pos], 0)
            if depth == 0:
                return text[start:pos].strip()
    return None


def _bare_number(text: str) -> str | None:
    candidate = text.strip().removesuffix(".").strip()
    return candidate if candidate and _NUMBER.fullmatch(candidate) else None


ANSWER_MODES = ("strict", "lenient")
_STATED = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?\s*(?P<answer>[^\n]*)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?!\d)|[;!?,]\s|\n")


def check_answer_mode(mode: str) -> str:
    """Returns ``mode`` if it is one of :data:`ANSWER_MODES`, else raises a ``ValueError`` naming them."""
    if mode not in ANSWER_MODES:
        raise ValueError(f"answer mode must be one of {list(ANSWER_MODES)}, got {mode!r}")
    return mode


def extract_answer(text: str, mode: str = "strict") -> str | None:
    """Extracts the final answer of a completion (see the module docstring for the order), or ``None``.

    Args:
        text: The completion.
        mode: ``strict`` (tags, ``\\boxed{}``, ``####``, a bare number) or ``lenient`` (also an answer in free text).

    Example:
        >>> extract_answer("<think>2+2</think><answer>\\\\boxed{4}</answer>"), extract_answer("#### 1,000")
        ('4', '1,000')
        >>> extract_answer("80 + 79 = 159"), extract_answer("80 + 79 = 159", mode="lenient")
        (None, '159')
    """
    check_answer_mode(mode)
    answer = _extract_strict(text)
    if answer is not None or mode == "strict":
        return answer
    return _extract_lenient(text)


def _extract_lenient(text: str) -> str | None:
    stated = list(_STATED.finditer(text))
    if stated:
        tail = stated[-1]["answer"].strip()
        end = _SENTENCE_END.search(tail)
        candidate = (tail[:end.start()] if end else tail).strip().strip("$*").strip()
        number = _NUMBER.match(candidate)
        if number and (number.end() == len(candidate) or candidate[number.end()] == " "):
            return number.group(0).strip()  # "3/4 of the pie": the number, not the words after it
        if candidate:
            return candidate
    parsed = _math_verify_extract(text)
    if parsed is not None:
        return parsed
    numbers = _NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


def _math_verify_extract(text: str) -> str | None:
    timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        parsed = parse(text, parsing_timeout=timeout)
    except Exception:  # noqa: BLE001 - an unparsable text has no answer, whatever math-verify raises
        return None
    return str(parsed[1]).strip() or None if len(parsed) > 1 else None


def _extract_strict(text: str) -> str | None:
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        block = blocks[-1]
        boxed = last_boxed(block)
        answer = boxed if boxed is not None else block.strip()
        return answer or None
    boxed = last_boxed(text)
    if boxed:
        return boxed
    gsm8k = _GSM8K.findall(text)
    if gsm8k and gsm8k[-1].strip():
        return gsm8k[-1].strip()
    return _bare_number(text)


def gold_answer(answer: object) -> str:
    """Normalises a reference answer: numbers become strings; a GSM8K solution keeps what follows ``####``."""
    text = str(answer).strip()
    gsm8k = _GSM8K.findall(text)
    if gsm8k and gsm8k[-1].strip():
        return gsm8k[-1].strip()
    boxed = last_boxed(text)
    return boxed if boxed is not None else text


def _as_fraction(text: str) -> Fraction | None:
    candidate = _bare_number(text.strip().strip("$").strip())
    if candidate is None:
        return None
    try:
        return Fraction(candidate.replace(",", "").replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify_parse(text: str, timeout: int | None) -> list:
    parsed = parse(f"${text}$", parsing_timeout=timeout)
    return parsed if parsed else parse(text, parsing_timeout=timeout)


def answers_match(predicted: str, gold: str) -> bool:
    """Whether two final answers are mathematically equivalent.

    Example:
        >>> answers_match("3/4", "0.75"), answers_match(r"\\frac{1}{2}", "0.5"), answers_match("2", "3")
        (True, True, False)
    """
    if predicted.strip() == gold.strip():
        return True
    p, g = _as_fraction(predicted), _as_fraction(gold)
    if p is not None and g is not None:
        return p == g
    timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold_parsed = _math_verify_parse(gold, timeout)
    pred_parsed = _math_verify_parse(predicted, timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
