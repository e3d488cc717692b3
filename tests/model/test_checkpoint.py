import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from model import CheckpointError, DeepSeekConfig, DeepSeekForCausalLM, build_tokenizer
from model.checkpoint import expected_hf_shapes, save_pretrained


def _model(**overrides):
    torch.manual_seed(0)
    return DeepSeekForCausalLM(DeepSeekConfig.from_preset("tiny", num_hidden_layers=2, **overrides)).eval()


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert_close(sa[name], sb[name], atol=0, rtol=0)


def test_round_trip_with_tokenizer(tmp_path):
    model = _model()
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias.normal_()
    tok = build_tokenizer()
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    back = DeepSeekForCausalLM.from_pretrained(tmp_path / "ckpt")
    _assert_same_weights(model, back)
    assert back.config == model.config
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["torch_dtype"] == "float32"
    names = load_file(tmp_path / "ckpt" / "model.safetensors").keys()
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert not any(n.endswith("gate_up_proj") for n in names)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "ckpt")("1+2")["input_ids"] == tok("1+2")["input_ids"]


def test_save_overwrites_atomically_and_leaves_no_temp_folders(tmp_path):
    a, b = _model(), _model(vocab_size=96)
    a.save_pretrained(tmp_path / "ckpt")
    b.save_pretrained(tmp_path / "ckpt")
    assert DeepSeekForCausalLM.from_pretrained(tmp_path / "ckpt").config.vocab_size == 96
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]

    class Broken:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        a.save_pretrained(tmp_path / "ckpt", tokenizer=Broken())
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the old checkpoint survives, no debris
    assert DeepSeekForCausalLM.from_pretrained(tmp_path / "ckpt").config.vocab_size == 96


def test_sharded_save_and_load(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_same_weights(model, DeepSeekForCausalLM.from_pretrained(tmp_path))


def test_dtype_and_device_on_load(tmp_path):
    model = _model().to(torch.bfloat16)
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    back = DeepSeekForCausalLM.from_pretrained(tmp_path)
    assert back.dtype == torch.bfloat16
    assert back.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert DeepSeekForCausalLM.from_pretrained(tmp_path, dtype="float32", device="cpu").dtype == torch.float32
    with pytest.raises(ValueError, match="dtype: expected one of float32, float16, bfloat16"):
        DeepSeekForCausalLM.from_pretrained(tmp_path, dtype="int8")


def _rewrite_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        DeepSeekForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="is not a folder"):
        DeepSeekForCausalLM.from_pretrained(tmp_path / "nope")


def test_unknown_model_type(tmp_path):
    _model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type: expected one of deepseek_v2, deepseek_v3, got 'llama'"):
        DeepSeekForCausalLM.from_pretrained(tmp_path)


def test_invalid_config_value(tmp_path):
    _model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["topk_group"] = 9
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"topk_group \(9\) must be at most n_group \(4\)"):
        DeepSeekForCausalLM.from_pretrained(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    _model().save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): 'model.layers.1.mlp.experts.3.up_proj.weight'"):
        DeepSeekForCausalLM.from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    _model().save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): 'model.layers.0.mlp.extra.weight'"):
        DeepSeekForCausalLM.from_pretrained(tmp_path)


def test_wrong_shape_names_tensor_expected_and_got(tmp_path):
    _model().save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(7)}))
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' has shape \[7\], expected \[128\]"):
        DeepSeekForCausalLM.from_pretrained(tmp_path)


def test_mtp_layers_and_rotary_tables_are_skipped(tmp_path):
    model = _model(num_nextn_predict_layers=1)
    model.save_pretrained(tmp_path)

    def add(t):
        t["model.layers.2.eh_proj.weight"] = torch.zeros(128, 256)  # V3's MTP layer sits after the last layer
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)

    _rewrite_weights(tmp_path, add)
    _assert_same_weights(model, DeepSeekForCausalLM.from_pretrained(tmp_path))


def test_named_hf_weights_and_load_hf_weights_round_trip():
    src, dst = _model(), _model()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    named = list(src.named_hf_weights())
    assert {n: tuple(t.shape) for n, t in named} == expected_hf_shapes(src.config, DeepSeekForCausalLM)
    dst.load_hf_weights(named)
    _assert_same_weights(src, dst)
    with pytest.raises(KeyError, match="has no tensor 'nope.weight'"):
        dst.load_hf_weights([("nope.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"'model.norm.weight' expects shape \(128,\), got \(3,\)"):
        dst.load_hf_weights([("model.norm.weight", torch.zeros(3))])
