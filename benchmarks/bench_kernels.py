"""Speed and peak memory of each kernel: Triton vs the PyTorch reference vs ``torch.compile`` of the naive op.

Run on a GPU machine (the Triton rows need CUDA):

    python benchmarks/bench_kernels.py                  # all kernels, DeepSeek-V2-like shapes, bf16
    python benchmarks/bench_kernels.py --only mla --no-compile
    python benchmarks/bench_kernels.py --small          # tiny shapes (also runs the torch rows on CPU)

Each row times one call (median of ``--iters`` after warm-up, which also absorbs autotuning and compilation)
and the peak memory allocated above the inputs during that call. ``fwd+bwd`` rows take gradients with
``torch.autograd.grad`` for every differentiable input. ``rel diff`` is the largest ``max|x - y| / max|y|`` over the
outputs and gradients, against the first row of its group.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import grpo_kernels
from grpo_kernels.moe import naive_moe_layer
from grpo_kernels.token_logprobs import naive_token_logprobs

Outputs = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Result:
    """One table row."""

    kernel: str
    impl: str
    mode: str
    ms: float | None
    peak_mib: float | None
    max_diff: float | None
    note: str = ""


@dataclass(frozen=True)
class Case:
    """One implementation of one kernel in one mode; ``run`` returns the tensors to compare."""

    kernel: str
    impl: str
    mode: str
    run: Callable[[], Outputs]


def with_backend(name: str, fn: Callable[..., Outputs]) -> Callable[..., Outputs]:
    """Runs ``fn`` with ``KERNELS_BACKEND`` set to ``name``."""

    def run(*args, **kwargs) -> Outputs:
        old = os.environ.get("KERNELS_BACKEND")
        os.environ["KERNELS_BACKEND"] = name
        try:
            return fn(*args, **kwargs)
        finally:
            if old is None:
                del os.environ["KERNELS_BACKEND"]
            else:
                os.environ["KERNELS_BACKEND"] = old

    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(case: Case, device: torch.device, warmup: int, iters: int) -> tuple[float, float | None, Outputs]:
    """``(median ms, peak MiB above the inputs, outputs)`` of ``case.run``."""
    for _ in range(warmup):
        case.run()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        case.run()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        outputs = case.run()
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        outputs = case.run()
    return statistics.median(times), peak, tuple(o.detach() for o in outputs if o is not None)


def max_diff(a: Outputs, b: Outputs) -> float:
    """Largest ``max|x - y| / max|y|`` over the outputs (and gradients)."""
    rel = (
        (x.float() - y.float()).abs().max().item() / max(y.float().abs().max().item(), 1e-30)
        for x, y in zip(a, b, strict=True)
    )
    return max(rel, default=0.0)


def grads(outputs: Outputs, inputs: list[torch.Tensor], upstream: Outputs) -> Outputs:
    """``outputs`` followed by the gradients of ``sum(out * g)`` with respect to ``inputs``."""
    pairs = [(o, g) for o, g in zip(outputs, upstream, strict=True) if o is not None]
    got = torch.autograd.grad([o for o, _ in pairs], inputs, [g.to(o.dtype) for o, g in pairs])
    return (*outputs, *got)


# ---- cases ----


def token_logprobs_cases(n: int, h: int, v: int, dtype, device, compile_naive: bool, triton: bool) -> list[Case]:
    g = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(n, h, device=device, generator=g) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device, generator=g) / math.sqrt(h)).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    upstream = (torch.randn(n, device=device, generator=g), torch.randn(n, device=device, generator=g))
    compiled = torch.compile(naive_token_logprobs) if compile_naive else None

    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn(hidden, weight, labels)

        return run

    def fwd_bwd(fn):
        return lambda: grads(fn(hidden, weight, labels), [hidden, weight], upstream)

    impls: list[tuple[str, Callable]] = []
    if triton:
        impls.append(("triton", with_backend("triton", lambda *a: grpo_kernels.token_logprobs(*a))))
    impls.append(("torch reference (chunked)", with_backend("torch", lambda *a: grpo_kernels.token_logprobs(*a))))
    impls.append(("naive eager", lambda *a: naive_token_logprobs(*a)))
    if compiled is not None:
        impls.append(("torch.compile(naive)", lambda *a: compiled(*a)))
    name = f"token_logprobs N={n} H={h} V={v} {str(dtype).removeprefix('torch.')}"
    return [Case(name, impl, "fwd", fwd(fn)) for impl, fn in impls] + [
        Case(name, impl, "fwd+bwd", fwd_bwd(fn)) for impl, fn in impls
    ]


def grouped_mm_layer(hidden, expert_ids, weights, w_gate_up, w_down):
    """Our permutation around ``torch._grouped_mm`` (cuBLAS grouped GEMM), when this torch has it."""
    permuted, order, counts = grpo_kernels.moe_permute(hidden, expert_ids, w_gate_up.shape[0])
    offs = torch.cumsum(counts, 0).to(torch.int32)
    gu = torch._grouped_mm(permuted, w_gate_up.transpose(1, 2), offs=offs)
    gate, up = gu.chunk(2, dim=-1)
    out = torch._grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offs)
    return grpo_kernels.moe_unpermute(out, order, weights)


def moe_cases(t, k, e, h, i, dtype, device, compile_naive: bool, triton: bool) -> list[Case]:
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(t, h, device=device, generator=g).to(dtype).requires_grad_()
    scores = torch.randn(t, e, device=device, generator=g).softmax(-1)
    gate_w, expert_ids = scores.topk(k, dim=-1)
    weights = gate_w.to(dtype).requires_grad_()
    w_gate_up = (torch.randn(e, 2 * i, h, device=device, generator=g) / math.sqrt(h)).to(dtype).requires_grad_()
    w_down = (torch.randn(e, h, i, device=device, generator=g) / math.sqrt(i)).to(dtype).requires_grad_()
    inputs = [hidden, weights, w_gate_up, w_down]
    upstream = (torch.randn(t, h, device=device, generator=g),)

    def layer(hidden, expert_ids, weights, w_gate_up, w_down):
        permuted, order, counts = grpo_kernels.moe_permute(hidden, expert_ids, e)
        return grpo_kernels.moe_unpermute(grpo_kernels.grouped_mlp(permuted, counts, w_gate_up, w_down), order, weights)

    def case_fns(fn):
        def fwd():
            with torch.no_grad():
                return (fn(hidden, expert_ids, weights, w_gate_up, w_down),)

        def fwd_bwd():
            return grads((fn(hidden, expert_ids, weights, w_gate_up, w_down),), inputs, upstream)

        return fwd, fwd_bwd

    impls: list[tuple[str, Callable]] = []
    if triton:
        impls.append(("triton", with_backend("triton", layer)))
    impls.append(("torch reference (expert loop)", with_backend("torch", layer)))
    impls.append(("naive eager (DeepSeek loop)", naive_moe_layer))
    if compile_naive:
        impls.append(("torch.compile(naive)", torch.compile(naive_moe_layer, dynamic=True)))
    if device.type == "cuda" and hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16:
        impls.append(("torch._grouped_mm + our permute", with_backend("torch", grouped_mm_layer)))
    name = f"moe layer T={t} K={k} E={e} H={h} I={i} {str(dtype).removeprefix('torch.')}"
    cases = []
    for impl, fn in impls:
        fwd, fwd_bwd = case_fns(fn)
        cases += [Case(name, impl, "fwd", fwd), Case(name, impl, "fwd+bwd", fwd_bwd)]
    return cases


def mla_cases(b, hq, s, dc, dr, dtype, device, compile_naive: bool, triton: bool) -> list[Case]:
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, hq, dc, device=device, generator=g).to(dtype)
    qr = torch.randn(b, hq, dr, device=device, generator=g).to(dtype)
    c = torch.randn(b, s, dc, device=device, generator=g).to(dtype)
    kr = torch.randn(b, s, dr, device=device, generator=g).to(dtype)
    lengths = torch.randint(s // 2, s + 1, (b,), device=device, generator=g)
    scale = 1 / math.sqrt(128 + dr)

    def naive(q, qr, c, kr, lengths):
        scores = (torch.einsum("bhc,bsc->bhs", q, c) + torch.einsum("bhr,bsr->bhs", qr, kr)).float() * scale
        valid = torch.arange(c.shape[1], device=c.device)[None, :] < lengths[:, None]
        probs = scores.masked_fill(~valid[:, None], float("-inf")).softmax(-1)
        return torch.einsum("bhs,bsc->bhc", probs.to(c.dtype), c)

    impls: list[tuple[str, Callable]] = []
    if triton:
        impls.append(("triton", with_backend("triton", lambda *a: grpo_kernels.mla_decode(*a, scale))))
    impls.append(("torch reference", with_backend("torch", lambda *a: grpo_kernels.mla_decode(*a, scale))))
    if compile_naive:
        impls.append(("torch.compile(naive)", torch.compile(naive)))
    name = f"mla_decode B={b} Hq={hq} S={s} d_c={dc} d_r={dr} {str(dtype).removeprefix('torch.')}"

    def make(fn):
        def run():
            with torch.no_grad():
                return (fn(q, qr, c, kr, lengths),)

        return run

    return [Case(name, impl, "fwd", make(fn)) for impl, fn in impls]


# ---- main ----


def run_cases(cases: list[Case], device, warmup: int, iters: int) -> list[Result]:
    results = []
    first: dict[tuple[str, str], Outputs] = {}
    for case in cases:
        try:
            ms, peak, outputs = measure(case, device, warmup, iters)
        except Exception as exc:  # a baseline that cannot run (OOM, compile failure) is reported, not fatal
            note = f"{type(exc).__name__}: {exc}"[:120]
            results.append(Result(case.kernel, case.impl, case.mode, None, None, None, note))
            print(f"  {case.kernel} | {case.impl} | {case.mode}: failed: {note}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        key = (case.kernel, case.mode)
        diff = max_diff(outputs, first[key]) if key in first else None
        first.setdefault(key, outputs)
        results.append(Result(case.kernel, case.impl, case.mode, ms, peak, diff))
        extra = f", peak {peak:.1f} MiB" if peak is not None else ""
        extra += f", rel diff {diff:.2e}" if diff is not None else ""
        print(f"  {case.kernel} | {case.impl} | {case.mode}: {ms:.3f} ms{extra}", flush=True)
    return results


def print_table(results: list[Result], device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\ndevice: {name}, torch {torch.__version__}")
    header = f"{'impl':<34} {'mode':<8} {'ms':>10} {'peak MiB':>10} {'rel diff':>10}  note"
    kernel = None
    for r in results:
        if r.kernel != kernel:
            kernel = r.kernel
            print(f"\n{kernel}\n{header}\n{'-' * len(header)}")
        ms = f"{r.ms:10.3f}" if r.ms is not None else f"{'-':>10}"
        peak = f"{r.peak_mib:10.1f}" if r.peak_mib is not None else f"{'-':>10}"
        diff = f"{r.max_diff:10.2e}" if r.max_diff is not None else f"{'-':>10}"
        print(f"{r.impl:<34} {r.mode:<8} {ms} {peak} {diff}  {r.note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="token_logprobs,moe,mla", help="comma list of token_logprobs,moe,mla")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a smoke test; runs on CPU too)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    triton = device.type == "cuda"
    if not triton:
        print("no CUDA device: only the PyTorch rows run")
    dtype = torch.bfloat16
    compile_naive = not args.no_compile
    small = args.small
    builders = {
        "token_logprobs": lambda: token_logprobs_cases(
            *((64, 32, 1000) if small else (8192, 2048, 102400)), dtype, device, compile_naive, triton
        ),
        "moe": lambda: moe_cases(
            *((64, 2, 4, 32, 16) if small else (4096, 6, 64, 2048, 1408)), dtype, device, compile_naive, triton
        ),
        "mla": lambda: mla_cases(
            *((2, 4, 64, 32, 16) if small else (64, 16, 4096, 512, 64)), dtype, device, compile_naive, triton
        ),
    }
    results = []
    for name in args.only.split(","):
        if name not in builders:
            parser.error(f"--only: unknown kernel {name!r}; known: {', '.join(builders)}")
        print(f"[{name}]", flush=True)
        results += run_cases(builders[name](), device, args.warmup, args.iters)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(results, device)


if __name__ == "__main__":
    main()
