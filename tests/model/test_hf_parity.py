"""Our model vs transformers' DeepseekV2/V3ForCausalLM on the same weights, through save/load both ways."""

import warnings

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from model import DeepSeekConfig, DeepSeekForCausalLM
from model.modeling import rope_inv_freq

TOL = dict(atol=1e-4, rtol=1e-4)
BASE = dict(vocab_size=64, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, initializer_range=0.1,
            max_position_embeddings=64)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}
V2 = dict(model_type="deepseek_v2", scoring_func="softmax", norm_topk_prob=False)
CONFIGS = {
    "v3": dict(q_lora_rank=48, n_group=4, topk_group=2, routed_scaling_factor=2.5),
    "v3-yarn-rotate-half-no-q-lora": dict(q_lora_rank=None, n_group=2, topk_group=1, rope_interleave=False,
                                          rope_scaling=YARN),
    "v3-yarn-interleave-2-dense": dict(q_lora_rank=48, n_group=1, topk_group=1, first_k_dense_replace=2,
                                       rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "v2-greedy-no-q-lora": dict(**V2, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1),
    "v2-group-limited-yarn": dict(**V2, q_lora_rank=48, topk_method="group_limited_greedy", n_group=4,
                                  topk_group=2, routed_scaling_factor=2.0, rope_scaling=YARN),
}


def _ours(name, seed=0):
    torch.manual_seed(seed)
    model = DeepSeekForCausalLM(DeepSeekConfig(**{**BASE, **CONFIGS[name]})).eval()
    for gate in model.model.moe_gates().values():
        if gate.e_score_correction_bias is not None:
            gate.e_score_correction_bias.normal_(0.0, 0.1)  # make the bias matter for selection
    return model


def _hf_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (3, 20), generator=g)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :11] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _compare(ours, hf):
    ids, mask, pos = _inputs()
    with torch.no_grad():
        assert_close(ours(ids).logits, hf(ids).logits, **TOL)
        a = ours(ids, attention_mask=mask, position_ids=pos).logits
        b = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert_close(a[real], b[real], **TOL)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ours_saved_loads_in_transformers_unchanged(name, tmp_path):
    ours = _ours(name)
    ours.save_pretrained(tmp_path)
    hf = _hf_load(tmp_path)
    expected = "DeepseekV2ForCausalLM" if ours.config.model_type == "deepseek_v2" else "DeepseekV3ForCausalLM"
    assert type(hf).__name__ == expected
    assert hf.config.num_key_value_heads == ours.config.num_attention_heads
    _compare(ours, hf)


@pytest.mark.parametrize("name", ["v3", "v3-yarn-rotate-half-no-q-lora", "v2-group-limited-yarn"])
def test_transformers_saved_loads_in_ours(name, tmp_path):
    cfg = DeepSeekConfig(**{**BASE, **CONFIGS[name]})
    cls = DeepseekV2Config if cfg.model_type == "deepseek_v2" else DeepseekV3Config
    hf_cfg = cls(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("model_type", "architectures")})
    torch.manual_seed(1)
    hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    hf.save_pretrained(tmp_path)
    ours = DeepSeekForCausalLM.from_pretrained(tmp_path)
    assert ours.config == cfg
    _compare(ours, hf)


def test_tied_embeddings_round_trip_through_transformers(tmp_path):
    torch.manual_seed(0)
    ours = DeepSeekForCausalLM(DeepSeekConfig(**{**BASE, **CONFIGS["v3"]}, tie_word_embeddings=True)).eval()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ours.save_pretrained(tmp_path / "a")
    hf = _hf_load(tmp_path / "a")
    _compare(ours, hf)
    hf.save_pretrained(tmp_path / "b")
    back = DeepSeekForCausalLM.from_pretrained(tmp_path / "b")
    assert back.lm_head.weight is back.model.embed_tokens.weight
    _compare(back, hf)


@pytest.mark.parametrize("scaling", [None, YARN, {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}])
def test_rope_frequencies_match_transformers(scaling):
    cfg = DeepSeekConfig(**{**BASE, **CONFIGS["v3"]}, rope_scaling=scaling)
    hf_cfg = DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    ours, factor = rope_inv_freq(cfg)
    if scaling is None:
        want = 1.0 / (cfg.rope_theta ** (torch.arange(0, 8, 2).float() / 8))
        assert factor == 1.0
    else:
        want, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
        assert factor == pytest.approx(hf_factor)
    assert_close(ours, want)
