import math

import pytest
import torch
from torch.testing import assert_close

from model import DeepSeekConfig, DeepSeekForCausalLM
from model.modeling import EXPERT_IMPLS, AttentionMask, Experts, Gate, MoE, balance_losses

V2 = dict(model_type="deepseek_v2", scoring_func="softmax")


def _gate_with_logits(cfg, logits):
    """A gate whose logits for the input ``e_0`` are ``logits`` (hidden_size = 1 would be too small for MLA)."""
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = torch.tensor(logits)
    x = torch.zeros(1, cfg.hidden_size)
    x[0, 0] = 1.0
    return gate, x


def _logit(p):
    return math.log(p / (1 - p))


def test_noaux_tc_selects_with_bias_but_weights_come_from_unbiased_scores():
    cfg = DeepSeekConfig(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
                         routed_scaling_factor=2.5, norm_topk_prob=True)
    s = [0.9, 0.1, 0.8, 0.7, 0.2, 0.3, 0.6, 0.65]
    gate, x = _gate_with_logits(cfg, [_logit(p) for p in s])
    # groups score top-2 sums: g0 = 1.0, g1 = 1.5, g2 = 0.5, g3 = 1.25 -> g1, g3; best two there: 2 (0.8), 3 (0.7)
    # (expert 0 has the highest score but its group loses)
    r = gate(x)
    assert sorted(r.indices[0].tolist()) == [2, 3]
    w = dict(zip(r.indices[0].tolist(), r.weights[0].tolist(), strict=True))
    assert w[2] == pytest.approx(2.5 * 0.8 / 1.5) and w[3] == pytest.approx(2.5 * 0.7 / 1.5)
    # a bias of +0.5 on expert 6: g3 = 1.1 + 0.65 = 1.75 > g1 = 1.5; best two: 6 (1.1), 2 (0.8)
    gate.e_score_correction_bias[6] = 0.5
    r = gate(x)
    assert sorted(r.indices[0].tolist()) == [2, 6]
    w = dict(zip(r.indices[0].tolist(), r.weights[0].tolist(), strict=True))
    assert w[6] == pytest.approx(2.5 * 0.6 / 1.4) and w[2] == pytest.approx(2.5 * 0.8 / 1.4)
    # probs for the balance losses: sigmoid scores normalised per token
    assert_close(r.probs[0], torch.tensor(s) / sum(s))


def test_group_limited_greedy_and_greedy_by_hand():
    logits = [2.0, 0.0, 1.9, 1.85, 1.95, 0.1, 0.2, 0.3]
    probs = torch.tensor(logits).softmax(-1)
    cfg = DeepSeekConfig(**V2, topk_method="group_limited_greedy", n_routed_experts=8, n_group=4, topk_group=2,
                         num_experts_per_tok=3, norm_topk_prob=False, routed_scaling_factor=16.0)
    gate, x = _gate_with_logits(cfg, logits)
    # group maxima: g0 = 2.0, g1 = 1.9, g2 = 1.95, g3 = 0.3 -> g0, g2; top-3 of {0: 2.0, 1: 0.0, 4: 1.95, 5: 0.1}
    r = gate(x)
    assert sorted(r.indices[0].tolist()) == [0, 4, 5]
    assert_close(r.weights[0].sort().values, (16.0 * probs[[0, 4, 5]]).sort().values)
    greedy = DeepSeekConfig(**V2, topk_method="greedy", n_routed_experts=8, n_group=1, topk_group=1,
                            num_experts_per_tok=3, norm_topk_prob=True, routed_scaling_factor=2.0)
    gate, x = _gate_with_logits(greedy, logits)
    r = gate(x)  # plain top-3: 0 (2.0), 4 (1.95), 2 (1.9); renormalised (the original V2 semantics), then scaled
    assert sorted(r.indices[0].tolist()) == [0, 2, 4]
    p = probs[[0, 2, 4]]
    assert_close(r.weights[0].sort().values, (2.0 * p / p.sum()).sort().values)


def test_balance_losses_by_hand():
    # sequence 0: two real tokens then one pad; sequence 1: one real token
    probs = torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.5, 0.2, 0.2, 0.1], [0.0, 0.0, 0.0, 1.0]],
                          [[0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]]])
    indices = torch.tensor([[[0, 2], [0, 1], [3, 2]],
                            [[3, 1], [0, 1], [0, 1]]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    out = balance_losses(probs, indices, valid, n_group=2, topk_group=2)
    # seq 0 (E=4, K=2, T=2): counts [2,1,1,0] -> f = 4/(2*2) * counts = [2,1,1,0]; P = [.45,.25,.2,.1]
    #   L_exp = .9 + .25 + .2 = 1.35; f' = [1.5, .5], P' = [.7, .3] -> L_dev = 1.05 + .15 = 1.2
    #   devices hit: token 0 -> {0, 1}, token 1 -> {0}: f'' = 2/(2*2) * [2, 1] = [1, .5] -> L_comm = .7 + .15 = .85
    # seq 1 (T=1): counts [0,1,0,1] -> f = 2 * counts = [0,2,0,2]; P = [.1,.1,.1,.7]
    #   L_exp = .2 + 1.4 = 1.6; f' = [1, 1], P' = [.2, .8] -> L_dev = 1.0
    #   devices hit: {1, 0}: f'' = 2/(2*1) * [1, 1] = [1, 1] -> L_comm = 1.0
    assert out["expert_balance"].item() == pytest.approx((1.35 + 1.6) / 2)
    assert out["device_balance"].item() == pytest.approx((1.2 + 1.0) / 2)
    assert out["comm_balance"].item() == pytest.approx((0.85 + 1.0) / 2)


def test_balance_loss_is_one_when_perfectly_balanced_and_differentiable():
    probs = torch.full((1, 4, 4), 0.25, requires_grad=True)
    indices = torch.tensor([[[0, 1], [2, 3], [0, 2], [1, 3]]])
    out = balance_losses(probs, indices, torch.ones(1, 4, dtype=torch.bool), n_group=2, topk_group=2)
    assert out["expert_balance"].item() == pytest.approx(1.0)
    out["expert_balance"].backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0


def _reference_experts(experts, x, indices, weights):
    """DeepSeek-V3's inference/model.py loop: per expert, gather its tokens and add weighted outputs."""
    y = torch.zeros_like(x)
    inter = experts.down_proj.shape[2]
    for i in range(experts.gate_up_proj.shape[0]):
        idx, top = torch.where(indices == i)
        if idx.numel() == 0:
            continue
        w1, w3 = experts.gate_up_proj[i, :inter], experts.gate_up_proj[i, inter:]
        h = torch.nn.functional.silu(x[idx] @ w1.T) * (x[idx] @ w3.T)
        y[idx] += (h @ experts.down_proj[i].T) * weights[idx, top, None]
    return y


@pytest.mark.parametrize("impl", sorted(EXPERT_IMPLS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sorted_dispatch_equals_the_per_expert_loop(impl, seed):
    torch.manual_seed(seed)
    cfg = DeepSeekConfig(n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=2)
    experts = Experts(cfg)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    experts.impl = impl
    x = torch.randn(37, cfg.hidden_size, requires_grad=True)
    indices = torch.stack([torch.randperm(6)[:3] for _ in range(37)])  # experts 6, 7 never chosen
    weights = torch.rand(37, 3)
    got = experts(x, indices, weights)
    want = _reference_experts(experts, x, indices, weights)
    assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, [x, experts.gate_up_proj, experts.down_proj], g)
    ref_grads = torch.autograd.grad(want, [x, experts.gate_up_proj, experts.down_proj], g)
    for a, b in zip(grads, ref_grads, strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_moe_layer_counts_only_real_tokens_and_adds_shared_experts():
    torch.manual_seed(0)
    cfg = DeepSeekConfig(initializer_range=0.1)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 5, cfg.hidden_size)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[0, :2] = False
    y, losses, counts = moe(x, valid)
    assert counts.sum().item() == 8 * cfg.num_experts_per_tok
    route = moe.gate(x.reshape(-1, cfg.hidden_size))
    routed = moe.experts(x.reshape(-1, cfg.hidden_size), route.indices, route.weights).view_as(x)
    assert_close(y, routed + moe.shared_experts(x))
    assert set(losses) == {"expert_balance", "device_balance", "comm_balance"}


def _model(**overrides):
    torch.manual_seed(0)
    return DeepSeekForCausalLM(DeepSeekConfig.from_preset("tiny", initializer_range=0.1, **overrides))


def test_routing_stats_accumulate_and_reset():
    model = _model().eval()
    ids = torch.randint(3, 128, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :4] = 0  # 8 real tokens
    model(ids, attention_mask=mask)
    stats = model.routing_stats()
    assert sorted(stats) == [1, 2, 3]
    assert all(c.sum().item() == 8 * 2 for c in stats.values())
    model(ids, attention_mask=mask)
    assert all(c.sum().item() == 16 * 2 for c in model.routing_stats().values())
    model.reset_routing_stats()
    assert all(c.sum().item() == 0 for c in model.routing_stats().values())


def test_update_router_bias_by_hand():
    model = _model()
    gate = model.model.layers[1].mlp.gate
    gate.load_since_update.copy_(torch.tensor([5, 1, 3, 3, 4, 2, 3, 3]))  # mean 3
    model.model.layers[2].mlp.gate.load_since_update.zero_()
    model.update_router_bias(0.01)
    assert_close(gate.e_score_correction_bias, torch.tensor([-1, 1, 0, 0, -1, 1, 0, 0]) * 0.01)
    assert gate.load_since_update.sum() == 0
    assert model.model.layers[2].mlp.gate.e_score_correction_bias.abs().sum() == 0  # no load, no change
    model.update_router_bias(0.01)  # the load was reset: nothing moves
    assert_close(gate.e_score_correction_bias, torch.tensor([-1, 1, 0, 0, -1, 1, 0, 0]) * 0.01)


def test_bias_load_counts_training_forwards_only():
    model = _model()
    ids = torch.randint(3, 128, (1, 5))
    model.eval()
    model(ids)
    gate = model.model.layers[1].mlp.gate
    assert gate.load_since_update.sum() == 0 and gate.tokens_seen.sum() == 10
    model.train()
    model(ids)
    assert gate.load_since_update.sum() == 10 and gate.tokens_seen.sum() == 20
    model.update_router_bias(0.1)
    assert gate.e_score_correction_bias.abs().sum() > 0


def test_update_router_bias_needs_noaux_tc():
    model = _model(**V2, topk_method="greedy", n_group=1, topk_group=1)
    with pytest.raises(ValueError, match="update_router_bias needs topk_method 'noaux_tc', got 'greedy'"):
        model.update_router_bias(0.01)


def test_aux_losses_are_summed_over_moe_layers():
    model = _model().eval()
    ids = torch.randint(3, 128, (2, 6))
    out = model(ids)
    per_layer = []
    h = model.model.embed_tokens(ids)
    for layer in model.model.layers:
        h_in = h
        cos, sin = model.model.rotary_emb(torch.arange(6).expand(2, 6))
        h, losses, _ = layer(h_in, cos, sin, AttentionMask(None, True), None)
        per_layer.append(losses)
    for name in ("expert_balance", "device_balance", "comm_balance"):
        assert_close(out.aux_losses[name], sum(d[name] for d in per_layer if d))
