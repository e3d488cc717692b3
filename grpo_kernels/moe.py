"""Mixture-of-experts building blocks: token permutation by expert and a grouped SwiGLU expert MLP.

A routed MoE layer with ``E`` experts and top-``K`` routing runs as

```python
permuted, order, tokens_per_expert = moe_permute(hidden, expert_ids, num_experts)  # [T*K, H]
expert_out = grouped_mlp(permuted, tokens_per_expert, w_gate_up, w_down)          # [T*K, H]
out = moe_unpermute(expert_out, order, routing_weights)                            # [T, H]
```

* ``moe_permute`` sorts the ``T*K`` (token, slot) assignments by expert (stably, so tokens keep their order
  within an expert): ``permuted[i] = hidden[order[i] // K]`` and expert ``e`` owns the contiguous rows
  ``sum(tokens_per_expert[:e]) .. + tokens_per_expert[e]``.
* ``grouped_mlp`` applies expert ``e``'s SwiGLU MLP to its rows:
  ``down_e(silu(x @ gate_e^T) * (x @ up_e^T))`` with ``w_gate_up[e] = [gate_e; up_e]`` (``[2I, H]``, gate rows
  first, as in a fused ``gate_up_proj``) and ``w_down[e]`` ``[H, I]``.
* ``moe_unpermute`` scatters the rows back and mixes each token's K expert outputs with its routing weights:
  ``out[t] = sum_k routing_weights[t, k] * expert_out[position of (t, k)]``.

All three are differentiable (``hidden``, ``expert_out``, ``routing_weights`` and both weights). The
references here are index ops and a loop over experts on contiguous slices; the Triton versions live in
:mod:`grpo_kernels.triton_impl.moe`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grpo_kernels.dispatch import KernelOp


def _check_index_tensor(name: str, t: torch.Tensor, dims: int) -> None:
    if t.dim() != dims or t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be a {dims}-d int64/int32 tensor, got {t.dtype} {tuple(t.shape)}")


def validate_permute_args(hidden: torch.Tensor, expert_ids: torch.Tensor, num_experts: int) -> None:
    """Raises ValueError naming the bad argument of :func:`moe_permute`."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    _check_index_tensor("expert_ids", expert_ids, 2)
    if expert_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"expert_ids must be [T, K] with T={hidden.shape[0]}, got {tuple(expert_ids.shape)}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if expert_ids.numel() and bool(((expert_ids < 0) | (expert_ids >= num_experts)).any()):
        raise ValueError(f"expert_ids must lie in [0, {num_experts})")


def validate_unpermute_args(expert_out: torch.Tensor, order: torch.Tensor, routing_weights: torch.Tensor) -> None:
    """Raises ValueError naming the bad argument of :func:`moe_unpermute`."""
    if routing_weights.dim() != 2 or not routing_weights.is_floating_point():
        raise ValueError(f"routing_weights must be a float [T, K] tensor, got {tuple(routing_weights.shape)}")
    t, k = routing_weights.shape
    _check_index_tensor("order", order, 1)
    if order.shape[0] != t * k:
        raise ValueError(f"order must be [T*K] = [{t * k}], got {tuple(order.shape)}")
    if expert_out.dim() != 2 or expert_out.shape[0] != t * k:
        raise ValueError(f"expert_out must be [T*K, H] with T*K={t * k}, got {tuple(expert_out.shape)}")


def validate_grouped_mlp_args(
    permuted: torch.Tensor, tokens_per_expert: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> None:
    """Raises ValueError naming the bad argument of :func:`grouped_mlp`."""
    if permuted.dim() != 2:
        raise ValueError(f"permuted must be [M, H], got shape {tuple(permuted.shape)}")
    m, h = permuted.shape
    _check_index_tensor("tokens_per_expert", tokens_per_expert, 1)
    e = tokens_per_expert.shape[0]
    if w_gate_up.dim() != 3 or w_gate_up.shape[0] != e or w_gate_up.shape[2] != h or w_gate_up.shape[1] % 2:
        raise ValueError(f"w_gate_up must be [E={e}, 2I, H={h}], got shape {tuple(w_gate_up.shape)}")
    i = w_gate_up.shape[1] // 2
    if tuple(w_down.shape) != (e, h, i):
        raise ValueError(f"w_down must be [E={e}, H={h}, I={i}], got shape {tuple(w_down.shape)}")
    if not (permuted.dtype == w_gate_up.dtype == w_down.dtype) or not permuted.is_floating_point():
        raise ValueError(
            f"permuted, w_gate_up and w_down must share a float dtype, got "
            f"{permuted.dtype}, {w_gate_up.dtype}, {w_down.dtype}"
        )
    if bool((tokens_per_expert < 0).any()) or int(tokens_per_expert.sum()) != m:
        raise ValueError(f"tokens_per_expert must be non-negative and sum to M={m}")


# ---- PyTorch references ----


def torch_moe_permute(
    hidden: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference permutation: a stable sort of the flattened assignments and a row gather."""
    flat = expert_ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat, stable=True)  # [T*K]
    permuted = hidden[order // expert_ids.shape[1]]  # [T*K, H]
    tokens_per_expert = torch.bincount(flat, minlength=num_experts)  # [E]
    return permuted, order, tokens_per_expert


def torch_moe_unpermute(expert_out: torch.Tensor, order: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
    """Reference un-permutation: invert ``order``, gather each token's K rows, mix in fp32."""
    t, k = routing_weights.shape
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device, dtype=order.dtype)  # [T*K]
    acc = torch.promote_types(expert_out.dtype, torch.float32)
    rows = expert_out[inverse].view(t, k, -1).to(acc)  # [T, K, H]
    return (rows * routing_weights.to(acc)[..., None]).sum(1).to(expert_out.dtype)  # [T, H]


def torch_grouped_mlp(
    permuted: torch.Tensor, tokens_per_expert: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """Reference grouped SwiGLU MLP: a loop over experts on contiguous row slices."""
    outs = []
    for e, x in enumerate(permuted.split(tokens_per_expert.tolist())):
        gate, up = (x @ w_gate_up[e].T).chunk(2, dim=-1)  # [m, I] each
        outs.append((F.silu(gate) * up) @ w_down[e].T)  # [m, H]
    return torch.cat(outs) if outs else permuted.new_zeros(permuted.shape)



def naive_moe_layer(
    hidden: torch.Tensor,  # [T, H]
    expert_ids: torch.Tensor,  # [T, K]
    routing_weights: torch.Tensor,  # [T, K]
    w_gate_up: torch.Tensor,  # [E, 2I, H]
    w_down: torch.Tensor,  # [E, H, I]
) -> torch.Tensor:
    """DeepSeek-V3's loop, independent of the three ops: each expert on its tokens, weighted by their gates.

    The reference a whole ``moe_permute -> grouped_mlp -> moe_unpermute`` layer is tested and benchmarked against.

    Returns:
        ``[T, H]``: ``out[t] = sum_k routing_weights[t, k] * mlp_{expert_ids[t, k]}(hidden[t])``.
    """
    y = torch.zeros_like(hidden)
    for e in range(w_gate_up.shape[0]):
        idx, top = torch.where(expert_ids == e)
        gate, up = (hidden[idx] @ w_gate_up[e].T).chunk(2, dim=-1)
        y = y.index_add(0, idx, ((F.silu(gate) * up) @ w_down[e].T) * routing_weights[idx, top, None])
    return y

_PERMUTE = KernelOp("moe_permute", torch_moe_permute, "grpo_kernels.triton_impl.moe:triton_moe_permute")
_UNPERMUTE = KernelOp("moe_unpermute", torch_moe_unpermute, "grpo_kernels.triton_impl.moe:triton_moe_unpermute")
_GROUPED_MLP = KernelOp("grouped_mlp", torch_grouped_mlp, "grpo_kernels.triton_impl.moe:triton_grouped_mlp")


# ---- public entry points ----


def moe_permute(
    hidden: torch.Tensor,  # [T, H]
    expert_ids: torch.Tensor,  # [T, K]
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups token rows by expert.

    Args:
        hidden: Token activations. ``[T, H]``
        expert_ids: The K experts each token is routed to. ``[T, K]`` int, in ``[0, num_experts)``.
        num_experts: E, the number of experts (some may receive no token).

    Returns:
        ``(permuted [T*K, H], order [T*K] int64, tokens_per_expert [E] int64)`` with
        ``permuted[i] = hidden[order[i] // K]``; ``order`` indexes the flattened ``[T*K]`` assignments, sorted
        stably by expert. Differentiable in ``hidden``.

    Raises:
        ValueError: on a bad shape, dtype or expert id.
    """
    validate_permute_args(hidden, expert_ids, num_experts)
    return _PERMUTE(hidden.device, hidden, expert_ids, num_experts)


def moe_unpermute(
    expert_out: torch.Tensor,  # [T*K, H]
    order: torch.Tensor,  # [T*K]
    routing_weights: torch.Tensor,  # [T, K]
) -> torch.Tensor:
    """Returns rows to their tokens and mixes each token's K expert outputs.

    Args:
        expert_out: Expert outputs in permuted order (as :func:`moe_permute` laid them out). ``[T*K, H]``
        order: The ``order`` returned by :func:`moe_permute`. ``[T*K]``
        routing_weights: Gate weight of each (token, slot). ``[T, K]``

    Returns:
        ``out [T, H]`` in ``expert_out``'s dtype, ``out[t] = sum_k routing_weights[t, k] * expert_out[j]``
        where ``order[j] = t*K + k``; mixed in fp32 (float64 for float64). Differentiable in ``expert_out``
        and ``routing_weights``.

    Raises:
        ValueError: on a bad shape or dtype.
    """
    validate_unpermute_args(expert_out, order, routing_weights)
    return _UNPERMUTE(expert_out.device, expert_out, order, routing_weights)


def grouped_mlp(
    permuted: torch.Tensor,  # [M, H]
    tokens_per_expert: torch.Tensor,  # [E]
    w_gate_up: torch.Tensor,  # [E, 2I, H]
    w_down: torch.Tensor,  # [E, H, I]
) -> torch.Tensor:
    """Each expert's SwiGLU MLP on its contiguous rows: ``down_e(silu(gate_e x) * up_e x)``.

    Args:
        permuted: Rows grouped by expert (expert 0's first). ``[M, H]``
        tokens_per_expert: Rows of each expert, summing to M. ``[E]`` int
        w_gate_up: Per expert, the gate projection rows then the up projection rows. ``[E, 2I, H]``
        w_down: Per expert, the down projection. ``[E, H, I]``

    Returns:
        ``[M, H]`` in the input dtype. Differentiable in ``permuted``, ``w_gate_up`` and ``w_down``.

    Raises:
        ValueError: on a bad shape or dtype, or counts that do not sum to M.
    """
    validate_grouped_mlp_args(permuted, tokens_per_expert, w_gate_up, w_down)
    return _GROUPED_MLP(permuted.device, permuted, tokens_per_expert, w_gate_up, w_down)
