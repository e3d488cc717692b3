"""Data-parallel scaling: GRPO step time and peak memory per trainer rank, for 1 and 2 (``--ranks``) ranks.

Each run starts N fresh processes joined in one process group (gloo on CPU, NCCL on GPU); the policy is sharded
with FSDP2 over them (:func:`model.distributed.shard_model`) and every rank computes its share of each
minibatch, so the update equals one rank's. Rank 0 samples with our torch engine, scores and pushes the weights
back after each step. The global batch is the same for every N: the log-prob passes and the update split over
the ranks, sampling and scoring stay on rank 0.

On CPU the ranks share the machine's cores: ``--threads`` (default: all cores) is the total, divided among the
ranks, so 1 rank with 2 threads is compared with 2 ranks of 1 thread each. Memory is each rank's peak resident
set (the process, the Python runtime included, measured every few ms) and what the run added to it after the
imports; on GPU it is ``torch.cuda.max_memory_allocated``. The ratio column is each N's median step time over
the 1-rank median of the same invocation.

Run: ``python benchmarks/bench_scale.py [--ranks 1,2] [--steps 5] [--hidden 128] [--layers 4]``
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_offload import _PeakRSS, _rss_bytes  # the same resident-memory sampler (benchmarks/ is on sys.path)

PARTS = ("generate", "score", "logprobs", "update", "sync", "sync_check")


def _length_reward(prompts: list, completions: list, **_: object) -> list[float]:
    """Rewards shorter completions (any signal will do: the benchmark times the machinery)."""
    return [1.0 / (1.0 + len(c)) for c in completions]


def _train(args: argparse.Namespace, dp: Any, device: str) -> tuple[list[dict], int]:
    """The timed GRPO steps on this rank; every timed step's parts, and the policy's parameter count."""
    from grpo.config import GRPOConfig
    from grpo.trainer import GRPOTrainer
    from model import DeepSeekConfig, DeepSeekForCausalLM, build_tokenizer
    from model.distributed import shard_model
    from rollout.torch_engine import TorchEngine

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = DeepSeekConfig.from_preset("tiny", vocab_size=len(tokenizer), hidden_size=args.hidden,
                                        num_hidden_layers=args.layers, moe_intermediate_size=args.hidden * 3 // 2,
                                        intermediate_size=args.hidden * 4)
    policy = DeepSeekForCausalLM(config).to(device)
    ref = copy.deepcopy(policy).eval()
    engine = TorchEngine(copy.deepcopy(policy).eval(), tokenizer=tokenizer) if dp.is_main else None
    shard_model(policy, dp, param_dtype=torch.bfloat16 if device == "cuda" else None)
    batch = args.prompts * args.G
    grpo = GRPOConfig(group_size=args.G, prompts_per_step=args.prompts, minibatch_size=batch,
                      micro_batch_size=args.micro, lr=1e-5, beta=0.04, max_new_tokens=args.tokens, seed=0)
    trainer = GRPOTrainer(policy, engine, _length_reward if dp.is_main else None, tokenizer, grpo, ref_model=ref,
                          dp=dp)
    rows = [{"prompt": f"What is {i} plus {2 * i}?"} for i in range(args.prompts)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps = []
    for k in range(args.warmup + args.steps):
        dp.barrier()
        start = time.perf_counter()
        metrics = trainer.step(rows)
        dp.barrier()
        if k >= args.warmup:
            steps.append({"total": time.perf_counter() - start,
                          **{p: metrics.get(f"time/{p}", 0.0) for p in PARTS}})
    return steps, sum(p.numel() for p in ref.parameters())


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    from model.distributed import DataParallel

    torch.set_num_threads(max(1, args.threads // world))
    device = args.device
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
    if device == "cuda":
        torch.cuda.set_device(rank)
    baseline = _rss_bytes()
    with _PeakRSS() as monitor:
        steps, params = _train(args, DataParallel.current(), device)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else monitor.peak
    result = {"rank": rank, "steps": steps, "peak": peak, "added": peak - (0 if device == "cuda" else baseline),
              "params": params}
    torch.save(result, f"{out}.rank{rank}")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, args: argparse.Namespace) -> list[dict]:
    """One run with ``world`` ranks; every rank's results."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result")
        mp.spawn(_rank, args=(world, _free_port(), args, out), nprocs=world, join=True)
        return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--G", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per completion")
    parser.add_argument("--micro", type=int, default=8, help="micro-batch size")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads in all (split over ranks)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.device == "cuda" and max(ranks) > torch.cuda.device_count():
        raise SystemExit(f"--ranks {args.ranks} needs {max(ranks)} GPUs; this machine has "
                         f"{torch.cuda.device_count()}")
    results = {n: run(n, args) for n in ranks}
    base = statistics.median(s["total"] for s in results[ranks[0]][0]["steps"])
    params = results[ranks[0]][0]["params"]
    memory = "peak allocated" if args.device == "cuda" else "peak RSS (added after imports)"
    print(f"\nGRPO step with N trainer ranks ({args.device}), {params / 1e6:.2f}M-parameter MoE, "
          f"{args.prompts} prompts x G={args.G}, {args.tokens} new tokens, micro-batch {args.micro}, "
          f"{args.steps} timed steps, {args.threads} threads in all")
    print(f"| ranks | s/step (median) | vs {ranks[0]} rank(s) | " + " | ".join(PARTS) + f" | {memory} per rank |")
    print("|" + "---|" * (4 + len(PARTS)))
    for n, per_rank in results.items():
        steps = per_rank[0]["steps"]  # rank 0's clock: it waits for every rank at the barriers
        median = statistics.median(s["total"] for s in steps)
        parts = " | ".join(f"{statistics.median(s[p] for s in steps):.3f}" for p in PARTS)
        mem = ", ".join(f"{r['peak'] / 2**20:.0f} MiB" + ("" if args.device == "cuda" else
                                                         f" (+{r['added'] / 2**20:.0f})") for r in per_rank)
        print(f"| {n} | {median:.3f} | {base / median:.2f}x | {parts} | {mem} |")


if __name__ == "__main__":
    main()
