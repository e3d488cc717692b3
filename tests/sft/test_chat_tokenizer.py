"""The SFT tests' chat tokenizer and tiny Llama (:mod:`tests.helpers.chat`) do what the tests rely on."""

from __future__ import annotations

import torch

from grpo.data import tasks
from tests.helpers.chat import UNK, char_tokenizer, tiny_llama


def test_char_tokenizer_round_trips_every_task_text():
    tok = char_tokenizer()
    rows = tasks.arithmetic(30, seed=3) + tasks.helpfulness(30, seed=3) + tasks.safety(30, seed=3)
    unk = tok.convert_tokens_to_ids(UNK)
    for row in rows:
        for key in ("prompt", "completion", "chosen", "rejected"):
            if key in row:
                ids = tok(row[key], add_special_tokens=False)["input_ids"]
                assert unk not in ids, row[key]
                assert tok.decode(ids) == row[key]


def test_char_tokenizer_markers_are_single_tokens():
    tok = char_tokenizer()
    ids = tok("<think>1</think>", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<think>", "1", "</think>"]
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<|end|>") == 5


def test_tiny_llama_forward_shape():
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, len(tok))
