"""The model through the Triton kernels: routed experts through the grouped GEMM and absorbed decoding through
``mla_decode`` give the reference path's outputs and gradients (Triton's interpreter on CPU, compiled on CUDA)."""

import torch

import grpo_kernels
from grpo_kernels.dispatch import BACKEND_ENV
from model import DeepSeekConfig, DeepSeekForCausalLM, LatentKVCache
from tests.helpers.kernels import (
    DEVICE,
    fresh_process_test,
    needs_triton,
    require_triton_in_process,
)


def tiny_moe(seed=0):
    torch.manual_seed(seed)
    config = DeepSeekConfig.from_preset("tiny", vocab_size=40, hidden_size=32, moe_intermediate_size=16,
                                        intermediate_size=48, num_hidden_layers=2, q_lora_rank=16, kv_lora_rank=16,
                                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                                        initializer_range=0.1)
    return DeepSeekForCausalLM(config).to(DEVICE)


def forward_backward(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    (logits.float().square().mean()).backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@needs_triton
def test_triton_model_training_step_equals_the_reference(monkeypatch):
    require_triton_in_process()
    model = tiny_moe().train()
    ids = torch.randint(1, 40, (3, 11), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    calls = []
    original = grpo_kernels.grouped_mlp
    monkeypatch.setattr(grpo_kernels, "grouped_mlp", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setenv(BACKEND_ENV, "torch")
    want_logits, want_grads = forward_backward(model, ids)
    assert not calls  # the reference path: the per-expert loop
    monkeypatch.setenv(BACKEND_ENV, "triton")
    got_logits, got_grads = forward_backward(model, ids)
    assert len(calls) == sum(layer.is_moe for layer in model.model.layers)  # every MoE layer, through the kernel
    torch.testing.assert_close(got_logits, want_logits, atol=2e-4, rtol=2e-4)
    assert want_grads.keys() == got_grads.keys()
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, atol=2e-4, rtol=2e-3, msg=lambda m, name=name: f"{name}: {m}")


@needs_triton
def test_triton_decoding_through_mla_decode_equals_the_reference(monkeypatch):
    require_triton_in_process()
    model = tiny_moe(1).eval()
    prompt = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    mask = torch.ones(2, 6, dtype=torch.long, device=DEVICE)
    mask[1, :2] = 0  # a left-padded row

    def decode(backend):
        monkeypatch.setenv(BACKEND_ENV, backend)
        cache = LatentKVCache(model.config, batch_size=2, max_len=12, dtype=torch.float32, device=DEVICE)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(prompt, attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1]
            steps, m, pos = [logits], mask, positions[:, -1:] + 1
            for _ in range(4):
                token = steps[-1].argmax(-1, keepdim=True)
                m = torch.cat([m, m.new_ones(2, 1)], dim=1)
                steps.append(model(token, attention_mask=m, position_ids=pos, cache=cache).logits[:, -1])
                pos = pos + 1
        return torch.stack(steps, 1)

    calls = []
    original = grpo_kernels.mla_decode
    monkeypatch.setattr(grpo_kernels, "mla_decode", lambda *a, **k: calls.append(1) or original(*a, **k))
    want = decode("torch")
    assert not calls
    got = decode("triton")
    assert len(calls) == 4 * model.config.num_hidden_layers  # every decode step of every layer
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


test_triton_in_fresh_process = fresh_process_test(__file__)
