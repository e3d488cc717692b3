"""The torch rollout engine on a tiny transformers Llama (and on our model in test_rollout_latent.py)."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rollout.base import SamplingConfig, build_engine
from rollout.sampling import filter_logits, sample_next
from rollout.torch_engine import TorchEngine, left_pad

EOS = 1
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [3]]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=EOS, pad_token_id=0,
                      bos_token_id=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def hf_greedy(model, prompt, max_new):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def forward_logprobs(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits.float()
    lp = logits[0, len(prompt) - 1:-1].log_softmax(-1)
    return lp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_left_pad_positions():
    ids, mask, pos = left_pad([[4, 5, 6], [7]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], 0, torch.device("cpu"))


def test_filter_logits_top_k_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 (<0.7, keep), 0.3 (mass before = 0.5 < 0.7, keep), 0.15 (mass before 0.8 >= 0.7, drop)
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.4)).tolist() == [[False, True, True, True]]


def test_sample_next_greedy_and_logprob():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    tok, lp = sample_next(logits, temperature=0.0)
    assert tok.tolist() == [1]
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[:, 1])
    tok, lp = sample_next(logits, temperature=2.0, top_k=1)
    assert tok.tolist() == [1]
    torch.testing.assert_close(lp, torch.log_softmax(logits / 2.0, -1)[:, 1])


def test_greedy_equals_transformers_generate():
    model = tiny_llama()
    engine = build_engine("torch", model)
    outs = engine.generate(PROMPTS, SamplingConfig(n=1, max_tokens=12, temperature=0.0))
    assert len(outs) == len(PROMPTS)
    for prompt, out in zip(PROMPTS, outs):
        expected = hf_greedy(model, prompt, 12)
        assert out.completion_ids == expected
        assert out.finish_reason == ("stop" if expected[-1] == EOS else "length")
        assert out.prompt_ids == prompt


def test_sampling_logprobs_equal_forward_and_groups_are_contiguous():
    model = tiny_llama(1)
    engine = TorchEngine(model)
    outs = engine.generate(PROMPTS, SamplingConfig(n=3, max_tokens=10, temperature=1.0, seed=7))
    assert [o.prompt_index for o in outs] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    for out in outs:
        assert len(out.logprobs) == len(out.completion_ids) >= 1
        ref = forward_logprobs(model, out.prompt_ids, out.completion_ids)
        torch.testing.assert_close(torch.tensor(out.logprobs), ref, atol=1e-4, rtol=0)
        if out.finish_reason == "stop":
            assert out.completion_ids[-1] == EOS and EOS not in out.completion_ids[:-1]
        else:
            assert len(out.completion_ids) == 10


def test_seed_reproducible_and_different_seeds_differ():
    engine = TorchEngine(tiny_llama(2))
    cfg = SamplingConfig(n=4, max_tokens=8, temperature=1.0, seed=3)
    a = [o.completion_ids for o in engine.generate(PROMPTS, cfg)]
    b = [o.completion_ids for o in engine.generate(PROMPTS, cfg)]
    c = [o.completion_ids for o in engine.generate(PROMPTS, SamplingConfig(n=4, max_tokens=8, seed=4))]
    assert a == b
    assert a != c


def test_update_weights_matches_fresh_engine():
    old, new = tiny_llama(3), tiny_llama(4)
    engine = TorchEngine(copy.deepcopy(old))
    cfg = SamplingConfig(n=2, max_tokens=8, temperature=1.0, seed=0)
    before = [o.completion_ids for o in engine.generate(PROMPTS, cfg)]
    # pushed in two buckets, as a trainer does
    items = list(new.state_dict().items())
    engine.update_weights(items[: len(items) // 2])
    engine.update_weights(items[len(items) // 2:])
    after = [o.completion_ids for o in engine.generate(PROMPTS, cfg)]
    fresh = [o.completion_ids for o in TorchEngine(new).generate(PROMPTS, cfg)]
    assert after == fresh
    assert after != before
    with pytest.raises(KeyError, match=r"TorchEngine\[LlamaForCausalLM\] has no tensor 'nope'"):
        engine.update_weights([("nope", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"holds 'lm_head.weight' with shape \(48, 32\), the trainer sends \(2, 2\)"):
        engine.update_weights([("lm_head.weight", torch.zeros(2, 2))])


def test_sleep_frees_weights_and_wake_up_restores_them():
    engine = TorchEngine(tiny_llama())
    cfg = SamplingConfig(n=2, max_tokens=6, seed=0)
    before = [o.completion_ids for o in engine.generate(PROMPTS, cfg)]
    engine.sleep()
    assert engine.is_sleeping
    assert all(p.numel() == 0 for p in engine.model.parameters())  # CPU: weights went to a scratch folder
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, SamplingConfig())
    engine.wake_up()
    assert [o.completion_ids for o in engine.generate(PROMPTS, cfg)] == before


def test_unknown_engine_name():
    with pytest.raises(KeyError, match="unknown rollout engine 'nope'"):
        build_engine("nope", None)


def test_sampling_config_validation():
    with pytest.raises(ValueError, match=r"SamplingConfig.top_p must be a float in \(0, 1\]"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="SamplingConfig.n"):
        SamplingConfig(n=0)


def test_min_tokens_suppresses_stop_tokens_but_not_their_logprobs():
    model = tiny_llama(5)
    def favour_eos(module, args, out):  # make eos the most likely token everywhere
        out[..., EOS] += 20.0
        return out

    model.lm_head.register_forward_hook(favour_eos)
    engine = TorchEngine(model)
    free = engine.generate(PROMPTS, SamplingConfig(max_tokens=6, temperature=0.0))
    assert all(o.completion_ids == [EOS] for o in free)
    forced = engine.generate(PROMPTS, SamplingConfig(max_tokens=6, temperature=0.0, min_tokens=6))
    for out in forced:
        assert len(out.completion_ids) == 6 and EOS not in out.completion_ids
        ref = forward_logprobs(model, out.prompt_ids, out.completion_ids)
        torch.testing.assert_close(torch.tensor(out.logprobs), ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingConfig(max_tokens=4, min_tokens=5)
