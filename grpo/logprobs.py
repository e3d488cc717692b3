"""Per-token log-probs and entropy of completions under a causal LM, never holding all ``[N, T, V]`` logits.

The model's backbone (``model.get_decoder()``) runs on the whole sequence; only the hidden states that
predict completion tokens go through the LM head, inside :func:`grpo_kernels.token_logprobs`, which works in chunks
of tokens and recomputes each chunk's logits in the backward pass. Position ids come from the attention mask
(``cumsum - 1``), so left-padded prompts see the same positions as unpadded ones. A prompt shared by several
rows (a prompt and its G samples) is computed once: by a backbone with ``supports_shared_prefix`` (ours) in one
pass, by a transformers decoder in two (the distinct prompts fill a KV cache that stays in the autograd graph,
its rows are gathered for the rows sharing each prompt, and the completions run over it).

LM heads, from the model's ``get_output_embeddings()`` and its config:

* a plain ``[V, H]`` weight goes to the kernel as is;
* a head with a bias ``b`` is folded into the weight: ``[h, 1] @ [W, b]^T = h W^T + b`` (one ``[V, H+1]``
  copy of the weight per call, still no ``[N, T, V]`` logits);
* a constant logit scale (Cohere's ``logit_scale``, Granite's ``logits_scaling``) is folded into the
  temperature;
* a non-linear head (Gemma's ``final_logit_softcapping``) falls back to the model's own forward and a float32
  log-softmax over the completion logits, which does materialise them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

import grpo_kernels
from model.distributed import is_sharded, run_in_root

__all__ = ["LMHead", "lm_head_of", "sequence_logprobs"]

Pair = tuple[Tensor, Tensor | None]


@dataclass(frozen=True)
class LMHead:
    """How a model turns final hidden states into logits.

    Attributes:
        weight: Output embedding. ``[V, H]``
        bias: Optional bias. ``[V]``
        logit_scale: Constant multiplying the logits (1.0 for most models).
        fused: Whether logits are ``(h W^T + b) * logit_scale`` exactly, so the chunked kernel applies; false
            for heads with a non-linear transform (soft-capping), which use the model's own forward.
    """

    weight: Tensor
    bias: Tensor | None
    logit_scale: float
    fused: bool


def _config_value(model: nn.Module, name: str):
    config = getattr(model, "config", None)
    if config is None:
        return None
    value = getattr(config, name, None)
    if value is None and hasattr(config, "get_text_config"):
        value = getattr(config.get_text_config(), name, None)
    return value


def lm_head_of(model: nn.Module) -> LMHead:
    """Reads the LM head of a Hugging Face causal LM.

    Raises:
        ValueError: if the model has no output embedding with a ``[V, H]`` weight.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{type(model).__name__} has no LM head: expected get_output_embeddings() to return a module "
            f"with a [V, H] weight, got {type(head).__name__}"
        )
    scale = 1.0
    if isinstance(getattr(model, "logit_scale", None), (int, float)):  # Cohere: logits * logit_scale
        scale *= float(model.logit_scale)
    if _config_value(model, "logits_scaling") is not None:  # Granite: logits / logits_scaling
        scale /= float(_config_value(model, "logits_scaling"))
    fused = _config_value(model, "final_logit_softcapping") is None
    return LMHead(weight=weight, bias=getattr(head, "bias", None), logit_scale=scale, fused=fused)


@dataclass(frozen=True)
class _Batch:
    """A validated batch: the inputs, derived position ids and the completion window."""

    input_ids: Tensor  # [N, L]
    attention_mask: Tensor  # [N, L]
    position_ids: Tensor  # [N, L]
    start: int  # first completion position
    stop: int  # one past the last completion position
    valid: Tensor  # [N, T] completion positions holding a real token

    @property
    def labels(self) -> Tensor:
        """The valid completion tokens, ``[M]``."""
        return self.input_ids[:, self.start : self.stop][self.valid]


def _completion_window(logits_to_keep: int | slice, length: int) -> tuple[int, int]:
    """``(start, stop)`` positions of the completion tokens in a length-``L`` sequence."""
    if isinstance(logits_to_keep, slice):
        if logits_to_keep.step not in (None, 1):
            raise ValueError(f"logits_to_keep slice must have step 1, got {logits_to_keep}")
        start, stop, _ = logits_to_keep.indices(length)
    elif isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool):
        start, stop = length - logits_to_keep, length
    else:
        raise ValueError(f"logits_to_keep must be an int or a slice, got {type(logits_to_keep).__name__}")
    if not 1 <= start < stop <= length:
        raise ValueError(
            f"logits_to_keep={logits_to_keep!r} must select a non-empty completion after at least one "
            f"context token (1 <= start < stop <= L={length}), got positions [{start}, {stop})"
        )
    return start, stop


def _make_batch(input_ids: Tensor, attention_mask: Tensor, logits_to_keep: int | slice) -> _Batch:
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be integer [N, L], got {input_ids.dtype} {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        want, got = tuple(input_ids.shape), tuple(attention_mask.shape)
        raise ValueError(f"attention_mask must have input_ids' shape {want}, got {got}")
    start, stop = _completion_window(logits_to_keep, input_ids.shape[1])
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [N, L]
    valid = attention_mask[:, start:stop] != 0  # [N, T]
    return _Batch(input_ids, attention_mask, position_ids, start, stop, valid)


def _prompt_groups(batch: _Batch) -> tuple[Tensor, Tensor] | None:
    """Rows that share their prompt (ids and mask): ``(first row of each distinct prompt [U], the distinct
    prompt of each row [N])``, or None when every row has its own prompt."""
    prompt = torch.cat([batch.input_ids[:, : batch.start], batch.attention_mask[:, : batch.start].long()], 1)
    distinct, inverse = torch.unique(prompt, dim=0, return_inverse=True)
    n = prompt.shape[0]
    if distinct.shape[0] == n:
        return None
    rows = torch.arange(n, device=prompt.device)
    first = torch.full((distinct.shape[0],), n, device=prompt.device).scatter_reduce(0, inverse, rows, "amin")
    return first, inverse


def _cache_argument(decoder: nn.Module) -> str | None:
    """The keyword a transformers decoder takes its KV cache by (``cache`` in transformers 5), or None."""
    params = inspect.signature(decoder.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _returned_cache(out: Any) -> Any:
    """The cache a transformers forward returned (``cache`` in transformers 5, ``past_key_values`` before)."""
    return out.cache if "cache" in getattr(out, "__dataclass_fields__", {}) else out.past_key_values


def _hf_shared_prompt_hidden(decoder: nn.Module, batch: _Batch, end: int) -> Tensor | None:
    """Hidden states at positions ``start - 1 .. end - 1`` for a transformers decoder, each distinct prompt run
    once: the prompts' forward fills a KV cache (kept in the autograd graph), its rows are gathered for the rows
    that share each prompt, and the completions run on top of it. ``[N, end - start + 1, H]``, or None when the
    rows share no prompt or the decoder's cache cannot be gathered this way (sliding windows, gradient
    checkpointing, no cache argument)."""
    groups = _prompt_groups(batch)
    cache_arg = _cache_argument(decoder)
    if groups is None or cache_arg is None or getattr(decoder, "gradient_checkpointing", False):
        return None
    first, inverse = groups
    start = batch.start
    cache = DynamicCache(config=getattr(decoder, "config", None))
    if any(getattr(cache, "is_sliding", None) or []):
        return None
    prompts = decoder(input_ids=batch.input_ids[first, :start], attention_mask=batch.attention_mask[first, :start],
                      position_ids=batch.position_ids[first, :start], use_cache=True, **{cache_arg: cache})
    cache = _returned_cache(prompts)
    if not isinstance(cache, DynamicCache):
        return None
    cache.reorder_cache(inverse)  # [U, ...] -> [N, ...]: each row gets its prompt's keys and values
    rest = decoder(input_ids=batch.input_ids[:, start:end], attention_mask=batch.attention_mask[:, :end],
                   position_ids=batch.position_ids[:, start:end], use_cache=True, **{cache_arg: cache})
    last_prompt = prompts.last_hidden_state[inverse, start - 1 : start]  # [N, 1, H]
    return torch.cat([last_prompt, rest.last_hidden_state], dim=1)  # [N, end - start + 1, H]


def _backbone_hidden(decoder: nn.Module, batch: _Batch, end: int, share_prompts: bool,
                     two_passes: bool = True) -> Tensor:
    """Hidden states at positions ``start - 1 .. end - 1`` (those that predict the completion). ``[N, T, H]``

    Rows sharing a prompt (the G samples of a group) run it once: ours through its shared-prefix forward, a
    transformers decoder through a gathered KV cache (:func:`_hf_shared_prompt_hidden`), which runs each block
    twice in one backward; ``two_passes=False`` (FSDP-sharded blocks, whose ranks then fall out of step) runs a
    transformers decoder in one pass instead.
    """
    shared = {}
    if share_prompts and batch.start < end:
        if getattr(decoder, "supports_shared_prefix", False):
            shared = {"shared_prefix": batch.start}
        elif two_passes and getattr(decoder, "config", None) is not None and hasattr(decoder,
                                                                                    "get_input_embeddings"):
            hidden = _hf_shared_prompt_hidden(decoder, batch, end)
            if hidden is not None:
                return hidden
    out = decoder(
        input_ids=batch.input_ids[:, :end],
        attention_mask=batch.attention_mask[:, :end],
        position_ids=batch.position_ids[:, :end],
        use_cache=False,
        **shared,
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [N, L, H]
    return hidden[:, batch.start - 1 : end]


def _fused_logprobs(model: nn.Module, head: LMHead, batch: _Batch, kw: dict[str, Any],
                    share_prompts: bool = True) -> Pair:
    """Backbone, then the chunked kernel over valid completion tokens: ``(logp [M], entropy [M] | None)``."""
    end = batch.stop - 1  # the last completion token predicts nothing we score: the backbone stops before it
    hidden = _backbone_hidden(model.get_decoder(), batch, end, share_prompts,
                              two_passes=not is_sharded(model))  # [N, T, H]
    hidden = hidden[batch.valid].to(head.weight.dtype)  # [M, H]
    weight = head.weight  # [V, H]
    if head.bias is not None:
        hidden = torch.cat([hidden, hidden.new_ones(hidden.shape[0], 1)], dim=1)  # [M, H+1]
        weight = torch.cat([weight, head.bias.to(weight.dtype)[:, None]], dim=1)  # [V, H+1]
    return grpo_kernels.token_logprobs(hidden, weight, batch.labels, **kw)


def _full_logits_logprobs(model: nn.Module, batch: _Batch, kw: dict[str, Any]) -> Pair:
    """The model's own forward (materialises the completion logits): ``(logp [M], entropy [M] | None)``."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=batch.input_ids.shape[1] - batch.start + 1,
    )
    logits = out.logits[:, : batch.stop - batch.start][batch.valid].float() / kw["temperature"]  # [M, V]
    logp_all = torch.log_softmax(logits, dim=-1)  # [M, V]
    logp = logp_all.gather(1, batch.labels[:, None].long()).squeeze(1)  # [M]
    entropy = -(logp_all.exp() * logp_all).sum(-1) if kw["with_entropy"] else None  # [M]
    return logp, entropy


def _valid_logprobs(model: nn.Module, batch: _Batch, chunk_size: int | None, with_entropy: bool,
                    temperature: float, share_prompts: bool) -> Pair:
    """Log-probs (and entropy) of the valid completion tokens, flat ``[n_valid]``."""
    head = lm_head_of(model)
    kw: dict[str, Any] = dict(temperature=temperature, with_entropy=with_entropy)
    if head.fused:
        kw |= dict(temperature=temperature / head.logit_scale, chunk_size=chunk_size)
        return _fused_logprobs(model, head, batch, kw, share_prompts)
    return _full_logits_logprobs(model, batch, kw)  # the model's logits already include its scale and capping


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    logits_to_keep: int | slice,
    *,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    temperature: float = 1.0,
    share_prompts: bool = True,
) -> Pair:
    """Log-probs (and entropy) of the completion tokens under ``model``.

    Args:
        model: A Hugging Face causal LM (``get_decoder()`` and ``get_output_embeddings()``).
        input_ids: Prompt then completion, prompts left-padded, completions right-padded. ``[N, L]``
        attention_mask: 1 at real tokens, 0 at padding. ``[N, L]``
        logits_to_keep: The completion: an int ``T`` (the last ``T`` positions) or a slice of positions.
        chunk_size: Tokens per LM-head chunk; ``None`` lets :func:`grpo_kernels.token_logprobs` choose.
        with_entropy: Also return the entropy of each position's next-token distribution.
        temperature: Logits are divided by it (match the sampling temperature).
        share_prompts: Run a prompt shared by several rows once (same values up to float rounding; a
            transformers model then runs its prompts and its completions in two passes over a KV cache).

    Returns:
        ``(logp, entropy)``, float32 ``[N, T]`` each (``entropy`` is ``None`` unless ``with_entropy``).
        ``logp[i, t]`` is ``log p(token | tokens before it)`` for completion token ``t``; positions whose
        token is padding hold 0 (in both) and are not computed. Differentiable w.r.t. the parameters.

    Raises:
        ValueError: on bad shapes, an empty or out-of-range completion window, a non-positive temperature,
            or a model without an LM head.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch = _make_batch(input_ids, attention_mask, logits_to_keep)
    # a sharded model's embeddings and LM head are whole for the call (as in its forward)
    logp, entropy = run_in_root(model, _valid_logprobs, model, batch, chunk_size, with_entropy, temperature,
                                share_prompts)
    zeros = torch.zeros(batch.valid.shape, dtype=logp.dtype, device=logp.device)  # [N, T]
    logp = zeros.masked_scatter(batch.valid, logp)
    return logp, None if entropy is None else zeros.masked_scatter(batch.valid, entropy)
