"""Weight sync from the trainer to its rollout engine, and the stale-weight guard (:class:`WeightSync`).

:meth:`WeightSync.sync_weights` sends the policy's weights in whole-layer buckets (:mod:`rollout.weights`; a
sharded policy's tensors gathered one at a time as the buckets fill, every rank taking part and rank 0
sending), then checks that every engine replica holds them: by fingerprints per tensor, exact in the engine's
dtype, or, for engines that cannot report them (vLLM), by the log-probs of a fixed probe sequence.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from grpo.config import GRPOConfig
from grpo.timing import PhaseTimer
from model.distributed import DataParallel, is_sharded, no_grad_forwards
from rollout.weights import (
    Fingerprint,
    StaleWeightsError,
    WeightReport,
    bucketed,
    candidate_fingerprints,
    check_names,
    compare_fingerprints,
    named_weights,
)

log = logging.getLogger(__name__)


class WeightSync:
    """The weight-sync half of :class:`grpo.trainer.GRPOTrainer` (a mixin: it reads the trainer's ``policy``,
    ``engine``, ``tokenizer``, ``config`` and ``dp``)."""

    policy: nn.Module
    engine: Any
    tokenizer: Any
    config: GRPOConfig
    dp: DataParallel
    _sync_names_checked: bool = False
    _unverifiable_warned: bool = False

    @torch.no_grad()
    def sync_weights(self, bucket_bytes: int = 64 << 20, metrics: dict[str, float] | None = None) -> None:
        """Pushes the policy's weights to the engine in whole-layer buckets, then (``config.sync_check``) checks
        that the engine holds them (:meth:`check_sync`).

        Args:
            bucket_bytes: About how many bytes to send per call (a decoder layer is never split).
            metrics: Where to add ``time/sync``, ``time/sync_check``, ``sync/bytes`` and ``sync/checked_tensors``.

        Raises:
            KeyError / ValueError: before anything is sent, for a name or shape the engine does not accept.
            StaleWeightsError: when the engine's weights differ from the trainer's after the sync.
        """
        metrics = {} if metrics is None else metrics
        timer = PhaseTimer(metrics)
        checking = self.config.sync_check
        probes: list[WeightReport] = []
        with timer("sync"):
            sent, nbytes = self._send_weights(bucket_bytes)
        if self.dp.is_main:
            metrics["sync/bytes"] = float(nbytes)
            if checking:
                with timer("sync_check"):
                    metrics["sync/checked_tensors"], probes = self._check_fingerprints(sent)
        if checking and self.dp.broadcast(bool(probes)):  # the probe is a forward: every rank runs it
            with timer("sync_check"):
                self._check_probes(probes)

    def _send_weights(self, bucket_bytes: int) -> tuple[dict[str, Tensor | dict[str, Fingerprint]], int]:
        """Sends the policy's weights to the engine in buckets (names checked first).

        Every rank runs it: a sharded policy's tensors are gathered whole one at a time as the buckets fill
        (never the whole model at once) and rank 0 sends each bucket.

        Returns:
            What rank 0 sent (name -> the tensor, or for a sharded policy, whose gathered tensors are freed
            after their bucket, its fingerprints in every dtype an engine may hold it in), and how many bytes.
        """
        main, sharded = self.dp.is_main, is_sharded(self.policy)
        if not self._sync_names_checked:  # engines outside the RolloutEngine ABC may lack these hooks
            shapes = {n: tuple(t.shape) for n, t in named_weights(self.policy)}  # every rank: gathers if sharded
            error = None
            accepted = getattr(self.engine, "accepted_weights", lambda: None)() if main else None
            if accepted is not None:
                try:
                    check_names(shapes, accepted, getattr(self.engine, "description", type(self.engine).__name__))
                except (KeyError, ValueError) as exc:
                    error = exc
            error = self.dp.broadcast(error)  # every rank stops, not only rank 0
            if error is not None:
                raise error
            self._sync_names_checked = True
        sent: dict[str, Tensor | dict[str, Fingerprint]] = {}
        nbytes = 0
        for bucket in bucketed(named_weights(self.policy), bucket_bytes):
            if not main:
                continue
            self.engine.update_weights(bucket)
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            sent.update({n: candidate_fingerprints(t) for n, t in bucket} if sharded else bucket)
        return sent, nbytes

    def check_sync(self, sent: dict[str, Tensor]) -> int:
        """The stale-weight guard: every engine replica must hold ``sent``, judged by fingerprints per tensor
        (exact, in the engine's dtype) or, for engines without them, by log-probs of a fixed probe sequence.

        Returns:
            How many tensors were checked by fingerprint (over all replicas).

        Raises:
            StaleWeightsError: naming the replica and the first tensor (or the probe) that differs.
        """
        checked, probes = self._check_fingerprints(sent)
        if probes:
            self._check_probes(probes)
        return checked

    @torch.no_grad()
    def _check_fingerprints(self, sent: dict[str, Tensor | dict[str, Fingerprint]]) -> tuple[int, list[WeightReport]]:
        """Compares the replicas' fingerprints with ``sent``'s; returns how many tensors that checked and the
        reports that carry probe log-probs instead (for :meth:`_check_probes`)."""
        checked = 0
        probes: list[WeightReport] = []
        reporter = getattr(self.engine, "weight_reports", None)
        reports = reporter(list(sent), self._probe_ids()) if reporter is not None else [
            WeightReport(type(self.engine).__name__, None, None)]
        for report in reports:
            if report.fingerprints is not None:
                compare_fingerprints(sent, report.fingerprints, report.where)
                checked += len(sent)
            elif report.probe is not None:
                probes.append(report)
            elif not self._unverifiable_warned:
                self._unverifiable_warned = True
                log.warning("weight sync check: %s reports neither fingerprints nor probe log-probs; its weights "
                            "are not checked", report.where)
        return checked, probes

    @torch.no_grad()
    def _check_probes(self, probes: list[WeightReport]) -> None:
        """Compares the engines' probe log-probs with the policy's (computed on every rank, compared on rank 0).

        Raises:
            StaleWeightsError: naming the replica whose probe differs by more than ``sync_probe_tol``.
        """
        mine = self._probe_logprobs(self._probe_ids())
        for report in probes:
            gap = sum(abs(a - b) for a, b in zip(report.probe, mine)) / max(1, len(mine))
            if len(report.probe) != len(mine) or not gap <= self.config.sync_probe_tol:
                raise StaleWeightsError(
                    f"weight sync check: {report.where} gives log-probs of the probe sequence that differ from "
                    f"the trainer's by {gap:.4g} on average (sync_probe_tol {self.config.sync_probe_tol}): the "
                    f"engine would sample from stale or corrupted weights")

    def _probe_ids(self, length: int = 16) -> list[int]:
        vocab = min(len(self.tokenizer), int(getattr(getattr(self.policy, "config", None), "vocab_size", 0) or
                                             len(self.tokenizer)))
        return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(1234)).tolist()

    def _probe_logprobs(self, ids: list[int]) -> list[float]:
        was_training = self.policy.training
        self.policy.eval()
        device = next(self.policy.parameters()).device
        batch = torch.tensor([ids], device=device)
        with no_grad_forwards(self.policy):
            logits = self.policy(input_ids=batch, attention_mask=torch.ones_like(batch)).logits[0, :-1].float()
        self.policy.train(was_training)
        return logits.log_softmax(-1).gather(-1, batch[0, 1:, None]).squeeze(-1).tolist()
