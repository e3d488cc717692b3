"""Data parallelism for the trainers: a policy sharded with FSDP2 over N ranks that compute one rank's update.

Every rank holds the whole (small) batch of token ids and takes its share of the micro-batches: micro-batch ``j``
runs on rank ``j % N``. A micro-batch's loss keeps the weight it has on one rank (its share of the minibatch's
tokens or sequences, known to every rank), so the gradients summed over ranks are one rank's accumulated
gradients, for every aggregation mode and for per-micro-batch terms such as the MoE balance loss. FSDP2 averages
gradients over ranks, so each rank scales its loss by ``N`` (:attr:`DataParallel.grad_scale`).

FSDP2's all-gathers run in lockstep: every rank must run the same number of forwards. A rank with fewer
micro-batches than the others runs its first one again as a *filler* with weight 0 (:meth:`DataParallel.share`
returns ``None`` for it), and :func:`filler_forward` restores the MoE routers' token counters it touched.

On one rank (:data:`SINGLE`) every helper is the identity and nothing here calls ``torch.distributed``.

Example (each rank, after ``torch.distributed.init_process_group``)::

    dp = DataParallel.current()
    policy = shard_model(policy, dp)
    for j in dp.share(num_micro_batches):
        ...  # j is None: a filler
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

ROUTER_COUNTERS: tuple[str, ...] = ("tokens_seen", "load_since_update")
"""Buffers of our MoE gates that count routed tokens (metrics and the aux-loss-free bias update)."""


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the trainer ranks.

    Attributes:
        rank: This rank, ``0 .. world_size - 1``; rank 0 samples, scores, logs and pushes weights.
        world_size: How many ranks train together.
        group: Their ``torch.distributed`` process group (``None``: the default group).
    """

    rank: int = 0
    world_size: int = 1
    group: Any = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in 0 .. world_size - 1 = {self.world_size - 1}, got {self.rank}")

    @classmethod
    def current(cls) -> DataParallel:
        """The default process group's layout, or :data:`SINGLE` when ``torch.distributed`` is not initialised."""
        if not (dist.is_available() and dist.is_initialized()):
            return SINGLE
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def enabled(self) -> bool:
        """Whether more than one rank trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0

    @property
    def grad_scale(self) -> float:
        """The factor on each rank's loss that turns FSDP's gradient average over ranks into their sum."""
        return float(self.world_size)

    def share(self, n: int) -> list[int | None]:
        """This rank's items of ``n`` (``j`` with ``j % world_size == rank``), padded with ``None`` (a filler) to
        ``ceil(n / world_size)`` entries so that every rank runs as many forwards as the others."""
        mine: list[int | None] = list(range(self.rank, n, self.world_size))
        return mine + [None] * (-(-n // self.world_size) - len(mine))

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from rank ``src`` on every rank (pickled; tensors travel on CPU)."""
        if not self.enabled:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (pickled; tensors travel on CPU)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def sum_floats(self, values: Mapping[str, float]) -> dict[str, float]:
        """Key-wise sum over ranks of float metrics (a key missing on a rank counts 0 there)."""
        if not self.enabled:
            return dict(values)
        out: dict[str, float] = {}
        for part in self.all_gather(dict(values)):
            for key, value in part.items():
                out[key] = out.get(key, 0.0) + value
        return out

    def barrier(self) -> None:
        """Waits until every rank gets here."""
        if self.enabled:
            dist.barrier(group=self.group)

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over ranks in place (returns it)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor


SINGLE = DataParallel()
"""One rank: no communication."""


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of blocks: ours and transformers' causal LMs (``model.layers``, GPT-2's ``h``, ...) and
    reward models over them (``backbone.layers``).

    Raises:
        ValueError: naming the model's class when no block list is found.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("model", "backbone"):  # a causal LM's decoder, a reward model's backbone
        if decoder is model and isinstance(getattr(model, name, None), nn.Module):
            decoder = getattr(model, name)
    for name in ("layers", "h", "blocks"):
        blocks = getattr(decoder, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(f"{type(model).__name__}: no list of decoder blocks found (looked for layers, h, blocks on "
                     f"{type(decoder).__name__}); it cannot be sharded block by block")


def shard_model(model: nn.Module, dp: DataParallel, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shards ``model`` in place with FSDP2 over ``dp``'s ranks: each decoder block, then the root (embeddings,
    final norm and LM head, tied or not). Identity on one rank.

    Args:
        model: Ours or a transformers causal LM, the same initial weights on every rank.
        dp: The ranks.
        param_dtype: Compute dtype (e.g. ``torch.bfloat16`` on GPU); the sharded master weights keep theirs and
            gradients are reduced in float32. ``None``: compute in the weights' dtype.

    Returns:
        ``model`` (its parameters are now ``DTensor`` shards).
    """
    if not dp.enabled:
        return model
    mesh = None if dp.group is None else DeviceMesh.from_group(dp.group, next(model.parameters()).device.type)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # code that runs the decoder and the LM head's weight itself (the fused log-probs) goes through this method,
    # which FSDP runs like the root's forward: the root's weights are whole inside, their gradients reduced after
    model._root_call = types.MethodType(_call, model)
    register_fsdp_forward_method(model, "_root_call")
    return model


def _call(self: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def run_in_root(model: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, for a sharded ``model`` run as its root's forward would be: the parameters outside
    the decoder blocks (embeddings, final norm, LM head) are whole during the call and their gradients reach the
    shards in backward. Use it for computations that call the decoder and read the LM head's weight directly."""
    if not is_sharded(model):
        return fn(*args, **kwargs)
    return model._root_call(fn, *args, **kwargs)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded by :func:`shard_model`."""
    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Frees a sharded model's gathered parameters (every FSDP unit back to its shards). FSDP keeps the root
    unit gathered after a forward, for the backward it expects; after a forward without gradients call this,
    or the root's whole tensors stay alive and ``model.parameters()`` lists them in place of the shards."""
    if is_sharded(model):
        for unit in model.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()


@contextlib.contextmanager
def no_grad_forwards(model: nn.Module) -> Iterator[None]:
    """Forwards without gradients: ``inference_mode`` for an unsharded model; ``no_grad`` for a sharded one
    (FSDP's gathered buffers must not become inference tensors), resharded afterwards (:func:`reshard`)."""
    if not is_sharded(model):
        with torch.inference_mode():
            yield
        return
    try:
        with torch.no_grad():
            yield
    finally:
        reshard(model)


def live_state(model: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """``model.state_dict(keep_vars=...)``'s names and order over the tensors the modules hold now: a sharded
    model's shards (each gathered whole by :func:`whole`), or whole tensors while its units are unsharded. A
    shared parameter appears under each of its names (the same object with ``keep_vars``)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        tensors = [*module._parameters.items(),
                   *((n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set)]
        for name, tensor in tensors:
            if tensor is not None:
                out[dot + name] = tensor if keep_vars else tensor.detach()
    return out


def state_of(model: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """``model.state_dict()``, or :func:`live_state` for a sharded model."""
    return live_state(model, keep_vars) if is_sharded(model) else model.state_dict(keep_vars=keep_vars)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached, all-gathered into a whole plain tensor when it is a shard (a collective: every rank
    calls it for the same tensor in the same order)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def whole_state(model: nn.Module, keep: bool = True, device: str | torch.device | None = "cpu",
                dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``state_of(model)`` as whole tensors on ``device`` (floating-point ones in ``dtype`` when given),
    gathered one at a time: a sharded model never holds more than one whole tensor on its device. A tensor
    shared under several names (tied embeddings) is gathered once and appears under each. Every rank must call
    it; ``keep=False`` (the ranks that do not save) keeps nothing and returns ``{}``."""
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor | None] = {}
    for name, tensor in state_of(model, keep_vars=True).items():
        if id(tensor) not in done:
            value = whole(tensor)  # on the ranks that do not keep it, freed at once
            if keep and dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            done[id(tensor)] = (value.to(device) if device is not None else value) if keep else None
        if keep:
            out[name] = done[id(tensor)]
    return out


@contextlib.contextmanager
def filler_forward(model: nn.Module) -> Iterator[None]:
    """A forward whose result is discarded: the MoE routers' token counters are restored afterwards."""
    saved = [(module, name, getattr(module, name).clone()) for module in model.modules()
             for name in ROUTER_COUNTERS if isinstance(getattr(module, name, None), torch.Tensor)]
    try:
        yield
    finally:
        for module, name, value in saved:
            getattr(module, name).copy_(value)


def sum_router_loads(model: nn.Module, dp: DataParallel) -> None:
    """Sums every MoE gate's ``load_since_update`` over ranks, so the aux-loss-free bias update sees the global
    load and stays the same on every rank."""
    if not dp.enabled:
        return
    for module in model.modules():
        load = getattr(module, "load_since_update", None)
        if isinstance(load, torch.Tensor):
            dp.all_reduce_(load)


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clips the gradients' total norm to ``max_norm`` (``inf``: no clipping); returns the norm before clipping,
    over all ranks' shards for a sharded model."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)
