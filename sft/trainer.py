"""The SFT phase: masked next-token NLL on assistant tokens, AdamW, linear warmup then cosine decay.

The loss of an optimizer step is the NLL summed over every assistant token of its micro-batches divided by the
number of those tokens, so gradient accumulation and packing do not change it: one step over 4 micro-batches
of 8 equals one step over a batch of 32. The trainer works with any causal LM whose forward takes
``input_ids``, ``attention_mask`` and ``position_ids`` and returns an object with ``.logits``.

Data order is a pure function of ``(seed, epoch)``, so :meth:`SFTTrainer.state_dict` (model, optimizer,
scheduler, step, RNG states) resumes a run exactly: the resumed run ends with the same weights as an
uninterrupted one.

Hyper-parameters: DeepSeek-V2 runs SFT for 2 epochs at lr 5e-6 on 1.5M conversations with a large model. Tiny
models learn from scratch and need far larger steps; the tests train a 2-layer, 32-wide model at lr 2e-2 with
10% warmup, and the tiny recipe picks its own values.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from model.distributed import SINGLE, DataParallel, clip_grad_norm, filler_forward
from sft.formatting import IGNORE_INDEX, tokenize_rows
from sft.packing import (
    Batch,
    check_packing_isolation,
    first_fit_decreasing,
    model_forward,
    pack_batch,
    pad_batch,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTConfig:
    """Settings of the SFT phase.

    Attributes:
        lr: Peak learning rate.
        epochs: Passes over the data.
        batch_size: Examples per micro-batch (rows per micro-batch when packing).
        grad_accum: Micro-batches per optimizer step.
        max_length: Most tokens per example (longer ones are cut) and per packed row.
        packing: Pack several examples per row (see :mod:`sft.packing`).
        warmup_ratio: Share of the steps with a linear warmup from 0 to ``lr``.
        min_lr_ratio: The cosine decays from ``lr`` to ``min_lr_ratio * lr`` at the last step.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        grad_clip: Clip the global gradient norm to this (0 disables).
        seed: Seed of the data order (and of the RNGs when the trainer is built).
        log_every: Log the metrics every this many steps (0 disables).
        max_steps: Stop after this many optimizer steps (None: all epochs).
        check_packing: Before packed training, check that the model keeps packed examples apart.
        moe_aux_coef: Weight of the MoE balance losses a model returns in ``.aux_losses`` (summed; 0 = off).
        progress: Show a progress bar.
    """

    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 1024
    packing: bool = False
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    max_steps: int | None = None
    check_packing: bool = True
    moe_aux_coef: float = 0.0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"sft {name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"sft lr must be > 0, got {self.lr!r}")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"sft {name} must lie in [0, 1], got {getattr(self, name)!r}")
        for name in ("weight_decay", "grad_clip", "log_every", "moe_aux_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"sft {name} must be >= 0, got {getattr(self, name)!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"sft betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"sft max_steps must be a positive integer or None, got {self.max_steps!r}")


@dataclass(frozen=True)
class StepMetrics:
    """Metrics of one optimizer step.

    Attributes:
        step: 1-based optimizer step.
        epoch: 0-based epoch the step belongs to.
        loss: Mean NLL over the step's assistant tokens.
        moe_aux_loss: The model's summed MoE balance losses (unweighted; 0 for models without them).
        lr: Learning rate used by the step.
        grad_norm: Global gradient norm before clipping.
        n_targets: Assistant tokens in the step.
        n_tokens: Tokens (padding excluded) in the step.
        tokens_per_s: ``n_tokens`` over the step's wall time.
    """

    step: int
    epoch: int
    loss: float
    moe_aux_loss: float
    lr: float
    grad_norm: float
    n_targets: int
    n_tokens: int
    tokens_per_s: float


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based).

    Linear from ``1/warmup`` to 1 over the first ``warmup`` steps, then cosine from 1 down to ``min_ratio`` at
    step ``total - 1``.

    Example:
        >>> warmup_cosine(0, total=10, warmup=2, min_ratio=0.0)
        0.5
        >>> warmup_cosine(9, total=10, warmup=2, min_ratio=0.0)
        0.0
    """
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = total - 1 - warmup
    if decay_steps <= 0:
        return 1.0
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_losses(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over the batch's targets (in fp32) and the model's summed MoE balance losses.

    Returns:
        ``(nll_sum, aux)``: divide ``nll_sum`` by ``batch.n_targets`` for the mean; ``aux`` is 0 for models whose
        output has no ``aux_losses``.
    """
    out = model_forward(model, batch)
    logits = out.logits.float()  # [B, T, V]
    nll = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    aux_losses = getattr(out, "aux_losses", None) or {}
    aux = sum((v.float() for v in aux_losses.values()), torch.zeros((), device=nll.device))
    return nll, aux


def nll_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed next-token NLL over the batch's targets (in fp32). Divide by ``batch.n_targets``."""
    return batch_losses(model, batch)[0]


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class SFTTrainer:
    """Supervised fine-tuning of a causal LM on the assistant tokens of conversations.

    Args:
        model: A causal LM (``forward(input_ids, attention_mask, position_ids).logits``).
        tokenizer: Its tokenizer, with a chat template and a pad or eos token.
        rows: Dataset rows with ``messages`` or ``prompt`` and ``completion`` (e.g. a ``datasets.Dataset``).
        config: The settings.
        save_fn: Called as ``save_fn(trainer)`` every ``save_every`` steps and at the end.
        save_every: Steps between ``save_fn`` calls (0: only at the end).
        log_fn: Receives each logged :class:`StepMetrics` (default: the module logger).
        chat_template: A template to use instead of the tokenizer's.
        dp: The trainer ranks (default one): every rank builds the same micro-batches and runs its share of them
            (see :mod:`model.distributed`; the model sharded by ``shard_model``), computing one rank's update.

    Example:
        >>> trainer = SFTTrainer(model, tokenizer, load_data("builtin:arithmetic", n=512, schema="sft"),
        ...                      SFTConfig(lr=1e-2, epochs=2))  # doctest: +SKIP
        >>> history = trainer.train()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        rows: Sequence[Mapping[str, Any]],
        config: SFTConfig,
        *,
        save_fn: Callable[[SFTTrainer], None] | None = None,
        save_every: int = 0,
        log_fn: Callable[[StepMetrics], None] | None = None,
        chat_template: str | None = None,
        dp: DataParallel = SINGLE,
    ) -> None:
        self.model, self.config, self.save_fn, self.save_every = model, config, save_fn, save_every
        self.dp = dp
        self.log_fn = log_fn or (lambda m: log.info("sft %s", asdict(m)))
        self.pad_id = _pad_id(tokenizer)
        self.examples, self.dropped = tokenize_rows(
            rows, tokenizer, chat_template=chat_template, max_length=config.max_length
        )
        if not self.examples:
            raise ValueError("no SFT example has an assistant token within max_length")
        if self.dropped:
            log.warning(
                "sft: dropped %d rows whose assistant tokens all lie past max_length=%d",
                self.dropped,
                config.max_length,
            )
        lengths = [len(ex) for ex in self.examples]
        self.units = (
            first_fit_decreasing(lengths, config.max_length)
            if config.packing
            else [[i] for i in range(len(self.examples))]
        )
        self.micro_per_epoch = math.ceil(len(self.units) / config.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / config.grad_accum)
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameter (all have requires_grad=False)")
        self.optimizer = torch.optim.AdamW(
            trainable, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        warmup = round(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, self.total_steps, warmup, config.min_lr_ratio)
        )
        self.step = 0
        self._order: tuple[int, list[int]] = (-1, [])
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        if config.packing and config.check_packing:
            check_packing_isolation(model, _vocab_size(model, tokenizer))

    # ------------------------------------------------------------------------------------------- data order
    def _epoch_order(self, epoch: int) -> list[int]:
        """The order of the units (examples, or packed rows) in ``epoch``: a function of the seed and epoch."""
        if self._order[0] != epoch:
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.units), generator=gen).tolist())
        return self._order[1]

    def _micro_batches(self, step: int) -> Iterator[Batch]:
        """The micro-batches of optimizer step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        first = k * self.config.grad_accum
        for m in range(first, min(first + self.config.grad_accum, self.micro_per_epoch)):
            units = [self.units[u] for u in order[m * self.config.batch_size : (m + 1) * self.config.batch_size]]
            if self.config.packing:
                yield pack_batch([[self.examples[i] for i in unit] for unit in units], self.pad_id)
            else:
                yield pad_batch([self.examples[unit[0]] for unit in units], self.pad_id)

    # ------------------------------------------------------------------------------------------- training
    def train_step(self) -> StepMetrics:
        """Runs one optimizer step and returns its metrics."""
        if self.done:
            raise RuntimeError(f"training is over ({self.step} of {self.total_steps} steps done)")
        device = next(self.model.parameters()).device
        t0 = time.perf_counter()
        batches = [b.to(device) for b in self._micro_batches(self.step)]
        n_targets = sum(b.n_targets for b in batches)
        self.model.train()
        sums, denom = {"loss": 0.0, "aux": 0.0}, max(n_targets, 1)
        for j in self.dp.share(len(batches)):  # every micro-batch on one rank; a filler (None) counts 0
            b = batches[0 if j is None else j]
            with filler_forward(self.model) if j is None else contextlib.nullcontext():
                nll, aux = batch_losses(self.model, b)
                share = b.n_targets / denom  # weights the per-batch balance loss like the tokens it covers
                loss = nll / denom + self.config.moe_aux_coef * share * aux
                (loss * (0.0 if j is None else self.dp.grad_scale)).backward()
            if j is not None:
                sums["loss"] += nll.item() / denom
                sums["aux"] += share * aux.item()
        sums = self.dp.sum_floats(sums)
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(self.model.parameters(), clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        n_tokens = sum(b.n_tokens for b in batches)
        metrics = StepMetrics(
            step=self.step + 1,
            epoch=self.step // self.steps_per_epoch,
            loss=sums["loss"],
            moe_aux_loss=sums["aux"],
            lr=lr,
            grad_norm=grad_norm,
            n_targets=n_targets,
            n_tokens=n_tokens,
            tokens_per_s=n_tokens / max(time.perf_counter() - t0, 1e-9),
        )
        self.step += 1
        return metrics

    @property
    def done(self) -> bool:
        """Whether every step has run."""
        return self.step >= self.total_steps

    def train(self, until_step: int | None = None) -> list[StepMetrics]:
        """Trains to the end (or until ``until_step`` steps are done); returns the metrics of the steps run.

        ``save_fn`` runs every ``save_every`` steps and once at the end of training.
        """
        stop = self.total_steps if until_step is None else min(until_step, self.total_steps)
        history = []
        with tqdm(total=self.total_steps, initial=self.step, desc="sft", disable=not self.config.progress) as bar:
            while self.step < stop:
                m = self.train_step()
                history.append(m)
                bar.update(1)
                bar.set_postfix(loss=f"{m.loss:.4f}", lr=f"{m.lr:.2e}")
                if self.config.log_every and m.step % self.config.log_every == 0:
                    self.log_fn(m)
                if self.save_fn and (self.done or (self.save_every and m.step % self.save_every == 0)):
                    self.save_fn(self)
        return history

    # ------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self, weights: bool = True) -> dict[str, Any]:
        """Everything needed to resume exactly: model, optimizer, scheduler, step, RNG states, data position.

        Tensors are the live ones; serialise (``torch.save``) or copy before training on.

        Args:
            weights: Include the model's and the optimizer's state (``False``: the rest only, for checkpoints
                that save those two sharded, see :class:`grpo.orchestration.checkpointing.StepCheckpoints`).
        """
        tensors = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()} if weights else {}
        return {
            **tensors,
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "rng": _rng_state(),
            "data": {
                "n_examples": len(self.examples),
                "n_units": len(self.units),
                "seed": self.config.seed,
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a :meth:`state_dict` (without ``model`` and ``optimizer``: the rest only); the data and settings
        must match those it was saved with.

        Raises:
            ValueError: when the data layout (examples, packing, seed, steps) differs from the saved one.
        """
        mine = self.state_dict(weights=False)["data"]
        for key, saved in state["data"].items():
            if mine.get(key) != saved:
                raise ValueError(
                    f"sft state was saved with {key}={saved}, this trainer has {key}={mine.get(key)}; "
                    f"resume with the same data and settings"
                )
        if "model" in state:  # else restored by the caller (a sharded checkpoint)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        _set_rng_state(state["rng"])


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a pad_token_id nor an eos_token_id to pad with")


def _vocab_size(model: torch.nn.Module, tokenizer: Any) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    return int(size) if size else len(tokenizer)
