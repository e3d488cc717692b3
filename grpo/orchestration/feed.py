"""Per-step records from a worker to the driver while one long call (SFT, a reward model's training) runs.

The worker puts a dict per step into a Ray queue (:class:`ray.util.queue.Queue`, an actor of its own); the
driver waits on the call's result and drains the queue meanwhile, so it logs each step as it happens and keeps
its progress display moving.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Record = dict[str, Any]


class Feed:
    """A queue the workers write step records to and the driver reads while it waits.

    Args:
        poll: Seconds between two reads of the queue while the call runs.
    """

    def __init__(self, poll: float = 0.25) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.poll = poll

    def _drain(self, on_record: Callable[[Record], None]) -> None:
        while not self.queue.empty():
            for record in self.queue.get_nowait_batch(self.queue.qsize()):
                on_record(record)

    def wait(self, futures: Sequence[Any], on_record: Callable[[Record], None]) -> list[Any]:
        """Waits for ``futures`` (Ray object refs), handing every record put meanwhile to ``on_record`` in the
        order put; returns the futures' results."""
        import ray

        pending = list(futures)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=self.poll)
            self._drain(on_record)
        results = ray.get(list(futures))  # raises the worker's error, after the records it put before failing
        self._drain(on_record)
        return results

    def close(self) -> None:
        self.queue.shutdown()


def put(queue: Any | None, record: Record) -> None:
    """Worker side: puts ``record`` into ``queue`` (a :class:`Feed`'s), when there is one."""
    if queue is not None:
        queue.put(record)
