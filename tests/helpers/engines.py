"""Rollout engines with a deliberate fault or a distinct class, named by dotted path in test recipes."""

from __future__ import annotations

from rollout.torch_engine import TorchEngine


class CorruptingEngine(TorchEngine):
    """An engine that silently loses part of an update (a stale tensor), as a buggy backend would."""

    victim = "model.layers.1.mlp.down_proj.weight"

    def update_weights(self, named_tensors):
        super().update_weights((n, t + 1e-3 if n == self.victim else t) for n, t in named_tensors)


class ProbeOnlyEngine(TorchEngine):
    """An engine that cannot report fingerprints (as vLLM): the guard compares probe log-probs instead."""

    def weight_fingerprints(self, names):
        return None


class StaleProbeEngine(ProbeOnlyEngine):
    """A probe-checked engine that drops every update: it keeps sampling from its old weights."""

    def update_weights(self, named_tensors):
        list(named_tensors)


class OtherEngine(TorchEngine):
    """A registered-by-path engine: a stage that names it must get workers running it."""
