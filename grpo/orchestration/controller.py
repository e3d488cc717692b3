"""The single controller: SFT -> RL stage 1 (reasoning) -> reward models -> RL stage 2 (preference) -> eval.

The driver (this module) owns no model. The roles run as Ray actors (:mod:`grpo.orchestration.workers`): one
policy worker (trainer) that lives through every phase, rollout workers that follow its weights, and per-phase
reward and reference workers. Each phase is a module of :mod:`grpo.orchestration.phases` that registers its
runner. Between phases the idle side is offloaded (the hybrid engine): during reward-model training
the policy's parameters and optimizer state leave memory and the rollout engines sleep.

Every phase is resumable: step checkpoints are written atomically on a schedule, completed phases are recorded
in ``progress.json``, and ``resume=true`` continues from the last complete step with the same data order and RNG
state. The embedded default starts a local Ray instance; ``ray.address=auto`` (or ``HOST:PORT``) joins a cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from grpo.orchestration import phases  # noqa: F401 - every phase registers its runner
from grpo.orchestration.checkpointing import Progress
from grpo.orchestration.console import LOG_DIR_ENV, Console, RunOutput
from grpo.orchestration.phases.registry import PHASE_RUNNERS
from grpo.orchestration.plan import plan
from grpo.orchestration.recipe import Recipe, to_dict
from grpo.orchestration.workers import (
    PolicyGroup,
    RolloutWorker,
    load_policy,
    preflight_weight_sync,
    remote,
    save_policy,
)
from grpo.phases import BASE, EVAL, POLICY_PHASES, RL_PHASES, reward_model_name
from grpo.reporting import MetricsLogger
from grpo.reporting.trackers import build_trackers
from model import DeepSeekConfig, DeepSeekForCausalLM, build_tokenizer
from model.files import atomic_write_text
from rewards.combine import RewardSpec
from rollout.loading import load_tokenizer

log = logging.getLogger(__name__)

def init_ray(recipe: Recipe, log_dir: Path | None = None) -> tuple[bool, Path | None]:
    """Starts the embedded local Ray instance, or joins ``ray.address``.

    Args:
        recipe: The run's recipe (its ``ray`` section).
        log_dir: The run's log folder: the workers write their output there (see
            :mod:`grpo.orchestration.console`) and Ray forwards none of it to the driver. ``None``: Ray forwards
            the workers' output as it comes (``--verbose``).

    Returns:
        ``(started, scratch)``: whether we started a local instance, and the temporary folder it uses when the
        run folder's path was too long for Ray's sockets (to remove after ``ray.shutdown()``), else ``None``.
    """
    import ray

    if ray.is_initialized():
        return False, None
    cfg = recipe.ray
    quiet = {"log_to_driver": False, "runtime_env": {"env_vars": {LOG_DIR_ENV: str(log_dir.resolve())}}} \
        if log_dir is not None else {}
    if cfg.address is None:
        os.environ.pop("RAY_ADDRESS", None)  # never attach to a stray cluster by accident
        temp = (recipe.run_dir / "ray").resolve()
        # Ray's unix sockets live at <temp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store (about 64
        # characters below <temp>) and a socket path must stay within 107 bytes.
        scratch = None
        if len(str(temp)) > 40:
            temp = scratch = Path(tempfile.mkdtemp(prefix="grpo-ray-"))
        ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=False,
                 _temp_dir=str(temp), logging_level=logging.WARNING, configure_logging=True, **quiet)
        return True, scratch
    ray.init(address=cfg.address, logging_level=logging.WARNING, **quiet)
    return False, None


class Pipeline:
    """Runs a recipe's phases in order.

    Args:
        recipe: The validated recipe.
        verbose: Show the workers' and libraries' output on the terminal as it comes, instead of sending it to
            the run's ``logs/`` folder (see :mod:`grpo.orchestration.console`).
    """

    def __init__(self, recipe: Recipe, verbose: bool = False) -> None:
        self.recipe = recipe
        self.run_dir = recipe.run_dir
        if self.run_dir.exists() and (self.run_dir / "progress.json").exists() and not recipe.resume:
            raise FileExistsError(f"run folder {self.run_dir} already holds a run; pass resume=true to continue "
                                  f"it, or choose another name=... or output_dir=...")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.progress = Progress(self.run_dir)
        self.logger = MetricsLogger(self.run_dir, tensorboard=False)  # its trackers start with the run
        self.output = RunOutput(self.run_dir, verbose)
        self.threads = recipe.ray.threads_per_worker or os.cpu_count()
        self.policy: Any = None
        self.rollouts: list[Any] = []
        self.rollout_engine: str | None = None
        self.rollout_routing = False  # the rollout workers' engines return routed experts (see rollout_workers)
        self.offloaded = False
        self.phase_started = time.perf_counter()  # when the running phase started (its wall time is reported)

    @property
    def console(self) -> Console:
        """The terminal: ``[grpo]`` lines and the phases' progress displays."""
        return self.output.console

    # -- paths ------------------------------------------------------------------------------------------------
    def ckpt(self, name: str) -> Path:
        return self.run_dir / "checkpoints" / name

    def current_policy(self) -> Path:
        """The newest policy checkpoint: the last completed policy phase, else the base model."""
        for phase in reversed(POLICY_PHASES):
            if self.progress.done(phase) and self.ckpt(phase).exists():
                return self.ckpt(phase)
        return self.ckpt(BASE)

    # -- run ----------------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Runs every phase of the recipe (skipping completed ones on resume); returns the run folder."""
        atomic_write_text(self.run_dir / "recipe.yaml", yaml.safe_dump(to_dict(self.recipe), sort_keys=False))
        with self.output:
            self._run()
        return self.run_dir

    def _run(self) -> None:
        if not self.output.verbose:
            self.console.print(f"run {self.run_dir} (workers' output and library messages: "
                               f"{self.output.folder}/; --verbose shows them here)")
        started, scratch = init_ray(self.recipe, None if self.output.verbose else self.output.folder)
        try:
            r = self.recipe
            self.logger.trackers = build_trackers(r.loggers, self.run_dir, r.name, to_dict(r), r.wandb, r.mlflow)
            self._base_checkpoint()
            self._preflight()
            for phase in self.recipe.phases:
                if self.progress.done(phase) and phase != EVAL:
                    log.warning("phase %s already complete: skipped", phase)
                    continue
                self.console.print(f"phase {phase}")
                self.phase_started = time.perf_counter()
                PHASE_RUNNERS.get(phase)(self)
                self.progress.record_seconds(phase, time.perf_counter() - self.phase_started)
        finally:
            self.logger.close()
            if started:
                import ray

                ray.shutdown()
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            # Offloaded tensors only live while their actors do; resuming uses the step checkpoints.
            shutil.rmtree(self.run_dir / "offload", ignore_errors=True)

    def _base_checkpoint(self) -> None:
        """Builds the starting policy: the recipe's checkpoint folder, or a fresh model from a preset."""
        base = self.ckpt(BASE)
        if (base / "config.json").exists():
            return
        cfg = self.recipe.model
        if cfg.path is not None:
            tokenizer = load_tokenizer(cfg.tokenizer or cfg.path)
            save_policy(load_policy(cfg.path, cfg.dtype), base, tokenizer)
            return
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else build_tokenizer()
        config = DeepSeekConfig.from_preset(
            cfg.preset, **{"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                           **cfg.overrides})
        torch.manual_seed(self.recipe.seed + cfg.seed)
        DeepSeekForCausalLM(config).save_pretrained(base, tokenizer=tokenizer)

    def _preflight(self) -> None:
        """Checks, before any phase starts, what would otherwise fail minutes into a run: every RL stage's engine
        must take the policy's weights (names and shapes), and on a GPU every role must fit its device."""
        for phase in RL_PHASES:
            if phase in self.recipe.phases:
                preflight_weight_sync(str(self.ckpt(BASE)), getattr(self.recipe, phase).engine)
        self.check_memory()

    def check_memory(self) -> None:
        """On a GPU run, compares the memory plan with this machine's device memory (``check_memory``).

        Raises:
            MemoryError: with the plan, when a role does not fit.
        """
        if self._device() != "cuda" or not self.recipe.check_memory:
            return
        if not torch.cuda.is_available():
            log.warning("memory check skipped: this driver sees no GPU to read the device memory from; run "
                        "`grpo plan ... --device-memory SIZE` to check the recipe")
            return
        memory = torch.cuda.get_device_properties(0).total_memory
        result = plan(self.recipe)
        if not result.fits(memory):
            raise MemoryError(f"the recipe does not fit this cluster's devices:\n{result.format(memory)}"
                              f"lower the batch shapes or raise ray.num_train_workers (or set check_memory=false "
                              f"to run anyway)")

    # -- roles ----------------------------------------------------------------------------------------------------
    def policy_worker(self) -> PolicyGroup:
        """The trainer ranks (``ray.num_train_workers``), started on first use and brought back from offload."""
        if self.policy is None:
            cfg, ray_cfg = self.recipe.model, self.recipe.ray
            n, device = ray_cfg.num_train_workers, self._device()
            self.policy = PolicyGroup.start(
                n, str(self.current_policy()), cpus=ray_cfg.train_cpus, gpus=self.gpus(ray_cfg.train_gpus),
                spread=ray_cfg.train_placement == "spread", threads=self.role_threads()[0], dtype=cfg.dtype,
                master_dtype=cfg.master_dtype, device=device, gradient_checkpointing=cfg.gradient_checkpointing)
        elif self.offloaded:
            self.policy.call("onload")
            self.offloaded = False
        return self.policy

    def trainer_ranks(self) -> PolicyGroup:
        """The trainer ranks with the policy offloaded, for work beside it (reward-model training); started
        first if no phase has yet."""
        if self.policy is None:
            self.policy_worker()
        self.offload_idle()
        return self.policy

    def role_threads(self, overlap: bool = False) -> tuple[int, int]:
        """Torch threads of each trainer rank and of each rollout worker (and reference worker).

        With ``ray.threads_per_worker`` set, that number for both. Else every role takes all the node's cores,
        since the roles take turns, except that trainer ranks packed on one node share them. With ``overlap``
        (async rollouts on CPU: the trainer updates while the rollout side samples and scores the next batch),
        the trainer ranks get half the cores and the rollout side the other half: more busy threads than cores
        slow every role down several-fold.
        """
        cfg = self.recipe.ray
        if cfg.threads_per_worker is not None:
            return cfg.threads_per_worker, cfg.threads_per_worker
        trainer_share = self.threads // 2 if overlap else self.threads
        packed = cfg.num_train_workers if cfg.train_placement == "pack" else 1
        rollout_share = self.threads - trainer_share if overlap else self.threads
        return max(1, trainer_share // packed), max(1, rollout_share // (cfg.num_rollout_workers if overlap else 1))

    def use_threads(self, overlap: bool) -> int:
        """Sets the trainer ranks' and rollout workers' threads to :meth:`role_threads`; returns the rollout side's
        (for the stage's reference worker)."""
        import ray

        trainer, rollout = self.role_threads(overlap and self._device() == "cpu")
        self.policy_worker().call("set_threads", trainer)
        ray.get([w.set_threads.remote(rollout) for w in self.rollouts])
        return rollout

    def rollout_workers(self, engine: str, routing: bool = False) -> list[Any]:
        """The rollout workers for a stage, awake: the existing ones when they run ``engine`` (built to return
        routed experts if ``routing``, see :class:`RolloutWorker`), else new ones (an earlier stage's workers
        are stopped)."""
        import ray

        if self.rollouts and (self.rollout_engine, self.rollout_routing) != (engine, routing):
            for worker in self.rollouts:
                ray.kill(worker)
            self.rollouts = []
        if not self.rollouts:
            self.rollout_engine, self.rollout_routing = engine, routing
            cfg = self.recipe.ray
            actor = remote(RolloutWorker, num_cpus=cfg.rollout_cpus, num_gpus=self.gpus(cfg.rollout_gpus),
                           scheduling_strategy="SPREAD")
            self.rollouts = [actor.remote(str(self.current_policy()), engine=engine, threads=self.role_threads()[1],
                                          dtype=self.recipe.model.dtype, device=self._device(), routing=routing)
                             for _ in range(cfg.num_rollout_workers)]
        else:
            ray.get([w.wake_up.remote() for w in self.rollouts])
        return self.rollouts

    def gpus(self, share: float) -> float:
        """GPUs an actor reserves: ``share`` on GPU runs (Ray hides every GPU from an actor that reserves
        none), 0 on CPU."""
        return share if self._device() == "cuda" else 0

    def _device(self) -> str:
        if self.recipe.model.device != "auto":
            return self.recipe.model.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def offload_idle(self) -> None:
        """Hybrid engine: puts the policy (params + optimizer state) and the rollout engines out of memory."""
        import ray

        if self.policy is not None and not self.offloaded and self.recipe.offload != "none":
            moved = sum(self.policy.call_each("offload", self.recipe.offload, str(self.run_dir / "offload")))
            self.offloaded = True
            self.console.print(f"offloaded the idle policy ({moved / 2**20:.1f} MiB)")
        if self.rollouts:
            ray.get([w.sleep.remote() for w in self.rollouts])

    def resolve_rewards(self, specs: list[RewardSpec]) -> list[RewardSpec]:
        """Turns ``rm:NAME`` into the ``reward_model`` reward loading that phase's checkpoint."""
        out = []
        for spec in specs:
            name = reward_model_name(spec.name)
            if name is not None:
                path = self.reward_model_path(name)
                if not (path / "config.json").exists():
                    raise FileNotFoundError(f"reward {spec.name!r} needs the reward model {path}; run the rm phase "
                                            f"first (phases must include 'rm' before this one)")
                spec = dataclasses.replace(spec, name="reward_model", key=spec.key or spec.name,
                                           kwargs={"path": str(path), **spec.kwargs})
            out.append(spec)
        return out

    def reward_model_path(self, name: str) -> Path:
        """The checkpoint the ``rm`` phase trains for reward model ``name``."""
        return self.ckpt(f"rm_{name}")

    def reward_models_ready(self, specs: list[RewardSpec]) -> bool:
        """Whether every ``rm:NAME`` among ``specs`` has its trained checkpoint."""
        names = [reward_model_name(s.name) for s in specs]
        return all((self.reward_model_path(n) / "config.json").exists() for n in names if n is not None)
