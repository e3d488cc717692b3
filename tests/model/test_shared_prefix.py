"""``shared_prefix``: rows that start with the same tokens compute them once, with the unshared results."""

import pytest
import torch
from torch.testing import assert_close

from model import DeepSeekConfig, DeepSeekForCausalLM
from model.modeling import SharedPrefix

G, B, P, T = 3, 3, 6, 5


def _model():
    torch.manual_seed(0)
    cfg = DeepSeekConfig.from_preset("tiny", initializer_range=0.05)
    return DeepSeekForCausalLM(cfg).double().train()


def _groups():
    """B prompts (one left-padded) with G completions each (one right-padded), rows shuffled; the last
    prompt has a single row."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 128, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    reps = torch.tensor([G, G, 1])
    n = int(reps.sum())
    ids = torch.cat([prompts.repeat_interleave(reps, 0), torch.randint(3, 128, (n, T), generator=g)], 1)
    mask = torch.cat([prompt_mask.repeat_interleave(reps, 0), torch.ones(n, T, dtype=torch.long)], 1)
    mask[1, -2:] = 0
    perm = torch.randperm(n, generator=g)
    ids, mask = ids[perm], mask[perm]
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _run(model, ids, mask, pos, shared_prefix):
    """Logits at real tokens, balance losses, gradients and routing counts of one forward + backward."""
    model.zero_grad(set_to_none=True)
    model.reset_routing_stats()
    out = model(ids, mask, pos, shared_prefix=shared_prefix)
    real = mask[..., None].to(out.logits.dtype)
    weights = torch.linspace(-1, 1, out.logits.shape[-1], dtype=out.logits.dtype)
    loss = (out.logits * real * weights).sum() + sum(out.aux_losses.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.logits * real, out.aux_losses, grads, model.routing_stats()


def _gate_tokens(model):
    """Records how many tokens the first MoE gate routes per forward."""
    seen = []
    gate = next(iter(model.model.moe_gates().values()))
    gate.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    return seen


@pytest.mark.parametrize("checkpointing", [False, True])
def test_same_outputs_losses_gradients_and_counts(checkpointing):
    model = _model()
    if checkpointing:
        model.gradient_checkpointing_enable()
    ids, mask, pos = _groups()
    logits, losses, grads, counts = _run(model, ids, mask, pos, 0)
    logits_s, losses_s, grads_s, counts_s = _run(model, ids, mask, pos, P)
    assert_close(logits_s, logits, rtol=1e-10, atol=1e-10)
    for name in losses:  # routing affinities are float32 whatever the model's dtype
        assert_close(losses_s[name], losses[name], rtol=1e-6, atol=1e-7, msg=name)
    for name in grads:
        assert_close(grads_s[name], grads[name], rtol=1e-6, atol=1e-6 * float(grads[name].abs().max()), msg=name)
    assert counts_s.keys() == counts.keys()
    for layer in counts:
        assert torch.equal(counts_s[layer], counts[layer])


def test_each_distinct_prefix_runs_once():
    model = _model()
    seen = _gate_tokens(model)
    ids, mask, pos = _groups()
    with torch.no_grad():
        model(ids, mask, pos, shared_prefix=P)
        model(ids, mask, pos)
    n = ids.shape[0]
    assert seen == [B * P + n * T, n * (P + T)]


def test_layout_of_find():
    ids, mask, pos = _groups()
    shared = SharedPrefix.find(ids, mask, pos, P)
    assert shared is not None and shared.prefix_mask.shape == (B, P)
    # every row's prefix, expanded back, is the row's own first P tokens
    assert torch.equal(shared.expand(shared.ids[..., None])[..., 0], ids)
    assert torch.equal(shared.expand(shared.positions[..., None])[..., 0], pos)
    assert torch.equal(shared.expand(shared.valid[..., None])[..., 0], mask.bool())
    # a prefix token stands for every row that shares it
    per_prefix = torch.bincount(shared.rows, minlength=B)
    head, tail = shared.split(shared.token_rows[..., None])
    assert torch.equal(head[..., 0], shared.prefix_mask * per_prefix[:, None])
    assert torch.equal(tail[..., 0], mask[:, P:])
    assert sorted(per_prefix.tolist()) == [1, G, G]


def test_rows_differing_in_mask_or_positions_are_not_shared():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 7, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    shared = SharedPrefix.find(ids, mask, pos, 3)
    assert shared is not None and shared.rows.tolist() in ([0, 1, 0], [1, 0, 1])
    assert SharedPrefix.find(ids[:2], mask[:2], pos[:2], 3) is None


def test_nothing_shared_is_the_plain_forward():
    model = _model()
    seen = _gate_tokens(model)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 128, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = model(ids, mask, shared_prefix=4).logits
        b = model(ids, mask).logits
    assert torch.equal(a, b)
    assert seen == [24, 24]


@pytest.mark.parametrize("bad", [-1, 8, 9, 2.0])
def test_bad_shared_prefix_is_named(bad):
    model = _model()
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="shared_prefix"):
        model(ids, torch.ones_like(ids), shared_prefix=bad)
