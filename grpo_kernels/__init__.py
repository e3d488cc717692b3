"""Triton kernels with PyTorch references; dispatch picks Triton on CUDA and the reference elsewhere.

Every op here takes plain tensors, validates them, and runs the backend :func:`backend` names for the tensors'
device (``KERNELS_BACKEND=triton|torch`` forces one). Triton is imported only when a Triton path runs.
"""

from grpo_kernels.dispatch import backend
from grpo_kernels.mla_decode import mla_decode
from grpo_kernels.moe import grouped_mlp, moe_permute, moe_unpermute
from grpo_kernels.token_logprobs import token_logprobs

__all__ = ["backend", "grouped_mlp", "mla_decode", "moe_permute", "moe_unpermute", "token_logprobs"]
