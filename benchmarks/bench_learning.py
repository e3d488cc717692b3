"""Does the recipe learn on every seed? Runs a recipe's whole pipeline for several seeds and prints a table.

For each seed it runs ``grpo run RECIPE seed=S`` (the global seed: model initialisation, SFT order, RL sampling
and prompt order, reward-model training; the data sets stay the same), then measures pass@8 of the SFT and
stage-1 checkpoints on the held-out set (8 samples per prompt at stage 1's temperature) and reads the run's
report and metrics:

* SFT accuracy and pass@8; stage-1 accuracy, its gain over SFT and pass@8 (held-out greedy accuracy, points);
* the stage-1 reward curve: the mean training reward of the first and last 20 steps, their difference, and the
  least-squares slope of the reward per 100 steps;
* stage 2: the change of the preference reward over sampled completions, and the alignment tax (accuracy points
  lost from stage 1 to stage 2; negative is a gain);
* wall time of the whole run.

The last lines check the targets the tiny recipe is held to (a stage-1 gain of at least 10 points, a reward rise
of at least 0.1, an alignment tax of at most 3 points) for every seed.

Run: ``python benchmarks/bench_learning.py [--seeds 0 1 2] [--recipe tiny] [--out runs/learning] [key=value ...]``
(about 10 minutes a seed on a 2-core CPU for the tiny recipe).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"gain": 10.0, "reward_rise": 0.1, "tax": 3.0}


def run_seed(recipe: str, seed: int, out: Path, overrides: list[str]) -> float:
    """Runs the pipeline for one seed (a fresh run folder); returns its wall time in seconds."""
    name = f"seed-{seed}"
    if (out / name / "report.json").exists():
        print(f"[bench] {out / name} already holds a finished run: reused", flush=True)
        return json.loads((out / name / "bench.json").read_text())["wall_s"]
    cmd = [sys.executable, "-m", "grpo", "run", recipe, f"seed={seed}", f"name={name}", f"output_dir={out}",
           *overrides]
    print(f"[bench] {' '.join(cmd[3:])}", flush=True)
    start = time.perf_counter()
    log = out / f"{name}.log"
    out.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ})
    if proc.returncode != 0:
        raise SystemExit(f"[bench] seed {seed} failed (exit {proc.returncode}); see {log}")
    wall = time.perf_counter() - start
    (out / name / "bench.json").write_text(json.dumps({"wall_s": wall}))
    return wall


def pass_at_8(run: Path, phase: str, temperature: float, answer_mode: str, data: Any) -> float | None:
    """pass@8 of a phase's checkpoint on the recipe's held-out set."""
    from grpo.data import load_data
    from grpo.evaluation import EvalConfig, evaluate_checkpoint

    folder = run / "checkpoints" / phase
    if not (folder / "config.json").exists():
        return None
    rows = [dict(r) for r in load_data(data)]
    config = EvalConfig(n=8, k=(8,), temperature=temperature, max_new_tokens=72, answer_mode=answer_mode,
                        progress=False, seed=0)
    return evaluate_checkpoint(str(folder), None, rows, config, rewards={}).pass_at_k[8]


def reward_curve(run: Path) -> tuple[float | None, float | None, float | None]:
    """Mean stage-1 training reward of the first and of the last 20 steps, and the least-squares slope of the
    reward per 100 steps."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward/mean"] for r in records if r["phase"] == "rl_reason" and r.get("reward/mean") is not None]
    if len(rewards) < 2:
        return None, None, None
    k = min(20, len(rewards) // 2)
    slope = statistics.linear_regression(range(len(rewards)), rewards).slope
    return statistics.mean(rewards[:k]), statistics.mean(rewards[-k:]), 100 * slope


def measure(run: Path, wall: float, recipe: Any) -> dict[str, Any]:
    report = json.loads((run / "report.json").read_text())
    phases = report["phases"]
    acc = {p: 100 * phases[p]["accuracy"] for p in phases if phases[p].get("accuracy") is not None}
    stage2 = (report["deltas"].get("stage2_reward_change") or {}).get("values") or {}
    first, last, slope = reward_curve(run)
    temperature = recipe.rl_reason.grpo.temperature
    return {
        "sft_acc": acc.get("sft"), "rl_acc": acc.get("rl_reason"), "pref_acc": acc.get("rl_pref"),
        "gain": (report["deltas"].get("stage1_accuracy_gain_points") or {}).get("value"),
        "sft_pass8": pass_at_8(run, "sft", temperature, recipe.eval.answer_mode, recipe.eval.data),
        "rl_pass8": pass_at_8(run, "rl_reason", temperature, recipe.eval.answer_mode, recipe.eval.data),
        "reward_first": first, "reward_last": last,
        "reward_rise": None if first is None else last - first, "reward_slope": slope,
        "pref_change": stage2.get("preference (sampled)"),
        "tax": report.get("alignment_tax"), "wall_min": wall / 60,
    }


def _f(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(results: dict[int, dict[str, Any]]) -> str:
    head = ("| seed | SFT acc | SFT pass@8 | stage-1 acc | stage-1 gain | stage-1 pass@8 | reward first 20 -> last 20 "
            "| reward slope / 100 steps | stage-2 preference change (sampled) | alignment tax | wall time |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    pct = lambda v: None if v is None else 100 * v  # noqa: E731
    for seed, m in results.items():
        lines.append(
            f"| {seed} | {_f(m['sft_acc'], '.1f')}% | {_f(pct(m['sft_pass8']), '.1f')}% "
            f"| {_f(m['rl_acc'], '.1f')}% | {_f(m['gain'], '+.1f')} | {_f(pct(m['rl_pass8']), '.1f')}% "
            f"| {_f(m['reward_first'], '.3f')} -> {_f(m['reward_last'], '.3f')} ({_f(m['reward_rise'], '+.3f')}) "
            f"| {_f(m['reward_slope'], '+.3f')} "
            f"| {_f(m['pref_change'], '+.3f')} | {_f(m['tax'], '+.1f')} | {_f(m['wall_min'], '.1f')} min |")
    return "\n".join(lines)


def verdict(results: dict[int, dict[str, Any]]) -> list[str]:
    checks = [("stage-1 gain >= 10 points", lambda m: m["gain"] is not None and m["gain"] >= TARGETS["gain"]),
              ("reward rise >= 0.1", lambda m: m["reward_rise"] is not None and m["reward_rise"] >= TARGETS[
                  "reward_rise"]),
              ("alignment tax <= 3 points", lambda m: m["tax"] is not None and m["tax"] <= TARGETS["tax"])]
    out = []
    for name, ok in checks:
        failing = [s for s, m in results.items() if not ok(m)]
        out.append(f"- {name}: {'every seed' if not failing else 'fails for seed(s) ' + ', '.join(map(str, failing))}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/learning", help="parent folder of the seed-S run folders")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides applied to every seed")
    args = parser.parse_args()
    from grpo.orchestration.recipe import load_recipe

    out = Path(args.out).resolve()
    results = {}
    for seed in args.seeds:
        recipe = load_recipe(args.recipe, [*args.overrides, f"seed={seed}"])
        wall = run_seed(args.recipe, seed, out, args.overrides)
        results[seed] = measure(out / f"seed-{seed}", wall, recipe)
        print(table({seed: results[seed]}).splitlines()[-1], flush=True)
    (out / "learning.json").write_text(json.dumps(results, indent=2))
    print(f"\nLearning across seeds: {args.recipe} {' '.join(args.overrides)}".rstrip())
    print(table(results))
    print("\n".join(verdict(results)))


if __name__ == "__main__":
    main()
