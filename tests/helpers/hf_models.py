"""Tiny Hugging Face model folders of the shapes users bring (built in-process, no hub), and a dense reward.

* :func:`llama_folder`: a Llama with tied input/output embeddings and a tokenizer with a chat template and a pad
  token (as SmolLM2 or Llama-3.2-1B-Instruct);
* :func:`qwen2_folder`: a Qwen2 with attention biases, untied embeddings, saved in bfloat16, and a tokenizer
  with neither a chat template nor a pad token (as a base model).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from grpo.data import tasks

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def char_tokenizer(chat: bool, pad: bool) -> PreTrainedTokenizerFast:
    """One token per character of the built-in tasks plus role and marker tokens; ``<|end|>`` is eos."""
    specials = ["<|pad|>", "<|unk|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", *tasks.TASK_MARKERS]
    vocab = {t: i for i, t in enumerate([*specials, *tasks.TASK_CHARACTERS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|unk|>", eos_token="<|end|>",
                                   pad_token="<|pad|>" if pad else None, extra_special_tokens={})
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def _sizes(tok: PreTrainedTokenizerFast) -> dict:
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=tok.pad_token_id)


def llama_folder(path: Path, seed: int = 0) -> Path:
    """A tied-embedding Llama + a chat tokenizer with a pad token, saved as a Hugging Face folder."""
    tok = char_tokenizer(chat=True, pad=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**_sizes(tok), tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def qwen2_folder(path: Path, seed: int = 0) -> Path:
    """An untied Qwen2 with attention biases in bfloat16 + a tokenizer without chat template or pad token."""
    tok = char_tokenizer(chat=False, pad=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**_sizes(tok), tie_word_embeddings=False)).to(torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def digit_share(prompts, completions, **columns):
    """Share of a completion's characters that are digits: a dense reward even an untrained model varies on."""
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]
