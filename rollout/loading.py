"""Loading a Hugging Face causal-LM folder: which class reads it, and its tokenizer (or why there is none).

Our DeepSeek-V2/V3 checkpoints (``model_type`` ``deepseek_v2`` / ``deepseek_v3``) load into :mod:`model`; any
other causal LM (Llama, Qwen2, Mistral, ...) loads with ``transformers.AutoModelForCausalLM``. One function
decides, so the trainer, the reference and the rollout engines always hold the same class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from model import DeepSeekForCausalLM
from model.checkpoint import read_config

OUR_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
# A folder has a usable tokenizer when it holds tokenizer.json (fast tokenizers), or tokenizer_config.json beside
# the vocabulary files of a slow tokenizer (sentencepiece's tokenizer.model, BPE's vocab.json + merges.txt, ...).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def model_type(path: str | Path) -> str | None:
    """The ``model_type`` of a checkpoint folder's ``config.json``.

    Raises:
        FileNotFoundError: when the folder has no ``config.json``.
    """
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a Hugging Face model folder: it has no config.json")
    return json.loads(config.read_text()).get("model_type")


def is_ours(path: str | Path) -> bool:
    return model_type(path) in OUR_MODEL_TYPES


def load_causal_lm(path: str | Path, dtype: str | torch.dtype | None = "float32",
                   device: str | torch.device = "cpu") -> nn.Module:
    """Loads a causal LM folder: ours with :mod:`model`, anything else with transformers.

    Args:
        path: The folder (``config.json`` + safetensors).
        dtype: Parameter dtype (``float32``, ``bfloat16``, a ``torch.dtype``); None keeps the checkpoint's.
        device: Where to put the model.
    """
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if is_ours(path):
        model = DeepSeekForCausalLM.from_pretrained(path, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype or "auto")
    return model.to(device)


def meta_causal_lm(path: str | Path) -> nn.Module:
    """The model a folder describes, built on the meta device (no memory, no weights): its names and shapes."""
    if is_ours(path):
        config = read_config(Path(path))
        with torch.device("meta"):
            model = DeepSeekForCausalLM(config)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))


def has_tokenizer(path: str | Path) -> bool:
    """Whether a folder holds tokenizer files :func:`load_tokenizer` can read."""
    folder = Path(path)
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | Path, *, required: bool = True) -> Any:
    """The tokenizer saved in a folder.

    Args:
        path: A model or tokenizer folder.
        required: Raise when the folder has no tokenizer files; else return None.

    Raises:
        FileNotFoundError: naming the files looked for, when ``required`` and none is there.
    """
    if not has_tokenizer(path):
        if not required:
            return None
        raise FileNotFoundError(
            f"{str(path)!r} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); save the tokenizer "
            f"into the folder (tokenizer.save_pretrained(folder)) or name a tokenizer folder (model.tokenizer=...)")
    return AutoTokenizer.from_pretrained(str(path))
