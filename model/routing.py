"""Recording and replaying our MoE model's expert choices (rollout routing replay, R3).

An engine and a trainer route a token to different experts often enough (other kernels, another dtype, a router
a step apart) that MoE policy-gradient runs drift apart from what was sampled. R3 records, for every token and
every MoE layer, the experts the engine chose, and the trainer's forward routes by them: the gate weights are
still computed from the current router's scores over the replayed experts, so the router keeps learning.

* :func:`recorded_routing`: within the block every gate appends each forward's chosen expert ids ``[N, K]``;
* :func:`replayed_routing`: within the block every gate routes by ``routing [B, T, M, K]`` (``M`` MoE layers in
  order; -1 where nothing was recorded: the gate chooses itself). The forward must run the rows' first
  positions as ``[B, T', D]`` (not the shared-prefix layout).
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
def recorded_routing(model: nn.Module) -> Iterator[list[list[Tensor]]]:
    """Yields one list per MoE layer that collects every forward's chosen expert ids ``[N, K]``."""
    gates = moe_gates(model)
    logs: list[list[Tensor]] = [[] for _ in gates]
    for gate, log in zip(gates, logs):
        gate.recording = log
    try:
        yield logs
    finally:
        for gate in gates:
            gate.recording = None


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
