"""The DeepSeek-V2/V3-style policy model: MLA attention, DeepSeekMoE, latent KV cache, HF checkpoint I/O."""

from model.cache import LatentKVCache
from model.checkpoint import CheckpointError
from model.config import DeepSeekConfig
from model.modeling import DeepSeekForCausalLM, DeepSeekModel, ModelOutput
from model.params import count_parameters
from model.tokenizer import build_tokenizer

__all__ = [
    "CheckpointError",
    "DeepSeekConfig",
    "DeepSeekForCausalLM",
    "DeepSeekModel",
    "LatentKVCache",
    "ModelOutput",
    "build_tokenizer",
    "count_parameters",
]
