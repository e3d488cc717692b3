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
import time
from typing import TYPE_CHECKING, Any

from grpo.data.loading import rows_of
from grpo.evaluation import EvalConfig, evaluate_checkpoint, open_engine
from grpo.orchestration.phases.registry import PHASE_RUNNERS
from grpo.phases import EVAL
from grpo.reporting import ON_STAGE2_PROMPTS, PLOTS_DIR, SAMPLED, PhaseEval, write_report
from rewards.combine import combine

if TYPE_CHECKING:
    from grpo.orchestration.controller import Pipeline


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


def _preference(engine: Any, tokenizer: Any, rows: list[dict], reward: Any, config: EvalConfig, name: str
                ) -> dict[str, float | None]:
    """The preference reward (total and components) over greedy and, with ``config.n``, sampled completions."""
    result = evaluate_checkpoint(engine, tokenizer, rows, config, rewards={}, name=f"{name} (preference)")
    scores = _mean_scores(reward, rows, [r.greedy for r in result.prompts], 1)
    if config.n:
        samples = [text for r in result.prompts for text in r.sample_texts]
        scores.update(_mean_scores(reward, rows, samples, config.n, SAMPLED))
    return scores


def _evaluate_phase(p: Pipeline, phase: str, rows: list[dict], config: EvalConfig,
                    preference: tuple[list[dict], Any, EvalConfig] | None) -> PhaseEval:
    """One checkpoint, loaded once: held-out accuracy, then (when configured) the preference reward."""
    engine, tokenizer, _ = open_engine(str(p.ckpt(phase)), None, config)
    result = evaluate_checkpoint(engine, tokenizer, rows, config, rewards={}, name=phase)
    rewards: dict[str, float | None] = {"accuracy": result.greedy_accuracy}
    if preference is not None:
        pref_rows, pref_reward, pref_config = preference
        for key, value in _preference(engine, tokenizer, pref_rows, pref_reward, pref_config, phase).items():
            # a stage-2 component that shares a name with a held-out metric (``accuracy`` as part of the rule
            # reward) is reported beside it, on the stage-2 prompts
            rewards[key + ON_STAGE2_PROMPTS if key in rewards else key] = value
    return PhaseEval(accuracy=result.greedy_accuracy, rewards=rewards, format_rate=result.format_rate,
                     length_mean=result.greedy_length.mean, n=result.num_prompts)


def _preference_setup(p: Pipeline, config: EvalConfig) -> tuple[list[dict], Any, EvalConfig] | None:
    """The stage-2 prompts, reward and settings, or None without ``pref_data`` or before the reward models."""
    cfg = p.recipe.eval
    specs = cfg.pref_rewards if cfg.pref_rewards is not None else p.recipe.rl_pref.rewards
    if cfg.pref_data is None or not p.reward_models_ready(specs):
        return None
    # the weighted sum of raw scores: ``normalize-then-sum`` is a training-time transform whose mean over the
    # evaluated set is 0 by construction, so it cannot compare checkpoints
    reward = combine(p.resolve_rewards(specs), mode="sum")
    pref_config = dataclasses.replace(config, accuracy=False, n=cfg.pref_samples, k=(1,) if cfg.pref_samples else (),
                                      temperature=cfg.pref_temperature, seed=p.recipe.seed)
    return rows_of(cfg.pref_data), reward, pref_config


def evaluate_run(p: Pipeline) -> dict[str, PhaseEval]:
    """Evaluates the run's checkpoints and writes ``report.md``/``report.json`` with the plots; returns them."""
    cfg = p.recipe.eval
    rows = rows_of(cfg.data)
    config = EvalConfig(n=0, max_new_tokens=cfg.max_new_tokens, accuracy=True, answer_mode=cfg.answer_mode,
                        progress=False)
    preference = _preference_setup(p, config)
    evals: dict[str, PhaseEval] = {}
    present = [phase for phase in cfg.checkpoints if (p.ckpt(phase) / "config.json").exists()]
    for phase in present:
        entry = evals[phase] = _evaluate_phase(p, phase, rows, config, preference)
        p.logger.log(EVAL, len(evals), {f"eval/{phase}/{k}": v for k, v in entry.rewards.items() if v is not None})
        others = [f"{k} {v:.3f}" for k, v in entry.rewards.items() if v is not None and k != "accuracy"]
        p.console.print(f"eval {phase}: accuracy {entry.accuracy:.3f}" + (f"; {', '.join(others)}" if others else ""))
    wall = {**p.progress.seconds(), EVAL: time.perf_counter() - p.phase_started}  # eval: until now
    md, js = write_report(p.run_dir, evals, recipe=p.recipe, wall_seconds=wall)
    p.logger.artifact([md, js, *sorted((p.run_dir / PLOTS_DIR).glob("*.png"))])
    p.progress.complete(EVAL, {phase: e.to_json() for phase, e in evals.items()})
    p.console.print(f"report: {md}")
    return evals


@PHASE_RUNNERS.register(EVAL)
def run(p: Pipeline) -> None:
    """Evaluates every policy checkpoint with the idle sides offloaded, then writes the run report."""
    p.offload_idle()
    evaluate_run(p)
