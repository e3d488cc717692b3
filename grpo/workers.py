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

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from grpo.checkpointing import StepCheckpoints
from grpo.config import GRPOConfig
from grpo.logprobs import sequence_logprobs
from grpo.offload import Offloader
from rollout.base import Rollout, RolloutEngine, SamplingConfig, build_engine

log = logging.getLogger(__name__)


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def load_policy(path: str | Path, dtype: str = "float32", device: str = "cpu") -> torch.nn.Module:
    """Loads a causal LM folder: ours (deepseek_v2/v3) with :mod:`model`, anything else with transformers."""
    import json

    torch_dtype = getattr(torch, dtype)
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    if model_type in ("deepseek_v2", "deepseek_v3"):
        from model import DeepSeekForCausalLM

        model = DeepSeekForCausalLM.from_pretrained(path, dtype=torch_dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    return model.to(device)


def save_policy(model: torch.nn.Module, path: str | Path, tokenizer: Any) -> None:
    """Saves a Hugging Face folder atomically (ours does it itself; transformers models through a temp dir)."""
    from grpo.checkpointing import atomic_dir

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


# ------------------------------------------------------------------------------------------------ roles
class RolloutWorker:
    """Owns a rollout engine built from a checkpoint folder."""

    def __init__(self, checkpoint: str, engine: str = "torch", threads: int | None = None,
                 dtype: str = "float32", device: str = "cpu") -> None:
        _set_threads(threads)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        if engine == "torch":
            self.engine = build_engine("torch", load_policy(checkpoint, dtype, device), tokenizer=tokenizer)
        else:
            self.engine = build_engine(engine, checkpoint, tokenizer=tokenizer)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        return self.engine.generate(prompt_token_ids, sampling)

    def update_weights(self, named: list[tuple[str, Tensor]]) -> None:
        self.engine.update_weights(named)

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
                 temperature: float, micro_batch_size: int = 32) -> Tensor:
        parts = [sequence_logprobs(self.model, input_ids[i:i + micro_batch_size],
                                   attention_mask[i:i + micro_batch_size], completion_len,
                                   chunk_size=chunk_size, temperature=temperature)[0]
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
        from rewards.combine import RewardSpec, combine
        from rewards.registry import get_reward

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
    :mod:`grpo.offload`) and brought back before use.
    """

    def __init__(self, checkpoint: str, threads: int | None = None, dtype: str = "float32", device: str = "cpu",
                 gradient_checkpointing: bool = False) -> None:
        _set_threads(threads)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.policy = load_policy(checkpoint, dtype, device)
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        self.trainer: Any = None
        self.offloader: Offloader | None = None

    # -- SFT --------------------------------------------------------------------------------------------------
    def sft(self, rows: list[dict], config: Any, state_dir: str, save_every: int, resume: bool
            ) -> list[dict[str, float]]:
        """Runs the SFT phase, checkpointing every ``save_every`` steps; returns the logged metrics."""
        from dataclasses import asdict

        from sft.trainer import SFTTrainer

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
        from grpo.trainer import GRPOTrainer

        ref = RemoteReference(reference_worker) if reference_worker is not None else None
        optimizer = self.trainer.optimizer if self.trainer is not None else None
        self.trainer = GRPOTrainer(self.policy, RolloutGroup(rollout_workers), RemoteReward(reward_worker),
                                   self.tokenizer, config, ref_model=ref, optimizer=optimizer)
        self.trainer.sync_weights()

    def rl_step(self, rows: list[dict], refill_rows: list[dict] | None = None) -> dict[str, float]:
        """One GRPO step; ``refill_rows`` are drawn from (in order) when dynamic sampling drops groups."""
        pool = list(refill_rows or [])

        def refill(k: int) -> list[dict]:
            taken, pool[:] = pool[:k], pool[k:]
            return taken

        return self.trainer.step(rows, refill=refill if pool else None)

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
