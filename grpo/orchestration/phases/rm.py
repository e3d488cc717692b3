"""The ``rm`` phase: Bradley-Terry reward models trained from the SFT policy, each as a Ray task."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from grpo.data.loading import rows_of
from grpo.orchestration.phases.registry import PHASE_RUNNERS
from grpo.phases import RM
from rewards.rm_train import train_reward_model_from_checkpoint

if TYPE_CHECKING:
    from grpo.orchestration.controller import Pipeline


def _train_reward_model(init: str, out: str, train: list, evals: list | None, config: Any, threads: int) -> dict:
    """A Ray task: trains one reward model from the SFT checkpoint (in its own process, freed when done)."""
    torch.set_num_threads(threads)
    result = train_reward_model_from_checkpoint(init, out, train, config, evals)
    return dataclasses.asdict(result)


@PHASE_RUNNERS.register(RM)
def run(p: Pipeline) -> None:
    """Trains each of ``rm.models`` (Bradley-Terry) with the idle policy offloaded; saves ``checkpoints/rm_NAME``."""
    import ray

    p.offload_idle()
    init = p.ckpt("sft") if p.ckpt("sft").exists() else p.current_policy()
    task = ray.remote(num_cpus=0.5)(_train_reward_model)
    results = {}
    for name, spec in p.recipe.rm.models.items():
        out = p.ckpt(f"rm_{name}")
        if (out / "config.json").exists() and p.recipe.resume:
            continue
        train = rows_of(spec.data)
        evals = rows_of(spec.eval_data) if spec.eval_data is not None else None
        config = dataclasses.replace(spec.train, seed=p.recipe.seed + spec.train.seed)
        result = ray.get(task.remote(str(init), str(out), train, evals, config, p.threads))
        results[name] = {"eval_accuracy": result.get("eval_accuracy"), "steps": result.get("steps")}
        p.logger.log("rm", 0, {f"rm/{name}/eval_accuracy": result.get("eval_accuracy") or 0.0,
                               f"rm/{name}/final_loss": (result.get("losses") or [0.0])[-1]})
        print(f"[grpo] reward model {name}: held-out pairwise accuracy {result.get('eval_accuracy')}", flush=True)
    p.progress.complete("rm", results)
