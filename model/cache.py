"""``LatentKVCache``: MLA's decode cache, ``d_c + d_h^R`` values per token per layer.

Each layer holds one preallocated buffer ``[B, S_max, d_c + d_h^R]``: the normed latent ``c_kv`` in the first
``d_c`` columns and the rotated shared key ``k_R`` in the last ``d_h^R``. ``latent(l)`` / ``rope(l)`` are views of
those two parts (``[B, S_max, kv_lora_rank]``, ``[B, S_max, qk_rope_head_dim]``); keeping them in one buffer
lets the absorbed attention read keys ``[c_kv; k_R]`` and values ``c_kv`` without a copy.

All layers share one write position ``seq_len``. Left-padded batches keep their padding in the cache and mask
it with the ``attention_mask [B, seq_len + T]`` given to the model.

Example:
    >>> from model.config import DeepSeekConfig
    >>> cache = LatentKVCache(DeepSeekConfig(), batch_size=2, max_len=16)
    >>> cache.latent(0).shape, cache.rope(0).shape
    (torch.Size([2, 16, 64]), torch.Size([2, 16, 16]))
    >>> cache.index_select(torch.tensor([0, 0, 1])).batch_size  # share prompts across samples
    3
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from model.config import DeepSeekConfig


class LatentKVCache:
    """Preallocated latent KV cache for every layer of one model.

    Args:
        config: The model's config (layers, ``kv_lora_rank``, ``qk_rope_head_dim``).
        batch_size: Rows B.
        max_len: Tokens per row S_max (prompt + generation).
        dtype: Storage dtype (the model's compute dtype).
        device: Storage device.
    """

    def __init__(self, config: DeepSeekConfig, batch_size: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        for name, value in (("batch_size", batch_size), ("max_len", max_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LatentKVCache {name}: expected a positive integer, got {value!r}")
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_rope_head_dim = config.qk_rope_head_dim
        width = config.kv_lora_rank + config.qk_rope_head_dim
        self.buffers: list[Tensor] = [torch.zeros(batch_size, max_len, width, dtype=dtype, device=device)
                                      for _ in range(config.num_hidden_layers)]
        self.seq_len = 0

    @classmethod
    def _from_buffers(cls, template: LatentKVCache, buffers: list[Tensor], seq_len: int) -> LatentKVCache:
        new = cls.__new__(cls)
        new.kv_lora_rank, new.qk_rope_head_dim = template.kv_lora_rank, template.qk_rope_head_dim
        new.buffers, new.seq_len = buffers, seq_len
        return new

    # ------------------------------------------------------------------ shape
    @property
    def batch_size(self) -> int:
        return self.buffers[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.buffers[0].shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.buffers)

    def latent(self, layer: int) -> Tensor:
        """``[B, S_max, kv_lora_rank]`` view of layer ``layer``'s normed latents ``c_kv``."""
        return self.buffers[layer][..., : self.kv_lora_rank]

    def rope(self, layer: int) -> Tensor:
        """``[B, S_max, qk_rope_head_dim]`` view of layer ``layer``'s rotated shared keys ``k_R``."""
        return self.buffers[layer][..., self.kv_lora_rank:]

    # ------------------------------------------------------------------ writing
    def check_append(self, batch: int, new: int) -> None:
        """Raises ``ValueError`` unless ``new`` tokens for ``batch`` rows fit."""
        if batch != self.batch_size:
            raise ValueError(f"cache has {self.batch_size} rows, the input has {batch}")
        if self.seq_len + new > self.max_len:
            raise ValueError(f"cache overflow: {self.seq_len} cached + {new} new tokens > max_len {self.max_len}")

    def write(self, layer: int, c_kv: Tensor, k_pe: Tensor) -> Tensor:
        """Stores ``c_kv [B, T, d_c]`` and ``k_pe [B, T, d_h^R]`` at ``seq_len`` for ``layer``.

        Returns:
            ``[B, seq_len + T, d_c + d_h^R]``: everything cached for this layer, the new tokens included.
        """
        start, end = self.seq_len, self.seq_len + c_kv.shape[1]
        buf = self.buffers[layer]
        buf[:, start:end, : self.kv_lora_rank] = c_kv
        buf[:, start:end, self.kv_lora_rank:] = k_pe
        return buf[:, :end]

    def advance(self, new: int) -> None:
        """Moves the shared write position past ``new`` tokens (after every layer wrote them)."""
        self.seq_len += new

    def reset(self) -> None:
        """Forgets every cached token (the buffers are reused)."""
        self.seq_len = 0

    # ------------------------------------------------------------------ rows
    def index_select(self, rows: Tensor) -> LatentKVCache:
        """A new cache holding rows ``rows`` (a LongTensor; repeats duplicate rows, omissions drop them).

        Used to share one prefilled prompt across its G samples (``rows = arange(B).repeat_interleave(G)``)
        and to drop finished rows. Only the ``seq_len`` cached positions are copied; the rest is zeros.
        """
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.buffers[0].device)
        if rows.dim() != 1:
            raise ValueError(f"index_select rows: expected a 1-D LongTensor, got shape {tuple(rows.shape)}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.batch_size):
            raise ValueError(f"index_select rows: expected ids in [0, {self.batch_size}), got {rows.tolist()}")
        new = []
        for buf in self.buffers:
            out = buf.new_zeros(rows.numel(), buf.shape[1], buf.shape[2])
            out[:, : self.seq_len] = buf[rows, : self.seq_len]
            new.append(out)
        return LatentKVCache._from_buffers(self, new, self.seq_len)

    def nbytes(self) -> int:
        """Bytes held by the preallocated buffers."""
        return sum(buf.numel() * buf.element_size() for buf in self.buffers)

    def __repr__(self) -> str:
        b = self.buffers[0]
        return (f"LatentKVCache(layers={self.num_layers}, batch={self.batch_size}, seq_len={self.seq_len}, "
                f"max_len={self.max_len}, width={b.shape[2]}, dtype={b.dtype}, device={b.device})")
