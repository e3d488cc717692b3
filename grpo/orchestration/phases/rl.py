"""The GRPO stages ``rl_reason`` and ``rl_pref``: the step loop on the policy worker, with its prompt order,
checkpoints, resume and optional held-out evaluation every ``eval_every`` steps."""

from __future__ import annotations

import dataclasses
import random
from typing import TYPE_CHECKING

from grpo.data.loading import rows_of
from grpo.orchestration.phases.registry import PHASE_RUNNERS
from grpo.orchestration.recipe import RLPhase
from grpo.orchestration.workers import ReferenceWorker, RewardWorker, remote
from grpo.phases import RL_PREF, RL_REASON

if TYPE_CHECKING:
    from grpo.orchestration.controller import Pipeline


class PromptSampler:
    """Deterministic prompt order: a fresh seeded permutation per epoch; its state is two integers."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch, self.cursor = size, seed, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(self.size))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.cursor == self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self._order[self.cursor])
            self.cursor += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation()


def run_stage(p: Pipeline, phase: str, cfg: RLPhase) -> None:
    """Runs one GRPO stage from its last complete step (or the start); saves ``checkpoints/<phase>``."""
    import ray

    rows = rows_of(cfg.data)
    g = dataclasses.replace(cfg.grpo, seed=p.recipe.seed + cfg.grpo.seed)
    policy = p.policy_worker()
    rollouts = p.rollout_workers(cfg.engine, routing=g.router_replay)
    rollout_threads = p.use_threads(overlap=g.async_rollouts)
    reward = remote(RewardWorker, num_cpus=0.25).remote(p.resolve_rewards(cfg.rewards), cfg.reward_mode,
                                                        threads=1, process=g.advantage == "process")
    reference = None
    if g.beta > 0:
        actor = remote(ReferenceWorker, num_cpus=0.25, num_gpus=p.gpus(p.recipe.ray.reference_gpus))
        reference = actor.remote(str(p.current_policy()), threads=rollout_threads, dtype=p.recipe.model.dtype,
                                 device=p._device())
    policy.call("start_rl", g, rollouts, reward, reference, p.recipe.ray.weight_transport)
    state_dir = str(p.run_dir / "state" / phase)
    sampler = PromptSampler(len(rows), g.seed)
    start, upcoming = 0, None  # async: the next step's prompt indices, already being sampled
    if p.recipe.resume:
        resumed = policy.call("load_rl_state", state_dir)
        if resumed is not None:
            start, extra = resumed
            sampler.load(extra["sampler"])
            upcoming = extra.get("upcoming")
        p.logger.truncate_after(phase, start)
    refill = g.prompts_per_step * g.max_refill_rounds if g.dynamic_sampling else 0
    eval_rows = rows_of(p.recipe.eval.data) if cfg.eval_every else []
    display = p.console.phase(phase, "rl", cfg.steps, start)
    for step in range(start, cfg.steps):
        # the prompts come in the sampler's order either way: async takes the next step's one step early
        taken = upcoming if upcoming is not None else sampler.take(g.prompts_per_step)
        batch = [rows[i] for i in taken]
        pool = [rows[i] for i in sampler.take(refill)] if refill else None
        upcoming = sampler.take(g.prompts_per_step) if g.async_rollouts and step + 1 < cfg.steps else None
        metrics = policy.call("rl_step", batch, pool, [rows[i] for i in upcoming] if upcoming else None)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            metrics.update(policy.call_main("rl_evaluate", eval_rows, p.recipe.eval.max_new_tokens,
                                            p.recipe.eval.answer_mode))
        p.logger.log(phase, step + 1, metrics)
        display.update(step + 1, metrics)
        if (step + 1) % p.recipe.checkpoint_every == 0 or step + 1 == cfg.steps:
            policy.call("save_rl_state", state_dir, step + 1, {"sampler": sampler.state(), "upcoming": upcoming})
    display.close()
    p.use_threads(overlap=False)
    policy.call("save_pretrained", str(p.ckpt(phase)))
    for worker in (reward, reference):
        if worker is not None:
            ray.kill(worker)
    p.progress.complete(phase, {"steps": cfg.steps})


@PHASE_RUNNERS.register(RL_REASON)
def run_reason(p: Pipeline) -> None:
    """Stage 1: reasoning with verifiable rewards."""
    run_stage(p, RL_REASON, p.recipe.rl_reason)


@PHASE_RUNNERS.register(RL_PREF)
def run_pref(p: Pipeline) -> None:
    """Stage 2: preference, ``r = c1 * helpful + c2 * safety + c3 * rule``."""
    run_stage(p, RL_PREF, p.recipe.rl_pref)
