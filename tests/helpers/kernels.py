"""Helpers for kernel tests and benchmarks: devices, the interpreter switch, per-dtype tolerances."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from grpo_kernels.dispatch import interpreter_enabled, triton_available


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
    """Switches Triton's interpreter on when there is no GPU; call before ``triton`` is imported."""
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def triton_runs_in_process() -> bool:
    """Whether Triton kernels can run in this process: on CUDA, or on CPU under the interpreter.

    Triton decides between compiled and interpreted functions when a function is decorated, its own library
    (``tl.cdiv``, ``tl.sum``, ...) included. A process that imported ``triton.language`` before
    ``TRITON_INTERPRET=1`` was set (a test module importing transformers, say) cannot interpret kernels.
    """
    if torch.cuda.is_available():
        return True
    if not interpreter_enabled():
        return False
    if "triton.language" not in sys.modules:
        return True
    import triton.language as tl

    return type(tl.cdiv).__name__ == "InterpretedFunction"


def require_triton_in_process() -> None:
    """Skips the calling test when :func:`triton_runs_in_process` is false (a fresh process runs it)."""
    if not triton_runs_in_process():
        pytest.skip("triton was imported before TRITON_INTERPRET=1; the fresh-process test runs this one")


def run_triton_tests_in_fresh_process(test_file: str, keyword: str = "triton and not fresh_process") -> None:
    """Runs the ``keyword`` tests of ``test_file`` in a new interpreter with ``TRITON_INTERPRET=1``.

    Raises:
        AssertionError: with the tail of pytest's output when any of them fails (or none is collected).
    """
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", keyword]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-4000:]}"


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


use_triton_interpreter_off_gpu()  # on import: before the importing test module defines or imports a Triton kernel
DEVICE = kernel_test_device()
ON_GPU = DEVICE.type == "cuda"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable")


def fresh_process_test(test_file: str):
    """A test for ``test_file`` that runs its Triton tests in a new process when this one cannot (see
    :func:`triton_runs_in_process`): ``test_triton_in_fresh_process = fresh_process_test(__file__)``."""

    @needs_triton
    def test_triton_in_fresh_process() -> None:
        if triton_runs_in_process():
            pytest.skip("the Triton tests run in this process")
        run_triton_tests_in_fresh_process(test_file)

    return test_triton_in_fresh_process
