"""The roles of a run as Ray actors, and the proxies that let the trainer talk to them.

* :class:`PolicyWorker` — the trainer: policy, optimizer, SFT and GRPO steps, checkpoints, offload.
* :class:`RolloutWorker` — a rollout engine (``torch`` or ``vllm``) that follows the trainer's weights.
* :class:`ReferenceWorker` — the frozen reference policy's log-probs for the KL penalty.
* :class:`RewardWorker` — rule rewards and reward models combined into one weighted score.

The classes are plain Python; :func:`remote` turns one into a Ray actor class, so tests can also use them
in-process. The proxies (:class:`RolloutGroup`, :class:`RemoteReward`, :class:`RemoteReference`) implement
the interfaces the trainer expects on top of actor handles.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from grpo.config import GRPOConfig
from grpo.logprobs import sequence_logprobs
from grpo.orchestration.checkpointing import StepCheckpoints, atomic_dir
from grpo.trainer import GRPOTrainer, encode_prompt
from model.registry import Registry
from rewards.answers import extract_answer
from rewards.combine import RewardSpec, combine
from rewards.registry import get_reward
from rewards.rules import AccuracyReward
from rollout.base import Rollout, RolloutEngine, SamplingConfig, build_engine
from rollout.loading import load_causal_lm, load_tokenizer, meta_causal_lm
from rollout.offload import Offloader
from rollout.vllm_engine import expected_weights
from rollout.weights import check_names, expected_names, named_weights
from sft.trainer import SFTTrainer

log = logging.getLogger(__name__)


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def load_policy(path: str | Path, dtype: str = "float32", device: str = "cpu") -> torch.nn.Module:
    """Loads a causal LM folder (see :func:`rollout.loading.load_causal_lm`)."""
    return load_causal_lm(path, dtype, device)


def save_policy(model: torch.nn.Module, path: str | Path, tokenizer: Any) -> None:
    """Saves a Hugging Face folder atomically (ours does it itself; transformers models through a temp dir)."""
    if hasattr(model, "named_hf_weights"):
        model.save_pretrained(path, tokenizer=tokenizer)
        return
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


# ------------------------------------------------------------------------------------------------ proxies
class RolloutGroup(RolloutEngine):
    """One engine made of several rollout workers: prompts are split into contiguous shares, one per worker."""

    def __init__(self, workers: Sequence[Any]) -> None:
        import ray

        self._ray = ray
        self.workers = list(workers)

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Rollout]:
        share = -(-len(prompt_token_ids) // len(self.workers))
        futures, offsets = [], []
        for i, worker in enumerate(self.workers):
            part = list(prompt_token_ids[i * share:(i + 1) * share])
            if part:
                futures.append(worker.generate.remote(part, sampling))
                offsets.append(i * share)
        out: list[Rollout] = []
        for offset, rollouts in zip(offsets, self._ray.get(futures)):
            for r in rollouts:
                r.prompt_index += offset
            out.extend(rollouts)
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        bucket = self._ray.put([(n, t.detach().cpu()) for n, t in named_tensors])
        self._ray.get([w.update_weights.remote(bucket) for w in self.workers])

    def accepted_weights(self) -> dict[str, tuple[int, ...]] | None:
        return self._ray.get(self.workers[0].accepted_weights.remote())  # every worker loads the same folder

    def weight_reports(self, names: Sequence[str], probe_ids: Sequence[int]) -> list[Any]:
        reports = self._ray.get([w.weight_report.remote(list(names), list(probe_ids)) for w in self.workers])
        return [dataclasses.replace(r, where=f"rollout worker {i}: {r.where}") for i, r in enumerate(reports)]

    @property
    def description(self) -> str:
        return self._ray.get(self.workers[0].description.remote())

    def sleep(self) -> None:
        self._ray.get([w.sleep.remote() for w in self.workers])

    def wake_up(self) -> None:
        self._ray.get([w.wake_up.remote() for w in self.workers])


class RemoteReward:
    """A reward callable (``f(prompts, completions, **columns)``) that scores on a :class:`RewardWorker`."""

    def __init__(self, worker: Any) -> None:
        import ray

        self._ray, self.worker = ray, worker

    def __call__(self, prompts: list, completions: list, **columns: Any) -> Any:
        return self._ray.get(self.worker.score.remote(prompts, completions, columns))


class RemoteReference:
    """The trainer's view of a :class:`ReferenceWorker`."""

    def __init__(self, worker: Any) -> None:
        import ray

        self._ray, self.worker = ray, worker

    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, completion_len: int, **kw: Any) -> Tensor:
        return self._ray.get(self.worker.logprobs.remote(input_ids, attention_mask, completion_len, **kw))

    def update_weights(self, named: list[tuple[str, Tensor]]) -> None:
        self._ray.get(self.worker.update_weights.remote([(n, t.detach().cpu()) for n, t in named]))


# ------------------------------------------------------------------------------------------------ engines
ENGINE_BUILDERS: Registry[Callable[..., RolloutEngine]] = Registry("rollout engine builder")


@ENGINE_BUILDERS.register("torch")
def _torch_engine(name: str, checkpoint: str, tokenizer: Any, dtype: str, device: str) -> RolloutEngine:
    """Our PyTorch engine over the policy's own class, in the run's dtype and on its device."""
    return build_engine("torch", load_policy(checkpoint, dtype, device), tokenizer=tokenizer)


@ENGINE_BUILDERS.register("*")
def _folder_engine(name: str, checkpoint: str, tokenizer: Any, dtype: str, device: str) -> RolloutEngine:
    """Any other registered engine (vLLM, or a dotted path ``pkg.module:Engine``) loads the folder itself."""
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
                 dtype: str = "float32", device: str = "cpu") -> None:
        _set_threads(threads)
        tokenizer = load_tokenizer(checkpoint)
        self.engine_name = engine
        self.engine = ENGINE_BUILDERS.get(engine if engine in ENGINE_BUILDERS else "*")(
            engine, checkpoint, tokenizer, dtype, device)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        return self.engine.generate(prompt_token_ids, sampling)

    def update_weights(self, named: list[tuple[str, Tensor]]) -> None:
        self.engine.update_weights(named)

    def accepted_weights(self) -> dict[str, tuple[int, ...]] | None:
        return self.engine.accepted_weights()

    def weight_report(self, names: list[str], probe_ids: list[int]) -> Any:
        return self.engine.weight_reports(names, probe_ids)[0]

    def description(self) -> str:
        return self.engine.description

    def engine_class(self) -> str:
        return type(self.engine).__name__

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


class ReferenceWorker:
    """The frozen reference policy."""

    def __init__(self, checkpoint: str, threads: int | None = None, dtype: str = "float32",
                 device: str = "cpu") -> None:
        _set_threads(threads)
        self.model = load_policy(checkpoint, dtype, device).eval().requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, completion_len: int, *, chunk_size: int,
                 temperature: float, micro_batch_size: int = 32, share_prompts: bool = True) -> Tensor:
        parts = [sequence_logprobs(self.model, input_ids[i:i + micro_batch_size],
                                   attention_mask[i:i + micro_batch_size], completion_len,
                                   chunk_size=chunk_size, temperature=temperature, share_prompts=share_prompts)[0]
                 for i in range(0, len(input_ids), micro_batch_size)]
        return torch.cat(parts)

    def update_weights(self, named: list[tuple[str, Tensor]]) -> None:
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
        _set_threads(threads)
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
    """The trainer role: holds the policy and its optimizer through SFT and both RL stages.

    Between phases the idle policy is offloaded (parameters, gradients and optimizer state; see
    :mod:`rollout.offload`) and brought back before use.
    """

    def __init__(self, checkpoint: str, threads: int | None = None, dtype: str = "float32", device: str = "cpu",
                 gradient_checkpointing: bool = False) -> None:
        _set_threads(threads)
        self.tokenizer = load_tokenizer(checkpoint)
        self.policy = load_policy(checkpoint, dtype, device)
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        self.trainer: Any = None
        self.offloader: Offloader | None = None

    # -- SFT --------------------------------------------------------------------------------------------------
    def sft(self, rows: list[dict], config: Any, state_dir: str, save_every: int, resume: bool
            ) -> list[dict[str, float]]:
        """Runs the SFT phase, checkpointing every ``save_every`` steps; returns the logged metrics."""
        history: list[dict[str, float]] = []
        checkpoints = StepCheckpoints(state_dir)

        def save(trainer: SFTTrainer) -> None:
            checkpoints.save(trainer.step, trainer.state_dict())

        trainer = SFTTrainer(self.policy, self.tokenizer, rows, config, save_fn=save, save_every=save_every,
                             log_fn=lambda m: history.append(asdict(m)))
        latest = checkpoints.load_latest() if resume else None
        if latest is not None:
            trainer.load_state_dict(latest[1])
        trainer.train()
        return history

    # -- RL ---------------------------------------------------------------------------------------------------
    def start_rl(self, config: GRPOConfig, rollout_workers: list[Any], reward_worker: Any,
                 reference_worker: Any | None) -> None:
        """Builds the GRPO trainer over the given workers and pushes the current weights to the engines."""
        ref = RemoteReference(reference_worker) if reference_worker is not None else None
        # every stage builds its optimizer and schedule from its own config; the previous stage's Adam moments
        # carry over only when the stage asks for them
        carried = None
        if config.carry_optimizer_state and self.trainer is not None:
            carried = self.trainer.optimizer.state_dict()
        elif config.carry_optimizer_state:
            log.warning("carry_optimizer_state: no earlier RL stage ran in this process (a stage launched alone, "
                        "or the first stage), so this stage starts from fresh Adam moments")
        self.trainer = GRPOTrainer(self.policy, RolloutGroup(rollout_workers), RemoteReward(reward_worker),
                                   self.tokenizer, config, ref_model=ref, optimizer_state=carried)
        self.trainer.sync_weights()

    def rl_step(self, rows: list[dict], refill_rows: list[dict] | None = None) -> dict[str, float]:
        """One GRPO step; ``refill_rows`` are drawn from (in order) when dynamic sampling drops groups."""
        pool = list(refill_rows or [])

        def refill(k: int) -> list[dict]:
            taken, pool[:] = pool[:k], pool[k:]
            return taken

        return self.trainer.step(rows, refill=refill if pool else None)

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

    def save_rl_state(self, state_dir: str, step: int, extra: dict[str, Any]) -> str:
        state = self.trainer.state_dict()
        state["extra"] = extra
        return str(StepCheckpoints(state_dir).save(step, state))

    def load_rl_state(self, state_dir: str) -> tuple[int, dict[str, Any]] | None:
        latest = StepCheckpoints(state_dir).load_latest()
        if latest is None:
            return None
        step, state = latest
        self.trainer.load_state_dict(state)
        return step, state.get("extra", {})

    # -- checkpoints and offload ---------------------------------------------------------------------------------
    def save_pretrained(self, path: str) -> None:
        save_policy(self.policy, path, self.tokenizer)

    def offload(self, mode: str, folder: str) -> int:
        optimizer = self.trainer.optimizer if self.trainer is not None else None
        self.offloader = Offloader(self.policy, optimizer, folder=folder)
        return self.offloader.offload(mode)

    def onload(self) -> None:
        if self.offloader is not None:
            self.offloader.onload()
            self.offloader = None

    def pid(self) -> int:
        return os.getpid()


def remote(cls: type, **options: Any) -> Any:
    """``ray.remote(**options)(cls)``, imported lazily."""
    import ray

    return ray.remote(**options)(cls)
