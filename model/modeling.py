"""A DeepSeek-V2/V3 decoder in one file: RMSNorm -> RoPE (YaRN) -> MLA -> MLP -> Gate -> MoE -> Block -> Model.

Read it top to bottom. Parameter names are transformers' (``q_a_proj``, ``kv_a_proj_with_mqa``, ``mlp.gate``,
``mlp.experts.gate_up_proj`` ...), so checkpoints map one to one (:mod:`model.checkpoint` splits the stacked
experts into ``mlp.experts.{i}.{gate,up,down}_proj.weight`` on disk).

Where this departs from transformers, on purpose:
- DeepSeek-V2 routing honours ``norm_topk_prob`` as DeepSeek's own code and vLLM do (transformers' V2 ignores it).
  Routing weights are ``scores`` of the chosen experts, renormalised to sum 1 when ``norm_topk_prob``, then
  always multiplied by ``routed_scaling_factor`` (vLLM's and transformers' V3 order).
- YaRN's cos/sin factor is DeepSeek's ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` with the
  original defaults (``mscale=1``, ``mscale_all_dim=0``); transformers agrees whenever both keys are given.
- DeepSeek-V2's expert-, device- and communication-level balance losses are returned unweighted, per sequence
  and averaged over sequences (the released code's ``seq_aux``); padded tokens neither count as load nor enter
  the averages. Expert groups stand for devices. V2's device-level token dropping is not implemented (no
  token is ever dropped).
- Routed experts are dispatched by sorting tokens by expert (no per-token loop), as in vLLM's fused MoE.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import grpo_kernels
from model import checkpoint as hf_checkpoint
from model.cache import LatentKVCache
from model.config import SCORING_FUNCS, TOPK_METHODS, DeepSeekConfig, yarn_get_mscale

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
BALANCE_LOSSES = ("expert_balance", "device_balance", "comm_balance")


@dataclass
class ModelOutput:
    """What :class:`DeepSeekModel` and :class:`DeepSeekForCausalLM` return.

    Attributes:
        logits: ``[B, T, V]`` (or ``[B, logits_to_keep, V]``); ``None`` from the backbone or with
            ``compute_logits=False``.
        last_hidden_state: ``[B, T, H]`` after the final RMSNorm.
        aux_losses: Unweighted MoE balance losses summed over MoE layers: ``expert_balance``,
            ``device_balance``, ``comm_balance`` (scalars; zeros without MoE layers or when decoding with a cache).
        cache: The latent cache the new tokens were appended to, if one was given.
    """

    logits: Tensor | None = None
    last_hidden_state: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    cache: LatentKVCache | None = None


class _Float32Buffers(nn.Module):
    """Keeps the buffers named in ``_fp32_buffers`` in float32 whatever dtype the module is cast to.

    (transformers does the same for ``e_score_correction_bias`` with ``_keep_in_fp32_modules_strict``.)
    """

    _fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - torch's signature
        saved = {name: getattr(self, name) for name in self._fp32_buffers if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, before in saved.items():
            after = getattr(self, name)
            if after.dtype != torch.float32:
                keep = after.float() if before.is_meta or after.is_meta else before.to(device=after.device)
                setattr(self, name, keep)
        return self


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype``, without a (no-op) conversion op when it already is: decoding is bound by op count."""
    return x if x.dtype == dtype else x.to(dtype)


# ----------------------------------------------------------------------------------------------- RMSNorm
class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)``, computed in float32 and cast back (as transformers does)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = _cast(x, torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * _cast(h, x.dtype)


# ----------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(config: DeepSeekConfig) -> tuple[Tensor, float]:
    """Inverse frequencies ``[d_h^R / 2]`` and the cos/sin factor, plain or YaRN-interpolated.

    YaRN (as DeepSeek-V2/V3): dimensions rotating fewer than ``beta_slow`` times over the original context
    are interpolated by ``1/factor``, those rotating more than ``beta_fast`` times are kept, with a linear ramp
    between; cos/sin are scaled by ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``.
    """
    dim, base = config.qk_rope_head_dim, float(config.rope_theta)
    freq = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / freq
    rs = config.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    factor, original = float(rs["factor"]), rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast", 32), rs.get("beta_slow", 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp  # 1 = keep the original frequency
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    attention_factor = yarn_get_mscale(factor, rs.get("mscale", 1.0)) / yarn_get_mscale(
        factor, rs.get("mscale_all_dim", 0.0))
    return inv_freq, attention_factor


class RotaryEmbedding(_Float32Buffers):
    """cos/sin tables for given positions (computed on the fly; ``inv_freq`` stays float32)."""

    _fp32_buffers = ("inv_freq",)

    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def init_runtime_buffers(self, device: torch.device) -> None:
        """Recomputes ``inv_freq`` on ``device`` (after a meta-device build)."""
        self.inv_freq = rope_inv_freq(self.config)[0].to(device)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``position_ids [B, T]`` -> ``(cos, sin)``, each ``[B, T, d_h^R / 2]`` float32."""
        freqs = position_ids.float()[..., None] * self.inv_freq  # [B, T, d/2]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleave: bool) -> Tensor:
    """Rotates ``x [B, T, (H,) d]`` by ``cos, sin [B, T, d/2]``.

    ``interleave=True`` rotates pairs ``(x0, x1), (x2, x3), ...`` (DeepSeek's layout, transformers' V2 and V3
    default) in place, as one complex multiplication; ``False`` rotates ``(x_i, x_{i+d/2})`` (rotate-half).
    The layout of the output differs from transformers' (which moves interleaved pairs to rotate-half order
    first), but q and k get the same one, so ``q . k`` is unchanged.
    """
    if x.dim() == 4:  # [B, T, H, d]: broadcast over heads
        cos, sin = cos[:, :, None], sin[:, :, None]
    # float32 whatever reaches the block (FSDP's mixed precision casts a block's floating inputs to bfloat16)
    cos, sin, xf = _cast(cos, torch.float32), _cast(sin, torch.float32), _cast(x, torch.float32)
    if interleave:
        pairs = xf.unflatten(-1, (-1, 2))  # [..., d/2, 2]
        if pairs.storage_offset() % 2 or any(stride % 2 for stride in pairs.stride()[:-1]):
            pairs = pairs.contiguous()  # a complex view needs pairs aligned to whole complex numbers
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin)).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return _cast(out, x.dtype)


# ----------------------------------------------------------------------------------------------- masks
class AttentionMask(NamedTuple):
    """``mask`` is ``[B, 1, T, S]`` bool (True = attend) or None; ``is_causal`` asks SDPA for a causal mask."""

    mask: Tensor | None
    is_causal: bool


def _packed_mask(position_ids: Tensor) -> AttentionMask | None:
    """Block-diagonal causal mask for packed rows (positions restarting at 0 inside a row), else None."""
    if position_ids.shape[1] < 2 or not bool((position_ids[:, 1:] <= position_ids[:, :-1]).any()):
        return None
    segment = (position_ids == 0).cumsum(-1)  # [B, T]: which packed example each token belongs to
    same = segment[:, :, None] == segment[:, None, :]  # [B, T, T]
    causal = torch.ones(same.shape[1:], dtype=torch.bool, device=same.device).tril()
    return AttentionMask((same & causal)[:, None], False)


def build_attention_mask(attention_mask: Tensor | None, batch: int, new: int, past: int,
                         device: torch.device, position_ids: Tensor | None = None) -> AttentionMask:
    """The attention pattern of ``new`` query tokens over ``past + new`` keys.

    Args:
        attention_mask: ``[B, past + new]``, 1 for real tokens, 0 for padding; None = all real.
        batch: B.
        new: T, the number of new tokens.
        past: Tokens already in the cache.
        device: Where to build the mask.
        position_ids: ``[B, T]``; without an ``attention_mask`` and a cache, positions that restart at 0
            inside a row mark packed examples, which then attend only within themselves (as transformers
            does for packed sequences).

    Query rows that see no real key (left padding) attend to every key instead, which keeps them finite;
    their outputs never reach a real token.
    """
    total = past + new
    if attention_mask is None:
        packed = _packed_mask(position_ids) if position_ids is not None and past == 0 else None
        if packed is not None:
            return packed
        if new == 1:
            return AttentionMask(None, False)
        if past == 0:
            return AttentionMask(None, True)
        keep = None
    else:
        if tuple(attention_mask.shape) != (batch, total):
            raise ValueError(f"attention_mask: expected shape ({batch}, {total}) (cached + new tokens), got "
                             f"{tuple(attention_mask.shape)}")
        keep = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # [B, 1, 1, S]
    q_pos = torch.arange(past, total, device=device)
    causal = torch.arange(total, device=device)[None, :] <= q_pos[:, None]  # [T, S]
    mask = causal[None, None] if keep is None else keep & causal
    if keep is not None:
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return AttentionMask(mask, False)


# ----------------------------------------------------------------------------------------------- shared prefix
@dataclass(frozen=True)
class SharedPrefix:
    """Rows that begin with the same ``P`` tokens (a prompt and its G sampled completions) compute them once.

    Hidden states then travel flat, ``[1, M, D]`` with ``M = B*P + N*T``: the ``B`` distinct prefixes of ``P``
    tokens, then the ``N`` rows' suffixes of ``T`` tokens. Every op but attention works per token; attention
    splits the two parts (:meth:`MLA.attend_shared`): prefix queries attend within their prefix, suffix queries
    to their row's prefix and their own suffix. The output is the unshared forward's, up to float rounding.

    Attributes:
        rows: ``[N]`` which prefix each row starts with.
        prefix_len: P.
        prefix_mask: ``[B, P]`` attention mask of the distinct prefixes.
        mask: ``[N, P + T]`` the rows' attention mask.
        ids: ``[1, M]`` flat token ids.
        positions: ``[1, M]`` flat position ids.
        attn_prefix: The prefixes' attention pattern (``P`` queries over ``P`` keys).
        attn_suffix: The suffixes' attention pattern (``T`` queries over ``P + T`` keys).
    """

    rows: Tensor
    prefix_len: int
    prefix_mask: Tensor
    mask: Tensor
    ids: Tensor
    positions: Tensor
    attn_prefix: AttentionMask
    attn_suffix: AttentionMask

    @classmethod
    def find(cls, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, prefix_len: int
             ) -> SharedPrefix | None:
        """The layout of ``input_ids [N, L]`` when at least two rows share their first ``prefix_len`` tokens
        (ids, mask and positions alike), else None."""
        n, length = input_ids.shape
        p = prefix_len
        key = torch.cat((input_ids[:, :p].long(), attention_mask[:, :p].long(), position_ids[:, :p].long()), 1)
        distinct, rows = torch.unique(key, dim=0, return_inverse=True)  # [B, 3P], [N]
        if distinct.shape[0] == n:
            return None
        b, t = distinct.shape[0], length - p
        prefix_mask = distinct[:, p:2 * p]
        ids = torch.cat((distinct[:, :p].reshape(-1), input_ids[:, p:].long().reshape(-1)))[None]
        positions = torch.cat((distinct[:, 2 * p:].reshape(-1), position_ids[:, p:].long().reshape(-1)))[None]
        device = input_ids.device
        return cls(rows, p, prefix_mask, attention_mask, ids, positions,
                   build_attention_mask(prefix_mask, b, p, 0, device),
                   build_attention_mask(attention_mask, n, t, p, device))

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[1, M, ...]`` -> prefixes ``[B, P, ...]`` and suffixes ``[N, T, ...]``."""
        n, b, p = self.mask.shape[0], self.prefix_mask.shape[0], self.prefix_len
        head, tail = x[0].split([b * p, x.shape[1] - b * p])
        return head.view(b, p, *x.shape[2:]), tail.view(n, -1, *x.shape[2:])

    def expand(self, x: Tensor) -> Tensor:
        """``[1, M, ...]`` -> every row's full sequence ``[N, P + T, ...]`` (its prefix, then its suffix)."""
        head, tail = self.split(x)
        return torch.cat((head[self.rows], tail), dim=1)

    @staticmethod
    def join(head: Tensor, tail: Tensor) -> Tensor:
        """Inverse of :meth:`split`: ``[B, P, ...]``, ``[N, T, ...]`` -> ``[1, M, ...]``."""
        return torch.cat((head.flatten(0, 1), tail.flatten(0, 1)))[None]

    @property
    def valid(self) -> Tensor:
        """``[1, M]`` bool, False at padding."""
        return self.join(self.prefix_mask, self.mask[:, self.prefix_len:]).bool()

    @cached_property  # read by every MoE layer of the forward
    def token_rows(self) -> Tensor:
        """``[1, M]`` how many rows each real token stands for (prefix tokens count once per row sharing them)."""
        share = torch.bincount(self.rows, minlength=self.prefix_mask.shape[0])  # [B]
        return self.join(self.prefix_mask * share[:, None], self.mask[:, self.prefix_len:].long())

    def balance_losses(self, probs: Tensor, indices: Tensor, n_group: int, topk_group: int) -> dict[str, Tensor]:
        """:func:`balance_losses` of the full rows, from flat ``probs [M, E]`` and ``indices [M, K]``."""
        (p_probs, s_probs), (p_idx, s_idx) = self.split(probs[None]), self.split(indices[None])
        sums = (_balance_sums(p_probs, p_idx, self.prefix_mask.bool(), n_group)[self.rows]
                + _balance_sums(s_probs, s_idx, self.mask[:, self.prefix_len:].bool(), n_group))
        return _balance_from_sums(sums, indices.shape[-1], n_group, topk_group)


# ----------------------------------------------------------------------------------------------- MLA
class MLA(nn.Module):
    """Multi-head Latent Attention with decoupled RoPE.

    ``c_kv = RMSNorm(W_dkv h)`` (d_c) and one shared ``k_R = RoPE(W_kr h)`` (d_h^R) are all a token caches;
    per head, ``k_C = W_uk c_kv``, ``v = W_uv c_kv`` (``kv_b_proj`` stacks W_uk and W_uv), queries come from
    ``c_q = RMSNorm(W_dq h)`` (or ``h`` directly without ``q_lora_rank``), ``q = [W_uq c_q; RoPE(W_qr c_q)]``.
    Two equivalent paths: :meth:`attend_naive` expands k, v (training, prefill without a cache) and
    :meth:`attend_absorbed` folds W_uk into the query and W_uv into the output and attends over the latents.
    """

    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        c = config
        self.n_heads, self.d_nope, self.d_rope, self.d_v = (c.num_attention_heads, c.qk_nope_head_dim,
                                                            c.qk_rope_head_dim, c.v_head_dim)
        self.kv_lora_rank = c.kv_lora_rank
        self.interleave = c.rope_interleave
        self.scale = c.softmax_scale()
        q_out = c.num_attention_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim,
                                            bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.v_head_dim, c.hidden_size, bias=c.attention_bias)

    def project(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``h [B, T, D]`` -> ``q_nope [B, T, H, d_h]``, ``q_pe [B, T, H, d_h^R]`` (rotated),
        ``c_kv [B, T, d_c]`` (normed latent), ``k_pe [B, T, d_h^R]`` (rotated)."""
        b, t, _ = h.shape
        q = self.q_proj(h) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(h)))
        q_nope, q_pe = q.view(b, t, self.n_heads, -1).split([self.d_nope, self.d_rope], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(h).split([self.kv_lora_rank, self.d_rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)
        k_pe = apply_rope(k_pe, cos, sin, self.interleave)
        return q_nope, q_pe, c_kv, k_pe

    def expand_kv(self, c_kv: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head keys and values from the latents ``c_kv [B, S, d_c]``, ``k_pe [B, S, d_h^R]``:
        ``k [B, S, H, d_h + d_h^R]``, ``v [B, S, H, d_v]``."""
        b, s = c_kv.shape[:2]
        k_nope, v = self.kv_b_proj(c_kv).view(b, s, self.n_heads, -1).split([self.d_nope, self.d_v], dim=-1)
        return torch.cat((k_nope, k_pe[:, :, None].expand(-1, -1, self.n_heads, -1)), dim=-1), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        """``q [B, T, H, d]``, ``k [B, S, H, d]``, ``v [B, S, H, d_v]`` -> ``[B, T, H * d_v]`` (before ``o_proj``)."""
        b, t = q.shape[:2]
        # Fused attention kernels (CPU flash included) want v as wide as q/k: zero-pad v, drop the pad after.
        v = F.pad(v, (0, q.shape[-1] - self.d_v)) if self.d_v < q.shape[-1] else v
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask.mask, is_causal=mask.is_causal,
                                             scale=self.scale)  # [B, H, T, d]
        return out[..., : self.d_v].transpose(1, 2).reshape(b, t, self.n_heads * self.d_v)

    def attend_naive(self, q_nope: Tensor, q_pe: Tensor, c_kv: Tensor, k_pe: Tensor,
                     mask: AttentionMask) -> Tensor:
        """Attention with k, v expanded from the latents: ``c_kv [B, S, d_c]``, ``k_pe [B, S, d_h^R]``.

        Returns:
            ``[B, T, H * d_v]`` (before ``o_proj``).
        """
        k, v = self.expand_kv(c_kv, k_pe)
        return self.attend(torch.cat((q_nope, q_pe), dim=-1), k, v, mask)

    def attend_shared(self, q_nope: Tensor, q_pe: Tensor, c_kv: Tensor, k_pe: Tensor,
                      shared: SharedPrefix) -> Tensor:
        """:meth:`attend_naive` over the flat tokens of a :class:`SharedPrefix` layout (all inputs
        ``[1, M, ...]``): the prefixes attend within themselves, each suffix to its prefix and itself.

        Returns:
            ``[1, M, H * d_v]`` (before ``o_proj``).
        """
        q = torch.cat((q_nope, q_pe), dim=-1)
        k, v = self.expand_kv(c_kv, k_pe)
        (q_head, q_tail), (k_head, _), (v_head, _) = shared.split(q), shared.split(k), shared.split(v)
        head = self.attend(q_head, k_head, v_head, shared.attn_prefix)  # [B, P, H * d_v]
        tail = self.attend(q_tail, shared.expand(k), shared.expand(v), shared.attn_suffix)  # [N, T, H * d_v]
        return shared.join(head, tail)

    def attend_absorbed(self, q_nope: Tensor, q_pe: Tensor, latent: Tensor, mask: AttentionMask) -> Tensor:
        """Attention directly over cached latents ``latent [B, S, d_c + d_h^R]`` (``[c_kv; k_pe]``).

        ``q_C . k_C = (W_uk^T q_C) . c_kv`` and ``sum_s p_s W_uv c_s = W_uv sum_s p_s c_s``: one shared key/value
        "head" of width ``d_c + d_h^R`` / ``d_c`` for all query heads (MQA over the latents).

        Returns:
            ``[B, T, H * d_v]`` (before ``o_proj``).
        """
        b, t = q_nope.shape[:2]
        w = self.kv_b_proj.weight.view(self.n_heads, self.d_nope + self.d_v, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.d_nope], w[:, self.d_nope:]  # [H, d_h, d_c], [H, d_v, d_c]
        # Per-head products as one batched matmul over heads (what einsum would do, without its overhead).
        q_lat = torch.bmm(q_nope.reshape(b * t, self.n_heads, -1).transpose(0, 1), w_uk)  # [H, B*T, d_c]
        q_lat = q_lat.view(self.n_heads, b, t, -1).transpose(0, 1)  # [B, H, T, d_c]
        q = torch.cat((q_lat, q_pe.transpose(1, 2)), dim=-1)  # [B, H, T, d_c + d_h^R]
        if t == 1:  # decoding
            o_lat = self._attend_one(q.view(b, self.n_heads, -1), latent, mask.mask)  # [B, H, d_c]
            out = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2))  # [H, B, d_v]
            return out.transpose(0, 1).reshape(b, 1, self.n_heads * self.d_v)
        k = latent[:, None]  # [B, 1, S, d_c + d_h^R]
        # The values are the first d_c columns of the keys; attending with v = k keeps q/k/v one width (fused
        # kernels need that) and the extra d_h^R output columns are dropped below.
        # One shared key/value head: fold the query heads into the query rows (row = h * T + t) so attention
        # runs as a single head, instead of SDPA broadcasting the latents to every head.
        s = latent.shape[1]
        attn_mask = mask.mask
        if mask.is_causal:
            attn_mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)[None, None]
        if attn_mask is not None:
            attn_mask = attn_mask.expand(attn_mask.shape[0], self.n_heads, t, s).reshape(-1, 1, self.n_heads * t, s)
        o_lat = F.scaled_dot_product_attention(q.reshape(b, 1, self.n_heads * t, -1), k, k, attn_mask=attn_mask,
                                               scale=self.scale)  # [B, 1, H * T, d_c + d_h^R]
        o_lat = o_lat[..., : self.kv_lora_rank].reshape(b, self.n_heads, t, self.kv_lora_rank)  # [B, H, T, d_c]
        out = torch.bmm(o_lat.transpose(0, 1).reshape(self.n_heads, b * t, -1), w_uv.transpose(1, 2))  # [H, B*T, d_v]
        return out.view(self.n_heads, b, t, self.d_v).permute(1, 2, 0, 3).reshape(b, t, self.n_heads * self.d_v)

    def _attend_one(self, q: Tensor, latent: Tensor, keep: Tensor | None) -> Tensor:
        """One query per row and head over the latents. Where the kernels' backend is Triton (CUDA, or
        ``KERNELS_BACKEND=triton``) this is :func:`grpo_kernels.mla_decode`, the fused split-K decode kernel;
        elsewhere two batched matmuls and a softmax over the joint latents (on CPU the kernel's reference, with
        its two score products, validation and empty-row handling, costs more per call than this one product).

        Args:
            q: ``[B, H, d_c + d_h^R]`` absorbed queries.
            latent: ``[B, S, d_c + d_h^R]`` cached ``[c_kv; k_pe]``.
            keep: ``[B, 1, 1, S]`` bool (True = attend; every row attends somewhere) or None.

        Returns:
            ``[B, H, d_c]``: the attention-weighted latents.
        """
        if grpo_kernels.backend(q.device) == "triton":  # the fused decode kernel (CUDA, or KERNELS_BACKEND=triton)
            d_c = self.kv_lora_rank
            mask = None if keep is None else keep.view(keep.shape[0], -1)  # [B, S]
            return grpo_kernels.mla_decode(q[..., :d_c], q[..., d_c:], latent[..., :d_c], latent[..., d_c:], mask,
                                      self.scale)
        keys = latent.transpose(1, 2)  # [B, d_c + d_h^R, S]
        if keep is None:
            scores = torch.bmm(q, keys).mul_(self.scale)  # [B, H, S]
        else:
            bias = _cast(torch.where(keep.view(keep.shape[0], 1, -1), 0.0, float("-inf")), q.dtype)  # [B, 1, S]
            scores = torch.baddbmm(bias, q, keys, alpha=self.scale)  # [B, H, S]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        return torch.bmm(_cast(probs, q.dtype), latent[..., : self.kv_lora_rank])

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask,
                cache: LatentKVCache | None = None, layer_idx: int = 0, shared: SharedPrefix | None = None
                ) -> Tensor:
        """``h [B, T, D]`` -> ``[B, T, D]``; with ``cache``, writes this layer's latents at ``cache.seq_len``
        and attends through the absorbed path over everything cached; with ``shared``, ``h`` is its flat
        layout ``[1, M, D]``."""
        q_nope, q_pe, c_kv, k_pe = self.project(h, cos, sin)
        if shared is not None:
            out = self.attend_shared(q_nope, q_pe, c_kv, k_pe, shared)
        elif cache is None:
            out = self.attend_naive(q_nope, q_pe, c_kv, k_pe, mask)
        else:
            latent = cache.write(layer_idx, c_kv, k_pe)  # [B, seq_len + T, d_c + d_h^R]
            out = self.attend_absorbed(q_nope, q_pe, latent, mask)
        return self.o_proj(out)


# ----------------------------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """SwiGLU feed-forward ``down(act(gate(x)) * up(x))``: the dense layers and the shared experts."""

    def __init__(self, config: DeepSeekConfig, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------------------------- Gate
def _score_softmax(logits: Tensor) -> Tensor:
    return logits.softmax(dim=-1)


SCORE_FUNCS: dict[str, Callable[[Tensor], Tensor]] = {"softmax": _score_softmax, "sigmoid": torch.sigmoid}


def _select_greedy(scores: Tensor, n_group: int, topk_group: int, k: int) -> Tensor:
    """Plain top-k over all experts. ``scores [N, E]`` -> ``[N, k]``."""
    return scores.topk(k, dim=-1, sorted=False).indices


def _restrict_to_groups(scores: Tensor, group_scores: Tensor, topk_group: int) -> Tensor:
    """``scores [N, E]`` with experts outside each token's best ``topk_group`` groups set to -inf."""
    n, n_group = group_scores.shape
    best = group_scores.topk(topk_group, dim=-1, sorted=False).indices  # [N, M]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # [N, G]
    keep = keep[:, :, None].expand(n, n_group, scores.shape[-1] // n_group).reshape(n, -1)
    return scores.masked_fill(~keep, float("-inf"))


def _select_group_limited(scores: Tensor, n_group: int, topk_group: int, k: int) -> Tensor:
    """DeepSeek-V2's device-limited routing: a group scores its best expert; top-k inside the best M groups."""
    group_scores = scores.view(scores.shape[0], n_group, -1).amax(dim=-1)  # [N, G]
    return _restrict_to_groups(scores, group_scores, topk_group).topk(k, dim=-1, sorted=False).indices


def _select_noaux_tc(scores: Tensor, n_group: int, topk_group: int, k: int) -> Tensor:
    """DeepSeek-V3: a group scores the sum of its top-2 (bias-corrected) experts; top-k inside the best M."""
    group_scores = scores.view(scores.shape[0], n_group, -1).topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
    return _restrict_to_groups(scores, group_scores, topk_group).topk(k, dim=-1, sorted=False).indices


TOPK_SELECTORS: dict[str, Callable[[Tensor, int, int, int], Tensor]] = {
    "greedy": _select_greedy,
    "group_limited_greedy": _select_group_limited,
    "noaux_tc": _select_noaux_tc,
}
assert set(SCORE_FUNCS) == set(SCORING_FUNCS) and set(TOPK_SELECTORS) == set(TOPK_METHODS)


class Routing(NamedTuple):
    """One gate's decision for ``N`` tokens.

    Attributes:
        weights: ``[N, K]`` float32 gate values of the chosen experts.
        indices: ``[N, K]`` chosen expert ids.
        probs: ``[N, E]`` float32 affinities normalised per token (softmax scores; sigmoid scores divided
            by their sum), the ``s_{i,t}`` of the balance losses.
    """

    weights: Tensor
    indices: Tensor
    probs: Tensor


class Gate(_Float32Buffers):
    """The router: affinity scores, top-k selection, gate weights; tracks per-expert token counts.

    ``e_score_correction_bias`` (``noaux_tc`` only; float32, not trained by gradient) shifts the scores used to
    *select* experts; gate weights come from the unbiased scores. :meth:`update_bias` nudges it toward balance.
    """

    _fp32_buffers = ("e_score_correction_bias",)

    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        self.config = config
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        bias = torch.zeros(config.n_routed_experts) if config.topk_method == "noaux_tc" else None
        self.register_buffer("e_score_correction_bias", bias)
        self.score = SCORE_FUNCS[config.scoring_func]
        self.select = TOPK_SELECTORS[config.topk_method]
        self.init_runtime_buffers(self.weight.device)
        self.replay: Tensor | None = None  # [B, T, K] expert ids to route by, -1: choose (see model.routing)
        self.recording: list[Tensor] | None = None  # every forward's chosen ids [N, K] are appended here
        self.recording_own = False  # record the router's own choice, before any replay (see model.routing)

    def init_runtime_buffers(self, device: torch.device) -> None:
        """Zeroed token counters: ``tokens_seen`` (for :meth:`routing_stats`) and ``load_since_update``."""
        self.register_buffer("tokens_seen", torch.zeros(self.n_experts, dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("load_since_update", torch.zeros(self.n_experts, dtype=torch.long, device=device),
                             persistent=False)

    def forward(self, x: Tensor) -> Routing:
        """``x [N, D]`` -> :class:`Routing`."""
        c = self.config
        scores = self.score(F.linear(_cast(x, torch.float32), _cast(self.weight, torch.float32)))  # [N, E]
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        own = self.select(choice, c.n_group, c.topk_group, self.top_k)  # [N, K]
        # route by the replayed experts; the weights still come from the scores
        indices = own if self.replay is None else _replayed(own, self.replay)
        if self.recording is not None:
            self.recording.append((own if self.recording_own else indices).detach().clone())
        weights = scores.gather(1, indices)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * c.routed_scaling_factor
        probs = scores if c.scoring_func == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
        return Routing(weights, indices, probs)

    @torch.no_grad()
    def record(self, counts: Tensor) -> None:
        """Adds ``counts [E]`` (tokens per expert) to the stats; to the bias-update load in training mode."""
        self.tokens_seen += counts
        if self.training:
            self.load_since_update += counts

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): ``b_i += gamma * sign(mean(load) - load_i)``; resets the load."""
        if self.e_score_correction_bias is None:
            raise ValueError(f"update_router_bias needs topk_method 'noaux_tc', got {self.config.topk_method!r}")
        load = self.load_since_update.float()
        self.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
        self.load_since_update.zero_()


def _replayed(chosen: Tensor, replay: Tensor) -> Tensor:
    """``chosen [N, K]`` with the rows ``replay [B, T, K]`` gives (the forward runs the first ``N / B`` of its
    ``T`` positions), except where ``replay`` holds -1."""
    b, n = replay.shape[0], chosen.shape[0]
    if n % b or n // b > replay.shape[1]:
        raise ValueError(f"router replay: {n} routed tokens are not the first positions of the replayed "
                         f"[{b}, {replay.shape[1]}] rows (a shared-prefix forward cannot be replayed)")
    rows = replay[:, : n // b].reshape(n, -1).to(chosen.device)
    return torch.where(rows >= 0, rows, chosen)


# ----------------------------------------------------------------------------------------------- MoE
def balance_losses(probs: Tensor, indices: Tensor, valid: Tensor, n_group: int, topk_group: int
                   ) -> dict[str, Tensor]:
    """DeepSeek-V2's expert-, device- and communication-level balance losses (unweighted).

    For each sequence of ``T`` real tokens, with ``E`` routed experts, ``K`` chosen per token, ``D = n_group``
    devices (expert groups) and ``M = topk_group``::

        f_i   = E / (K T) * #tokens choosing expert i          P_i   = mean_t s_{i,t}
        L_exp = sum_i f_i P_i
        f'_d  = mean_{i in d} f_i,   P'_d = sum_{i in d} P_i,  L_dev  = sum_d f'_d P'_d
        f''_d = D / (M T) * #tokens sent to device d,          L_comm = sum_d f''_d P'_d

    averaged over the sequences that have a real token.

    Args:
        probs: ``[B, T, E]`` float32 affinities ``s_{i,t}``.
        indices: ``[B, T, K]`` chosen experts.
        valid: ``[B, T]`` bool, False for padding.
        n_group: D.
        topk_group: M.

    Returns:
        ``{"expert_balance", "device_balance", "comm_balance"}`` scalars.
    """
    sums = _balance_sums(probs, indices, valid, n_group)
    return _balance_from_sums(sums, indices.shape[-1], n_group, topk_group)


def _balance_sums(probs: Tensor, indices: Tensor, valid: Tensor, n_group: int) -> Tensor:
    """Per-sequence sums behind :func:`balance_losses`, additive over tokens: ``[B, 2E + D + 1]`` =
    (tokens choosing each expert, summed affinities, tokens sent to each device, real tokens)."""
    b, t, e = probs.shape
    k = indices.shape[-1]
    v = valid.to(probs.dtype)  # [B, T]
    counts = torch.zeros(b, e, device=probs.device).scatter_add_(
        1, indices.reshape(b, t * k), v[:, :, None].expand(b, t, k).reshape(b, t * k))  # [B, E]
    p_sum = (probs * v[:, :, None]).sum(dim=1)  # [B, E]
    sent = torch.zeros(b, t, n_group, device=probs.device).scatter_(2, indices // (e // n_group), 1.0)
    sent = (sent * v[:, :, None]).sum(dim=1)  # [B, D]
    return torch.cat((counts, p_sum, sent, v.sum(dim=1, keepdim=True)), dim=1)


def _balance_from_sums(sums: Tensor, k: int, n_group: int, topk_group: int) -> dict[str, Tensor]:
    """:func:`balance_losses` from :func:`_balance_sums` (``[B, 2E + D + 1]``) and ``K``."""
    b = sums.shape[0]
    e = (sums.shape[1] - n_group - 1) // 2
    per_group = e // n_group
    counts, p_sum, sent, n_real = sums.split([e, e, n_group, 1], dim=1)
    n_tok = n_real.squeeze(1).clamp(min=1)  # [B]
    f = counts * e / (k * n_tok[:, None])  # [B, E]
    p = p_sum / n_tok[:, None]  # [B, E]
    f_dev = f.view(b, n_group, per_group).mean(dim=-1)  # [B, D]
    p_dev = p.view(b, n_group, per_group).sum(dim=-1)  # [B, D]
    f_comm = sent * n_group / (topk_group * n_tok[:, None])  # [B, D]
    has = (n_real.squeeze(1) > 0).to(sums.dtype)  # [B]
    denom = has.sum().clamp(min=1)

    def mean_over_sequences(per_seq: Tensor) -> Tensor:
        return (per_seq * has).sum() / denom

    return {
        "expert_balance": mean_over_sequences((f * p).sum(dim=1)),
        "device_balance": mean_over_sequences((f_dev * p_dev).sum(dim=1)),
        "comm_balance": mean_over_sequences((f_comm * p_dev).sum(dim=1)),
    }


def _experts_loop(xs: Tensor, gate_up: Tensor, down: Tensor, act: Callable[[Tensor], Tensor],
                  counts: Tensor) -> Tensor:
    """Per-expert SwiGLU over contiguous slices (one ``.tolist()`` sync; the fastest on CPU).

    Args:
        xs: ``[N*K, D]`` rows sorted by expert.
        gate_up: ``[E, 2I, D]``.
        down: ``[E, D, I]``.
        act: The gate activation.
        counts: ``[E]`` rows per expert.

    Returns:
        ``[N*K, D]`` expert outputs, in the same order as ``xs``.
    """
    sizes = counts.tolist()
    outs = []
    for xe, w_gate_up, w_down, size in zip(xs.split(sizes), gate_up.unbind(0), down.unbind(0), sizes):
        if size:
            g, u = F.linear(xe, w_gate_up).chunk(2, dim=-1)
            outs.append(F.linear(act(g) * u, w_down))
    return torch.cat(outs) if outs else xs.new_zeros(0, down.shape[1])


def _experts_grouped_mm(xs: Tensor, gate_up: Tensor, down: Tensor, act: Callable[[Tensor], Tensor],
                        counts: Tensor) -> Tensor:
    """The same as :func:`_experts_loop` with two ``torch._grouped_mm`` calls and no host sync."""
    offs = counts.cumsum(0).to(torch.int32)
    g, u = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    return torch._grouped_mm(act(g) * u, down.transpose(1, 2), offs=offs)


def _experts_triton(xs: Tensor, gate_up: Tensor, down: Tensor, act: Callable[[Tensor], Tensor],
                    counts: Tensor) -> Tensor:
    """The same with :func:`grpo_kernels.grouped_mlp` (Triton's grouped GEMM, fused SwiGLU); SwiGLU experts only."""
    if act is not F.silu:
        raise ValueError("the grouped-GEMM kernel computes SwiGLU experts (hidden_act 'silu'); use impl 'loop'")
    return grpo_kernels.grouped_mlp(xs, counts, gate_up, down)


def _experts_auto(xs: Tensor, gate_up: Tensor, down: Tensor, act: Callable[[Tensor], Tensor],
                  counts: Tensor) -> Tensor:
    """The Triton grouped GEMM where the kernels' backend is Triton (CUDA, or ``KERNELS_BACKEND=triton``) and the
    experts are SwiGLU; else ``grouped_mm`` on CUDA and ``loop`` elsewhere (what measured fastest on those;
    ``benchmarks/bench_model.py``)."""
    if act is F.silu and grpo_kernels.backend(xs.device) == "triton":
        return _experts_triton(xs, gate_up, down, act, counts)
    impl = _experts_grouped_mm if xs.is_cuda else _experts_loop
    return impl(xs, gate_up, down, act, counts)


EXPERT_IMPLS: dict[str, Callable[..., Tensor]] = {
    "auto": _experts_auto,
    "loop": _experts_loop,
    "grouped_mm": _experts_grouped_mm,
    "triton": _experts_triton,
}


class Experts(nn.Module):
    """The routed experts as stacked weights: ``gate_up_proj [E, 2I, D]`` (gate rows, then up rows) and
    ``down_proj [E, D, I]`` (transformers' in-memory layout; per-expert ``nn.Linear`` weights on disk)."""

    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        e, d, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))
        self.act = ACTIVATIONS[config.hidden_act]
        self.impl = "auto"  # a key of EXPERT_IMPLS

    def forward(self, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """``x [N, D]``, ``indices, weights [N, K]`` -> ``sum_k weights[:, k] * FFN_{indices[:, k]}(x)`` ``[N, D]``.

        Dispatch by sorting the ``N*K`` (token, expert) pairs by expert: each expert then reads one contiguous
        slice, so there is one matmul per expert (or one grouped matmul), never a per-token loop.
        """
        k = indices.shape[1]
        flat = indices.reshape(-1)  # [N*K]
        order = flat.argsort(stable=True)  # pairs sorted by expert
        token = order // k  # [N*K] the token of each sorted pair
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0])  # [E]
        ys = EXPERT_IMPLS[self.impl](x.index_select(0, token), self.gate_up_proj, self.down_proj, self.act, counts)
        ys = _cast(ys, torch.float32) * weights.reshape(-1).index_select(0, order)[:, None]  # gate-weighted, float32
        out = torch.zeros(x.shape, dtype=ys.dtype, device=x.device).index_add_(0, token, ys)  # [N, D]
        return _cast(out, x.dtype)


class MoE(nn.Module):
    """DeepSeekMoE: ``h' = sum_shared FFN_s(u) + sum_i g_i FFN_i(u)`` (the residual is added by the block)."""

    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = Gate(config)
        self.experts = Experts(config)
        shared = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = MLP(config, shared) if config.n_shared_experts else None

    def forward(self, x: Tensor, valid: Tensor | None, with_losses: bool = True,
                shared: SharedPrefix | None = None) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """``x [B, T, D]``, ``valid [B, T]`` (None = all real) -> ``(y [B, T, D], balance losses, counts [E])``
        where ``counts`` are real tokens per expert; ``with_losses=False`` skips the losses (``{}``). With
        ``shared``, ``x`` is its flat layout ``[1, M, D]`` and losses and counts are those of the full rows."""
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        route = self.gate(flat)
        y = self.experts(flat, route.indices, route.weights).view(b, t, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        valid = torch.ones(b, t, dtype=torch.bool, device=x.device) if valid is None else valid
        c = self.config
        losses = {}
        if with_losses and shared is not None:
            losses = shared.balance_losses(route.probs, route.indices, c.n_group, c.topk_group)
        elif with_losses:
            losses = balance_losses(route.probs.view(b, t, -1), route.indices.view(b, t, -1), valid, c.n_group,
                                    c.topk_group)
        with torch.no_grad():  # real tokens per expert, without a host sync
            real = valid.long() if shared is None else shared.token_rows  # [B, T]
            real = real.reshape(-1, 1).expand_as(route.indices).reshape(-1)
            counts = torch.zeros(c.n_routed_experts, dtype=torch.long, device=x.device).scatter_add_(
                0, route.indices.reshape(-1), real)
        return y, losses, counts


# ----------------------------------------------------------------------------------------------- Block
class Block(nn.Module):
    """Pre-norm decoder layer: ``h += MLA(norm(h))``, ``h += FFN(norm(h))`` (FFN = MLP or MoE)."""

    def __init__(self, config: DeepSeekConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if self.is_moe else MLP(config, config.intermediate_size)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask, valid: Tensor | None,
                cache: LatentKVCache | None = None, shared: SharedPrefix | None = None
                ) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """``h [B, T, D]`` (``[1, M, D]`` with ``shared``) -> ``(h, balance losses ({} for a dense layer),
        tokens per expert or None)``."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, self.layer_idx, shared)
        if not self.is_moe:
            return h + self.mlp(self.post_attention_layernorm(h)), {}, None
        y, losses, counts = self.mlp(self.post_attention_layernorm(h), valid, with_losses=cache is None,
                                     shared=shared)
        return h + y, losses, counts


# ----------------------------------------------------------------------------------------------- Model
@torch.no_grad()
def init_weights(module: nn.Module, std: float) -> None:
    """DeepSeek's init: N(0, std) for every matrix, zeros for biases, ones for norms, zero correction bias."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.normal_(0.0, std)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    elif isinstance(module, RMSNorm):
        module.weight.fill_(1.0)
    elif isinstance(module, Experts):
        module.gate_up_proj.normal_(0.0, std)
        module.down_proj.normal_(0.0, std)
    elif isinstance(module, Gate):
        module.weight.normal_(0.0, std)
        if module.e_score_correction_bias is not None:
            module.e_score_correction_bias.zero_()


def _zero_losses(device: torch.device) -> dict[str, Tensor]:
    return {name: torch.zeros((), device=device) for name in BALANCE_LOSSES}


class DeepSeekModel(nn.Module):
    """The backbone: ``embed_tokens -> layers -> norm``; returns :class:`ModelOutput` (no logits)."""

    supports_shared_prefix = True  # forward takes ``shared_prefix`` (see :class:`SharedPrefix`)

    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.checkpoint_kwargs: dict[str, Any] = {"use_reentrant": False}
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: LatentKVCache | None = None, use_cache: bool | None = None, shared_prefix: int = 0
                ) -> ModelOutput:
        """Runs the decoder.

        Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, S]`` with ``S = cache.seq_len + T`` (just ``T`` without a cache); 1 = real
                token, 0 = padding (left padding for batched prompts). None = all real.
            position_ids: ``[B, T]``; default ``cache.seq_len + arange(T)`` for every row (RoPE scores depend
                only on position differences, so a per-row constant shift from left padding is harmless).
            cache: A :class:`LatentKVCache`; the new tokens' latents are written at ``cache.seq_len`` and
                attention runs through the absorbed MLA path; ``cache.seq_len`` then advances by ``T``.
                Decoding is inference only: balance losses are not computed (zeros).
            use_cache: Accepted for transformers compatibility; caching is decided by ``cache`` alone.
            shared_prefix: ``P > 0``: rows whose first ``P`` tokens (ids, mask, positions) are identical run
                them once (:class:`SharedPrefix`; the GRPO log-prob passes, where G completions share a prompt).
                The results (outputs, balance losses, routing counts) are the unshared ones; it applies only
                with an ``attention_mask`` and no ``cache``, and is skipped when no two rows share a prefix.

        Returns:
            :class:`ModelOutput` with ``last_hidden_state [B, T, H]`` and ``aux_losses``.
        """
        b, t = input_ids.shape
        past = 0 if cache is None else cache.seq_len
        if cache is not None:
            cache.check_append(b, t)
        device = input_ids.device
        given_positions = position_ids
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=device).expand(b, t)
        elif tuple(position_ids.shape) != (b, t):
            raise ValueError(f"position_ids: expected shape ({b}, {t}), got {tuple(position_ids.shape)}")
        if not isinstance(shared_prefix, int) or not 0 <= shared_prefix < max(t, 1):
            raise ValueError(f"shared_prefix: expected an int in [0, {t}) (tokens before the last), got "
                             f"{shared_prefix!r}")
        shared = None
        if shared_prefix and cache is None and attention_mask is not None:
            shared = SharedPrefix.find(input_ids, attention_mask, position_ids, shared_prefix)
        if shared is not None:  # run the flat layout: distinct prefixes, then every row's suffix
            input_ids, position_ids, mask, valid = shared.ids, shared.positions, shared.attn_suffix, shared.valid
        else:
            mask = build_attention_mask(attention_mask, b, t, past, device, given_positions)
            valid = None if attention_mask is None else attention_mask[:, past:].to(device=device, dtype=torch.bool)
        cos, sin = self.rotary_emb(position_ids)
        h, losses = self._layers(self.embed_tokens(input_ids), cos, sin, mask, valid, cache, shared)
        if shared is not None:  # what the gates recorded, in the rows' order (as an unshared forward records it)
            for gate in self.moe_gates().values():
                if gate.recording:
                    gate.recording[-1] = shared.expand(gate.recording[-1][None]).flatten(0, 1)
        if cache is not None:
            cache.advance(t)
        h = self.norm(h)
        return ModelOutput(last_hidden_state=h if shared is None else shared.expand(h), aux_losses=losses,
                           cache=cache)

    def _layers(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, valid: Tensor | None,
                cache: LatentKVCache | None, shared: SharedPrefix | None) -> tuple[Tensor, dict[str, Tensor]]:
        """The decoder layers over ``h`` (checkpointed in training when enabled), recording each MoE layer's
        routing counts; returns the hidden states and the summed balance losses."""
        losses = _zero_losses(h.device)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for layer in self.layers:
            if use_ckpt:
                h, layer_losses, counts = checkpoint(layer, h, cos, sin, mask, valid, None, shared,
                                                     **self.checkpoint_kwargs)
            else:
                h, layer_losses, counts = layer(h, cos, sin, mask, valid, cache, shared)
            for name, value in layer_losses.items():
                losses[name] = losses[name] + value
            if counts is not None:
                layer.mlp.gate.record(counts)
        return h, losses

    # --------------------------------------------------------------- routing
    def moe_gates(self) -> dict[int, Gate]:
        """``{layer index: gate}`` for the MoE layers."""
        return {layer.layer_idx: layer.mlp.gate for layer in self.layers if layer.is_moe}

    def routing_stats(self) -> dict[int, Tensor]:
        """Real tokens routed to each expert since the last reset: ``{layer index: counts [E]}``."""
        return {i: gate.tokens_seen.clone() for i, gate in self.moe_gates().items()}

    def reset_routing_stats(self) -> None:
        """Zeroes the counters :meth:`routing_stats` reports."""
        for gate in self.moe_gates().values():
            gate.tokens_seen.zero_()

    def update_router_bias(self, gamma: float) -> None:
        """Nudges every gate's ``e_score_correction_bias`` by ``+gamma`` for experts below the mean load and
        ``-gamma`` above it, from the tokens routed in training mode since the last update (DeepSeek-V3's
        aux-loss-free balancing). Under data parallelism, all-reduce ``gate.load_since_update`` first."""
        for gate in self.moe_gates().values():
            gate.update_bias(gamma)

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Latent-cache bytes per token over all layers: ``layers * (d_c + d_h^R) * sizeof(dtype)``."""
        return self.config.kv_cache_bytes_per_token(dtype)


class DeepSeekForCausalLM(nn.Module):
    """``model`` (:class:`DeepSeekModel`) plus ``lm_head``, laid out like transformers' causal LMs.

    Example:
        >>> cfg = DeepSeekConfig.from_preset("tiny")
        >>> lm = DeepSeekForCausalLM(cfg)
        >>> lm(torch.tensor([[1, 5, 7]])).logits.shape
        torch.Size([1, 3, 128])
    """

    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DeepSeekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            init_weights(self.lm_head, config.initializer_range)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: LatentKVCache | None = None, *, compute_logits: bool = True,
                logits_to_keep: int = 0, shared_prefix: int = 0) -> ModelOutput:
        """Runs the decoder and the output head.

        Args:
            input_ids, attention_mask, position_ids, cache, shared_prefix: As :meth:`DeepSeekModel.forward`.
            compute_logits: False skips the head (``logits=None``), for chunked log-prob code that reads
                ``last_hidden_state`` and ``get_output_embeddings().weight``.
            logits_to_keep: 0 = logits at every position; ``n > 0`` = only the last ``n`` (decoding).

        Returns:
            :class:`ModelOutput` with ``logits [B, T or n, V]`` (model dtype), ``last_hidden_state``,
            ``aux_losses``, ``cache``.
        """
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         shared_prefix=shared_prefix)
        if compute_logits:
            h = out.last_hidden_state if logits_to_keep <= 0 else out.last_hidden_state[:, -logits_to_keep:]
            out.logits = self.lm_head(h)
        return out

    # --------------------------------------------------------------- transformers-style accessors
    def get_decoder(self) -> DeepSeekModel:
        return self.model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recomputes each decoder layer in backward (in training mode); kwargs go to ``torch.utils.checkpoint``
        (default ``use_reentrant=False``)."""
        self.model.gradient_checkpointing = True
        self.model.checkpoint_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    # --------------------------------------------------------------- cache, routing
    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> LatentKVCache:
        """An empty :class:`LatentKVCache` for this model (default: the model's dtype and device)."""
        return LatentKVCache(self.config, batch_size=batch_size, max_len=max_len, dtype=dtype or self.dtype,
                             device=device or self.device)

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        return self.model.kv_cache_bytes_per_token(dtype)

    def routing_stats(self) -> dict[int, Tensor]:
        return self.model.routing_stats()

    def reset_routing_stats(self) -> None:
        self.model.reset_routing_stats()

    def update_router_bias(self, gamma: float) -> None:
        self.model.update_router_bias(gamma)

    def set_experts_impl(self, name: str) -> None:
        """Chooses the routed-expert kernel: ``auto`` (default: the Triton grouped GEMM where the kernels'
        backend is Triton, else ``grouped_mm`` on CUDA and ``loop`` elsewhere), ``loop`` (per-expert matmuls over
        slices), ``grouped_mm`` (``torch._grouped_mm``) or ``triton`` (:func:`grpo_kernels.grouped_mlp`)."""
        if name not in EXPERT_IMPLS:
            raise ValueError(f"experts impl: expected one of {', '.join(EXPERT_IMPLS)}, got {name!r}")
        for module in self.modules():
            if isinstance(module, Experts):
                module.impl = name

    # --------------------------------------------------------------- checkpoints (Hugging Face format)
    def named_hf_weights(self) -> Iterator[tuple[str, Tensor]]:
        """``(HF name, tensor)`` pairs, per-expert views included (no copies): what a rollout engine loads."""
        return hf_checkpoint.named_hf_weights(self)

    def load_hf_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Copies ``(HF name, tensor)`` pairs into this model in place (weight sync)."""
        hf_checkpoint.load_hf_weights(self, named_tensors)

    def save_pretrained(self, path: str | Path, tokenizer: Any = None,
                        state: Mapping[str, Tensor] | None = None) -> None:
        """Writes a Hugging Face folder (config.json, safetensors, tokenizer files) atomically; ``state``: the
        weights to write instead of the model's own (see :func:`model.checkpoint.save_pretrained`)."""
        hf_checkpoint.save_pretrained(self, path, tokenizer=tokenizer, state=state)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None) -> DeepSeekForCausalLM:
        """Loads a Hugging Face folder written by us, transformers or DeepSeek (see :mod:`model.checkpoint`)."""
        return hf_checkpoint.load_pretrained(cls, path, dtype=dtype, device=device)
