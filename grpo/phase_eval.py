"""The pipeline's ``eval`` phase: every policy checkpoint of the run on the held-out sets, then the report.

For each checkpoint (``base``, ``sft``, ``rl_reason``, ``rl_pref`` when present) it measures greedy accuracy and
format rate on the held-out reasoning problems, and the mean preference reward (the stage-2 combination
``c1*helpful + c2*safety + c3*rule``, with each component) on held-out stage-2 prompts, over the greedy
completions and over ``pref_samples`` sampled completions per prompt (reported with the suffix ``(sampled)``).
``report.md`` / ``report.json`` tabulate them with the deltas that matter (stage-1 gain, stage-2 preference gain,
the alignment tax), next to the training curves.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from grpo.evaluate import EvalConfig, evaluate_checkpoint
from grpo.report import ON_STAGE2_PROMPTS, SAMPLED
from rewards.combine import combine

if TYPE_CHECKING:
    from grpo.pipeline import Pipeline


def _mean(values: list[Any]) -> float | None:
    valid = [float(v) for v in values if v is not None]
    return sum(valid) / len(valid) if valid else None


def _mean_scores(reward: Any, rows: list[dict], completions: list[str], repeat: int, suffix: str = ""
                 ) -> dict[str, float | None]:
    """Mean total and components of ``reward`` over completions (``repeat`` consecutive ones per row)."""
    rows = [row for row in rows for _ in range(repeat)]
    columns = {k: [row.get(k) for row in rows] for k in rows[0] if k != "prompt"}
    out = reward([row["prompt"] for row in rows], completions, **columns)
    scores = {f"preference{suffix}": _mean(out.total)}
    scores.update({f"{k}{suffix}": _mean(v) for k, v in out.breakdown.items()})
    return scores


def _preference(path: str, rows: list[dict], reward: Any, config: EvalConfig, name: str
                ) -> dict[str, float | None]:
    result = evaluate_checkpoint(path, None, rows, config, rewards={}, name=f"{name} (preference)")
    scores = _mean_scores(reward, rows, [r.greedy for r in result.prompts], 1)
    if config.n:
        samples = [text for r in result.prompts for text in r.sample_texts]
        scores.update(_mean_scores(reward, rows, samples, config.n, SAMPLED))
    return scores


def evaluate_run(p: Pipeline) -> dict[str, dict[str, Any]]:
    """Evaluates the run's checkpoints, writes ``report.md``/``report.json`` and the plots; returns the table."""
    from grpo.pipeline import _rows
    from grpo.report import plot_metrics, write_report

    cfg = p.recipe.eval
    rows = _rows(cfg.data)
    pref_rows = _rows(cfg.pref_data) if cfg.pref_data is not None else None
    specs = cfg.pref_rewards if cfg.pref_rewards is not None else p.recipe.rl_pref.rewards
    pref_reward = None
    if pref_rows is not None and all(not s.name.startswith("rm:") or p.ckpt(f"rm_{s.name[3:]}").exists()
                                     for s in specs):
        # the weighted sum of raw scores: ``normalize-then-sum`` is a training-time transform whose mean over the
        # evaluated set is 0 by construction, so it cannot compare checkpoints
        pref_reward = combine(p.resolve_rewards(specs), mode="sum")
    config = EvalConfig(n=0, max_tokens=cfg.max_new_tokens, accuracy=True, answer_mode=cfg.answer_mode,
                        progress=True)
    pref_config = dataclasses.replace(config, accuracy=False, n=cfg.pref_samples, k=(1,) if cfg.pref_samples else (),
                                      temperature=cfg.pref_temperature, seed=p.recipe.seed)
    evals: dict[str, dict[str, Any]] = {}
    for phase in cfg.checkpoints:
        path = p.ckpt(phase)
        if not (path / "config.json").exists():
            continue
        result = evaluate_checkpoint(str(path), None, rows, config, rewards={}, name=phase)
        entry: dict[str, Any] = {
            "accuracy": result.greedy_accuracy,
            "format_rate": result.format_rate,
            "length_mean": result.greedy_length.mean,
            "n": result.num_prompts,
            "rewards": {"accuracy": result.greedy_accuracy},  # the stage-2 rewards below, on their own prompts
        }
        if pref_reward is not None:
            for key, value in _preference(str(path), pref_rows, pref_reward, pref_config, phase).items():
                # a stage-2 component that shares a name with a held-out metric (``accuracy`` as part of the
                # rule reward) is reported beside it, on the stage-2 prompts
                entry["rewards"][key + ON_STAGE2_PROMPTS if key in entry["rewards"] else key] = value
        evals[phase] = entry
        p.logger.log("eval", len(evals), {f"eval/{phase}/{k}": v for k, v in entry["rewards"].items()
                                           if v is not None})
        print(f"[grpo] eval {phase}: accuracy {entry['accuracy']:.3f}, rewards "
              + ", ".join(f"{k} {v:.3f}" for k, v in entry["rewards"].items() if v is not None), flush=True)
    plot_metrics(p.run_dir)
    md, _ = write_report(p.run_dir, evals, recipe=p.recipe)
    p.progress.complete("eval", evals)
    print(f"[grpo] report: {md}", flush=True)
    return evals
