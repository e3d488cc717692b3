"""The ``rm`` phase: Bradley-Terry reward models trained from the SFT policy on the trainer ranks."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from grpo.data.loading import rows_of
from grpo.orchestration.feed import Feed
from grpo.orchestration.phases.registry import PHASE_RUNNERS
from grpo.phases import RM

if TYPE_CHECKING:
    from grpo.orchestration.controller import Pipeline


def _train(p: Pipeline, ranks: Any, name: str, args: tuple) -> dict[str, Any]:
    """Trains one reward model on the ranks, its steps shown as they run; the training result."""
    feed, display = Feed(), p.console.phase(f"rm {name}", "rm")
    try:
        return feed.wait(ranks.submit("train_reward_model", *args, feed.queue),
                         lambda r: display.update(int(r["step"]), r, int(r["total"])))[0]
    finally:
        display.close()
        feed.close()


@PHASE_RUNNERS.register(RM)
def run(p: Pipeline) -> None:
    """Trains each of ``rm.models`` (Bradley-Terry) on the trainer ranks, the idle policy offloaded; saves
    ``checkpoints/rm_NAME``."""
    ranks = p.trainer_ranks()
    init = p.ckpt("sft") if p.ckpt("sft").exists() else p.current_policy()
    results = {}
    for name, spec in p.recipe.rm.models.items():
        out = p.ckpt(f"rm_{name}")
        if (out / "config.json").exists() and p.recipe.resume:
            continue
        train = rows_of(spec.data)
        evals = rows_of(spec.eval_data) if spec.eval_data is not None else None
        config = dataclasses.replace(spec.train, seed=p.recipe.seed + spec.train.seed)
        result = _train(p, ranks, name, (str(init), str(out), train, evals, config))
        results[name] = {"eval_accuracy": result.get("eval_accuracy"), "steps": result.get("steps")}
        p.logger.log("rm", 0, {f"rm/{name}/eval_accuracy": result.get("eval_accuracy") or 0.0,
                               f"rm/{name}/final_loss": (result.get("losses") or [0.0])[-1]})
        accuracy = result.get("eval_accuracy")
        p.console.print(f"reward model {name}: held-out pairwise accuracy "
                        + ("n/a (no eval_data)" if accuracy is None else f"{accuracy:.3f}"))
    p.progress.complete("rm", results)
