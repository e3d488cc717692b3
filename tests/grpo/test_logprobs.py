import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from grpo.logprobs import lm_head_of, sequence_logprobs

V, H = 64, 32
TINY = dict(
    vocab_size=V,
    hidden_size=H,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)


def _llama(**kw):
    return LlamaForCausalLM(LlamaConfig(**TINY, **kw))


def _qwen2_tied():
    return Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True))


def _llama_biased_head():
    model = _llama()
    model.lm_head = nn.Linear(H, V, bias=True)
    nn.init.normal_(model.lm_head.bias, std=0.5)
    return model


def _cohere_scaled():
    return CohereForCausalLM(CohereConfig(**TINY, logit_scale=0.5))


def _granite_scaled():
    return GraniteForCausalLM(GraniteConfig(**TINY, logits_scaling=2.0))


def _gemma2_softcapped():
    return Gemma2ForCausalLM(Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=2.0))


def _gpt2():  # learned absolute positions: left padding only works with position ids from the mask
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=64))


MODELS = {
    "llama": _llama,
    "gpt2": _gpt2,
    "qwen2-tied": _qwen2_tied,
    "llama-bias": _llama_biased_head,
    "cohere-scale": _cohere_scaled,
    "granite-scale": _granite_scaled,
    "gemma2-softcap": _gemma2_softcapped,
}

PROMPT_LENS, COMPLETION_LENS = [4, 2, 3], [3, 5, 1]
P, T = max(PROMPT_LENS), max(COMPLETION_LENS)


def _build(name):
    torch.manual_seed(0)
    model = MODELS[name]().float().eval()
    with torch.no_grad():  # larger weights than the default init, so logits spread and the test is sharp
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model


def _batch(seed=0):
    """Left-padded prompts then right-padded completions: ``input_ids, attention_mask [N, P + T]``."""
    gen = torch.Generator().manual_seed(seed)
    n = len(PROMPT_LENS)
    ids = torch.zeros(n, P + T, dtype=torch.long)
    mask = torch.zeros(n, P + T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(PROMPT_LENS, COMPLETION_LENS, strict=True)):
        ids[i, P - p : P + c] = torch.randint(1, V, (p + c,), generator=gen)
        mask[i, P - p : P + c] = 1
    return ids, mask


def _reference(model, ids, mask, temperature=1.0):
    """Full logits from the model's forward (same position ids), log-softmax gathered: ``[N, T]`` each."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float() / temperature
    logp_all = torch.log_softmax(logits[:, P - 1 : -1], dim=-1)  # [N, T, V]
    logp = logp_all.gather(-1, ids[:, P:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    valid = mask[:, P:].bool()
    return logp * valid, entropy * valid


@pytest.mark.parametrize("name", MODELS)
def test_matches_full_logits_values_and_gradients(name):
    model = _build(name)
    ids, mask = _batch()
    logp, entropy = sequence_logprobs(model, ids, mask, T, with_entropy=True, chunk_size=4, temperature=0.7)
    want_logp, want_entropy = _reference(model, ids, mask, temperature=0.7)
    assert logp.shape == (3, T) and logp.dtype == torch.float32
    assert_close(logp, want_logp, atol=1e-5, rtol=1e-5)
    assert_close(entropy, want_entropy, atol=1e-5, rtol=1e-5)
    assert torch.equal(logp[~mask[:, P:].bool()], torch.zeros(int((mask[:, P:] == 0).sum())))
    assert (logp[mask[:, P:].bool()] < 0).all()

    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(logp.sum() + 0.1 * entropy.sum(), params)
    ref_grads = torch.autograd.grad(want_logp.sum() + 0.1 * want_entropy.sum(), params)
    for (pname, _), g, rg in zip(model.named_parameters(), grads, ref_grads, strict=True):
        assert_close(g, rg, atol=1e-5, rtol=1e-4, msg=lambda m, pname=pname: f"{pname}: {m}")
    assert all(g.abs().sum() > 0 for g in grads)  # every parameter receives gradient


def test_head_kinds_are_detected():
    assert lm_head_of(_build("llama")).fused and lm_head_of(_build("llama")).bias is None
    assert lm_head_of(_build("llama-bias")).bias is not None
    assert lm_head_of(_build("cohere-scale")).logit_scale == 0.5
    assert lm_head_of(_build("granite-scale")).logit_scale == 0.5
    assert not lm_head_of(_build("gemma2-softcap")).fused


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_left_padding_equals_unpadded_sequences(name):
    model = _build(name)
    ids, mask = _batch(seed=1)
    logp, _ = sequence_logprobs(model, ids, mask, T)
    for i, (p, c) in enumerate(zip(PROMPT_LENS, COMPLETION_LENS, strict=True)):
        alone = ids[i : i + 1, P - p : P + c]
        single, _ = sequence_logprobs(model, alone, torch.ones_like(alone), c)
        assert_close(logp[i, :c], single[0], atol=1e-5, rtol=1e-5)


def test_slice_window_and_chunk_sizes_agree():
    model = _build("qwen2-tied")
    ids, mask = _batch(seed=2)
    base, base_ent = sequence_logprobs(model, ids, mask, T, with_entropy=True)
    sliced, _ = sequence_logprobs(model, ids, mask, slice(P, P + T))
    assert torch.equal(sliced, base)
    shorter, _ = sequence_logprobs(model, ids, mask, slice(P, P + T - 1))
    assert_close(shorter, base[:, : T - 1])
    for chunk in (1, 3, 100):
        lp, ent = sequence_logprobs(model, ids, mask, T, chunk_size=chunk, with_entropy=True)
        assert_close(lp, base) and assert_close(ent, base_ent)
    assert sequence_logprobs(model, ids, mask, T)[1] is None


def test_bad_inputs_are_named():
    model = _build("llama")
    ids, mask = _batch()
    cases = [
        (dict(logits_to_keep=0), r"logits_to_keep=0 must select a non-empty completion"),
        (dict(logits_to_keep=P + T), r"after at least one context token .* got positions \[0, 9\)"),
        (dict(logits_to_keep=slice(P, None, 2)), "slice must have step 1"),
        (dict(logits_to_keep=2.0), "logits_to_keep must be an int or a slice, got float"),
        (dict(mask=mask[:, 1:]), r"attention_mask must have input_ids' shape \(3, 9\), got \(3, 8\)"),
        (dict(ids=ids.float()), r"input_ids must be integer \[N, L\]"),
        (dict(temperature=0.0), "temperature must be > 0"),
    ]
    for kw, msg in cases:
        args = dict(ids=ids, mask=mask, logits_to_keep=T) | kw
        temperature = args.pop("temperature", 1.0)
        with pytest.raises(ValueError, match=msg):
            sequence_logprobs(model, *args.values(), temperature=temperature)
    with pytest.raises(ValueError, match="has no LM head"):
        sequence_logprobs(model.model, ids, mask, T)


def test_rows_sharing_a_prompt_run_it_once_with_the_same_results(monkeypatch):
    from model import DeepSeekConfig, DeepSeekForCausalLM
    from model.modeling import DeepSeekModel

    torch.manual_seed(0)
    model = DeepSeekForCausalLM(DeepSeekConfig.from_preset("tiny", vocab_size=V)).train()
    routed = []
    next(iter(model.model.moe_gates().values())).register_forward_hook(
        lambda mod, inp, out: routed.append(inp[0].shape[0]))
    ids, mask = _batch(seed=3)
    ids, mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)  # each prompt sampled twice
    ids[1::2, P:] = torch.randint(1, V, (3, T), generator=torch.Generator().manual_seed(4)) * mask[1::2, P:]
    params = list(model.parameters())

    def run():
        logp, entropy = sequence_logprobs(model, ids, mask, T, with_entropy=True)
        return logp, entropy, torch.autograd.grad(logp.sum() + 0.1 * entropy.sum(), params)

    shared = run()
    monkeypatch.setattr(DeepSeekModel, "supports_shared_prefix", False)
    plain = run()
    # three distinct prompts ran once each (the last completion token predicts nothing scored: not run)
    assert routed == [3 * P + 6 * (T - 1), 6 * (P + T - 1)]
    assert_close(shared[0], plain[0], atol=1e-5, rtol=1e-5)
    assert_close(shared[1], plain[1], atol=1e-5, rtol=1e-5)
    for (pname, _), g, rg in zip(model.named_parameters(), shared[2], plain[2], strict=True):
        assert_close(g, rg, atol=1e-5, rtol=1e-4, msg=lambda m, pname=pname: f"{pname}: {m}")


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2-tied", "llama-bias", "cohere-scale", "granite-scale"])
def test_transformers_models_run_a_shared_prompt_once_with_the_same_results(name):
    model = _build(name)  # eval mode: GPT-2's dropout would make any two passes differ
    ids, mask = _batch(seed=5)
    ids, mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)  # each prompt sampled three times
    gen = torch.Generator().manual_seed(6)
    ids[:, P:] = torch.randint(1, V, (9, T), generator=gen) * mask[:, P:]
    tokens = []
    model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: tokens.append(inp[0].numel()))
    params = list(model.parameters())

    def run(share):
        tokens.clear()
        logp, entropy = sequence_logprobs(model, ids, mask, T, with_entropy=True, share_prompts=share)
        return logp, entropy, torch.autograd.grad(logp.sum() + 0.1 * entropy.sum(), params), list(tokens)

    shared, plain = run(True), run(False)
    assert shared[3] == [3 * P, 9 * (T - 1)] and plain[3] == [9 * (P + T - 1)]  # three distinct prompts, once each
    assert_close(shared[0], plain[0], atol=1e-5, rtol=1e-5)
    assert_close(shared[1], plain[1], atol=1e-5, rtol=1e-5)
    for (pname, _), g, rg in zip(model.named_parameters(), shared[2], plain[2], strict=True):
        assert_close(g, rg, atol=1e-5, rtol=1e-4, msg=lambda m, pname=pname: f"{pname}: {m}")
    want_logp, _ = _reference(model, ids, mask)
    assert_close(shared[0], want_logp, atol=1e-5, rtol=1e-5)
