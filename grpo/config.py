"""Typed settings for one RL (GRPO) phase, validated up front with messages that name the field."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from grpo import advantages, correction, losses
from model.registry import check_fields


@dataclass
class GRPOConfig:
    """Settings of the GRPO trainer.

    Batch shape: each step takes ``prompts_per_step`` prompts and samples ``group_size`` completions for each,
    so one step holds ``prompts_per_step * group_size`` sequences; they are split into minibatches of
    ``minibatch_size`` sequences for ``updates_per_batch`` (μ) passes, one optimizer step per minibatch.

    Attributes:
        group_size: G, completions per prompt (DeepSeekMath 64, R1-Zero 16); at least 2 (one completion per
            prompt has no group to be compared with: every advantage would be 0).
        prompts_per_step: B, prompts per step.
        minibatch_size: Sequences per optimizer step; must divide ``prompts_per_step * group_size``.
        micro_batch_size: Sequences per forward/backward inside a minibatch (gradient accumulation); must
            divide ``minibatch_size``.
        updates_per_batch: μ, passes over each batch (1 = strictly on-policy, old log-probs = current).
        lr: Learning rate (DeepSeekMath 1e-6, R1-Zero 3e-6).
        lr_schedule: ``constant`` or ``cosine``, after ``warmup_steps`` of linear warmup.
        warmup_steps: Optimizer steps of linear warmup.
        total_steps: Planned RL steps (the cosine schedule's horizon); None in a recipe means the stage's
            ``steps``. Needed by ``cosine``.
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient clipping norm; 0 disables clipping.
        beta: KL-to-reference weight (DeepSeekMath 0.04, R1-Zero 0.001); 0 skips the reference model.
        kl: KL estimator, ``k1``, ``k2`` or ``k3``.
        clip_low: ε_low of the ratio clip.
        clip_high: ε_high (DAPO clip-higher uses e.g. 0.28).
        clip_ratio_c: Dual-clip bound for negative advantages (e.g. 3.0); None turns it off.
        loss_agg: Aggregation mode of :func:`grpo.losses.agg_loss`.
        policy_loss: Registered policy-loss variant (``vanilla``, ``gspo``).
        advantage: Registered advantage estimator (``grpo``, ``dr_grpo``, ``rloo``; ``process`` takes step scores
            from a process reward returning :class:`rewards.StepRewards`, see :mod:`grpo.steps`).
        advantage_scale: ``group``, ``batch`` or ``none``; None keeps the estimator's default.
        max_new_tokens: Completion length limit.
        temperature: Sampling temperature for rollouts (R1-Zero 1.0).
        top_p: Nucleus sampling mass.
        dynamic_sampling: Drop groups whose rewards are all equal (they carry no signal) and sample more prompts,
            up to ``max_refill_rounds`` extra rounds (DAPO).
        max_refill_rounds: See ``dynamic_sampling``.
        mask_truncated: Give completions cut at ``max_new_tokens`` no loss (DAPO overlong filtering).
        ref_reset_every: Copy the policy into the reference model every K steps (0 = never).
        moe_aux_coef: Weight of the MoE balance losses the policy returns (0 = off).
        moe_bias_gamma: DeepSeek-V3's aux-loss-free balancing: after each optimizer step, nudge every routed
            expert's selection bias by ±γ toward balanced load (0 = off; needs a policy with
            ``update_router_bias``).
        logprob_chunk_size: Tokens per chunk when computing log-probs without materialising all logits.
        share_prompts: In the log-prob passes (old, reference, update), run a prompt shared by several rows (its
            G samples) once: one pass for our models, a KV cache gathered per row for transformers models (see
            :mod:`grpo.logprobs`). Same values up to float rounding; off runs every row in full.
        carry_optimizer_state: Start from the Adam moments of the previous RL stage of the same run (when there
            is one) instead of fresh ones; the stage's own ``lr``, ``weight_decay`` and schedule still apply.
        sync_check: After every weight sync, check that each rollout engine holds exactly the trainer's weights
            (fingerprints per tensor, or a log-prob probe for engines that cannot report fingerprints) and stop
            with a message naming the first tensor that differs (the stale-weight guard); its cost is logged
            as ``time/sync_check``.
        sync_probe_tol: For engines checked by the probe: the largest mean absolute difference between the
            engine's and the trainer's log-probs of the probe sequence that still counts as the same weights
            (engines in another dtype or with other kernels never agree exactly).
        rollout_correction: How the policy gradient corrects for the engine sampling from other log-probs than
            the trainer's (:mod:`grpo.correction`): ``none``, ``tis``, ``mis``, ``seq-tis``, ``seq-mis``, or
            ``auto`` (``none`` for an engine whose log-probs are the trainer's own, our float32 torch engine;
            ``tis`` otherwise, e.g. vLLM). The mismatch itself is measured every step whatever this says.
        rollout_correction_cap: ``C > 1``: the truncation (``tis``) or the kept range ``[1/C, C]`` (``mis``).
        router_replay: Rollout routing replay (R3) for our MoE policy: the engine records the experts it routed
            every token to and the policy's log-prob and update passes route by them (the gate weights still
            come from the current router, so it keeps learning; see :mod:`model.routing`). Those passes then run
            every row's prompt in full (a shared-prefix forward cannot be replayed). Needs an engine that
            records routing: our torch engine, or the vLLM engine on a GPU (a pipeline builds it with
            ``enable_return_routed_experts=True``; see :mod:`rollout.vllm_routing`). Whatever this says, an engine that
            records routing does so every step, for ``mismatch/routing_disagreement``.
        async_rollouts: One-step off-policy rollouts: step k+1's completions are sampled on the rollout workers
            while the trainer updates on step k's, with the weights before that update (bounded staleness
            ``max_staleness``). The ratio's old policy is the trainer's own (proximal) log-probs and the
            engine's log-probs are the behaviour policy, weighted in by ``rollout_correction`` (``auto``:
            ``tis``), the decoupled objective (Hilton et al. 2022; AReaL). A remote reference computes the
            next batch's log-probs as soon as it is sampled (:mod:`grpo.prefetch`). Not with dynamic sampling.
        max_staleness: How many updates a sampled batch may lag; 1 (one-step off-policy) is the one supported.
        seed: Seed of sampling and minibatch shuffling.
    """

    group_size: int = 8
    prompts_per_step: int = 8
    minibatch_size: int = 64
    micro_batch_size: int = 16
    updates_per_batch: int = 1
    lr: float = 1e-6
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.04
    kl: str = "k3"
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: float | None = None
    loss_agg: str = "seq-mean-token-mean"
    policy_loss: str = "vanilla"
    advantage: str = "grpo"
    advantage_scale: str | None = None
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    dynamic_sampling: bool = False
    max_refill_rounds: int = 2
    mask_truncated: bool = False
    ref_reset_every: int = 0
    moe_aux_coef: float = 0.0
    moe_bias_gamma: float = 0.0
    logprob_chunk_size: int = 1024
    share_prompts: bool = True
    carry_optimizer_state: bool = False
    sync_check: bool = True
    sync_probe_tol: float = 0.02
    rollout_correction: str = "auto"
    rollout_correction_cap: float = 2.0
    router_replay: bool = False
    async_rollouts: bool = False
    max_staleness: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ["group_size", "prompts_per_step", "minibatch_size", "micro_batch_size", "updates_per_batch",
                    "max_new_tokens", "logprob_chunk_size"] + ([] if self.total_steps is None else ["total_steps"])
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        non_negative = ["lr", "beta", "clip_low", "clip_high", "weight_decay", "max_grad_norm", "moe_aux_coef",
                        "temperature", "warmup_steps", "ref_reset_every", "max_refill_rounds", "moe_bias_gamma",
                        "sync_probe_tol"]
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be at least 2, got {self.group_size}: GRPO normalises each reward "
                             f"within its prompt's group, so a group of one gives every completion advantage 0")
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 (or None), got {self.clip_ratio_c!r}")
        if not self.rollout_correction_cap > 1.0:
            raise ValueError(f"rollout_correction_cap must be > 1, got {self.rollout_correction_cap!r}")
        if self.rollout_correction != "auto" and self.rollout_correction not in correction.CORRECTIONS:
            raise ValueError(f"rollout_correction must be auto or one of {list(correction.CORRECTIONS)}, got "
                             f"{self.rollout_correction!r}")
        self._check_async()
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        batch = self.prompts_per_step * self.group_size
        if batch % self.minibatch_size:
            raise ValueError(f"minibatch_size ({self.minibatch_size}) must divide prompts_per_step * group_size "
                             f"({self.prompts_per_step} * {self.group_size} = {batch})")
        if self.minibatch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) must divide minibatch_size "
                             f"({self.minibatch_size})")
        self._check_choice("lr_schedule", ("constant", "cosine"))
        self._check_choice("advantage_scale", (None, "group", "batch", "none"))
        self._check_registered()

    def _check_async(self) -> None:
        if self.async_rollouts and self.max_staleness != 1:
            raise ValueError(f"max_staleness: only 1 (one-step off-policy) is supported, got {self.max_staleness}")
        if self.async_rollouts and self.dynamic_sampling:
            raise ValueError("async_rollouts cannot be combined with dynamic_sampling (the next batch is sampled "
                             "before this one's groups are scored)")

    def _check_choice(self, name: str, allowed: tuple) -> None:
        if getattr(self, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def _check_registered(self) -> None:
        for name, registry in (("advantage", advantages.ADVANTAGE_ESTIMATORS), ("kl", losses.KL_ESTIMATORS),
                               ("loss_agg", losses.AGG_MODES), ("policy_loss", losses.POLICY_RATIOS)):
            if getattr(self, name) not in registry:
                raise ValueError(f"{name} must be one of {list(registry)}, got {getattr(self, name)!r}")

    @property
    def batch_size(self) -> int:
        """Sequences per step: ``prompts_per_step * group_size``."""
        return self.prompts_per_step * self.group_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GRPOConfig:
        """Builds a config, naming any unknown key."""
        check_fields(cls, values, "GRPO setting(s)")
        return cls(**values)
