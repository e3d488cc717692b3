"""Recording and replaying our MoE model's expert choices (rollout routing replay, R3).

An engine and a trainer route a token to different experts often enough (other kernels, another dtype, a router
a step apart) that MoE policy-gradient runs drift apart from what was sampled. R3 records, for every token and
every MoE layer, the experts the engine chose, and the trainer's forward routes by them: the gate weights are
still computed from the current router's scores over the replayed experts, so the router keeps learning.

* :func:`recorded_routing`: within the block every gate appends each forward's chosen expert ids ``[N, K]``
  (a shared-prefix forward's in the rows' order, as the unshared forward would choose them), or with
  ``own=True`` the router's own choice even where it is replaying;
* :func:`replayed_routing`: within the block every gate routes by ``routing [B, T, M, K]`` (``M`` MoE layers in
  order; -1 where nothing was recorded: the gate chooses itself). The forward must run the rows' first
  positions as ``[B, T', D]`` (not the shared-prefix layout);
* :func:`routing_disagreement`: how many (token, layer) decisions a recording and an engine's routing differ on,
  the engine-trainer routing mismatch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from model.modeling import Gate


def moe_gates(model: nn.Module) -> list[Gate]:
    """The model's routers, in layer order."""
    return [m for m in model.modules() if isinstance(m, Gate)]


@contextlib.contextmanager
def recorded_routing(model: nn.Module, own: bool = False) -> Iterator[list[list[Tensor]]]:
    """Yields one list per MoE layer that collects every forward's chosen expert ids ``[N, K]`` (``own``: the
    router's own choice, before any replay)."""
    gates = moe_gates(model)
    logs: list[list[Tensor]] = [[] for _ in gates]
    for gate, log in zip(gates, logs):
        gate.recording, gate.recording_own = log, own
    try:
        yield logs
    finally:
        for gate in gates:
            gate.recording, gate.recording_own = None, False


def routing_disagreement(logs: list[list[Tensor]], routing: Tensor) -> tuple[int, int]:
    """``(decisions that differ, decisions compared)`` between one forward's recording and ``routing``.

    A decision is one token's set of ``K`` experts in one MoE layer; it is compared where ``routing`` has one
    (not -1: padding, or positions the engine never ran), the order of the ``K`` experts aside.

    Args:
        logs: :func:`recorded_routing`'s lists after one forward over the rows' first ``T'`` positions: one
            ``[N * T', K]`` per MoE layer.
        routing: The engine's choices for the same rows ``[N, T, M, K]`` (``T >= T'``), -1 where unknown.
    """
    differ = compared = 0
    n = routing.shape[0]
    for j, log in enumerate(logs):
        got = log[-1].view(n, -1, log[-1].shape[-1]).sort(-1).values.cpu()  # [N, T', K]
        want = routing[:, : got.shape[1], j].sort(-1).values  # [N, T', K]
        known = (want >= 0).all(-1)
        differ += int(((got != want).any(-1) & known).sum())
        compared += int(known.sum())
    return differ, compared


@contextlib.contextmanager
def replayed_routing(model: nn.Module, routing: Tensor) -> Iterator[None]:
    """Routes every forward within the block by ``routing [B, T, M, K]`` (-1: the gate chooses).

    Raises:
        ValueError: when ``routing`` has another number of MoE layers or experts per token than the model.
    """
    gates = moe_gates(model)
    if routing.dim() != 4 or routing.shape[2] != len(gates) or (gates and routing.shape[3] != gates[0].top_k):
        raise ValueError(f"router replay: routing of shape {tuple(routing.shape)} does not fit a model with "
                         f"{len(gates)} MoE layers of top-{gates[0].top_k if gates else '?'} routing "
                         f"(expected [B, T, {len(gates)}, K])")
    for j, gate in enumerate(gates):
        gate.replay = routing[:, :, j]
    try:
        yield
    finally:
        for gate in gates:
            gate.replay = None
