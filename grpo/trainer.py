"""The GRPO trainer: one RL step = generate -> score -> advantages -> old/ref log-probs -> μ updates -> sync.

The algorithm's math lives in :mod:`grpo.advantages`, :mod:`grpo.losses` and :mod:`grpo.logprobs`; this module
only moves data between them, the rollout engine and the reward functions. Departures from DeepSeekMath's
GRPO that are options here (all off by default): DAPO's dynamic sampling, clip-higher and overlong filtering,
Dr.GRPO's aggregation, GSPO's sequence ratio, and resetting the reference model every K steps.

Data parallel (``dp`` with N ranks, the policy sharded by :func:`model.distributed.shard_model`): rank 0 samples,
scores and computes the advantages, every rank receives the step's batch, and the log-probs and the update run
over the ranks' shares of the micro-batches (see :mod:`model.distributed`), computing one rank's update.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from grpo.advantages import compute_advantages
from grpo.batch import Scores, Trajectories, pad_engine_logprobs, pad_routing, pad_trajectories
from grpo.config import GRPOConfig
from grpo.correction import correction_weights, mismatch_metrics, mismatch_stats, resolve
from grpo.logprobs import sequence_logprobs
from grpo.losses import micro_batch_weight, policy_loss
from grpo.prefetch import WorkAhead
from grpo.steps import check_step_rewards, token_step_ends
from grpo.timing import PhaseTimer
from grpo.weight_sync import WeightSync
from model.distributed import (
    SINGLE,
    DataParallel,
    clip_grad_norm,
    filler_forward,
    is_sharded,
    no_grad_forwards,
    sum_router_loads,
)
from model.routing import recorded_routing, replayed_routing, routing_disagreement
from rollout.base import PendingRollouts, Rollout, RolloutEngine, SamplingConfig
from rollout.weights import named_weights
from sft.formatting import encode_prompt

log = logging.getLogger(__name__)

Row = dict[str, Any]


class GRPOTrainer(WeightSync):
    """Trains a causal LM (ours or any transformers model) with GRPO against reward functions.

    Args:
        policy: The model being trained (forward takes ``input_ids``/``attention_mask``; see
            :func:`grpo.logprobs.sequence_logprobs`).
        engine: The rollout engine that samples from a copy of the policy; weights are pushed to it after
            every step.
        reward_fn: A reward callable ``f(prompts, completions, **columns)`` returning a list of floats (or None),
            or an object returning ``RewardOutput(total, breakdown)`` (see :mod:`rewards`). With
            ``advantage="process"``, a process reward returning one :class:`rewards.StepRewards` per completion.
        tokenizer: The policy's tokenizer (chat template, pad and eos ids, decoding).
        config: :class:`GRPOConfig`.
        ref_model: The frozen reference policy: a module, or a remote reference with ``logprobs(input_ids,
            attention_mask, completion_len, chunk_size=, temperature=)`` and ``update_weights(named)``; a copy
            of ``policy`` when None and β > 0.
        optimizer: Defaults to AdamW over the policy's trainable parameters, built from ``config``.
        optimizer_state: An earlier optimizer's ``state_dict()`` (the previous stage's, with
            ``config.carry_optimizer_state``) whose Adam moments the new optimizer starts from; its learning rate
            and weight decay are this config's.
        dp: The trainer ranks (default one). Only rank 0 uses ``engine`` and ``reward_fn`` (others may pass
            None); every rank holds a reference, the same on all (a sharded policy's default copy is sharded).
    """

    def __init__(self, policy: nn.Module, engine: RolloutEngine, reward_fn: Callable[..., Any], tokenizer: Any,
                 config: GRPOConfig, ref_model: nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, optimizer_state: dict[str, Any] | None = None,
                 dp: DataParallel = SINGLE) -> None:
        if config.lr_schedule == "cosine" and config.total_steps is None:
            raise ValueError("lr_schedule 'cosine' needs total_steps (the schedule's horizon in RL steps); recipes "
                             "default it to the stage's steps")
        self.policy, self.engine, self.reward_fn = policy, engine, reward_fn
        self.tokenizer, self.config, self.dp = tokenizer, config, dp
        if ref_model is None and config.beta > 0:
            if is_sharded(policy):
                raise ValueError("beta > 0 needs a reference policy, and a sharded policy cannot be copied into "
                                 "one: pass ref_model (a copy made before shard_model, or a remote reference)")
            ref_model = copy.deepcopy(policy)
        self.ref_model = ref_model
        if isinstance(ref_model, nn.Module):
            ref_model.eval().requires_grad_(False)
        params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = optimizer or torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
            for group in self.optimizer.param_groups:  # the moments carry over; the settings are this stage's
                group.update(lr=config.lr, initial_lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step_count = 0
        self.rng = torch.Generator().manual_seed(config.seed)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._aux_losses: dict[str, Tensor] = {}
        self._sync_names_checked = False
        self._unverifiable_warned = False
        # the rollout correction this engine needs (rank 0 knows the engine; every rank applies it)
        matches = bool(getattr(engine, "logprobs_match_trainer", False)) if dp.is_main else False
        # one step behind, the engine's log-probs are the behaviour policy's, never the trainer's own
        self.correction = self.dp.broadcast(resolve(config.rollout_correction, matches and not config.async_rollouts))
        self._pending: tuple[list[Row], PendingRollouts] | None = None  # async: the next step's, being sampled
        self._work_ahead: WorkAhead | None = None  # async: their scores and reference log-probs, computing
        self._prefetch_used = False
        self._mismatch: dict[str, float] = {}
        self._engine_gives_logprobs: bool | None = None
        if config.router_replay and dp.is_main and not getattr(engine, "can_record_routing", False):
            raise ValueError(f"router_replay: {getattr(engine, 'description', type(engine).__name__)} cannot record "
                             f"the experts it routes tokens to; use the torch engine with our MoE model, or the vLLM "
                             f"engine built with enable_return_routed_experts=True (on a GPU)")
        # the engine records its expert choices wherever it can: for replay, and for the routing mismatch
        self._records_routing = config.router_replay or bool(getattr(engine, "can_record_routing", False))
        decoder = policy.get_decoder() if hasattr(policy, "get_decoder") else policy
        decoder.register_forward_hook(self._capture_aux_losses)

    def _capture_aux_losses(self, module: nn.Module, args: Any, output: Any) -> None:
        """Keeps the MoE balance losses of the policy's last forward (our models return them)."""
        self._aux_losses = getattr(output, "aux_losses", None) or {}

    # -- schedule ----------------------------------------------------------------------------------------
    def _lr_factor(self, opt_step: int) -> float:
        cfg = self.config
        if opt_step < cfg.warmup_steps:
            return (opt_step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        updates_per_step = cfg.updates_per_batch * (cfg.batch_size // cfg.minibatch_size)
        horizon = max(1, (cfg.total_steps or 1) * updates_per_step - cfg.warmup_steps)
        progress = min(1.0, (opt_step - cfg.warmup_steps) / horizon)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    # -- one step -----------------------------------------------------------------------------------------------
    def step(self, rows: list[Row], refill: Callable[[int], list[Row]] | None = None,
             next_rows: list[Row] | None = None) -> dict[str, float]:
        """Runs one RL step on ``rows`` (each with a ``prompt`` and the reward functions' columns).

        Args:
            rows: ``prompts_per_step`` dataset rows.
            refill: With dynamic sampling, called with a count to draw that many more rows.
            next_rows: With ``async_rollouts``, the next step's rows: they start being sampled now, with the
                weights before this step's update, and the next call must pass them as its ``rows``.

        Returns:
            The step's metrics (flat dict of floats).
        """
        cfg = self.config
        metrics: dict[str, float] = {}
        timer = PhaseTimer(metrics)
        started = time.perf_counter()
        batch = rollouts = scores = None
        work, self._work_ahead = self._work_ahead, None
        if self.dp.is_main:
            ahead = self._take_pending(rows)
            metrics["async/staleness"] = float(ahead is not None)  # sampled a step ago, before the last update
            if cfg.async_rollouts and next_rows is not None:
                ahead = ahead or self._launch(rows)  # queued before the next batch on the workers
                self._pending = (list(next_rows), self._launch(next_rows))
            rows, rollouts, scores = self._sample_and_score(rows, refill, metrics, timer, ahead, work)
            if self._pending is not None:  # started after this batch is scored: the reward sees batches in order
                self._work_ahead = WorkAhead(self._pending[1], lambda done: self.score(next_rows, done),
                                             self._remote_reference if self._prefetches_reference() else None,
                                             self.pad_id)
            with timer("advantages"):
                rewards = torch.tensor(scores.total, dtype=torch.float32)
                batch = self._trajectories(rollouts, self._advantages(rollouts, scores), rewards)
        batch, rng_state = self.dp.broadcast((batch, self.rng.get_state()))  # every rank shuffles alike
        self.rng.set_state(rng_state)
        self._mismatch = {}
        with timer("logprobs"):
            batch = self._reference_logprobs(batch, work)
        if cfg.async_rollouts and self.dp.is_main:
            metrics["async/reference_prefetched"] = float(self._prefetch_used)
        with timer("update"):
            metrics.update(self._update(batch))
        metrics.update(self._mismatch_metrics())
        self.sync_weights(metrics=metrics)
        self.step_count += 1
        if cfg.ref_reset_every and self.ref_model is not None and self.step_count % cfg.ref_reset_every == 0:
            self._reset_reference()
        if self.dp.is_main:  # sampled while the last step trained (async): tokens per second of this step
            seconds = time.perf_counter() - started if metrics["async/staleness"] else metrics["time/generate"]
            metrics.update(self._rollout_metrics(rollouts, scores, seconds))
        metrics.update(self._settings_that_ran())
        metrics["time/step"] = time.perf_counter() - started  # the whole step, overlapped parts once
        return metrics

    def _settings_that_ran(self) -> dict[str, float]:
        """The step's settings as they ran (the optimizer's own weight decay, not the config's)."""
        return {"beta": self.config.beta, "temperature": self.config.temperature,
                "weight_decay": float(self.optimizer.param_groups[0].get("weight_decay", 0.0))}

    # -- generate + score (with dynamic sampling) ---------------------------------------------------------------
    def _take_pending(self, rows: list[Row]) -> PendingRollouts | None:
        """The rollouts sampled ahead for ``rows`` (async), or None.

        Raises:
            RuntimeError: when rows were sampled ahead for another batch.
        """
        if self._pending is None:
            return None
        ahead_rows, ahead = self._pending
        self._pending = None
        if [r["prompt"] for r in ahead_rows] != [r["prompt"] for r in rows]:
            raise RuntimeError("async_rollouts: this step's rows are not the ones sampled ahead by the previous "
                               "step (pass the previous call's next_rows as rows)")
        return ahead

    def _sample_and_score(self, rows: list[Row], refill: Callable[[int], list[Row]] | None,
                          metrics: dict[str, float], timer: PhaseTimer, ahead: PendingRollouts | None = None,
                          work: WorkAhead | None = None) -> tuple[list[Row], list[Rollout], Scores]:
        """Samples (or takes the rollouts sampled ``ahead``, and their scores from ``work``) and scores ``rows``;
        with dynamic sampling, drops the groups without signal and samples rows from ``refill`` in their place (up
        to ``max_refill_rounds`` rounds)."""
        cfg = self.config
        want, g = len(rows), cfg.group_size
        kept_rows: list[Row] = []
        kept_rollouts: list[Rollout] = []
        kept_scores: list[Scores] = []
        pending, rounds, dropped = rows, 0, 0
        while pending:
            with timer("generate"):  # async: the wait for what was sampled while the last step trained
                rollouts = ahead.result() if ahead is not None else self.generate(pending)
                ahead = None
            with timer("score"):  # async: the wait for the scores computed while the last step trained
                scores = work.scores(rollouts) if work is not None else None
                if cfg.async_rollouts:
                    metrics["async/scores_prefetched"] = float(scores is not None)
                scores = self.score(pending, rollouts) if scores is None else scores
            for i, row in enumerate(pending):
                group = slice(i * g, (i + 1) * g)
                if cfg.dynamic_sampling and scores.is_flat(group) and len(kept_rows) < want:
                    dropped += 1
                    continue
                if len(kept_rows) == want:
                    break
                kept_rows.append(row)
                kept_rollouts.extend(rollouts[group])
                kept_scores.append(scores.select(group))
            missing = want - len(kept_rows)
            if not missing or refill is None or rounds >= cfg.max_refill_rounds:
                break
            rounds += 1
            pending = refill(missing)
        if not kept_rows:
            raise RuntimeError("dynamic sampling dropped every group (all rewards equal in each group) and no "
                               "refill was possible; raise max_refill_rounds or check the reward functions")
        metrics["dynamic_sampling/dropped_groups"] = float(dropped)
        metrics["dynamic_sampling/kept_groups"] = float(len(kept_rows))
        return kept_rows, kept_rollouts, Scores.concat(kept_scores)

    def generate(self, rows: list[Row]) -> list[Rollout]:
        """Samples ``group_size`` completions per row with the engine."""
        return self._launch(rows).result()

    def _launch(self, rows: list[Row]) -> PendingRollouts:
        """Starts sampling ``group_size`` completions per row (at once, on engines that run elsewhere)."""
        cfg = self.config
        prompt_ids = [encode_prompt(self.tokenizer, row["prompt"]) for row in rows]
        sampling = SamplingConfig(n=cfg.group_size, max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                  top_p=cfg.top_p, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=self.rng)),
                                  logprobs=True,  # the engine's own: the mismatch and its correction
                                  record_routing=self._records_routing)
        if self._engine_gives_logprobs is None:  # asked once: the settings are the stage's
            self._engine_gives_logprobs = bool(getattr(self.engine, "can_return_logprobs", lambda s: True)(sampling))
            if not self._engine_gives_logprobs:
                log.warning("%s cannot return sampling log-probs with temperature %s and top_p %s: the rollout "
                            "mismatch is not measured or corrected", getattr(self.engine, "description", "the "
                            "engine"), cfg.temperature, cfg.top_p)
        sampling = dataclasses.replace(sampling, logprobs=self._engine_gives_logprobs)
        if hasattr(self.engine, "generate_async"):
            return self.engine.generate_async(prompt_ids, sampling)
        return PendingRollouts.done(self.engine.generate(prompt_ids, sampling))  # an engine outside the ABC

    def score(self, rows: list[Row], rollouts: list[Rollout]) -> Scores:
        """Scores completions with the reward (``None`` counts 0 in the total); with ``advantage="process"``, the
        process reward's :class:`rewards.StepRewards` (the total is their mean)."""
        g = self.config.group_size
        prompts = [rows[i // g]["prompt"] for i in range(len(rollouts))]
        columns = {k: [rows[i // g].get(k) for i in range(len(rollouts))] for k in rows[0] if k != "prompt"}
        columns["completion_ids"] = [r.completion_ids for r in rollouts]
        out = self.reward_fn(prompts, [r.text for r in rollouts], **columns)
        if self.config.advantage == "process":
            steps = check_step_rewards(out, len(rollouts))
            return Scores([s.mean for s in steps], {}, steps)
        if hasattr(out, "total"):
            total, breakdown = list(out.total), dict(out.breakdown)
        else:
            total, breakdown = list(out), {}
        if len(total) != len(rollouts):
            raise ValueError(f"the reward returned {len(total)} values for {len(rollouts)} completions")
        return Scores([0.0 if t is None else float(t) for t in total], breakdown)

    # -- advantages ---------------------------------------------------------------------------------------
    def _advantages(self, rollouts: list[Rollout], scores: Scores) -> Tensor:
        """``[N]`` outcome advantages from the totals, or ``[N, T]`` process ones from the step rewards."""
        cfg = self.config
        kw: dict[str, Any] = {} if cfg.advantage_scale is None else {"scale": cfg.advantage_scale}
        if cfg.advantage != "process":
            return compute_advantages(cfg.advantage, torch.tensor(scores.total, dtype=torch.float32),
                                      cfg.group_size, **kw)
        decode = (lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False))  # noqa: E731
        ends = [token_step_ends(decode, r.completion_ids, s.ends) for r, s in zip(rollouts, scores.steps)]
        num_tokens = max(1, max(len(r.completion_ids) for r in rollouts))  # the T of pad_trajectories
        return compute_advantages("process", [list(s.scores) for s in scores.steps], cfg.group_size,
                                  step_ends=ends, num_tokens=num_tokens, **kw)

    # -- tensors ----------------------------------------------------------------------------------------
    def _trajectories(self, rollouts: list[Rollout], advantages: Tensor, rewards: Tensor) -> Trajectories:
        ids, attn, comp = pad_trajectories([r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts],
                                           self.pad_id)
        if self.config.mask_truncated:
            truncated = torch.tensor([r.finish_reason == "length" for r in rollouts])
            comp = comp.masked_fill(truncated[:, None], 0)
        return Trajectories(ids, attn, comp, advantages.float(), rewards,
                            engine_logp=pad_engine_logprobs(rollouts, comp.shape[1]),
                            routing=pad_routing(rollouts, ids.shape[1] - comp.shape[1], ids.shape[1]))

    def _logprobs(self, model: nn.Module, batch: Trajectories, with_entropy: bool = False, measure: bool = False
                  ) -> tuple[Tensor, Tensor | None]:
        """``sequence_logprobs`` of ``batch`` under ``model``; the policy replays the engine's routing with
        ``router_replay``, and ``measure`` counts the engine-trainer routing mismatch of this forward."""
        routed = batch.routing is not None and model is self.policy  # the reference routes by itself
        replay, measure = routed and self.config.router_replay, routed and measure
        with (replayed_routing(model, batch.routing) if replay else contextlib.nullcontext(),
              recorded_routing(model, own=True) if measure else contextlib.nullcontext() as own):
            out = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_len,
                                    chunk_size=self.config.logprob_chunk_size, with_entropy=with_entropy,
                                    temperature=self.config.temperature or 1.0,
                                    share_prompts=self.config.share_prompts and not replay)
        if measure:
            differ, compared = routing_disagreement(own, batch.routing)
            self._mismatch["route_differ"] = self._mismatch.get("route_differ", 0.0) + differ
            self._mismatch["route_compared"] = self._mismatch.get("route_compared", 0.0) + compared
        return out

    def _batched_logprobs(self, model: nn.Module, batch: Trajectories, measure: bool = False) -> Tensor:
        """``[N, T]`` log-probs of ``batch`` by micro-batches; with several ranks each runs its share (``measure``:
        counting the routing mismatch, see :meth:`_logprobs`)."""
        mb, n = self.config.micro_batch_size, len(batch.rewards)
        starts = range(0, n, mb)
        parts: dict[int, Tensor] = {}
        with no_grad_forwards(model):
            for j in self.dp.share(len(starts)):
                start = starts[0 if j is None else j]
                with filler_forward(model) if j is None else contextlib.nullcontext():
                    micro = batch.select(torch.arange(start, min(start + mb, n)))
                    logp = self._logprobs(model, micro, measure=measure and j is not None)[0]
                if j is not None:
                    parts[j] = logp.cpu() if self.dp.enabled else logp
        if self.dp.enabled:
            parts = {j: t for gathered_parts in self.dp.all_gather(parts) for j, t in gathered_parts.items()}
        logp = torch.cat([parts[j] for j in range(len(starts))])
        return logp.to(batch.input_ids.device).clone()  # a normal tensor again: the loss may save it for backward

    def _reset_reference(self) -> None:
        """Copies the policy into the reference (a local module, or a remote one through ``update_weights``)."""
        if self._work_ahead is not None:
            self._work_ahead.discard_reference()  # computed (or computing) with the reference being replaced
        if isinstance(self.ref_model, nn.Module):
            self.ref_model.load_state_dict(self.policy.state_dict())
            return
        named = []
        for name, tensor in named_weights(self.policy):  # every rank gathers a sharded policy's tensors
            if self.dp.is_main:
                named.append((name, tensor.clone()))
        if self.dp.is_main:  # a remote reference serves rank 0
            self.ref_model.update_weights(named)

    def _prefetches_reference(self) -> bool:
        """Whether the batch being sampled ahead gets its reference log-probs early (:mod:`grpo.prefetch`): with
        a remote reference that no reset replaces before that batch trains."""
        cfg = self.config
        reset_due = bool(cfg.ref_reset_every) and (self.step_count + 1) % cfg.ref_reset_every == 0
        return cfg.beta > 0 and self.ref_model is not None and not isinstance(self.ref_model, nn.Module) and \
            not reset_due

    def _remote_reference(self, input_ids: Tensor, attention_mask: Tensor, completion_len: int) -> Tensor:
        return self.ref_model.logprobs(input_ids, attention_mask, completion_len,
                                       chunk_size=self.config.logprob_chunk_size,
                                       temperature=self.config.temperature or 1.0,
                                       share_prompts=self.config.share_prompts)

    def _ref_logprobs(self, batch: Trajectories, ahead: WorkAhead | None = None) -> Tensor:
        """``[N, T]`` the reference's log-probs of ``batch`` (those prefetched ``ahead`` when they are of it)."""
        if isinstance(self.ref_model, nn.Module):
            return self._batched_logprobs(self.ref_model, batch)
        logp = None
        if self.dp.is_main:  # a remote reference serves rank 0
            logp = ahead.reference_logprobs(batch.input_ids, batch.attention_mask) if ahead is not None else None
            self._prefetch_used = logp is not None
            if logp is None:
                logp = self._remote_reference(batch.input_ids, batch.attention_mask, batch.completion_len)
        return self.dp.broadcast(logp)

    def _reference_logprobs(self, batch: Trajectories, ahead: WorkAhead | None = None) -> Trajectories:
        cfg = self.config
        on_policy = cfg.updates_per_batch == 1 and cfg.minibatch_size == cfg.batch_size
        if not on_policy:
            was_training = self.policy.training
            self.policy.eval()
            batch = batch.replace(old_logp=self._batched_logprobs(self.policy, batch, measure=True))
            self.policy.train(was_training)
            if batch.engine_logp is not None:  # one correction for the whole batch, every rank alike
                weight = self._correct(batch.old_logp, batch.engine_logp, batch.completion_mask, reduce=False)
                batch = batch.replace(pg_weight=weight)
        self._prefetch_used = False
        if cfg.beta > 0:
            batch = batch.replace(ref_logp=self._ref_logprobs(batch, ahead))
        return batch

    # -- update ----------------------------------------------------------------------------------------
    def _update(self, batch: Trajectories) -> dict[str, float]:
        cfg = self.config
        self.policy.train()
        sums: dict[str, float] = {}
        count = 0
        n = len(batch.rewards)
        for _ in range(cfg.updates_per_batch):
            order = torch.randperm(n, generator=self.rng)
            for start in range(0, n, cfg.minibatch_size):
                # in row order inside the minibatch (the same update): micro-batches then hold whole groups, so
                # each prompt runs once per micro-batch for all of its samples (see grpo.logprobs)
                rows = order[start:start + cfg.minibatch_size].sort().values
                stats = self._minibatch_step(batch.select(rows))
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        return {k: v / count for k, v in sums.items()}

    def _minibatch_step(self, mini: Trajectories) -> dict[str, float]:
        """Accumulates the minibatch's micro-batches (this rank's share of them), then one optimizer step."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        n, mb = len(mini.rewards), cfg.micro_batch_size
        starts = range(0, n, mb)
        for j in self.dp.share(len(starts)):
            start = starts[0 if j is None else j]
            micro = mini.select(torch.arange(start, min(start + mb, n)))
            with filler_forward(self.policy) if j is None else contextlib.nullcontext():
                m = self._micro_batch_backward(micro, mini, filler=j is None)
            for k, v in m.items():
                stats[k] = stats.get(k, 0.0) + v
        stats = self.dp.sum_floats(stats)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if cfg.max_grad_norm > 0:
            stats["grad_norm"] = clip_grad_norm(params, cfg.max_grad_norm)
        stats["lr"] = self.scheduler.get_last_lr()[0]  # the rate this optimizer step uses
        self.optimizer.step()
        self.scheduler.step()
        if cfg.moe_bias_gamma and hasattr(self.policy, "update_router_bias"):
            sum_router_loads(self.policy, self.dp)
            self.policy.update_router_bias(cfg.moe_bias_gamma)
        return stats

    def _micro_batch_backward(self, micro: Trajectories, mini: Trajectories, filler: bool) -> dict[str, float]:
        """Backpropagates one micro-batch's loss at its share of the minibatch (0 for a filler); returns its
        metrics times that share."""
        cfg = self.config
        weight = 0.0 if filler else float(micro_batch_weight(cfg.loss_agg, micro.completion_mask,
                                                              mini.completion_mask))
        logp, entropy = self._logprobs(self.policy, micro, with_entropy=True,
                                       measure=micro.old_logp is None and not filler)  # on-policy: the first pass
        old = micro.old_logp if micro.old_logp is not None else logp.detach()
        weight_pg = micro.pg_weight  # off-policy: computed with the old log-probs for the whole batch
        if micro.old_logp is None and micro.engine_logp is not None and not filler:  # on-policy: old = current
            weight_pg = self._correct(old, micro.engine_logp, micro.completion_mask, reduce=True)
        loss, m = policy_loss(logp, old, micro.advantages, micro.completion_mask, clip_low=cfg.clip_low,
                              clip_high=cfg.clip_high, ref_logp=micro.ref_logp, beta=cfg.beta, kl=cfg.kl,
                              agg=cfg.loss_agg, variant=cfg.policy_loss, max_len=cfg.max_new_tokens,
                              clip_ratio_c=cfg.clip_ratio_c, pg_weight=weight_pg)
        aux = self._moe_aux_loss()
        ((loss + aux) * (weight * self.dp.grad_scale)).backward()
        if filler:
            return {}
        mask = micro.completion_mask.bool()
        m["entropy"] = float(entropy.detach()[mask].mean()) if mask.any() else 0.0
        m["moe_aux_loss"] = float(aux.detach())
        return {k: float(v) * weight for k, v in m.items()}

    def _correct(self, old: Tensor, engine: Tensor, mask: Tensor, reduce: bool) -> Tensor | None:
        """The rollout correction's weights for these rows (None for ``none``), adding their mismatch to the
        step's; ``reduce``: the rows are this rank's share (summed over ranks at the end of the step)."""
        stats = mismatch_stats(old, engine, mask)
        weight, affected = correction_weights(old, engine, mask, self.correction, self.config.rollout_correction_cap)
        stats["affected"] = float(affected.sum())
        acc = self._mismatch
        for key in ("abs_sum", "kl_sum", "tokens", "affected"):
            acc[key] = acc.get(key, 0.0) + stats[key]
        acc["abs_max"] = max(acc.get("abs_max", 0.0), stats["abs_max"])
        acc["reduce"] = float(reduce)
        return None if self.correction == "none" else weight

    def _mismatch_metrics(self) -> dict[str, float]:
        """The step's engine-trainer mismatch (:func:`grpo.correction.mismatch_metrics`; {} without engine
        log-probs) and, where the engine recorded its routing, the share of (token, MoE layer) expert choices the
        trainer's router makes otherwise (``mismatch/routing_disagreement``; each rank counted its share)."""
        acc = self._mismatch
        routes = self.dp.sum_floats({k: acc.get(k, 0.0) for k in ("route_differ", "route_compared")})
        if self.dp.enabled and self.dp.broadcast(bool(acc.get("reduce"))):  # every rank saw its share
            parts = self.dp.all_gather(acc)
            acc = {k: sum(p.get(k, 0.0) for p in parts) for k in ("abs_sum", "kl_sum", "tokens", "affected")}
            acc["abs_max"] = max(p.get("abs_max", 0.0) for p in parts)
        out = mismatch_metrics(acc, acc["affected"]) if acc.get("tokens") else {}
        if routes["route_compared"]:
            out["mismatch/routing_disagreement"] = routes["route_differ"] / routes["route_compared"]
        return out

    def _moe_aux_loss(self) -> Tensor:
        """The policy's MoE balance losses from its last forward, summed and weighted by ``moe_aux_coef``."""
        if not self.config.moe_aux_coef or not self._aux_losses:
            return torch.zeros(())
        return self.config.moe_aux_coef * sum(self._aux_losses.values(), torch.zeros(()))

    # -- metrics ----------------------------------------------------------------------------------------
    def _rollout_metrics(self, rollouts: list[Rollout], scores: Scores, seconds: float) -> dict[str, float]:
        total = torch.tensor(scores.total)
        lengths = torch.tensor([float(len(r.completion_ids)) for r in rollouts])
        out = {
            "reward/mean": float(total.mean()),
            "reward/std": float(total.std()) if total.numel() > 1 else 0.0,
            "completion/length_mean": float(lengths.mean()),
            "completion/length_max": float(lengths.max()),
            "completion/truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
            "tokens_per_s": float(lengths.sum()) / max(seconds, 1e-9),
        }
        for name, values in scores.breakdown.items():
            valid = [v for v in values if v is not None]
            if valid:
                out[f"reward/{name}"] = sum(valid) / len(valid)
        stats = getattr(self.policy, "routing_stats", None)
        if callable(stats):
            for layer, counts in stats().items():
                counts = counts.float()
                out[f"moe/layer{layer}_max_load"] = float(counts.max() / counts.mean().clamp(min=1e-9))
            self.policy.reset_routing_stats()
        return out

    # -- checkpointing ----------------------------------------------------------------------------------------
    def state_dict(self, weights: bool = True) -> dict[str, Any]:
        """Everything needed to resume exactly: policy, reference, optimizer, schedule, RNG and step.

        Args:
            weights: Include the policy's and the optimizer's state (``False``: the rest only, for checkpoints
                that save those two sharded, see :class:`grpo.orchestration.checkpointing.StepCheckpoints`).
        """
        tensors = ({"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict()}
                   if weights else {})
        return {
            **tensors,
            "ref_model": self.ref_model.state_dict() if isinstance(self.ref_model, nn.Module) else None,
            "scheduler": self.scheduler.state_dict(),
            "step": self.step_count,
            "rng": self.rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            # async: the batch sampled ahead (it finished before the sync that ended the step), so a resumed run
            # trains on exactly what the uninterrupted one would
            "pending": (self._pending[0], self._pending[1].result()) if self._pending is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` (without ``policy`` and ``optimizer``: the rest only, the caller having
        restored those) and pushes the weights to the engine."""
        if state.get("pending") is not None and self.dp.is_main:
            rows, rollouts = state["pending"]
            self._pending = (rows, PendingRollouts.done(rollouts))
        if "policy" in state:
            self.policy.load_state_dict(state["policy"])
            self.optimizer.load_state_dict(state["optimizer"])
        if isinstance(self.ref_model, nn.Module) and state["ref_model"] is not None:
            self.ref_model.load_state_dict(state["ref_model"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = state["step"]
        self.rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.sync_weights()
