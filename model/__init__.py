"""The DeepSeek-V2/V3-style policy model: MLA attention, DeepSeekMoE, latent KV cache, HF checkpoint I/O.

The package also holds the small pieces every layer above it shares, none of which imports torch: the registry
(:mod:`model.registry`), crash-safe files (:mod:`model.files`) and the character-level tokenizer with the
reasoning format's tags (:mod:`model.tokenizer`). The model classes load on first use, so importing one of those
pieces (as the torch-free :mod:`rewards` does) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LatentKVCache": "model.cache",
    "CheckpointError": "model.checkpoint",
    "DeepSeekConfig": "model.config",
    "DeepSeekForCausalLM": "model.modeling",
    "DeepSeekModel": "model.modeling",
    "ModelOutput": "model.modeling",
    "count_parameters": "model.params",
    "build_tokenizer": "model.tokenizer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")


__all__ = sorted(_LAZY)
