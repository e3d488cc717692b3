"""Training a reward model on preference pairs with the Bradley-Terry loss.

A preference pair is ``{"prompt", "chosen", "rejected"}`` (strings or chat-message lists, as for rewards). Each
step scores the ``N`` chosen and ``N`` rejected conversations in one forward pass of ``2N`` sequences and
minimises ``mean(-log sigmoid(r_chosen - r_rejected))`` with AdamW. Evaluation reports pairwise accuracy: the
share of held-out pairs with ``r_chosen > r_rejected`` (ties count as wrong).

On N trainer ranks (``dp``, the model sharded by :func:`model.distributed.shard_model`) every rank takes its
share of each batch's pairs (pair ``j`` on rank ``j % N``) and one forward per batch (a rank with no pair runs a
zero-weight filler); its loss is its pairs' share of the batch mean, so the ranks together take one rank's step.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from model.distributed import (
    SINGLE,
    DataParallel,
    clip_grad_norm,
    filler_forward,
    reshard,
    shard_model,
    whole_state,
)
from rewards.reward_model import RewardModel, bradley_terry_loss, encode, score_pairs_texts

PAIR_FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class RewardModelTrainConfig:
    """Reward-model training.

    Attributes:
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        epochs: Passes over the training pairs.
        batch_size: Pairs per step.
        max_length: Longest sequence (longer ones keep their last tokens).
        max_grad_norm: Gradient-norm clip (``None``: no clipping).
        warmup_steps: Linear learning-rate warm-up steps.
        seed: Seed of the score head's initialisation (from a checkpoint) and of the shuffling.
        device: Where to train.
        eval_batch_size: Pairs per evaluation batch.
        progress: Show a tqdm progress bar.
    """

    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 8
    max_length: int = 1024
    max_grad_norm: float | None = 1.0
    warmup_steps: int = 0
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = 32
    progress: bool = True

    def __post_init__(self) -> None:
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("epochs", "batch_size", "max_length", "eval_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")


@dataclass(frozen=True)
class RewardModelTrainResult:
    """What training did.

    Attributes:
        losses: Loss of every step.
        steps: Optimizer steps taken.
        seconds: Wall time of the training loop.
        eval_accuracy: Pairwise accuracy on the held-out pairs (``None`` without them).
        eval_accuracy_before: The same before training.
    """

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    eval_accuracy: float | None = None
    eval_accuracy_before: float | None = None


def check_pairs(pairs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validates preference pairs (rows of a list or a ``datasets.Dataset``).

    Raises:
        ValueError: naming the row and the missing field.
    """
    rows = []
    for i, row in enumerate(pairs):
        missing = [f for f in PAIR_FIELDS if f not in row]
        if missing:
            raise ValueError(f"preference pair {i} lacks field(s) {missing}; expected {list(PAIR_FIELDS)}")
        rows.append({f: row[f] for f in PAIR_FIELDS})
    if not rows:
        raise ValueError("no preference pairs")
    return rows


def _pair_batch(model: RewardModel, tokenizer: Any, batch: Sequence[Mapping[str, Any]], max_length: int,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and rejected sides of a batch, ``[N]`` each, in one forward pass."""
    prompts = [row["prompt"] for row in batch] * 2
    completions = [row["chosen"] for row in batch] + [row["rejected"] for row in batch]
    texts, templated = score_pairs_texts(tokenizer, prompts, completions)
    ids, mask = encode(tokenizer, texts, max_length, add_special_tokens=not templated)  # [2N, T]
    device = next(model.parameters()).device
    scores = model(ids.to(device), mask.to(device))  # [2N]
    return scores[: len(batch)], scores[len(batch) :]


def _my_pairs(batch: Sequence[Mapping[str, Any]], dp: DataParallel) -> tuple[list[Mapping[str, Any]], bool]:
    """This rank's pairs of ``batch`` and whether it has none (then it runs the first pair as a filler)."""
    mine = [batch[j] for j in dp.share(len(batch)) if j is not None]
    return (mine, False) if mine else ([batch[0]], True)


@torch.no_grad()
def pairwise_accuracy(model: RewardModel, tokenizer: Any, pairs: Iterable[Mapping[str, Any]],
                      batch_size: int = 32, max_length: int = 1024, dp: DataParallel = SINGLE) -> float:
    """Share of pairs with ``r_chosen > r_rejected`` (on N ranks: each scores its share, the counts are summed)."""
    rows = check_pairs(pairs)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(rows), batch_size):
            mine, filler = _my_pairs(rows[start : start + batch_size], dp)
            with filler_forward(model) if filler else contextlib.nullcontext():
                chosen, rejected = _pair_batch(model, tokenizer, mine, max_length)
            correct += 0 if filler else int((chosen > rejected).sum())
    finally:
        model.train(was_training)
        reshard(model)  # no backward follows: a sharded model's root would stay gathered
    return dp.sum_floats({"correct": float(correct)})["correct"] / len(rows)


def _step(model: RewardModel, tokenizer: Any, batch: list[dict[str, Any]], config: RewardModelTrainConfig,
          dp: DataParallel, optimizer: torch.optim.Optimizer) -> float:
    """One optimizer step on ``batch`` (this rank's share of its pairs); this rank's share of the batch loss."""
    mine, filler = _my_pairs(batch, dp)
    optimizer.zero_grad(set_to_none=True)
    with filler_forward(model) if filler else contextlib.nullcontext():
        chosen, rejected = _pair_batch(model, tokenizer, mine, config.max_length)
        # this rank's pairs' share of the batch mean
        loss = bradley_terry_loss(chosen, rejected) * (0.0 if filler else len(mine) / len(batch))
        (loss * dp.grad_scale).backward()
    clip_grad_norm(model.parameters(), config.max_grad_norm or float("inf"))
    optimizer.step()
    return float(loss.detach())


def train_reward_model(model: RewardModel, tokenizer: Any, train_pairs: Iterable[Mapping[str, Any]],
                       config: RewardModelTrainConfig | None = None,
                       eval_pairs: Iterable[Mapping[str, Any]] | None = None,
                       dp: DataParallel = SINGLE,
                       on_step: Callable[[int, int, float], None] | None = None) -> RewardModelTrainResult:
    """Trains ``model`` in place with the Bradley-Terry loss and AdamW.

    Args:
        model: The reward model (moved to ``config.device``; sharded over ``dp``'s ranks when there are several).
        tokenizer: Its tokenizer.
        train_pairs: Preference pairs ``{"prompt", "chosen", "rejected"}``.
        config: Hyper-parameters.
        eval_pairs: Held-out pairs for pairwise accuracy before and after training.
        dp: The trainer ranks (every rank passes the same pairs and takes its share of each batch).
        on_step: Called after every step with ``(step, total_steps, loss)`` (1-based step).

    Returns:
        Per-step losses, steps, time and held-out accuracy.
    """
    config = config or RewardModelTrainConfig()
    rows = check_pairs(train_pairs)
    held_out = check_pairs(eval_pairs) if eval_pairs is not None else None
    model.to(config.device)

    def accuracy() -> float | None:
        if not held_out:
            return None
        return pairwise_accuracy(model, tokenizer, held_out, config.eval_batch_size, config.max_length, dp)

    before = accuracy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    steps_per_epoch = math.ceil(len(rows) / config.batch_size)
    rng = random.Random(config.seed)
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    progress = config.progress and dp.is_main
    total = config.epochs * steps_per_epoch
    with tqdm(total=total, desc="reward model", disable=not progress) as bar:
        for _ in range(config.epochs):
            order = list(range(len(rows)))
            rng.shuffle(order)
            for first in range(0, len(order), config.batch_size):
                batch = [rows[i] for i in order[first : first + config.batch_size]]
                loss = _step(model, tokenizer, batch, config, dp, optimizer)
                scheduler.step()
                losses.append(dp.sum_floats({"loss": loss})["loss"])
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if on_step is not None:
                    on_step(len(losses), total, losses[-1])
    seconds = time.perf_counter() - start
    after = accuracy()
    return RewardModelTrainResult(losses=losses, steps=len(losses), seconds=seconds, eval_accuracy=after,
                                  eval_accuracy_before=before)


def train_reward_model_from_checkpoint(init_path: str | Path, output_path: str | Path,
                                       train_pairs: Iterable[Mapping[str, Any]],
                                       config: RewardModelTrainConfig | None = None,
                                       eval_pairs: Iterable[Mapping[str, Any]] | None = None,
                                       loader: str = "auto", dp: DataParallel = SINGLE,
                                       on_step: Callable[[int, int, float], None] | None = None
                                       ) -> RewardModelTrainResult:
    """Initialises a reward model from a causal-LM checkpoint, trains it, saves it (with the tokenizer).

    On N ranks (``dp``) every rank calls it: the model is sharded over them, and rank 0 gathers the trained
    weights tensor by tensor into a whole copy and saves it.
    """
    config = config or RewardModelTrainConfig()
    tokenizer = AutoTokenizer.from_pretrained(str(init_path))
    model = RewardModel.from_causal_lm(init_path, loader=loader, seed=config.seed)
    if dp.enabled:
        shard_model(model.to(config.device), dp)
    result = train_reward_model(model, tokenizer, train_pairs, config, eval_pairs, dp, on_step)
    if dp.enabled:
        state = whole_state(model, keep=dp.is_main)
        if dp.is_main:
            model = RewardModel.from_causal_lm(init_path, loader=loader, seed=config.seed)
            model.load_state_dict(state)
    if dp.is_main:
        model.save_pretrained(output_path, tokenizer=tokenizer)
    dp.barrier()
    return result
