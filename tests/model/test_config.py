import dataclasses

import pytest
import torch

from model import DeepSeekConfig
from model.config import PRESETS

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    cfg = DeepSeekConfig.from_preset(name)
    assert cfg.num_experts_per_tok <= cfg.n_routed_experts


def test_tiny_preset_shape_and_override():
    cfg = DeepSeekConfig.from_preset("tiny", vocab_size=111)
    assert cfg.vocab_size == 111
    assert cfg.model_type == "deepseek_v3" and cfg.scoring_func == "sigmoid" and cfg.topk_method == "noaux_tc"
    assert cfg.first_k_dense_replace == 1 and cfg.q_lora_rank is not None and cfg.n_group > 1
    assert [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)] == [False, True, True, True]
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        DeepSeekConfig.from_preset("huge")
    with pytest.raises(ValueError, match=r"unknown DeepSeekConfig fields \['vocab'\]"):
        DeepSeekConfig.from_preset("tiny", vocab=3)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"topk_method": "best"}, r"topk_method: expected one of 'greedy', 'group_limited_greedy', 'noaux_tc'"),
        ({"scoring_func": "tanh"}, r"scoring_func: expected one of 'softmax', 'sigmoid', got 'tanh'"),
        ({"n_routed_experts": 6}, r"n_routed_experts \(6\) must be divisible by n_group \(4\)"),
        ({"topk_group": 5}, r"topk_group \(5\) must be at most n_group \(4\)"),
        ({"num_experts_per_tok": 5}, r"num_experts_per_tok \(5\) exceeds the 4 experts reachable"),
        ({"hidden_size": 0}, r"hidden_size: expected an integer >= 1, got 0"),
        ({"kv_lora_rank": -3}, r"kv_lora_rank: expected an integer >= 1, got -3"),
        ({"q_lora_rank": 0}, r"q_lora_rank: expected an integer >= 1, got 0"),
        ({"qk_rope_head_dim": 7}, r"qk_rope_head_dim: expected an even number"),
        ({"first_k_dense_replace": 9}, r"first_k_dense_replace: expected at most num_hidden_layers \(4\)"),
        ({"hidden_act": "swish"}, r"hidden_act: expected one of"),
        ({"model_type": "llama"}, r"model_type: expected one of 'deepseek_v2', 'deepseek_v3', got 'llama'"),
        ({"scoring_func": "softmax"}, r"scoring_func='softmax' is not what model_type 'deepseek_v3' implements"),
        ({"n_group": 8, "topk_group": 4, "num_experts_per_tok": 2},
         r"'noaux_tc' scores a group by its top-2 experts"),
        ({"rms_norm_eps": 0.0}, r"rms_norm_eps: expected a positive number"),
        ({"routed_scaling_factor": -1.0}, r"routed_scaling_factor: expected a positive number"),
        ({"pad_token_id": 128}, r"pad_token_id: expected None or an id in \[0, vocab_size=128\)"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_scaling\['type'\]: expected one of 'yarn'"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}},
         r"rope_scaling\['original_max_position_embeddings'\]: required"),
        ({"rope_scaling": {**YARN, "alpha": 1}}, r"rope_scaling: unknown keys \['alpha'\]"),
        ({"rope_scaling": {**YARN, "factor": 0.5}}, r"rope_scaling\['factor'\]: expected >= 1"),
    ],
)
def test_invalid_configs_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        DeepSeekConfig(**changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"scoring_func": "sigmoid"}, r"scoring_func='sigmoid' is not what model_type 'deepseek_v2' implements"),
        ({"topk_method": "noaux_tc"}, r"topk_method='noaux_tc' is not what model_type 'deepseek_v2'"),
        ({"rope_interleave": False}, r"rope_interleave=False is not what model_type 'deepseek_v2'"),
        ({"hidden_size": 130}, r"hidden_size \(130\) must be divisible by num_attention_heads \(4\)"),
    ],
)
def test_v2_rejects_what_transformers_v2_does_not_build(changes, message):
    v2 = dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy")
    DeepSeekConfig(**v2)  # valid as is
    with pytest.raises(ValueError, match=message):
        DeepSeekConfig(**{**v2, **changes})


def test_group_limited_reachable_experts():
    base = dict(model_type="deepseek_v2", scoring_func="softmax", n_routed_experts=8, n_group=4)
    DeepSeekConfig(**base, topk_method="group_limited_greedy", topk_group=1, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="exceeds the 2 experts reachable"):
        DeepSeekConfig(**base, topk_method="group_limited_greedy", topk_group=1, num_experts_per_tok=3)
    DeepSeekConfig(**base, topk_method="greedy", topk_group=1, num_experts_per_tok=8)  # greedy ignores groups


def test_config_is_frozen_and_replace_validates():
    cfg = DeepSeekConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vocab_size = 3
    assert cfg.replace(vocab_size=300).vocab_size == 300
    with pytest.raises(ValueError, match="n_group"):
        cfg.replace(n_group=3)


def test_rope_scaling_alias_is_normalised():
    cfg = DeepSeekConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    assert cfg.rope_scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


def test_softmax_scale_with_yarn_mscale_all_dim():
    cfg = DeepSeekConfig(rope_scaling=YARN)
    m = 0.1 * 0.707 * torch.log(torch.tensor(4.0)).item() + 1.0
    assert cfg.softmax_scale() == pytest.approx(48 ** -0.5 * m * m)
    assert DeepSeekConfig().softmax_scale() == pytest.approx(48 ** -0.5)


def test_kv_cache_bytes_per_token_formula_and_mha_ratio():
    cfg = DeepSeekConfig.from_preset("deepseek-v2")
    assert cfg.kv_cache_elements_per_token() == 60 * (512 + 64)
    assert cfg.kv_cache_bytes_per_token(torch.bfloat16) == 60 * 576 * 2
    assert cfg.kv_cache_bytes_per_token(torch.float32) == 60 * 576 * 4
    mha = 2 * cfg.num_attention_heads * cfg.qk_nope_head_dim * cfg.num_hidden_layers  # 2 n_h d_h l
    assert cfg.kv_cache_elements_per_token() / mha == pytest.approx(576 / 32768)
    # the paper: d_c = 4 d_h and d_h^R = d_h / 2 make MLA's cache that of GQA with 2.25 groups
    assert (cfg.kv_lora_rank + cfg.qk_rope_head_dim) / (2 * cfg.qk_nope_head_dim) == 2.25


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_dict_round_trip(name):
    cfg = DeepSeekConfig.from_preset(name)
    d = cfg.to_hf_dict()
    assert d["num_key_value_heads"] == cfg.num_attention_heads
    assert d["architectures"] == [{"deepseek_v2": "DeepseekV2ForCausalLM",
                                   "deepseek_v3": "DeepseekV3ForCausalLM"}[cfg.model_type]]
    for key in ("topk_method", "scoring_func", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob",
                "first_k_dense_replace", "moe_layer_freq", "rope_theta", "rope_scaling", "rope_parameters"):
        assert key in d
    assert d["rope_parameters"]["rope_theta"] == cfg.rope_theta
    if cfg.rope_scaling is not None:
        assert d["rope_scaling"]["type"] == "yarn" and d["rope_parameters"]["rope_type"] == "yarn"
        assert d["rope_parameters"]["factor"] == cfg.rope_scaling["factor"]
    assert DeepSeekConfig.from_hf_dict(d) == cfg


def test_from_hf_dict_reads_transformers_and_deepseek_layouts():
    cfg = DeepSeekConfig.from_preset("deepseek-v2", num_hidden_layers=2)
    d = cfg.to_hf_dict()
    # transformers 5 writes only rope_parameters; DeepSeek writes only rope_theta / rope_scaling
    hf5 = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_theta")}
    assert DeepSeekConfig.from_hf_dict(hf5) == cfg
    legacy = {k: v for k, v in d.items() if k != "rope_parameters"}
    legacy.update(auto_map={"AutoConfig": "configuration_deepseek.DeepseekV2Config"}, aux_loss_alpha=0.003)
    back = DeepSeekConfig.from_hf_dict(legacy)
    assert back == cfg and back.extra == {"aux_loss_alpha": 0.003}  # remote-code pointers are dropped
    assert back.to_hf_dict()["aux_loss_alpha"] == 0.003


def test_from_hf_dict_defaults_and_errors():
    v3 = {k: v for k, v in DeepSeekConfig.from_preset("deepseek-v3").to_hf_dict().items()
          if k not in ("topk_method", "scoring_func", "num_nextn_predict_layers")}
    v3["num_mtp_layers"] = 2
    cfg = DeepSeekConfig.from_hf_dict(v3)  # transformers' V3 config has no topk_method / scoring_func
    assert (cfg.topk_method, cfg.scoring_func, cfg.num_nextn_predict_layers) == ("noaux_tc", "sigmoid", 2)
    v2 = DeepSeekConfig.from_preset("deepseek-v2-lite").to_hf_dict()
    v2.update(n_group=None, topk_group=None)  # transformers' V2 default
    assert (DeepSeekConfig.from_hf_dict(v2).n_group, DeepSeekConfig.from_hf_dict(v2).topk_group) == (1, 1)
    with pytest.raises(ValueError, match="model_type: expected one of deepseek_v2, deepseek_v3, got 'llama'"):
        DeepSeekConfig.from_hf_dict({**v2, "model_type": "llama"})
    with pytest.raises(ValueError, match=r"lacks required keys \['kv_lora_rank'\]"):
        DeepSeekConfig.from_hf_dict({k: v for k, v in v2.items() if k != "kv_lora_rank"})


def test_transformers_reads_our_config_dict():
    from transformers import DeepseekV2Config, DeepseekV3Config

    for cls, name in ((DeepseekV3Config, "deepseek-v3"), (DeepseekV2Config, "deepseek-v2")):
        ours = DeepSeekConfig.from_preset(name)
        d = ours.to_hf_dict()
        hf = cls(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
        assert hf.num_key_value_heads == ours.num_attention_heads
        assert hf.rope_parameters["rope_type"] == "yarn"
        assert hf.rope_parameters["factor"] == 40 and hf.rope_parameters["rope_theta"] == 10000.0
        assert hf.rope_parameters["mscale_all_dim"] == ours.rope_scaling["mscale_all_dim"]
        assert hf.first_k_dense_replace == ours.first_k_dense_replace
