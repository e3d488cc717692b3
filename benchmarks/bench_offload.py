"""Peak memory of the generation phase with and without offloading the idle trainer (the hybrid engine).

A trainer holds a policy with gradients and AdamW state (after one optimizer step); then the rollout phase builds
an engine copy of the policy and samples. With ``offload`` the trainer's parameters, gradients and optimizer
state leave memory first (to disk on CPU, to host memory on a GPU) and come back bit-exactly afterwards. Each
mode runs in a fresh process, so the peaks do not mix; the table reports the peak resident memory (CPU) or peak
allocated device memory (CUDA) during the rollout phase.

Run: ``python benchmarks/bench_offload.py [--hidden 512] [--layers 8] [--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time

import torch


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _PeakRSS:
    """Samples the process's resident memory every few milliseconds while active."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()

    def __enter__(self) -> _PeakRSS:
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def one_mode(args: argparse.Namespace) -> dict:
    from model import DeepSeekConfig, DeepSeekForCausalLM
    from rollout.base import SamplingConfig
    from rollout.offload import Offloader
    from rollout.torch_engine import TorchEngine

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = DeepSeekConfig.from_preset("tiny", vocab_size=4096, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                     intermediate_size=4 * args.hidden, moe_intermediate_size=args.hidden,
                                     eos_token_id=2)
    policy = DeepSeekForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    ids = torch.randint(3, 4096, (4, 64), device=device)
    policy(ids).logits.float().mean().backward()
    opt.step()  # AdamW state exists now; gradients stay allocated as in a trainer between steps
    snapshot = {k: v.detach().clone().cpu() for k, v in policy.state_dict().items()}
    params = sum(p.numel() for p in policy.parameters())
    with tempfile.TemporaryDirectory() as folder:
        offloader = Offloader(policy, opt, folder=folder)
        moved = offloader.offload(args.mode) if args.mode != "none" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        weights = snapshot  # the engine is built from the last synced weights
        with _PeakRSS() as rss:
            engine_model = DeepSeekForCausalLM(cfg).to(device).eval()
            engine_model.load_state_dict(weights)
            engine = TorchEngine(engine_model)
            engine.generate([[5, 6, 7, 8]] * 8, SamplingConfig(n=4, max_tokens=32, seed=0))
            del engine, engine_model
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss.peak
        offloader.onload()
    exact = all(torch.equal(v.cpu(), snapshot[k]) for k, v in policy.state_dict().items())
    return {"mode": args.mode, "params": params, "moved": moved, "peak": peak, "exact": exact}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:
        print(json.dumps(one_mode(args)))
        return
    offload = "disk" if args.device == "cpu" else "cpu"
    rows = []
    for mode in ("none", offload):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--hidden", str(args.hidden), "--layers",
                              str(args.layers), "--device", args.device], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak"]
    what = "peak RSS" if args.device == "cpu" else "peak CUDA allocated"
    print(f"\nRollout-phase {what}, policy of {rows[0]['params'] / 1e6:.1f}M parameters + AdamW state, {args.device}")
    print(f"| trainer during rollout | {what} (MiB) | vs resident | moved off (MiB) | round trip bit-exact |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {'resident' if r['mode'] == 'none' else 'offloaded (' + r['mode'] + ')'} | {r['peak'] / 2**20:.0f} "
              f"| {r['peak'] / base:.2f}x | {r['moved'] / 2**20:.0f} | {r['exact']} |")


if __name__ == "__main__":
    main()
