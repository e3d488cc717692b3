"""Batches of tokenised examples: padded (one example per row) or packed (several per row).

Targets are shifted per example before batching: ``targets[t]`` is the label of token ``t + 1`` of the same
example and the last token of each example has no target. A row's last token therefore never learns to predict
the next example's first token, and the loss is a plain per-position cross-entropy of ``logits`` against
``targets`` in both layouts.

Packing (the choice made here): examples are placed into rows of at most ``max_length`` tokens by
first-fit-decreasing bin packing; ``position_ids`` restart at 0 for every example (and for the padding at the
end of a row), and ``attention_mask`` is ``None``. Transformers models read restarting positions with no
attention mask as packed sequences and attend only within each one (a block-diagonal causal mask for
eager/SDPA/flex, the variable-length path for flash attention), so no token attends across examples and a
packed batch gives the same loss as the padded one. :func:`check_packing_isolation` verifies this for a given
model before training. A padded batch carries a 2-D ``attention_mask`` (1 on tokens, 0 on padding) and
positions ``0..T-1``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sft.formatting import IGNORE_INDEX, TokenizedExample


@dataclass(frozen=True)
class Batch:
    """Model inputs and per-position targets.

    Attributes:
        input_ids: Token ids.  # [B, T]
        targets: Label of the next token of the same example, ``IGNORE_INDEX`` where none.  # [B, T]
        position_ids: Positions, restarting per example when packed.  # [B, T]
        attention_mask: 1 on tokens and 0 on padding for padded batches; ``None`` for packed ones.  # [B, T]
        n_tokens: Number of real (non-padding) tokens.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    n_tokens: int

    @property
    def n_targets(self) -> int:
        """Number of positions with a target (the tokens the loss averages over)."""
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device``."""
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return Batch(
            self.input_ids.to(device),
            self.targets.to(device),
            self.position_ids.to(device),
            mask,
            self.n_tokens,
        )


def shift_targets(labels: Sequence[int]) -> list[int]:
    """Per-example next-token targets: ``labels[1:]`` followed by ``IGNORE_INDEX``.

    Example:
        >>> shift_targets([-100, 5, 6])
        [5, 6, -100]
    """
    return [*labels[1:], IGNORE_INDEX]


class _MaxTree:
    """A segment tree over bin capacities answering "first bin with room >= x" in O(log n)."""

    def __init__(self, n: int, capacity: int) -> None:
        self.size = 1
        while self.size < n:
            self.size *= 2
        self.tree = [capacity] * (2 * self.size)

    def first_fit(self, x: int) -> int:
        """Index of the first leaf holding at least ``x`` (the root must hold at least ``x``)."""
        k = 1
        while k < self.size:
            k = 2 * k if self.tree[2 * k] >= x else 2 * k + 1
        return k - self.size

    def take(self, i: int, x: int) -> None:
        """Removes ``x`` from leaf ``i`` and updates the maxima above it."""
        k = i + self.size
        self.tree[k] -= x
        k //= 2
        while k:
            self.tree[k] = max(self.tree[2 * k], self.tree[2 * k + 1])
            k //= 2


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Packs items into as few bins of ``capacity`` as first-fit-decreasing finds.

    Items are taken longest first (ties by index) and each goes into the first bin with room.

    Args:
        lengths: Item sizes, each in ``[1, capacity]``.
        capacity: Bin size.

    Returns:
        Bins as lists of item indices, in the order the bins were opened.

    Example:
        >>> first_fit_decreasing([3, 5, 2, 4], capacity=7)
        [[1, 2], [3, 0]]
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    for i, n in enumerate(lengths):
        if not 1 <= n <= capacity:
            raise ValueError(f"item {i} has length {n}, expected 1..{capacity} (truncate examples to max_length)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    tree = _MaxTree(max(len(lengths), 1), capacity)
    bins: list[list[int]] = []
    for i in order:
        b = tree.first_fit(lengths[i])
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        tree.take(b, lengths[i])
    return bins


def pad_batch(examples: Sequence[TokenizedExample], pad_id: int) -> Batch:
    """One example per row, right-padded to the longest.

    Returns:
        A batch with a 2-D attention mask and positions ``0..T-1``.  # [B, T]
    """
    if not examples:
        raise ValueError("cannot batch zero examples")
    width = max(len(ex) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [B, T]
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # [B, T]
    for r, ex in enumerate(examples):
        n = len(ex)
        ids[r, :n] = torch.tensor(ex.input_ids)
        targets[r, :n] = torch.tensor(shift_targets(ex.labels))
        mask[r, :n] = 1
    positions = torch.arange(width).expand(len(examples), width).clone()  # [B, T]
    return Batch(ids, targets, positions, mask, int(mask.sum()))


def pack_batch(rows: Sequence[Sequence[TokenizedExample]], pad_id: int) -> Batch:
    """Several examples per row, concatenated, right-padded to the longest row.

    Args:
        rows: The examples of each row (e.g. from :func:`first_fit_decreasing`).
        pad_id: Token id of the padding.

    Returns:
        A batch with ``attention_mask=None`` and positions restarting at every example and at the padding.
    """
    if not rows or any(not r for r in rows):
        raise ValueError("cannot pack an empty row")
    width = max(sum(len(ex) for ex in r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    positions = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    n_tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            n = len(ex)
            ids[r, at : at + n] = torch.tensor(ex.input_ids)
            targets[r, at : at + n] = torch.tensor(shift_targets(ex.labels))
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
        n_tokens += at
    return Batch(ids, targets, positions, None, n_tokens)


def forward_kwargs(model: torch.nn.Module) -> dict[str, object]:
    """Extra forward arguments for training: ``use_cache=False`` when the model takes it.

    A key/value cache is useless in training, and transformers models skip packed-sequence detection when one
    is created.
    """
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def model_forward(model: torch.nn.Module, batch: Batch) -> Any:
    """``model(input_ids=..., attention_mask=..., position_ids=...)`` for a batch; the output has ``.logits``."""
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        **forward_kwargs(model),
    )


@torch.no_grad()
def check_packing_isolation(model: torch.nn.Module, vocab_size: int, *, rel_tol: float = 0.1) -> None:
    """Checks that the model keeps packed examples apart (see the module docstring).

    Runs two short random sequences ``a`` and ``b`` alone, packed (positions restarting, no mask) and joined
    as one sequence, in eval mode. The packed logits of ``b`` must match its logits alone far more closely
    than the joined ones do: ``err(packed) <= rel_tol * err(joined)``.

    Raises:
        RuntimeError: when the model lets packed examples see each other.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randint(0, vocab_size, (1, 6), generator=gen)  # [1, 6]
        b = torch.randint(0, vocab_size, (1, 5), generator=gen)  # [1, 5]
        ab = torch.cat([a, b], dim=1)  # [1, 11]

        def run(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            batch = Batch(ids.to(device), ids.to(device), pos.to(device), None, ids.numel())
            return model_forward(model, batch).logits.float()[0, -b.shape[1] :]  # [5, V]

        alone = run(b, torch.arange(5)[None])
        packed = run(ab, torch.cat([torch.arange(6), torch.arange(5)])[None])
        joined = run(ab, torch.arange(11)[None])
    finally:
        model.train(was_training)
    err = (packed - alone).abs().max().item()
    leak = (joined - alone).abs().max().item()
    if err > rel_tol * leak:
        raise RuntimeError(
            f"{type(model).__name__} lets packed examples attend to each other (packed vs alone logits "
            f"differ by {err:.3g}, joined vs alone by {leak:.3g}); it must treat restarting "
            f"position_ids with attention_mask=None as separate sequences. Train with packing=False"
        )
