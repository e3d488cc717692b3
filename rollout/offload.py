"""Offloading the idle side between phases (the "hybrid engine").

The trainer (parameters, gradients and optimizer state) and the rollout engine share the same devices and take
turns. While one side is idle its memory goes elsewhere:

* ``cpu``: tensors move to host memory (pinned when a GPU is present) and come back to their device;
* ``disk``: tensors are written to a folder (safetensors for tensors, one file per kind) and their storage is
  released; used on CPU-only machines, where "CPU memory" is the memory being freed.

Round trips are bit-exact (tests check it), and shapes/dtypes/devices are restored as they were. A policy
sharded over trainer ranks (:func:`model.distributed.shard_model`) offloads each rank's own shards: a sharded
parameter keeps its identity (FSDP holds it), so its local tensor's storage is released and refilled in place.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor

MODES = ("cpu", "disk", "none")


def resolve_mode(mode: str, device: torch.device) -> str:
    """``auto`` picks ``cpu`` on an accelerator and ``disk`` on a CPU-only machine."""
    if mode == "auto":
        return "disk" if device.type == "cpu" else "cpu"
    if mode not in MODES:
        raise ValueError(f"offload mode must be auto, {', '.join(MODES)}; got {mode!r}")
    return mode


def _tensor_slots(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, tuple[Any, str]]:
    """Every tensor the trainer holds, by a stable name -> (owner, attribute/key) so it can be swapped out."""
    slots: dict[str, tuple[Any, str]] = {}
    for name, p in model.named_parameters():
        slots[f"param/{name}"] = (p, "data")
        if p.grad is not None:
            slots[f"grad/{name}"] = (p, "grad")
    for name, b in model.named_buffers():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if b is not None:
            slots[f"buffer/{name}"] = (owner, attr)
    if optimizer is not None:
        index = {id(p): name for name, p in model.named_parameters()}
        for p, state in optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    slots[f"optim/{index.get(id(p), id(p))}/{key}"] = (state, key)
    return slots


def _slot(owner: Any, attr: str) -> torch.Tensor:
    return owner[attr] if isinstance(owner, dict) else getattr(owner, attr)


def _get(owner: Any, attr: str) -> torch.Tensor:
    value = _slot(owner, attr)
    return value._local_tensor if isinstance(value, DTensor) else value


def _in_place(owner: Any, attr: str) -> bool:
    """Whether the slot holds a shard (``DTensor``): released and refilled in place, never rebound."""
    return isinstance(_slot(owner, attr), DTensor)


def _set(owner: Any, attr: str, value: torch.Tensor) -> None:
    if isinstance(owner, dict):
        owner[attr] = value
    elif attr in ("data", "grad"):
        setattr(owner, attr, value)
    else:  # a buffer: keep it registered on its module
        owner._buffers[attr] = value


@dataclass
class Offloader:
    """Moves a model's (and optionally its optimizer's) tensors out of the way and back.

    Args:
        model: The module whose parameters, gradients and buffers move.
        optimizer: Its optimizer; the state tensors move too.
        folder: Where ``disk`` mode writes (created; emptied on ``onload``).

    Example:
        >>> off = Offloader(model, optimizer, folder="runs/x/offload")  # doctest: +SKIP
        >>> off.offload("disk"); ...; off.onload()  # doctest: +SKIP
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    folder: Path | str | None = None
    mode: str | None = field(default=None, init=False)
    _meta: dict[str, tuple[torch.device, torch.dtype, torch.Size]] = field(default_factory=dict, init=False)
    _held: dict[str, torch.Tensor] = field(default_factory=dict, init=False)  # cpu mode: the shards' copies
    # shards share storages (FSDP reduce-scatters a block's gradients into one buffer and views it): each
    # shard's storage, by its address before release, and each storage's size
    _storage_of: dict[str, int] = field(default_factory=dict, init=False)
    _storage_bytes: dict[int, int] = field(default_factory=dict, init=False)

    @property
    def offloaded(self) -> bool:
        return self.mode not in (None, "none")

    def offload(self, mode: str = "auto") -> int:
        """Offloads everything; returns the bytes moved off the device (or freed from memory for ``disk``)."""
        if self.offloaded:
            raise RuntimeError(f"already offloaded ({self.mode}); call onload() first")
        device = next(self.model.parameters()).device
        mode = resolve_mode(mode, device)
        self.mode = mode
        if mode == "none":
            return 0
        slots = _tensor_slots(self.model, self.optimizer)
        self._meta = {k: (_get(o, a).device, _get(o, a).dtype, _get(o, a).shape) for k, (o, a) in slots.items()}
        moved = sum(_get(o, a).numel() * _get(o, a).element_size() for o, a in slots.values())
        shards = [key for key, (owner, attr) in slots.items() if _in_place(owner, attr)]
        if mode == "cpu":
            pin = torch.cuda.is_available()
            for key, (owner, attr) in slots.items():
                t = _get(owner, attr)
                cpu = t.detach().to("cpu", copy=True)
                cpu = cpu.pin_memory() if pin and t.device.type != "cpu" else cpu
                if key in shards:
                    self._held[key] = cpu
                else:
                    _set(owner, attr, cpu)
            self._release({key: _get(*slots[key]) for key in shards})  # every copy taken before any release
        else:
            folder = self._folder()
            folder.mkdir(parents=True, exist_ok=True)
            tensors = {k: _get(o, a).detach().to("cpu").contiguous() for k, (o, a) in slots.items()}
            save_file(tensors, str(folder / "tensors.safetensors"))
            del tensors
            self._release({key: _get(*slots[key]) for key in shards})
            for key, (owner, attr) in slots.items():
                if key not in shards:
                    _set(owner, attr, torch.empty(0, dtype=self._meta[key][1], device=self._meta[key][0]))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return moved

    def onload(self) -> None:
        """Restores every tensor to its device, dtype and shape, bit for bit."""
        if not self.offloaded:
            self.mode = None
            return
        slots = _tensor_slots(self.model, self.optimizer)
        missing = sorted(set(self._meta) - set(slots))
        if missing:
            raise RuntimeError(f"cannot onload: tensors disappeared while offloaded: {missing[:5]}")
        stored = load_file(str(self._folder() / "tensors.safetensors")) if self.mode == "disk" else None
        restored: set[int] = set()
        for key, (owner, attr) in slots.items():
            device, dtype, shape = self._meta[key]
            if _in_place(owner, attr):
                local, storage = _get(owner, attr), self._storage_of[key]
                if storage not in restored:  # once per storage: a second resize would free its first views
                    local.untyped_storage().resize_(self._storage_bytes[storage])
                    restored.add(storage)
                local.copy_(stored[key] if stored is not None else self._held[key])
                continue
            src = stored[key] if stored is not None else _get(owner, attr)
            _set(owner, attr, src.to(device=device, dtype=dtype).reshape(shape))
        if self.mode == "disk":
            shutil.rmtree(self._folder(), ignore_errors=True)
        self.mode, self._held, self._storage_of, self._storage_bytes = None, {}, {}, {}

    def _release(self, shards: dict[str, torch.Tensor]) -> None:
        """Frees the shards' memory, keeping the tensors (their storages are resized back on onload). Storages
        are told apart before any is freed: a freed storage no longer has an address."""
        for key, local in shards.items():
            storage = local.untyped_storage()
            self._storage_of[key] = storage.data_ptr()
            self._storage_bytes.setdefault(storage.data_ptr(), storage.nbytes())
        for local in shards.values():
            local.untyped_storage().resize_(0)

    def _folder(self) -> Path:
        if self.folder is None:
            raise ValueError("disk offload needs a folder (Offloader(folder=...))")
        return Path(self.folder)
