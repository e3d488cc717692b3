"""Backend choice for every kernel: Triton on CUDA, the plain PyTorch reference elsewhere.

The environment variable ``KERNELS_BACKEND`` (``triton`` or ``torch``) forces a path. It is read on every
call, so a test or a benchmark can switch backends inside one process. Forcing ``triton`` on CPU tensors needs
Triton's interpreter (``TRITON_INTERPRET=1`` set before the first Triton kernel is defined).

Each op is a :class:`KernelOp`: a PyTorch reference and the dotted path of its Triton implementation, imported
on first use so that the package imports without Triton.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

BACKEND_ENV = "KERNELS_BACKEND"
BACKENDS = ("triton", "torch")


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (checked once, without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or deliberately blocked install
        return False


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def backend(device: torch.device | str | None = None) -> str:
    """The backend a kernel call on ``device`` uses: ``"triton"`` or ``"torch"``.

    Args:
        device: Device of the call's tensors; ``None`` means the default CUDA device if there is one.

    Returns:
        ``KERNELS_BACKEND`` when set, else ``"triton"`` for a CUDA device with Triton installed, else
        ``"torch"``.

    Raises:
        ValueError: if ``KERNELS_BACKEND`` holds anything but ``triton`` or ``torch``.
        RuntimeError: if ``KERNELS_BACKEND=triton`` but Triton is not installed.
    """
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(BACKENDS)}, got {forced!r}")
        if forced == "triton" and not triton_available():
            raise RuntimeError(f"{BACKEND_ENV}=triton but the 'triton' package is not installed")
        return forced
    if device is None:
        on_cuda = torch.cuda.is_available()
    else:
        on_cuda = torch.device(device).type == "cuda"
    return "triton" if on_cuda and triton_available() else "torch"


def check_triton_device(*tensors: torch.Tensor) -> None:
    """Refuses to launch a Triton kernel on CPU tensors unless the interpreter is on.

    Raises:
        RuntimeError: naming the device and the way to run Triton on CPU.
    """
    for t in tensors:
        if t.device.type != "cuda" and not interpreter_enabled():
            raise RuntimeError(
                f"the triton backend needs CUDA tensors, got a tensor on {t.device}; "
                "set TRITON_INTERPRET=1 (before the first kernel call) to run Triton's interpreter on CPU, "
                f"or {BACKEND_ENV}=torch"
            )


class KernelOp:
    """One op with a PyTorch reference and a lazily imported Triton implementation.

    Args:
        name: The op's name, used in error messages.
        torch_impl: The plain PyTorch implementation.
        triton_path: ``"package.module:function"`` of the Triton implementation, same signature.
    """

    def __init__(self, name: str, torch_impl: Callable[..., Any], triton_path: str) -> None:
        self.name = name
        self._impls: dict[str, Callable[..., Any] | str] = {"torch": torch_impl, "triton": triton_path}

    def impl(self, name: str) -> Callable[..., Any]:
        """The implementation for backend ``name``, importing the Triton module on first use."""
        if name not in self._impls:
            raise ValueError(f"{self.name}: unknown backend {name!r}; known: {', '.join(BACKENDS)}")
        found = self._impls[name]
        if isinstance(found, str):
            module_name, _, attr = found.partition(":")
            found = getattr(importlib.import_module(module_name), attr)
            self._impls[name] = found
        return found

    def __call__(self, device: torch.device, *args: Any, **kwargs: Any) -> Any:
        """Runs the implementation :func:`backend` picks for ``device``."""
        return self.impl(backend(device))(*args, **kwargs)
