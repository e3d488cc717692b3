"""The roles of a run as Ray actors, and the proxies that let the trainer talk to them.

* :class:`PolicyWorker` — a trainer rank: policy (sharded over the ranks when there are several), optimizer,
  SFT and GRPO steps, checkpoints, offload; :class:`PolicyGroup` drives the N ranks as one.
* :class:`RolloutWorker` — a rollout engine (``torch`` or ``vllm``) that follows the trainer's weights.
* :class:`ReferenceWorker` — the frozen reference policy's log-probs for the KL penalty.
* :class:`RewardWorker` — rule rewards and reward models combined into one weighted score.

The classes are plain Python; :func:`remote` turns one into a Ray actor class, so tests can also use them
in-process. The trainer talks to them through :mod:`grpo.orchestration.proxies`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from grpo.config import GRPOConfig
from grpo.logprobs import sequence_logprobs
from grpo.orchestration import feed, transport
from grpo.orchestration.checkpointing import StepCheckpoints, atomic_dir
from grpo.orchestration.console import capture_worker_output
from grpo.orchestration.proxies import RemoteReference, RemoteReward, RolloutGroup
from grpo.trainer import GRPOTrainer, encode_prompt
from model.distributed import SINGLE, DataParallel, is_sharded, shard_model, whole_state
from model.registry import Registry
from rewards.answers import extract_answer
from rewards.combine import RewardSpec, combine
from rewards.registry import get_reward
from rewards.rm_train import train_reward_model_from_checkpoint
from rewards.rules import AccuracyReward
from rollout.base import Rollout, RolloutEngine, SamplingConfig, build_engine
from rollout.loading import load_causal_lm, load_tokenizer, meta_causal_lm
from rollout.offload import Offloader
from rollout.vllm_engine import expected_weights
from rollout.weights import check_names, expected_names, named_weights
from sft.trainer import SFTTrainer

log = logging.getLogger(__name__)


def _start_role(role: str, threads: int | None) -> None:
    """What every role does first in its process: its output to the run's log folder, its thread count."""
    capture_worker_output(role)
    _set_threads(threads)


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def load_policy(path: str | Path, dtype: str = "float32", device: str = "cpu") -> torch.nn.Module:
    """Loads a causal LM folder (see :func:`rollout.loading.load_causal_lm`)."""
    return load_causal_lm(path, dtype, device)


def save_policy(model: torch.nn.Module, path: str | Path, tokenizer: Any,
                state: dict[str, Tensor] | None = None) -> None:
    """Saves a Hugging Face folder atomically (ours does it itself; transformers models through a temp dir).

    Args:
        model: The model.
        path: The folder.
        tokenizer: Saved beside the weights.
        state: The weights to write under the model's ``state_dict()`` names instead of its own (a sharded
            model's, gathered by :func:`model.distributed.whole_state`).
    """
    if hasattr(model, "named_hf_weights"):
        model.save_pretrained(path, tokenizer=tokenizer, state=state)
        return
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)


# ------------------------------------------------------------------------------------------------ engines
ENGINE_BUILDERS: Registry[Callable[..., RolloutEngine]] = Registry("rollout engine builder")


@ENGINE_BUILDERS.register("torch")
def _torch_engine(name: str, checkpoint: str, tokenizer: Any, dtype: str, device: str, routing: bool
                  ) -> RolloutEngine:
    """Our PyTorch engine over the policy's own class, in the run's dtype and on its device (it records the
    routing of our MoE models whenever asked)."""
    return build_engine("torch", load_policy(checkpoint, dtype, device), tokenizer=tokenizer)


@ENGINE_BUILDERS.register("vllm")
def _vllm_engine(name: str, checkpoint: str, tokenizer: Any, dtype: str, device: str, routing: bool
                 ) -> RolloutEngine:
    """vLLM over the checkpoint folder; ``routing``: built to return routed experts (router replay)."""
    return build_engine("vllm", checkpoint, tokenizer=tokenizer,
                        **({"enable_return_routed_experts": True} if routing else {}))


@ENGINE_BUILDERS.register("*")
def _folder_engine(name: str, checkpoint: str, tokenizer: Any, dtype: str, device: str, routing: bool
                   ) -> RolloutEngine:
    """Any other registered engine (a dotted path ``pkg.module:Engine``) loads the folder itself."""
    return build_engine(name, checkpoint, tokenizer=tokenizer)


def _torch_engine_weights(checkpoint: str) -> dict[str, tuple[int, ...]]:
    return expected_names(meta_causal_lm(checkpoint))


def _vllm_engine_weights(checkpoint: str) -> dict[str, tuple[int, ...]]:
    return expected_weights(checkpoint)


ENGINE_WEIGHTS: Registry[Callable[[str], dict[str, tuple[int, ...]]]] = Registry("engine weight list")
"""What an engine built from a checkpoint folder accepts in a weight update, known without building it: the
pipeline checks a recipe's model against its stages' engines before the first phase starts."""
ENGINE_WEIGHTS.add("torch", _torch_engine_weights)
ENGINE_WEIGHTS.add("vllm", _vllm_engine_weights)


def preflight_weight_sync(checkpoint: str, engine: str) -> None:
    """Checks that the trainer's weights of ``checkpoint`` can be synced to ``engine`` (names and shapes), from
    the checkpoint's config alone (meta-device models: no memory, no weights).

    Raises:
        KeyError / ValueError: naming the engine, the model and the first tensor it would not take.
    """
    if engine not in ENGINE_WEIGHTS:
        return  # an engine given by dotted path is checked by the trainer before its first sync
    sent = {n: tuple(t.shape) for n, t in named_weights(meta_causal_lm(checkpoint))}
    check_names(sent, ENGINE_WEIGHTS.get(engine)(checkpoint), f"({engine} engine, {checkpoint})")


# ------------------------------------------------------------------------------------------------ roles
class RolloutWorker:
    """Owns a rollout engine built from a checkpoint folder."""

    def __init__(self, checkpoint: str, engine: str = "torch", threads: int | None = None,
                 dtype: str = "float32", device: str = "cpu", routing: bool = False) -> None:
        _start_role("RolloutWorker", threads)
        tokenizer = load_tokenizer(checkpoint)
        self.engine_name = engine
        self.engine = ENGINE_BUILDERS.get(engine if engine in ENGINE_BUILDERS else "*")(
            engine, checkpoint, tokenizer, dtype, device, routing)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        return self.engine.generate(prompt_token_ids, sampling)

    def update_weights(self, wire: transport.Wire) -> None:
        self.engine.update_weights(transport.from_wire(wire))

    def join_weight_group(self, host: str, port: int, rank: int, world: int, device_type: str) -> None:
        """Joins trainer rank 0's weight broadcast group (the ``collective`` transport)."""
        self._weight_group = transport.join(host, port, rank, world, device_type)
        self._weight_device = "cuda" if device_type == "cuda" else "cpu"

    def receive_weights(self, meta: transport.Meta) -> None:
        """Receives one bucket broadcast by trainer rank 0 and loads it into the engine."""
        self.engine.update_weights(transport.receive(self._weight_group[1], meta, self._weight_device))

    def accepted_weights(self) -> dict[str, tuple[int, ...]] | None:
        return self.engine.accepted_weights()

    def weight_report(self, names: list[str], probe_ids: list[int]) -> Any:
        return self.engine.weight_reports(names, probe_ids)[0]

    def description(self) -> str:
        return self.engine.description

    def logprobs_match_trainer(self) -> bool:
        return self.engine.logprobs_match_trainer

    def can_return_logprobs(self, sampling: SamplingConfig) -> bool:
        return self.engine.can_return_logprobs(sampling)

    def can_record_routing(self) -> bool:
        return self.engine.can_record_routing

    def engine_class(self) -> str:
        return type(self.engine).__name__

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    def set_threads(self, threads: int) -> None:
        _set_threads(threads)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


class ReferenceWorker:
    """The frozen reference policy."""

    def __init__(self, checkpoint: str, threads: int | None = None, dtype: str = "float32",
                 device: str = "cpu") -> None:
        _start_role("ReferenceWorker", threads)
        self.model = load_policy(checkpoint, dtype, device).eval().requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, completion_len: int, *, chunk_size: int,
                 temperature: float, micro_batch_size: int = 32, share_prompts: bool = True) -> Tensor:
        parts = [sequence_logprobs(self.model, input_ids[i:i + micro_batch_size],
                                   attention_mask[i:i + micro_batch_size], completion_len,
                                   chunk_size=chunk_size, temperature=temperature, share_prompts=share_prompts)[0]
                 for i in range(0, len(input_ids), micro_batch_size)]
        return torch.cat(parts)

    def update_weights(self, wire: transport.Wire) -> None:
        named = transport.from_wire(wire)
        loader = getattr(self.model, "load_hf_weights", None)
        if loader is not None:
            loader(named)
        else:
            self.model.load_state_dict(dict(named), strict=False)


class RewardWorker:
    """Scores completions with a weighted combination of rewards (rule functions and reward models), or with
    one process reward (``process=True``: its :class:`rewards.StepRewards` pass through unweighted)."""

    def __init__(self, specs: Sequence[Any], mode: str = "sum", threads: int | None = None,
                 process: bool = False) -> None:
        _start_role("RewardWorker", threads)
        if process:
            if len(specs) != 1:
                raise ValueError(f"process supervision takes one process reward, got {len(specs)}")
            spec = specs[0] if isinstance(specs[0], RewardSpec) else RewardSpec.from_dict(specs[0])
            self.reward = get_reward(spec.name, **spec.kwargs)
        else:
            self.reward = combine(list(specs), mode=mode)

    def score(self, prompts: list, completions: list, columns: dict[str, list]) -> Any:
        return self.reward(prompts, completions, **columns)


class PolicyWorker:
    """A trainer rank: holds the policy and its optimizer through SFT and both RL stages.

    With several ranks (``world_size > 1``) every rank loads the same checkpoint, the ranks join one
    ``torch.distributed`` group (:meth:`rendezvous` on rank 0, then :meth:`join` on all, gloo on CPU and NCCL on
    GPU) and the policy is sharded over them with FSDP2 (:func:`model.distributed.shard_model`). Every method
    is then called on every rank (they meet in collectives), except :meth:`rl_evaluate` (rank 0, which owns the
    rollout engines, the reward and the reference). Between phases the idle policy is offloaded (parameters,
    gradients and optimizer state, each rank its own shards; see :mod:`rollout.offload`) and brought back.
    """

    def __init__(self, checkpoint: str, threads: int | None = None, dtype: str = "float32", device: str = "cpu",
                 gradient_checkpointing: bool = False, rank: int = 0, world_size: int = 1,
                 master_dtype: str | None = None) -> None:
        _start_role(f"PolicyWorker-rank{rank}", threads)
        self.tokenizer = load_tokenizer(checkpoint)
        self.dtype, self.master_dtype = dtype, master_dtype or dtype
        self.policy = load_policy(checkpoint, self.master_dtype, device)  # the trainer's own (master) copy
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        self.device, self.rank, self.world_size = device, rank, world_size
        self.dp: DataParallel = SINGLE
        self.trainer: Any = None
        self.offloader: Offloader | None = None

    # -- ranks --------------------------------------------------------------------------------------------------
    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address for the process group: this node's IP and a free port."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, host: str, port: int) -> None:
        """Joins the trainer ranks' process group at rank 0's ``host:port`` and shards the policy over them."""
        backend = "nccl" if self.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank,
                                world_size=self.world_size)
        self.dp = DataParallel.current()
        # mixed precision: master weights in master_dtype, compute in dtype, gradients reduced in float32
        compute = getattr(torch, self.dtype) if self.dtype != self.master_dtype else None
        shard_model(self.policy, self.dp, param_dtype=compute)

    # -- SFT --------------------------------------------------------------------------------------------------
    def sft(self, rows: list[dict], config: Any, state_dir: str, save_every: int, resume: bool,
            queue: Any | None = None) -> list[dict[str, float]]:
        """Runs the SFT phase, checkpointing every ``save_every`` steps; returns the logged metrics, each also
        put into ``queue`` (a :class:`grpo.orchestration.feed.Feed`'s) with the phase's ``total`` steps as it is
        logged."""
        history: list[dict[str, float]] = []
        checkpoints = StepCheckpoints(state_dir)

        def logged(metrics: Any) -> None:
            history.append(asdict(metrics))
            if self.dp.is_main:
                feed.put(queue, {**history[-1], "total": trainer.total_steps})

        def save(trainer: SFTTrainer) -> None:
            checkpoints.save_trainer(trainer.step, trainer.model, trainer.optimizer,
                                     trainer.state_dict(weights=False), self.dp)

        trainer = SFTTrainer(self.policy, self.tokenizer, rows, config, save_fn=save, save_every=save_every,
                             log_fn=logged, dp=self.dp)
        latest = checkpoints.load_trainer(trainer.model, trainer.optimizer, self.dp) if resume else None
        if latest is not None:
            trainer.load_state_dict(latest[1])
        trainer.train()
        return history

    # -- reward models -----------------------------------------------------------------------------------------
    def train_reward_model(self, init: str, out: str, train: list[dict], evals: list[dict] | None,
                           config: Any, queue: Any | None = None) -> dict[str, Any]:
        """Trains one reward model from ``init`` on these ranks (sharded over them; the idle policy stays
        offloaded) and saves it to ``out``; returns the training result. Each step's ``{"step", "total",
        "loss"}`` goes into ``queue`` when given."""
        def on_step(step: int, total: int, loss: float) -> None:
            if self.dp.is_main:
                feed.put(queue, {"step": step, "total": total, "loss": loss})

        result = train_reward_model_from_checkpoint(init, out, train, config, evals, dp=self.dp, on_step=on_step)
        return dataclasses.asdict(result)

    # -- RL ---------------------------------------------------------------------------------------------------
    def start_rl(self, config: GRPOConfig, rollout_workers: list[Any], reward_worker: Any,
                 reference_worker: Any | None, weight_transport: str = "object_store") -> None:
        """Builds the GRPO trainer over the given workers and pushes the current weights to the engines
        (through ``weight_transport``, see :mod:`grpo.orchestration.transport`)."""
        ref = RemoteReference(reference_worker) if reference_worker is not None else None
        # every stage builds its optimizer and schedule from its own config; the previous stage's Adam moments
        # carry over only when the stage asks for them
        carried = None
        if config.carry_optimizer_state and self.trainer is not None:
            carried = self.trainer.optimizer.state_dict()
        elif config.carry_optimizer_state:
            log.warning("carry_optimizer_state: no earlier RL stage ran in this process (a stage launched alone, "
                        "or the first stage), so this stage starts from fresh Adam moments")
        main = self.dp.is_main  # rank 0 samples, scores and asks the reference; the others only train
        engine = RolloutGroup(rollout_workers, weight_transport) if main else None
        self.trainer = GRPOTrainer(self.policy, engine,
                                   RemoteReward(reward_worker) if main else None, self.tokenizer, config,
                                   ref_model=ref, optimizer_state=carried, dp=self.dp)
        self.trainer.sync_weights()

    def rl_step(self, rows: list[dict], refill_rows: list[dict] | None = None,
                next_rows: list[dict] | None = None) -> dict[str, float]:
        """One GRPO step; ``refill_rows`` are drawn from (in order) when dynamic sampling drops groups;
        ``next_rows`` (``async_rollouts``) start being sampled while this step trains."""
        pool = list(refill_rows or [])

        def refill(k: int) -> list[dict]:
            taken, pool[:] = pool[:k], pool[k:]
            return taken

        return self.trainer.step(rows, refill=refill if pool else None, next_rows=next_rows)

    def rl_evaluate(self, rows: list[dict], max_new_tokens: int, answer_mode: str) -> dict[str, float]:
        """Greedy accuracy of the current policy on held-out ``rows`` (through the rollout engines, which hold
        the policy's weights after every sync): ``{"eval/accuracy": ..., "eval/answer_rate": ...}``."""
        engine = self.trainer.engine
        prompt_ids = [encode_prompt(self.tokenizer, row["prompt"]) for row in rows]
        rollouts = engine.generate(prompt_ids, SamplingConfig(n=1, max_tokens=max_new_tokens, temperature=0.0,
                                                              logprobs=False))
        texts = [r.text for r in rollouts]
        scores = AccuracyReward(answer_mode)([row["prompt"] for row in rows], texts,
                                             answer=[row.get("answer") for row in rows])
        valid = [s for s in scores if s is not None]
        return {"eval/accuracy": sum(valid) / max(1, len(valid)),
                "eval/answer_rate": sum(extract_answer(t, answer_mode) is not None for t in texts) / len(texts)}

    def save_rl_state(self, state_dir: str, step: int, extra: dict[str, Any]) -> str | None:
        state = self.trainer.state_dict(weights=False)
        state["extra"] = extra
        path = StepCheckpoints(state_dir).save_trainer(step, self.policy, self.trainer.optimizer, state, self.dp)
        return None if path is None else str(path)

    def load_rl_state(self, state_dir: str) -> tuple[int, dict[str, Any]] | None:
        latest = StepCheckpoints(state_dir).load_trainer(self.policy, self.trainer.optimizer, self.dp)
        if latest is None:
            return None
        step, state = latest
        self.trainer.load_state_dict(state)
        return step, state.get("extra", {})

    # -- checkpoints and offload ---------------------------------------------------------------------------------
    def save_pretrained(self, path: str) -> None:
        """Saves the policy whole as a Hugging Face folder in the run's dtype: a sharded policy is gathered
        tensor by tensor into rank 0's host memory, and rank 0 writes it."""
        state = None
        if is_sharded(self.policy) or self.master_dtype != self.dtype:
            state = whole_state(self.policy, keep=self.dp.is_main, dtype=getattr(torch, self.dtype))
        if self.dp.is_main:
            save_policy(self.policy, path, self.tokenizer, state)
        self.dp.barrier()

    def offload(self, mode: str, folder: str) -> int:
        """Offloads this rank's policy (its shards) and optimizer state; returns the bytes moved."""
        optimizer = self.trainer.optimizer if self.trainer is not None else None
        where = Path(folder) / f"rank{self.dp.rank}" if self.dp.enabled else folder
        self.offloader = Offloader(self.policy, optimizer, folder=where)
        return self.offloader.offload(mode)

    def onload(self) -> None:
        if self.offloader is not None:
            self.offloader.onload()
            self.offloader = None

    def pid(self) -> int:
        return os.getpid()

    def set_threads(self, threads: int) -> None:
        _set_threads(threads)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


class PolicyGroup:
    """The trainer ranks (:class:`PolicyWorker` actors), driven as one.

    :meth:`call` runs a method on every rank, which is what collectives need, and returns rank 0's result;
    :meth:`call_main` runs one on rank 0 alone.

    Args:
        actors: The ranks' actor handles, rank 0 first.
    """

    def __init__(self, actors: Sequence[Any]) -> None:
        self.actors = list(actors)

    @classmethod
    def start(cls, n: int, checkpoint: str, *, cpus: float, gpus: float = 0, spread: bool = False,
              ready_timeout: float = 120.0, **worker_kwargs: Any) -> PolicyGroup:
        """Starts ``n`` ranks in a placement group (packed on one node when they fit, else over several;
        ``spread``: one rank per node) and joins them in one process group.

        Raises:
            RuntimeError: when the cluster cannot place the ranks within ``ready_timeout`` seconds, naming what
                each rank asks for.
        """
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if n == 1:
            return cls([remote(PolicyWorker, num_cpus=cpus, num_gpus=gpus).remote(checkpoint, **worker_kwargs)])
        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        group = placement_group([bundle] * n, strategy="STRICT_SPREAD" if spread else "PACK")
        try:
            ray.get(group.ready(), timeout=ready_timeout)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(group)
            raise RuntimeError(
                f"cannot place {n} trainer ranks of {bundle} each{' on separate nodes' if spread else ''} within "
                f"{ready_timeout:.0f} s; the cluster has {ray.cluster_resources()} (lower ray.num_train_workers "
                f"or ray.train_cpus, or add nodes)") from None
        actors = [remote(PolicyWorker, num_cpus=cpus, num_gpus=gpus, scheduling_strategy=(
            PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank))).remote(
                checkpoint, rank=rank, world_size=n, **worker_kwargs) for rank in range(n)]
        host, port = ray.get(actors[0].rendezvous.remote())
        ray.get([actor.join.remote(host, port) for actor in actors])
        return cls(actors)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Runs ``method`` on every rank (arguments sent once through the object store); rank 0's result."""
        return self.call_each(method, *args, **kwargs)[0]

    def call_each(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Runs ``method`` on every rank; every rank's result, in rank order."""
        import ray

        return ray.get(self.submit(method, *args, **kwargs))

    def submit(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Starts ``method`` on every rank; the results' object refs, in rank order."""
        import ray

        if len(self.actors) > 1:
            args = tuple(ray.put(a) for a in args)
            kwargs = {k: ray.put(v) for k, v in kwargs.items()}
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def call_main(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Runs ``method`` on rank 0 only."""
        import ray

        return ray.get(getattr(self.actors[0], method).remote(*args, **kwargs))

    def node_ids(self) -> list[str]:
        """The node of every rank, in rank order."""
        return self.call_each("node_id")


def remote(cls: type, **options: Any) -> Any:
    """``ray.remote(**options)(cls)``, imported lazily."""
    import ray

    return ray.remote(**options)(cls)
