import pytest
import torch

from model import DeepSeekConfig, DeepSeekForCausalLM, count_parameters

# (total, active) from the papers: DeepSeek-V2 (arXiv 2405.04434) and DeepSeek-V3 (arXiv 2412.19437)
PUBLISHED = {
    "deepseek-v2": (236e9, 21e9),
    "deepseek-v2-lite": (15.7e9, 2.4e9),
    "deepseek-v3": (671e9, 37e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_match_the_papers_within_3_percent(name):
    total, active = count_parameters(DeepSeekConfig.from_preset(name))
    want_total, want_active = PUBLISHED[name]
    assert abs(total / want_total - 1) < 0.03, total
    assert abs(active / want_active - 1) < 0.03, active


def test_v3_with_mtp_matches_the_released_checkpoint():
    cfg = DeepSeekConfig.from_preset("deepseek-v3")
    total, active = count_parameters(cfg)
    total_mtp, active_mtp = count_parameters(cfg, include_mtp=True)
    assert active_mtp == active
    assert abs(total_mtp / 685e9 - 1) < 0.03  # the model card's 671B main model + 14B MTP module
    assert abs((total_mtp - total) / 14e9 - 1) < 0.05


def _meta_count(cfg):
    with torch.device("meta"):
        model = DeepSeekForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"q_lora_rank": None, "attention_bias": True},
        {"moe_layer_freq": 2, "n_shared_experts": 0},
        {"model_type": "deepseek_v2", "scoring_func": "softmax", "topk_method": "greedy", "n_shared_experts": 2,
         "first_k_dense_replace": 2},
    ],
)
def test_formula_equals_a_meta_device_build(overrides):
    cfg = DeepSeekConfig.from_preset("tiny", **overrides)
    total, _ = count_parameters(cfg)
    assert total == _meta_count(cfg)


def test_v2_lite_formula_equals_a_meta_device_build():
    cfg = DeepSeekConfig.from_preset("deepseek-v2-lite", num_hidden_layers=3)
    assert count_parameters(cfg)[0] == _meta_count(cfg)


def test_active_by_hand_for_tiny():
    cfg = DeepSeekConfig.from_preset("tiny")
    d, v = 128, 128
    attn = (d * 96 + 96 + 96 * 4 * 48) + (d * (64 + 16) + 64) + 64 * 4 * (32 + 32) + 4 * 32 * d
    expert = 3 * d * 192
    dense_layer = attn + 2 * d + 3 * d * 512
    moe_active = attn + 2 * d + 8 * d + expert * (1 + 2)  # gate, 1 shared + top-2 routed
    moe_total = attn + 2 * d + 8 * d + expert * (1 + 8)
    assert count_parameters(cfg) == (v * d + v * d + d + dense_layer + 3 * moe_total,
                                     d + v * d + d + dense_layer + 3 * moe_active)
