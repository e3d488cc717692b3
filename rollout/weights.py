"""Weights as rollout engines see them: Hugging Face names, each tensor once, in whole-layer buckets, with
fingerprints that prove an engine holds what the trainer sent.

* :func:`named_weights` lists a model's (HF name, tensor) pairs with every tensor once: tied input/output
  embeddings (``tie_word_embeddings``) and any other shared tensor are sent under their first name only (the
  engine's copy of the model shares them the same way, so filling the first fills all).
* :func:`bucketed` groups them into buckets of about ``bucket_bytes`` that never split a decoder layer (vLLM
  processes a layer once all of its tensors have arrived).
* :func:`fingerprint` is the stale-weight guard's checksum: the float64 sum and sum of squares of a tensor's
  values *in the engine's dtype*, so a trainer in float32 and an engine in bfloat16 compare exactly (the trainer
  casts its tensor as the engine did before summing). :func:`compare_fingerprints` names the first tensor that
  differs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.distributed import state_of, whole

_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
# Relative tolerance of two float64 sums of the same values taken in different orders (another device or
# kernel): float64 rounding is ~1e-16 per addition, so 1e-9 leaves room for 10^6-term sums and still catches a
# change of one value in a billion of the tensor's norm.
FINGERPRINT_RTOL = 1e-9


def layer_key(name: str) -> str:
    """The decoder layer a weight belongs to (``model.layers.3``), else the weight's own name."""
    match = _LAYER_RE.match(name)
    return match.group(0)[:-1] if match else name


def named_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(Hugging Face name, tensor) pairs of a model's persistent weights, every tensor once.

    Ours maps its internal layout (stacked experts) to HF names; any other model yields its ``state_dict`` names,
    skipping a name whose tensor was already yielded under another (tied embeddings: ``lm_head.weight`` is the
    same parameter as ``model.embed_tokens.weight``). A sharded model's tensors are gathered whole one at a time
    as the iteration reaches them: every rank iterates alike, and only a bucket's worth is alive at once.
    """
    named = getattr(model, "named_hf_weights", None)
    if named is not None:
        yield from named()
        return
    seen: set[int] = set()
    for name, tensor in state_of(model, keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        yield name, whole(tensor)  # a sharded model's shards: gathered one at a time (every rank iterates)


def bucketed(named: Iterable[tuple[str, Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
    """Groups (name, tensor) pairs into buckets of about ``bucket_bytes`` each, closing a bucket only between two
    decoder layers (a layer larger than ``bucket_bytes`` makes a bucket of its own)."""
    bucket: list[tuple[str, Tensor]] = []
    size, key = 0, None
    for name, tensor in named:
        k = layer_key(name)
        if bucket and size >= bucket_bytes and k != key:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor.detach()))
        size += tensor.numel() * tensor.element_size()
        key = k
    if bucket:
        yield bucket


@dataclass(frozen=True)
class Fingerprint:
    """A tensor's checksum in a given dtype.

    Attributes:
        dtype: The dtype the values were summed in (the engine's), e.g. ``"bfloat16"``.
        numel: Number of values.
        total: Float64 sum of the values.
        sumsq: Float64 sum of their squares.
    """

    dtype: str
    numel: int
    total: float
    sumsq: float

    def matches(self, other: Fingerprint) -> bool:
        """Whether ``other`` holds the same values up to float64 summation order."""
        if self.numel != other.numel:
            return False
        scale = math.sqrt(max(self.sumsq, other.sumsq) * max(self.numel, 1))  # >= sum |x| (Cauchy-Schwarz)
        tol = FINGERPRINT_RTOL * scale + 1e-300
        return (abs(self.total - other.total) <= tol
                and abs(self.sumsq - other.sumsq) <= FINGERPRINT_RTOL * max(self.sumsq, other.sumsq) + 1e-300
                and math.isfinite(other.total) == math.isfinite(self.total))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def fingerprint(tensor: Tensor, dtype: torch.dtype | str | None = None) -> Fingerprint:
    """The :class:`Fingerprint` of ``tensor`` after casting it to ``dtype`` (default: its own dtype)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or tensor.dtype
    values = tensor.detach().to(dtype)  # no copy when it already has the dtype
    norm = float(torch.linalg.vector_norm(values, dtype=torch.float64))  # accumulated in float64, no float64 copy
    return Fingerprint(dtype_name(dtype), values.numel(), float(values.sum(dtype=torch.float64)), norm * norm)


ENGINE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes an engine may hold a floating-point weight in (besides the weight's own)."""


def candidate_fingerprints(tensor: Tensor) -> dict[str, Fingerprint]:
    """``{dtype: fingerprint}`` of ``tensor`` in its own dtype and, if floating point, in every one of
    :data:`ENGINE_DTYPES`: what the trainer keeps of a tensor it sent and then freed (a sharded policy's
    gathered tensors), so that :func:`compare_fingerprints` can match an engine's report in whatever dtype."""
    dtypes = {tensor.dtype, *(ENGINE_DTYPES if tensor.is_floating_point() else ())}
    return {dtype_name(d): fingerprint(tensor, d) for d in dtypes}


def fingerprints(named: Iterable[tuple[str, Tensor]]) -> dict[str, Fingerprint]:
    """``{name: fingerprint}`` of (name, tensor) pairs, each in its own dtype (what an engine reports)."""
    return {name: fingerprint(tensor) for name, tensor in named}


def compare_fingerprints(sent: Mapping[str, Tensor | Mapping[str, Fingerprint]], held: Mapping[str, Fingerprint],
                         where: str) -> None:
    """Checks that an engine holds the tensors it was sent.

    Args:
        sent: Name -> the trainer's tensor, as sent, or its :func:`candidate_fingerprints`.
        held: Name -> the engine's fingerprint of the tensor it holds under that name.
        where: Which engine, for the message (e.g. ``"rollout worker 0 (TorchEngine)"``).

    Raises:
        StaleWeightsError: naming the first tensor that is missing or differs.
    """
    for name, tensor in sent.items():
        got = held.get(name)
        if got is None:
            raise StaleWeightsError(f"weight sync check: {where} reports no tensor {name!r} after the sync")
        want = fingerprint(tensor, got.dtype) if isinstance(tensor, Tensor) else tensor.get(got.dtype)
        if want is None:
            raise StaleWeightsError(f"weight sync check: {where} holds {name!r} in {got.dtype}, a dtype the "
                                    f"trainer kept no fingerprint in ({sorted(tensor)})")
        if not want.matches(got):
            raise StaleWeightsError(
                f"weight sync check: {where} holds a different {name!r} than the trainer sent (sum "
                f"{got.total:.9g} vs {want.total:.9g}, sum of squares {got.sumsq:.9g} vs {want.sumsq:.9g}, in "
                f"{got.dtype}): the engine would sample from stale or corrupted weights")


class StaleWeightsError(RuntimeError):
    """An engine's weights differ from the trainer's after a sync."""


def expected_names(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every name an in-memory model accepts in a weight update (shared tensors under each of their names)."""
    named = getattr(model, "named_hf_weights", None)
    if named is not None:
        return {n: tuple(t.shape) for n, t in named()}
    out = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    out.update({n: tuple(b.shape) for n, b in model.named_buffers(remove_duplicate=False)})
    return out


def check_names(sent: Mapping[str, Sequence[int]], accepted: Mapping[str, Sequence[int]], model: str) -> None:
    """Checks that an engine accepts every (name, shape) the trainer will send, before anything is sent.

    Raises:
        KeyError: naming the model and the first name it does not have.
        ValueError: naming the first tensor whose shape differs.
    """
    for name, shape in sent.items():
        if name not in accepted:
            close = [n for n in accepted if n.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]][:3]
            raise KeyError(f"weight sync: the engine's model {model} has no tensor {name!r} that the trainer "
                           f"sends" + (f" (it has e.g. {close})" if close else ""))
        if tuple(accepted[name]) != tuple(shape):
            raise ValueError(f"weight sync: the engine's model {model} holds {name!r} with shape "
                             f"{tuple(accepted[name])}, the trainer sends {tuple(shape)}")


@dataclass(frozen=True)
class WeightReport:
    """What one engine replica says about the weights it holds after a sync (see
    :meth:`rollout.base.RolloutEngine.weight_report`).

    Attributes:
        where: The replica, for messages (``"rollout worker 1: TorchEngine (runs/x/checkpoints/sft)"``).
        fingerprints: Name -> :class:`Fingerprint` of the tensor it holds, or None when it cannot tell.
        probe: Without fingerprints, its log-probs of the probe sequence (None when it cannot compute them).
    """

    where: str
    fingerprints: dict[str, Fingerprint] | None
    probe: list[float] | None = None
