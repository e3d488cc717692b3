"""The trainer's views of the Ray actors it drives (:mod:`grpo.orchestration.workers`): a group of rollout workers
as one :class:`rollout.base.RolloutEngine`, the reward worker as a reward callable and the reference worker as
a reference policy."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor

from grpo.orchestration.transport import WEIGHT_TRANSPORTS, to_wire
from rollout.base import PendingRollouts, Rollout, RolloutEngine, SamplingConfig


class RolloutGroup(RolloutEngine):
    """One engine made of several rollout workers: prompts are split into contiguous shares, one per worker.

    Args:
        workers: The rollout workers' actor handles.
        transport: How weights reach them (a :data:`grpo.orchestration.transport.WEIGHT_TRANSPORTS` name).
    """

    def __init__(self, workers: Sequence[Any], transport: str = "object_store") -> None:
        import ray

        self._ray = ray
        self.workers = list(workers)
        self.transport = WEIGHT_TRANSPORTS.get(transport)(self.workers)

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Rollout]:
        return self.generate_async(prompt_token_ids, sampling).result()

    def generate_async(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig
                       ) -> PendingRollouts:
        """Starts every worker on its share and returns at once; the workers keep their calls in order, so a
        later weight update waits for this generation."""
        share = -(-len(prompt_token_ids) // len(self.workers))
        futures, offsets = [], []
        for i, worker in enumerate(self.workers):
            part = list(prompt_token_ids[i * share:(i + 1) * share])
            if part:
                futures.append(worker.generate.remote(part, sampling))
                offsets.append(i * share)

        def wait() -> list[Rollout]:
            out: list[Rollout] = []
            for offset, rollouts in zip(offsets, self._ray.get(futures)):
                for r in rollouts:
                    r.prompt_index += offset
                out.extend(rollouts)
            return out

        return PendingRollouts(wait)

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        bucket = list(named_tensors)
        if bucket:
            self.transport.send(bucket)

    def accepted_weights(self) -> dict[str, tuple[int, ...]] | None:
        return self._ray.get(self.workers[0].accepted_weights.remote())  # every worker loads the same folder

    def weight_reports(self, names: Sequence[str], probe_ids: Sequence[int]) -> list[Any]:
        reports = self._ray.get([w.weight_report.remote(list(names), list(probe_ids)) for w in self.workers])
        return [dataclasses.replace(r, where=f"rollout worker {i}: {r.where}") for i, r in enumerate(reports)]

    @property
    def description(self) -> str:
        return self._ray.get(self.workers[0].description.remote())

    def can_return_logprobs(self, sampling: SamplingConfig) -> bool:
        return self._ray.get(self.workers[0].can_return_logprobs.remote(sampling))

    @property
    def can_record_routing(self) -> bool:
        return all(self._ray.get([w.can_record_routing.remote() for w in self.workers]))

    @property
    def logprobs_match_trainer(self) -> bool:
        return all(self._ray.get([w.logprobs_match_trainer.remote() for w in self.workers]))

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
        self._ray.get(self.worker.update_weights.remote(to_wire(named)))
