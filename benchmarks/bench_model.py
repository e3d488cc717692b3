"""Speed of our DeepSeek model vs transformers' on the same tiny weights (CPU or GPU).

Measures, for the ``tiny`` preset at batch 8 x seq 128 (by default):

- ``fwd+bwd``: a training step's forward and backward (sum of logits as the loss);
- ``decode``: one token for every row on top of a 128-token prefix, ours through the latent cache and the
  absorbed MLA path, transformers' through its ``DynamicCache``;
- ours with both routed-expert matmuls (``loop`` over per-expert slices, one ``grouped_mm``).

Each row is the median of ``--reps`` timed runs after ``--warmup`` runs, at 1 thread and at torch's default
thread count. Run::

    python benchmarks/bench_model.py [--batch 8] [--seq 128] [--reps 10] [--device cpu] [--threads 1 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

from model import DeepSeekConfig, DeepSeekForCausalLM


def _timed(fn: Callable[[], None], warmup: int, reps: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _fwd_bwd(model: torch.nn.Module, ids: torch.Tensor, hf: bool) -> Callable[[], None]:
    def run() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits if hf else model(ids).logits
        logits.float().sum().backward()

    return run


def _ours_decode(model: DeepSeekForCausalLM, ids: torch.Tensor, nxt: torch.Tensor) -> Callable[[], None]:
    cache = model.new_cache(ids.shape[0], ids.shape[1] + 1)
    with torch.no_grad():
        model(ids, cache=cache, compute_logits=False)
    prefix = cache.seq_len

    @torch.no_grad()
    def run() -> None:
        cache.seq_len = prefix  # drop the token the previous run appended
        model(nxt, cache=cache, logits_to_keep=1)

    return run


def _hf_decode(model: torch.nn.Module, ids: torch.Tensor, nxt: torch.Tensor) -> Callable[[], None]:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    prefix = ids.shape[1]
    pos = torch.full((ids.shape[0], 1), prefix, device=ids.device)

    @torch.no_grad()
    def run() -> None:
        extra = cache.get_seq_length() - prefix
        if extra:
            cache.crop(-extra)  # drop the token the previous run appended
        model(input_ids=nxt, past_key_values=cache, use_cache=True, position_ids=pos, logits_to_keep=1)

    return run


def _models(device: torch.device, dtype: torch.dtype) -> tuple[DeepSeekForCausalLM, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ours = DeepSeekForCausalLM(DeepSeekConfig.from_preset("tiny"))
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return ours.to(device=device, dtype=dtype), hf.to(device=device, dtype=dtype)


def run_benchmark(batch: int, seq: int, reps: int, warmup: int, device: torch.device, dtype: torch.dtype,
                  threads: list[int]) -> list[tuple[str, int, float, float]]:
    """Returns rows ``(case, threads, ours ms, transformers ms)``."""
    ours, hf = _models(device, dtype)
    vocab = ours.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=g).to(device)
    nxt = torch.randint(3, vocab, (batch, 1), generator=g).to(device)
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        ours.train()
        hf.train()
        hf_fb = _timed(_fwd_bwd(hf, ids, hf=True), warmup, reps, device)
        hf_dec = _timed(_hf_decode(hf.eval(), ids, nxt), warmup, reps, device)
        for impl in ("loop", "grouped_mm"):
            ours.set_experts_impl(impl)
            ours.train()
            rows.append((f"fwd+bwd ({impl})", n, _timed(_fwd_bwd(ours, ids, hf=False), warmup, reps, device),
                         hf_fb))
            rows.append((f"decode  ({impl})", n, _timed(_ours_decode(ours.eval(), ids, nxt), warmup, reps, device),
                         hf_dec))
        ours.set_experts_impl("auto")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, nargs="*", default=None,
                        help="CPU thread counts to time (default: 1 and torch's default)")
    args = parser.parse_args()
    device = torch.device(args.device)
    threads = args.threads or sorted({1, torch.get_num_threads()})
    rows = run_benchmark(args.batch, args.seq, args.reps, args.warmup, device, getattr(torch, args.dtype), threads)
    print(f"tiny preset, batch {args.batch}, seq {args.seq}, {args.device} {args.dtype}, torch "
          f"{torch.__version__}; median of {args.reps} runs")
    print(f"{'case':<22}{'threads':>8}{'ours ms':>10}{'HF ms':>10}{'ours/HF':>9}")
    for case, n, ours_ms, hf_ms in rows:
        print(f"{case:<22}{n:>8}{ours_ms:>10.2f}{hf_ms:>10.2f}{ours_ms / hf_ms:>9.2f}")


if __name__ == "__main__":
    main()
