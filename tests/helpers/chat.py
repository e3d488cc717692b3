"""A character-level chat tokenizer over the built-in tasks' text and a tiny Llama, for the SFT and evaluation
tests (:mod:`tests.sft.test_chat_tokenizer` tests them)."""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from grpo.data import tasks

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
PAD, UNK = "<|pad|>", "<|unk|>"

# Plain template: the mask comes from diffing renderings.
DIFF_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# Same rendering, assistant content and its end-of-turn marked with {% generation %}.
GENERATION_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% generation %}{{ m['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def char_tokenizer(template: str = DIFF_TEMPLATE) -> PreTrainedTokenizerFast:
    """One token per character of the built-in tasks, plus the role, marker, pad and unk tokens."""
    specials = [PAD, UNK, *ROLE_TOKENS, *tasks.TASK_MARKERS]
    vocab = {t: i for i, t in enumerate([*specials, *tasks.TASK_CHARACTERS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token="<|end|>", extra_special_tokens={}
    )
    fast.chat_template = template
    return fast


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    """A 2-layer, 32-wide Llama in fp32 with SDPA attention."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=5,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).float()
