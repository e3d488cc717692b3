"""Tiny models and tokenizers built in-process for tests (no hub access)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 48
PAD, EOS, BOS = 0, 1, 2


def word_tokenizer(vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``<pad> <eos> <bos> t3 ... t{vocab-1}`` (no chat template)."""
    words = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS}
    words.update({f"t{i}": i for i in range(3, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def tiny_llama(seed: int = 0, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=EOS, pad_token_id=PAD,
                      bos_token_id=BOS, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def count_target(prompts, completions, parity, **_):
    """Share of completion words whose token number has the row's parity (dense and trivially learnable)."""
    out = []
    for text, want in zip(completions, parity):
        words = [w for w in text.split() if w.startswith("t")]
        out.append(sum(int(w[1:]) % 2 == want for w in words) / max(1, len(words)))
    return out
