"""How a bucket of weights travels from trainer rank 0 to the rollout workers (``ray.weight_transport``).

* ``object_store`` (the default): the bucket is put once in Ray's object store and every worker reads it from
  there (one copy into host shared memory; works everywhere Ray does). Tensors travel as their raw bytes in
  numpy arrays (:func:`to_wire`), which Ray writes out of band and workers on the node read in place; a pickled
  tensor would be copied element by element on both sides (about 10x slower for a bucket of small tensors).
* ``collective``: a ``torch.distributed`` process group of its own joins trainer rank 0 (rank 0 of the group) and
  the rollout workers (ranks 1..W); each bucket is flattened into one buffer per dtype and broadcast from rank 0,
  NCCL between GPUs and gloo on CPU (so CPU tests run the very same code path). Only the names, shapes and
  dtypes travel through Ray. The group is separate from the trainer ranks' own: built from a ``TCPStore`` that
  trainer rank 0 hosts, so neither group needs the other's members.

Both hand the worker's engine the same (name, tensor) pairs; a test checks that they leave equal weights.
"""

from __future__ import annotations

import datetime
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from model.registry import Registry

TIMEOUT = datetime.timedelta(minutes=10)

Meta = list[tuple[str, tuple[int, ...], str]]
"""A bucket's (name, shape, dtype name) in order: what the receivers need to rebuild it."""

Wire = list[tuple[str, np.ndarray, tuple[int, ...], str]]
"""A bucket as (name, raw bytes, shape, dtype name) per tensor: what travels through Ray's object store."""


class WeightTransport(ABC):
    """Sends buckets of (name, tensor) pairs from the trainer to every rollout worker's engine.

    Args:
        workers: The rollout workers' actor handles.
    """

    def __init__(self, workers: Sequence[Any]) -> None:
        self.workers = list(workers)

    @abstractmethod
    def send(self, bucket: list[tuple[str, Tensor]]) -> None:
        """Loads ``bucket`` into every worker's engine; returns once all have it."""


WEIGHT_TRANSPORTS: Registry[type[WeightTransport]] = Registry("weight transport")


@WEIGHT_TRANSPORTS.register("object_store")
class ObjectStoreTransport(WeightTransport):
    """Through Ray's object store: one ``ray.put`` per bucket, read by every worker."""

    def send(self, bucket: list[tuple[str, Tensor]]) -> None:
        import ray

        ref = ray.put(to_wire(bucket))
        ray.get([w.update_weights.remote(ref) for w in self.workers])


def to_wire(bucket: list[tuple[str, Tensor]]) -> Wire:
    """``bucket``'s tensors as host byte arrays (views where a tensor is already contiguous on the CPU), for
    :func:`ray.put`: numpy arrays are stored out of band and read in place by the workers of a node."""
    out = []
    for name, tensor in bucket:
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        out.append((name, raw, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")))
    return out


def from_wire(wire: Wire) -> list[tuple[str, Tensor]]:
    """The (name, tensor) pairs of :func:`to_wire`'s output, as read-only views of its arrays (to copy from: the
    object store's memory is immutable)."""
    with warnings.catch_warnings():  # torch warns that the arrays are not writable; nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        return [(name, torch.from_numpy(raw).view(getattr(torch, dtype)).view(shape) if raw.size else
                 torch.empty(shape, dtype=getattr(torch, dtype))) for name, raw, shape, dtype in wire]


@WEIGHT_TRANSPORTS.register("collective")
class CollectiveTransport(WeightTransport):
    """A ``torch.distributed`` broadcast from trainer rank 0 to the workers (NCCL on GPU, gloo on CPU).

    The group is formed on the first :meth:`send`, on the device of the tensors sent.
    """

    def __init__(self, workers: Sequence[Any]) -> None:
        super().__init__(workers)
        self.group: Any = None
        self.device: torch.device | None = None

    def _connect(self, device: torch.device) -> None:
        import ray

        host, world = ray.util.get_node_ip_address(), len(self.workers) + 1
        store = dist.TCPStore(host, 0, world, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
        joined = [w.join_weight_group.remote(host, store.port, rank, world, device.type)
                  for rank, w in enumerate(self.workers, start=1)]
        self.group, self.device = process_group(store, 0, world, device.type), device
        ray.get(joined)
        self._store = store  # the store lives as long as the group

    def send(self, bucket: list[tuple[str, Tensor]]) -> None:
        import ray

        if self.group is None:
            self._connect(bucket[0][1].device)
        meta, buffers = pack(bucket, self.device)
        received = [w.receive_weights.remote(meta) for w in self.workers]
        for buffer in buffers.values():
            self.group.broadcast(buffer, 0).wait()
        ray.get(received)


def process_group(store: dist.Store, rank: int, world: int, device_type: str) -> Any:
    """A process group over ``store`` of its own (not the default one): NCCL for ``cuda``, else gloo."""
    if device_type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, world)
    return dist.ProcessGroupGloo(store, rank, world, TIMEOUT)


def join(host: str, port: int, rank: int, world: int, device_type: str) -> Any:
    """A rollout worker's side of :meth:`CollectiveTransport._connect`: the group through trainer rank 0's store."""
    store = dist.TCPStore(host, port, world, is_master=False, timeout=TIMEOUT)
    return store, process_group(store, rank, world, device_type)


def _dtype_order(meta: Meta) -> list[str]:
    return sorted({dtype for _, _, dtype in meta})


def pack(bucket: list[tuple[str, Tensor]], device: torch.device | None = None
         ) -> tuple[Meta, dict[str, Tensor]]:
    """A bucket as its :data:`Meta` and one flat buffer per dtype name (in sorted order: the order they are
    broadcast in), on ``device``."""
    meta: Meta = [(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in bucket]
    buffers = {}
    for dtype in _dtype_order(meta):
        flat = torch.cat([t.detach().reshape(-1) for (_, _, d), (_, t) in zip(meta, bucket) if d == dtype])
        buffers[dtype] = flat.to(device) if device is not None else flat
    return meta, buffers


def receive(group: Any, meta: Meta, device: torch.device | str) -> list[tuple[str, Tensor]]:
    """Receives a bucket broadcast from rank 0 of ``group`` and unpacks it into (name, tensor) pairs."""
    sizes = {dtype: 0 for dtype in _dtype_order(meta)}
    for _, shape, dtype in meta:
        sizes[dtype] += math.prod(shape)
    buffers = {}
    for dtype, size in sizes.items():
        buffers[dtype] = torch.empty(size, dtype=getattr(torch, dtype), device=device)
        group.broadcast(buffers[dtype], 0).wait()
    return unpack(meta, buffers)


def unpack(meta: Meta, buffers: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
    """The (name, tensor) pairs of a bucket from its flat per-dtype buffers (views, no copies)."""
    offsets = {dtype: 0 for dtype in buffers}
    out = []
    for name, shape, dtype in meta:
        n = math.prod(shape)
        out.append((name, buffers[dtype][offsets[dtype]:offsets[dtype] + n].view(shape)))
        offsets[dtype] += n
    return out

