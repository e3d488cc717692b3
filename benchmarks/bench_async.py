"""Sync vs one-step off-policy (async) rollouts: RL steps per minute and the stage-1 accuracy gain of each.

One SFT run of the recipe is shared; its run folder is copied once per mode and stage 1 (``rl_reason``) and the
held-out evaluation run on top of it (``resume=true``), with ``rl_reason.grpo.async_rollouts`` false, then true,
on one rollout worker and one trainer rank (``ray.num_rollout_workers=1``, ``ray.num_train_workers=1``). Steps
per minute come from the trainer's own step time (``time/step``, which in async mode includes waiting for the
generation that overlapped the update), the first step left out; the gain is the report's stage-1 accuracy gain
over SFT (held-out greedy accuracy, points). Both modes run one after the other on the same machine.

Run: ``python benchmarks/bench_async.py [--recipe tiny] [--out runs/async] [key=value ...]`` (about 10 minutes
for the tiny recipe on a 2-core CPU, half of it the SFT run, which a later run in the same ``--out`` reuses).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["ray.num_rollout_workers=1", "ray.num_train_workers=1"]


def grpo(out: Path, name: str, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "grpo", "run", *args, f"name={name}", f"output_dir={out}", *COMMON]
    print(f"[bench] {' '.join(cmd[3:])}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{name}.log").open("a") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    if proc.returncode != 0:
        raise SystemExit(f"[bench] {name} failed (exit {proc.returncode}); see {out / f'{name}.log'}")


def measure(run: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["time/step"] for r in rows if r["phase"] == "rl_reason" and r["step"] > 1 and "time/step" in r]
    report = json.loads((run / "report.json").read_text())
    gain = (report["deltas"].get("stage1_accuracy_gain_points") or {}).get("value")
    mismatch = [r.get("mismatch/logp_abs_mean") for r in rows if r["phase"] == "rl_reason"]
    return {"steps_per_min": 60.0 / statistics.mean(steps), "step_s": statistics.median(steps),
            "gain": gain, "sft_acc": report["phases"]["sft"]["accuracy"],
            "rl_acc": report["phases"]["rl_reason"]["accuracy"],
            "mismatch": statistics.mean(m for m in mismatch if m is not None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--out", type=Path, default=Path("runs/async"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    base = args.out / "sft"
    if not (base / "checkpoints" / "sft" / "config.json").exists():
        grpo(args.out, "sft", [args.recipe, "phases=[sft]", *args.overrides])
    results = {}
    for mode in ("sync", "async"):
        run = args.out / mode
        if not (run / "report.json").exists():
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(base, run, ignore=shutil.ignore_patterns("ray", "offload"))
            grpo(args.out, mode, [args.recipe, "phases=[rl_reason,eval]", "resume=true",
                                  f"rl_reason.grpo.async_rollouts={'true' if mode == 'async' else 'false'}",
                                  *args.overrides])
        results[mode] = measure(run)
    sync, asynchronous = results["sync"], results["async"]
    print(f"\nStage 1 of {args.recipe}, 1 rollout worker and 1 trainer rank (steps after the first)")
    print("| mode | RL steps/min | s/step (median) | speed-up | SFT acc | stage-1 acc | stage-1 gain | "
          "mean abs log-prob gap |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['steps_per_min']:.1f} | {r['step_s']:.2f} | "
              f"{r['steps_per_min'] / sync['steps_per_min']:.2f}x | {100 * r['sft_acc']:.1f}% | "
              f"{100 * r['rl_acc']:.1f}% | {r['gain']:+.1f} | {r['mismatch']:.2e} |")
    print(f"\nasync / sync: {asynchronous['steps_per_min'] / sync['steps_per_min']:.2f}x steps per minute; "
          f"gain difference {asynchronous['gain'] - sync['gain']:+.1f} points")


if __name__ == "__main__":
    main()
