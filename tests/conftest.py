"""Fixtures shared across the test packages (module-specific ones stay in their modules).

Everything is built in-process: no test reads a model hub.
"""

from __future__ import annotations

import pytest

from model.tokenizer import build_tokenizer
from tests.helpers.chat import char_tokenizer


@pytest.fixture(scope="session")
def tiny_tok():
    """The embedded character-level tokenizer of the tiny recipe (tags as single tokens, a chat template)."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def chat_tok():
    """A character-level tokenizer over the built-in tasks' text with a plain chat template (the SFT tests')."""
    return char_tokenizer()
