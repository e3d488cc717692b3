"""The single controller: SFT -> RL stage 1 (reasoning) -> reward models -> RL stage 2 (preference) -> eval.

The driver (this module) owns no model. The roles run as Ray actors (:mod:`grpo.workers`): one policy worker
(trainer) that lives through every phase, rollout workers that follow its weights, and per-phase reward and
reference workers. Between phases the idle side is offloaded (the hybrid engine): during reward-model training
the policy's parameters and optimizer state leave memory and the rollout engines sleep.

Every phase is resumable: step checkpoints are written atomically on a schedule, completed phases are recorded
in ``progress.json``, and ``resume=true`` continues from the last complete step with the same data order and RNG
state. The embedded default starts a local Ray instance; ``ray.address=auto`` (or ``HOST:PORT``) joins a cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from grpo.checkpointing import Progress, atomic_write_text
from grpo.data import load_data
from grpo.recipe import Recipe, RLPhase, to_dict
from grpo.registry import Registry
from grpo.workers import PolicyWorker, ReferenceWorker, RewardWorker, RolloutWorker, remote
from rewards.combine import RewardSpec

log = logging.getLogger(__name__)
PHASE_RUNNERS: Registry[Callable[[Pipeline], None]] = Registry("pipeline phase")
RM_PREFIX = "rm:"


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


def _rows(spec: Any) -> list[dict[str, Any]]:
    return [dict(r) for r in load_data(spec)]


def init_ray(recipe: Recipe) -> tuple[bool, Path | None]:
    """Starts the embedded local Ray instance, or joins ``ray.address``.

    Returns:
        ``(started, scratch)``: whether we started a local instance, and the temporary folder it uses when the
        run folder's path was too long for Ray's sockets (to remove after ``ray.shutdown()``), else ``None``.
    """
    import ray

    if ray.is_initialized():
        return False, None
    cfg = recipe.ray
    if cfg.address is None:
        os.environ.pop("RAY_ADDRESS", None)  # never attach to a stray cluster by accident
        temp = (recipe.run_dir / "ray").resolve()
        # Ray's unix sockets live at <temp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store (about 64
        # characters below <temp>) and a socket path must stay within 107 bytes.
        scratch = None
        if len(str(temp)) > 40:
            temp = scratch = Path(tempfile.mkdtemp(prefix="grpo-ray-"))
        ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=False,
                 _temp_dir=str(temp), logging_level=logging.WARNING, configure_logging=True)
        return True, scratch
    ray.init(address=cfg.address, logging_level=logging.WARNING)
    return False, None


class Pipeline:
    """Runs a recipe's phases in order.

    Args:
        recipe: The validated recipe.
    """

    def __init__(self, recipe: Recipe) -> None:
        from grpo.report import MetricsLogger

        self.recipe = recipe
        self.run_dir = recipe.run_dir
        if self.run_dir.exists() and (self.run_dir / "progress.json").exists() and not recipe.resume:
            raise FileExistsError(f"run folder {self.run_dir} already holds a run; pass resume=true to continue "
                                  f"it, or choose another name=... or output_dir=...")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.progress = Progress(self.run_dir)
        self.logger = MetricsLogger(self.run_dir)
        self.threads = recipe.ray.threads_per_worker or os.cpu_count()
        self.policy: Any = None
        self.rollouts: list[Any] = []
        self.rollout_engine: str | None = None
        self.offloaded = False

    # -- paths ------------------------------------------------------------------------------------------------
    def ckpt(self, name: str) -> Path:
        return self.run_dir / "checkpoints" / name

    def current_policy(self) -> Path:
        """The newest policy checkpoint: the last completed policy phase, else the base model."""
        for phase in ("rl_pref", "rl_reason", "sft"):
            if self.progress.done(phase) and self.ckpt(phase).exists():
                return self.ckpt(phase)
        return self.ckpt("base")

    # -- run ----------------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Runs every phase of the recipe (skipping completed ones on resume); returns the run folder."""
        atomic_write_text(self.run_dir / "recipe.yaml", yaml.safe_dump(to_dict(self.recipe), sort_keys=False))
        started, scratch = init_ray(self.recipe)
        try:
            self._base_checkpoint()
            self._preflight()
            for phase in self.recipe.phases:
                if self.progress.done(phase) and phase != "eval":
                    log.warning("phase %s already complete: skipped", phase)
                    continue
                print(f"[grpo] phase {phase}", flush=True)
                PHASE_RUNNERS.get(phase)(self)
        finally:
            self.logger.close()
            if started:
                import ray

                ray.shutdown()
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            # Offloaded tensors only live while their actors do; resuming uses the step checkpoints.
            shutil.rmtree(self.run_dir / "offload", ignore_errors=True)
        return self.run_dir

    def _base_checkpoint(self) -> None:
        """Builds the starting policy: the recipe's checkpoint folder, or a fresh model from a preset."""
        base = self.ckpt("base")
        if (base / "config.json").exists():
            return
        cfg = self.recipe.model
        if cfg.path is not None:
            from grpo.workers import load_policy, save_policy
            from rollout.loading import load_tokenizer

            tokenizer = load_tokenizer(cfg.tokenizer or cfg.path)
            save_policy(load_policy(cfg.path, cfg.dtype), base, tokenizer)
            return
        import torch

        from model import DeepSeekConfig, DeepSeekForCausalLM, build_tokenizer

        if cfg.tokenizer is not None:
            from rollout.loading import load_tokenizer

            tokenizer = load_tokenizer(cfg.tokenizer)
        else:
            tokenizer = build_tokenizer()
        config = DeepSeekConfig.from_preset(
            cfg.preset, **{"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                           **cfg.overrides})
        torch.manual_seed(self.recipe.seed + cfg.seed)
        DeepSeekForCausalLM(config).save_pretrained(base, tokenizer=tokenizer)

    def _preflight(self) -> None:
        """Checks, before any phase starts, what would otherwise fail minutes into a run: every RL stage's engine
        must take the policy's weights (names and shapes)."""
        from grpo.workers import preflight_weight_sync

        for phase in ("rl_reason", "rl_pref"):
            if phase in self.recipe.phases:
                preflight_weight_sync(str(self.ckpt("base")), getattr(self.recipe, phase).engine)

    # -- roles ----------------------------------------------------------------------------------------------------
    def policy_worker(self) -> Any:
        import ray

        if self.policy is None:
            cfg = self.recipe.model
            actor = remote(PolicyWorker, num_cpus=0.5)
            self.policy = actor.remote(str(self.current_policy()), threads=self.threads, dtype=cfg.dtype,
                                       device=self._device(), gradient_checkpointing=cfg.gradient_checkpointing)
        elif self.offloaded:
            ray.get(self.policy.onload.remote())
            self.offloaded = False
        return self.policy

    def rollout_workers(self, engine: str) -> list[Any]:
        """The rollout workers for a stage, awake: the existing ones when they run ``engine``, else new ones (an
        earlier stage's workers with another engine are stopped)."""
        import ray

        if self.rollouts and self.rollout_engine != engine:
            for worker in self.rollouts:
                ray.kill(worker)
            self.rollouts = []
        if not self.rollouts:
            self.rollout_engine = engine
            cfg = self.recipe.ray
            actor = remote(RolloutWorker, num_cpus=cfg.rollout_cpus, scheduling_strategy="SPREAD")
            self.rollouts = [actor.remote(str(self.current_policy()), engine=engine, threads=self.threads,
                                          dtype=self.recipe.model.dtype, device=self._device())
                             for _ in range(cfg.num_rollout_workers)]
        else:
            ray.get([w.wake_up.remote() for w in self.rollouts])
        return self.rollouts

    def _device(self) -> str:
        if self.recipe.model.device != "auto":
            return self.recipe.model.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def offload_idle(self) -> None:
        """Hybrid engine: puts the policy (params + optimizer state) and the rollout engines out of memory."""
        import ray

        if self.policy is not None and not self.offloaded and self.recipe.offload != "none":
            moved = ray.get(self.policy.offload.remote(self.recipe.offload, str(self.run_dir / "offload")))
            self.offloaded = True
            print(f"[grpo] offloaded the idle policy ({moved / 2**20:.1f} MiB)", flush=True)
        if self.rollouts:
            ray.get([w.sleep.remote() for w in self.rollouts])

    def resolve_rewards(self, specs: list[RewardSpec]) -> list[RewardSpec]:
        """Turns ``rm:NAME`` into the ``reward_model`` reward loading that phase's checkpoint."""
        out = []
        for spec in specs:
            if spec.name.startswith(RM_PREFIX):
                name = spec.name[len(RM_PREFIX):]
                path = self.ckpt(f"rm_{name}")
                if not (path / "config.json").exists():
                    raise FileNotFoundError(f"reward {spec.name!r} needs the reward model {path}; run the rm phase "
                                            f"first (phases must include 'rm' before this one)")
                spec = dataclasses.replace(spec, name="reward_model", key=spec.key or spec.name,
                                           kwargs={"path": str(path), **spec.kwargs})
            out.append(spec)
        return out


# ------------------------------------------------------------------------------------------------ phases
@PHASE_RUNNERS.register("sft")
def run_sft(p: Pipeline) -> None:
    import ray

    cfg = p.recipe.sft
    rows = [row for spec in cfg.data for row in _rows(spec)]
    policy = p.policy_worker()
    state_dir = p.run_dir / "state" / "sft"
    if p.recipe.resume:
        latest = (state_dir / "latest")
        p.logger.truncate_after("sft", int(latest.read_text().split("_")[1]) if latest.exists() else 0)
    train = dataclasses.replace(cfg.train, seed=p.recipe.seed + cfg.train.seed)
    history = ray.get(policy.sft.remote(rows, train, str(state_dir), p.recipe.checkpoint_every,
                                        p.recipe.resume))
    for m in history:
        p.logger.log("sft", int(m.pop("step")), m)
    ray.get(policy.save_pretrained.remote(str(p.ckpt("sft"))))
    p.progress.complete("sft", {"steps": len(history)})


def _run_rl(p: Pipeline, phase: str, cfg: RLPhase) -> None:
    import ray

    rows = _rows(cfg.data)
    g = dataclasses.replace(cfg.grpo, seed=p.recipe.seed + cfg.grpo.seed)
    policy = p.policy_worker()
    rollouts = p.rollout_workers(cfg.engine)
    reward = remote(RewardWorker, num_cpus=0.25).remote(p.resolve_rewards(cfg.rewards), cfg.reward_mode,
                                                        threads=1, process=g.advantage == "process")
    reference = None
    if g.beta > 0:
        reference = remote(ReferenceWorker, num_cpus=0.25).remote(str(p.current_policy()), threads=p.threads,
                                                                  dtype=p.recipe.model.dtype, device=p._device())
    ray.get(policy.start_rl.remote(g, rollouts, reward, reference))
    state_dir = str(p.run_dir / "state" / phase)
    sampler = PromptSampler(len(rows), g.seed)
    start = 0
    if p.recipe.resume:
        resumed = ray.get(policy.load_rl_state.remote(state_dir))
        if resumed is not None:
            start, extra = resumed
            sampler.load(extra["sampler"])
        p.logger.truncate_after(phase, start)
    refill = g.prompts_per_step * g.max_refill_rounds if g.dynamic_sampling else 0
    eval_rows = _rows(p.recipe.eval.data) if cfg.eval_every else []
    bar = tqdm(range(start, cfg.steps), desc=phase, initial=start, total=cfg.steps, dynamic_ncols=True)
    for step in bar:
        batch = [rows[i] for i in sampler.take(g.prompts_per_step)]
        pool = [rows[i] for i in sampler.take(refill)] if refill else None
        metrics = ray.get(policy.rl_step.remote(batch, pool))
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            metrics.update(ray.get(policy.rl_evaluate.remote(eval_rows, p.recipe.eval.max_new_tokens,
                                                             p.recipe.eval.answer_mode)))
        p.logger.log(phase, step + 1, metrics)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics.get('kl', 0.0):.4f}")
        if (step + 1) % p.recipe.checkpoint_every == 0 or step + 1 == cfg.steps:
            ray.get(policy.save_rl_state.remote(state_dir, step + 1, {"sampler": sampler.state()}))
    ray.get(policy.save_pretrained.remote(str(p.ckpt(phase))))
    for worker in (reward, reference):
        if worker is not None:
            ray.kill(worker)
    p.progress.complete(phase, {"steps": cfg.steps})


@PHASE_RUNNERS.register("rl_reason")
def run_rl_reason(p: Pipeline) -> None:
    _run_rl(p, "rl_reason", p.recipe.rl_reason)


@PHASE_RUNNERS.register("rl_pref")
def run_rl_pref(p: Pipeline) -> None:
    _run_rl(p, "rl_pref", p.recipe.rl_pref)


def _train_reward_model(init: str, out: str, train: list, evals: list | None, config: Any, threads: int) -> dict:
    import torch

    from rewards.rm_train import train_reward_model_from_checkpoint

    torch.set_num_threads(threads)
    result = train_reward_model_from_checkpoint(init, out, train, config, evals)
    return dataclasses.asdict(result)


@PHASE_RUNNERS.register("rm")
def run_rm(p: Pipeline) -> None:
    import ray

    p.offload_idle()
    init = p.ckpt("sft") if p.ckpt("sft").exists() else p.current_policy()
    task = ray.remote(num_cpus=0.5)(_train_reward_model)
    results = {}
    for name, spec in p.recipe.rm.models.items():
        out = p.ckpt(f"rm_{name}")
        if (out / "config.json").exists() and p.recipe.resume:
            continue
        train = _rows(spec.data)
        evals = _rows(spec.eval_data) if spec.eval_data is not None else None
        config = dataclasses.replace(spec.train, seed=p.recipe.seed + spec.train.seed)
        result = ray.get(task.remote(str(init), str(out), train, evals, config, p.threads))
        results[name] = {"eval_accuracy": result.get("eval_accuracy"), "steps": result.get("steps")}
        p.logger.log("rm", 0, {f"rm/{name}/eval_accuracy": result.get("eval_accuracy") or 0.0,
                               f"rm/{name}/final_loss": (result.get("losses") or [0.0])[-1]})
        print(f"[grpo] reward model {name}: held-out pairwise accuracy {result.get('eval_accuracy')}", flush=True)
    p.progress.complete("rm", results)


@PHASE_RUNNERS.register("eval")
def run_eval(p: Pipeline) -> None:
    from grpo.phase_eval import evaluate_run

    p.offload_idle()
    evaluate_run(p)
