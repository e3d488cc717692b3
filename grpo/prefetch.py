"""The scores and the reference log-probs of the batch sampled ahead (``async_rollouts``), computed while the
trainer updates on the current one.

With one-step off-policy rollouts, step k+1's completions are sampled while step k trains. Their rewards and
their reference log-probs depend only on the completions (the reward models and the reference are frozen), so
the workers that compute them (the reward worker, the reference worker: their own cores or GPUs) can start as
soon as the completions land instead of waiting for step k+1 to ask. :class:`WorkAhead` is a background thread
on trainer rank 0 that waits for the rollouts, then has them scored and, when asked, sends them to the
reference. Step k+1 takes what it computed: the scores if they are of the very rollouts it trains on, the
log-probs if they are of exactly its sequences (the same token ids and attention mask); otherwise it computes
them itself. A reset of the reference (``ref_reset_every``) discards log-probs computed with the old one. So a
step trains on the same numbers as without the prefetch. The trainer starts the thread once it has scored its
own batch, so the reward functions still see one call at a time, once per batch and in order: only earlier
relative to the updates.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import Tensor

from grpo.batch import Scores, pad_trajectories
from rollout.base import PendingRollouts, Rollout

ReferenceCall = Callable[[Tensor, Tensor, int], Tensor]
"""``(input_ids [N, L], attention_mask [N, L], completion_len T) -> [N, T]`` the reference's log-probs."""


class WorkAhead:
    """Scores ``pending``'s rollouts and computes their reference log-probs in a background thread.

    Args:
        pending: The rollouts being sampled ahead.
        score: Scores them (the trainer's :meth:`grpo.trainer.GRPOTrainer.score` for their rows).
        reference: Computes the reference's log-probs (the trainer's call to its remote reference); None: not
            prefetched.
        pad_id: The pad token id the trainer pads trajectories with (:func:`grpo.batch.pad_trajectories`).
    """

    def __init__(self, pending: PendingRollouts, score: Callable[[list[Rollout]], Scores],
                 reference: ReferenceCall | None, pad_id: int) -> None:
        self._pending, self._score, self._reference, self._pad_id = pending, score, reference, pad_id
        self._rollouts: list[Rollout] | None = None
        self._scores: Scores | None = None
        self._logprobs: tuple[Tensor, Tensor, Tensor] | None = None
        self._error: BaseException | None = None
        self._reference_valid = reference is not None
        self._thread = threading.Thread(target=self._run, name="work-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            rollouts = self._rollouts = self._pending.result()
            self._scores = self._score(rollouts)
            if self._reference is not None:
                ids, attn, comp = pad_trajectories([r.prompt_ids for r in rollouts],
                                                   [r.completion_ids for r in rollouts], self._pad_id)
                self._logprobs = (ids, attn, self._reference(ids, attn, comp.shape[1]))
        except BaseException as exc:  # re-raised in the trainer's thread, by the accessor that needs the result
            self._error = exc

    def _wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def scores(self, rollouts: list[Rollout]) -> Scores | None:
        """Waits for the prefetch; its scores if they are of ``rollouts`` (the same objects), else None.

        Raises:
            The error the reward (or the sampling, or the reference) raised in the background thread.
        """
        self._wait()
        same = self._rollouts is not None and len(self._rollouts) == len(rollouts) and all(
            a is b for a, b in zip(self._rollouts, rollouts))
        return self._scores if same else None

    def discard_reference(self) -> None:
        """Marks the reference log-probs as not to be used (the reference is being replaced)."""
        self._reference_valid = False

    def reference_logprobs(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor | None:
        """Waits for the prefetch; ``[N, T]`` its reference log-probs if they are of exactly these sequences, else
        None (the caller computes them itself).

        Raises:
            The error raised in the background thread.
        """
        self._wait()
        if self._logprobs is None or not self._reference_valid:
            return None
        ids, attn, logp = self._logprobs
        if ids.shape != input_ids.shape or not (torch.equal(ids, input_ids.cpu()) and
                                                torch.equal(attn, attention_mask.cpu())):
            return None
        return logp
