"""Backend choice: the environment variable is read per call, CUDA picks Triton, CPU the reference."""

import subprocess
import sys

import pytest
import torch

import grpo_kernels
from grpo_kernels.dispatch import BACKEND_ENV, KernelOp, check_triton_device, triton_available


def test_cpu_defaults_to_torch(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert grpo_kernels.backend("cpu") == "torch"


def test_cuda_defaults_to_triton_when_installed(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert grpo_kernels.backend("cuda") == ("triton" if triton_available() else "torch")


def test_environment_is_read_per_call(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert grpo_kernels.backend("cuda") == "torch"
    if triton_available():
        monkeypatch.setenv(BACKEND_ENV, "Triton ")
        assert grpo_kernels.backend("cpu") == "triton"


def test_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="KERNELS_BACKEND must be one of triton, torch, got 'cuda'"):
        grpo_kernels.backend("cpu")


def test_kernel_op_routes_to_the_chosen_backend(monkeypatch):
    op = KernelOp("demo", lambda x: ("torch", x), "builtins:print")
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert op(torch.device("cpu"), 3) == ("torch", 3)
    assert op.impl("triton") is print
    with pytest.raises(ValueError, match="demo: unknown backend 'jax'"):
        op.impl("jax")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        check_triton_device(torch.zeros(1))


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import grpo_kernels, torch\n"
        "assert 'grpo_kernels.triton_impl.token_logprobs' not in sys.modules\n"
        "h = torch.randn(3, 4); w = torch.randn(5, 4)\n"
        "lp, ent = grpo_kernels.token_logprobs(h, w, torch.tensor([0, 1, 4]))\n"
        "print(lp.shape[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"KERNELS_BACKEND": "torch", "OMP_NUM_THREADS": "1", "PATH": ""},
    )
    assert out.stdout.strip() == "3"
