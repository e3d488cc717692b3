"""Helpers for kernel tests and benchmarks: devices, the interpreter switch, per-dtype tolerances."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """Allowed error of a kernel against a float64 reference.

    Attributes:
        atol: Absolute tolerance of element-wise comparisons.
        rtol: Relative tolerance of element-wise comparisons.
        grad_rel: Allowed ``||got - want|| / ||want||`` of a gradient.
    """

    atol: float
    rtol: float
    grad_rel: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-9, rtol=1e-9, grad_rel=1e-9),
    torch.float32: Tolerance(atol=2e-4, rtol=2e-4, grad_rel=1e-4),
    torch.bfloat16: Tolerance(atol=6e-2, rtol=3e-2, grad_rel=2e-2),
    torch.float16: Tolerance(atol=1e-2, rtol=5e-3, grad_rel=5e-3),
}


def kernel_test_device() -> torch.device:
    """CUDA when present (compiled Triton kernels), else CPU (Triton's interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_triton_interpreter_off_gpu() -> None:
    """Switches Triton's interpreter on when there is no GPU; call before any Triton kernel is imported."""
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Element-wise comparison with the tolerance of ``dtype`` (the dtype the kernel computed in)."""
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(
        got.double(), want.double(), atol=tol.atol, rtol=tol.rtol, msg=lambda m: f"{what} ({dtype}): {m}"
    )


def assert_grad_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Relative-norm comparison of a gradient with the tolerance of ``dtype``."""
    got, want = got.double(), want.double()
    err = (got - want).norm().item()
    scale = max(want.norm().item(), 1e-30)
    limit = TOLERANCES[dtype].grad_rel
    assert err / scale <= limit, f"{what} ({dtype}): relative error {err / scale:.3e} > {limit:.1e}"
