"""The torch engine on our DeepSeek model: latent-cache decoding vs transformers' generate on the same weights."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from model import DeepSeekConfig, DeepSeekForCausalLM
from rollout.base import SamplingConfig
from rollout.torch_engine import TorchEngine

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [4]]


def tiny_ours(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = DeepSeekConfig.from_preset("tiny", vocab_size=64, eos_token_id=2, bos_token_id=1, pad_token_id=0, **kw)
    return DeepSeekForCausalLM(cfg).eval()


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"])
def test_greedy_equals_transformers_generate_on_same_checkpoint(tmp_path, model_type):
    kw = {} if model_type == "deepseek_v3" else dict(model_type="deepseek_v2", scoring_func="softmax",
                                                     topk_method="group_limited_greedy", norm_topk_prob=False)
    ours = tiny_ours(1, **kw)
    ours.save_pretrained(tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    outs = TorchEngine(ours).generate(PROMPTS, SamplingConfig(n=2, max_tokens=16, temperature=0.0))
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                          eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
        assert outs[2 * i].completion_ids == ref
        assert outs[2 * i + 1].completion_ids == ref  # greedy: both samples of the group agree


def test_sampled_logprobs_equal_forward_logprobs():
    model = tiny_ours(2)
    outs = TorchEngine(model).generate(PROMPTS, SamplingConfig(n=3, max_tokens=12, seed=5))
    for out in outs:
        ids = torch.tensor([out.prompt_ids + out.completion_ids])
        with torch.no_grad():
            logits = model(ids).logits.float()[0, len(out.prompt_ids) - 1:-1]
        ref = logits.log_softmax(-1).gather(-1, torch.tensor(out.completion_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(out.logprobs), ref, atol=1e-4, rtol=0)


def test_update_weights_with_hf_names_matches_fresh_engine():
    old, new = tiny_ours(3), tiny_ours(4)
    engine = TorchEngine(copy.deepcopy(old))
    cfg = SamplingConfig(n=2, max_tokens=10, seed=1)
    stale = [o.completion_ids for o in engine.generate(PROMPTS, cfg)]
    named = list(new.named_hf_weights())
    assert any(".mlp.experts.0.gate_proj.weight" in n for n, _ in named)
    engine.update_weights(named[:10])
    engine.update_weights(named[10:])
    fresh = [o.completion_ids for o in TorchEngine(new).generate(PROMPTS, cfg)]
    assert [o.completion_ids for o in engine.generate(PROMPTS, cfg)] == fresh != stale
