"""vLLM's routed experts as our rollouts' ``routing`` (rollout routing replay with the vLLM engine).

vLLM 0.32 returns the experts it routed every token to when the engine is built with
``enable_return_routed_experts=True``; only its V2 model runner (``VLLM_USE_V2_MODEL_RUNNER=1``, Triton, so a
GPU) captures them, and prefix caching must stay on (vLLM keeps the routing of cached prompt blocks with them).
``CompletionOutput.routed_experts`` is then a numpy array ``[S, L, K]``, laid out as vLLM 0.32's capturer and
output connector write it (``model_executor/layers/fused_moe/routed_experts_capturer.py``,
``distributed/aux_output_connector/connector.py``):

* rows: the tokens vLLM ran a forward over, from ``SamplingParams.routed_experts_prompt_start`` (0 here: the
  whole prompt) to the sequence's last token but one (the last sampled token is never fed back), so
  ``S = len(prompt) + len(completion) - 1``;
* ``L``: every decoder layer (``num_hidden_layers``), indexed by the layer number in the module name; the dense
  layers' rows are never written (zeros);
* ``K``: the ``num_experts_per_tok`` routed experts of the token, as logical expert ids (captured before any
  expert-parallel load balancing maps them to physical replicas), uint8 or uint16.

Ours is ``[S, M, K]`` over the ``M`` MoE layers in order (:attr:`rollout.base.Rollout.routing`), so the
conversion keeps the MoE layers' columns and checks every size it relies on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


def moe_layer_indices(config: Mapping[str, Any]) -> list[int]:
    """The decoder layers of a DeepSeek-V2/V3 ``config.json`` that are MoE layers: ``i >= first_k_dense_replace``
    and ``i % moe_layer_freq == 0`` (when the model has routed experts at all), as vLLM's and our model build
    them."""
    if not config.get("n_routed_experts"):
        return []
    first, freq = int(config.get("first_k_dense_replace", 0)), int(config.get("moe_layer_freq", 1))
    return [i for i in range(int(config["num_hidden_layers"])) if i >= first and i % freq == 0]


def routing_from_vllm(routed: Any, prompt_len: int, completion_len: int, moe_layers: Sequence[int], num_layers: int,
                      top_k: int) -> torch.Tensor:
    """vLLM's ``CompletionOutput.routed_experts`` ``[S, L, K]`` as our ``[S, M, K]`` routing (int64).

    Args:
        routed: The array vLLM returned for one sample (None when it returned none).
        prompt_len: The sample's prompt tokens.
        completion_len: Its completion tokens.
        moe_layers: The MoE layers' indices among the ``num_layers`` decoder layers (:func:`moe_layer_indices`).
        num_layers: ``num_hidden_layers``.
        top_k: ``num_experts_per_tok``.

    Raises:
        RuntimeError: when vLLM returned nothing, or an array of another shape than ``[prompt_len +
            completion_len - 1, num_layers, top_k]``: the layout is not the one the replay relies on.
    """
    want = (prompt_len + completion_len - 1, num_layers, top_k)
    if routed is None:
        raise RuntimeError("vLLM returned no routed experts for a sample; build the engine with "
                           "enable_return_routed_experts=True (vLLM's V2 model runner, VLLM_USE_V2_MODEL_RUNNER=1)")
    array = np.asarray(routed)
    if array.shape != want:
        raise RuntimeError(f"vLLM's routed experts have shape {array.shape}, expected {want} (prompt + completion "
                           f"- 1 tokens, every decoder layer, top-k): this vLLM lays them out otherwise than 0.32, "
                           f"so they cannot be replayed")
    return torch.from_numpy(array[:, list(moe_layers)].astype(np.int64))
