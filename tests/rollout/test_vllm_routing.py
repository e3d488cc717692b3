"""vLLM's routed experts ``[S, L, K]`` (every decoder layer) as our rollouts' ``[S, M, K]`` MoE-layer routing."""

import numpy as np
import pytest
import torch

from model import DeepSeekConfig, DeepSeekForCausalLM
from model.routing import moe_gates, recorded_routing
from rollout.vllm_routing import moe_layer_indices, routing_from_vllm


def test_the_moe_layers_of_a_config():
    assert moe_layer_indices({"num_hidden_layers": 4, "n_routed_experts": 8, "first_k_dense_replace": 1}) == [1, 2, 3]
    assert moe_layer_indices({"num_hidden_layers": 6, "n_routed_experts": 8, "first_k_dense_replace": 1,
                              "moe_layer_freq": 2}) == [2, 4]
    assert moe_layer_indices({"num_hidden_layers": 4, "n_routed_experts": None}) == []


def test_the_moe_layers_are_the_ones_our_model_builds():
    for overrides in ({}, {"first_k_dense_replace": 2}, {"num_hidden_layers": 6, "moe_layer_freq": 2}):
        config = DeepSeekConfig.from_preset("tiny", vocab_size=32, **overrides)
        model = DeepSeekForCausalLM(config)
        assert moe_layer_indices(config.to_hf_dict()) == sorted(model.model.moe_gates())


def test_vllm_layout_becomes_ours():
    """A sequence routed by our model, written as vLLM 0.32 returns it, comes back as our engine records it."""
    torch.manual_seed(0)
    config = DeepSeekConfig.from_preset("tiny", vocab_size=32)
    model = DeepSeekForCausalLM(config).eval()
    prompt, completion = [3, 4, 5, 6], [7, 8, 9]
    ids = torch.tensor([prompt + completion])
    with torch.no_grad(), recorded_routing(model) as logs:
        model(input_ids=ids)
    ours = torch.stack([log[0] for log in logs], dim=1)[: len(prompt) + len(completion) - 1]  # [S, M, K]
    layers = moe_layer_indices(config.to_hf_dict())
    vllm = np.zeros((ours.shape[0], config.num_hidden_layers, config.num_experts_per_tok), dtype=np.uint8)
    vllm[:, layers] = ours.numpy()  # the dense layers' rows stay zero
    got = routing_from_vllm(vllm, len(prompt), len(completion), layers, config.num_hidden_layers,
                            config.num_experts_per_tok)
    assert got.dtype == torch.int64 and torch.equal(got, ours)
    assert len(moe_gates(model)) == got.shape[1]


def test_other_shapes_and_missing_routing_are_refused():
    layers = [1, 2, 3]
    good = np.zeros((6, 4, 2), dtype=np.uint8)
    assert routing_from_vllm(good, 4, 3, layers, 4, 2).shape == (6, 3, 2)
    with pytest.raises(RuntimeError, match=r"shape \(7, 4, 2\), expected \(6, 4, 2\)"):
        routing_from_vllm(np.zeros((7, 4, 2), dtype=np.uint8), 4, 3, layers, 4, 2)  # the last token too
    with pytest.raises(RuntimeError, match=r"shape \(6, 3, 2\), expected \(6, 4, 2\)"):
        routing_from_vllm(np.zeros((6, 3, 2), dtype=np.uint8), 4, 3, layers, 4, 2)  # MoE layers only
    with pytest.raises(RuntimeError, match="returned no routed experts.*enable_return_routed_experts=True"):
        routing_from_vllm(None, 4, 3, layers, 4, 2)
