import pytest
import torch
from torch.testing import assert_close

from model import DeepSeekConfig, DeepSeekForCausalLM, LatentKVCache
from model.modeling import MLA, build_attention_mask

TOL = dict(atol=1e-5, rtol=1e-5)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}


def _model(**overrides):
    torch.manual_seed(0)
    return DeepSeekForCausalLM(DeepSeekConfig.from_preset("tiny", **overrides)).eval()


def _left_padded(batch, length, pads, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "rope_interleave": False, "rope_scaling": YARN}])
@torch.no_grad()
def test_prefill_then_token_by_token_equals_full_forward(overrides):
    model = _model(**overrides)
    prompt, new = 6, 5
    ids, mask, pos = _left_padded(3, prompt + new, pads=[0, 2, 4])
    full = model(ids, attention_mask=mask, position_ids=pos).logits
    cache = model.new_cache(3, prompt + new)
    steps = [model(ids[:, :prompt], attention_mask=mask[:, :prompt], position_ids=pos[:, :prompt],
                   cache=cache).logits]
    assert cache.seq_len == prompt
    for t in range(prompt, prompt + new):
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1], cache=cache)
        steps.append(out.logits)
    real = mask.bool()
    assert_close(torch.cat(steps, dim=1)[real], full[real], **TOL)
    assert cache.seq_len == prompt + new


@torch.no_grad()
def test_cache_without_mask_and_chunked_prefill():
    model = _model()
    ids = torch.randint(3, 128, (2, 9))
    full = model(ids).logits
    cache = model.new_cache(2, 16)
    a = model(ids[:, :4], cache=cache).logits
    b = model(ids[:, 4:7], cache=cache).logits  # a multi-token chunk on top of a filled cache: causal offset
    c = model(ids[:, 7:8], cache=cache).logits
    d = model(ids[:, 8:9], cache=cache, logits_to_keep=1).logits
    assert_close(torch.cat([a, b, c, d], dim=1), full, **TOL)


@torch.no_grad()
def test_index_select_shares_prompts_and_drops_rows():
    model = _model()
    prompt, group = 5, 3
    ids, mask, pos = _left_padded(2, prompt, pads=[0, 2])
    cache = model.new_cache(2, prompt + 2)
    model(ids, attention_mask=mask, position_ids=pos, cache=cache)
    rows = torch.arange(2).repeat_interleave(group)  # [0, 0, 0, 1, 1, 1]
    shared = cache.index_select(rows)
    assert shared.batch_size == 6 and shared.seq_len == prompt and shared.max_len == prompt + 2
    for layer in range(shared.num_layers):
        assert_close(shared.latent(layer)[:, :prompt], cache.latent(layer)[rows, :prompt])
        assert_close(shared.rope(layer)[:, :prompt], cache.rope(layer)[rows, :prompt])
    nxt = torch.randint(3, 128, (6, 1), generator=torch.Generator().manual_seed(1))
    mask6, pos6 = mask[rows], pos[rows]
    step_mask = torch.cat([mask6, torch.ones(6, 1, dtype=torch.long)], dim=1)
    step_pos = pos6[:, -1:] + 1
    got = model(nxt, attention_mask=step_mask, position_ids=step_pos, cache=shared).logits
    full = model(torch.cat([ids[rows], nxt], dim=1), attention_mask=step_mask,
                 position_ids=torch.cat([pos6, step_pos], dim=1)).logits
    assert_close(got[:, -1], full[:, -1], **TOL)
    # drop finished rows 1 and 4: the survivors decode exactly as before
    keep = torch.tensor([0, 2, 3, 5])
    kept = shared.index_select(keep)
    nxt2 = torch.randint(3, 128, (4, 1), generator=torch.Generator().manual_seed(2))
    mask2 = torch.cat([step_mask[keep], torch.ones(4, 1, dtype=torch.long)], dim=1)
    got2 = model(nxt2, attention_mask=mask2, position_ids=step_pos[keep] + 1, cache=kept).logits
    full2 = model(torch.cat([ids[rows][keep], nxt[keep], nxt2], dim=1), attention_mask=mask2,
                  position_ids=torch.cat([pos6[keep], step_pos[keep], step_pos[keep] + 1], dim=1)).logits
    assert_close(got2[:, -1], full2[:, -1], **TOL)


@pytest.mark.parametrize("pads", [[0, 0], [3, 0]])
@torch.no_grad()
def test_absorbed_attention_equals_naive(pads):
    torch.manual_seed(0)
    cfg = DeepSeekConfig(initializer_range=0.2)
    mla = MLA(cfg)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2)
    h = torch.randn(2, 7, cfg.hidden_size)
    mask = torch.ones(2, 7, dtype=torch.long)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    cos, sin = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    q_nope, q_pe, c_kv, k_pe = mla.project(h, cos, sin)
    attn = build_attention_mask(mask if any(pads) else None, 2, 7, 0, h.device)
    naive = mla.attend_naive(q_nope, q_pe, c_kv, k_pe, attn)
    absorbed = mla.attend_absorbed(q_nope, q_pe, torch.cat([c_kv, k_pe], dim=-1), attn)
    real = mask.bool()
    assert_close(absorbed[real], naive[real], **TOL)


def test_cache_shapes_nbytes_and_errors():
    cfg = DeepSeekConfig()
    cache = LatentKVCache(cfg, batch_size=2, max_len=10, dtype=torch.bfloat16)
    assert cache.latent(0).shape == (2, 10, cfg.kv_lora_rank) and cache.rope(3).shape == (2, 10, 16)
    assert cache.nbytes() == 2 * 10 * cfg.kv_cache_bytes_per_token(torch.bfloat16)
    with pytest.raises(ValueError, match="max_len: expected a positive integer, got 0"):
        LatentKVCache(cfg, batch_size=2, max_len=0)
    with pytest.raises(ValueError, match=r"expected ids in \[0, 2\)"):
        cache.index_select(torch.tensor([0, 2]))
    model = _model()
    small = model.new_cache(2, 4)
    with pytest.raises(ValueError, match="cache overflow: 0 cached \\+ 5 new tokens > max_len 4"):
        model(torch.ones(2, 5, dtype=torch.long), cache=small)
    with pytest.raises(ValueError, match="cache has 2 rows, the input has 3"):
        model(torch.ones(3, 1, dtype=torch.long), cache=small)
    model(torch.ones(2, 2, dtype=torch.long), cache=small)
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(2, 3\) \(cached \+ new tokens\)"):
        model(torch.ones(2, 1, dtype=torch.long), attention_mask=torch.ones(2, 1), cache=small)


def test_kv_cache_bytes_per_token_on_the_model():
    model = _model()
    cfg = model.config
    assert model.kv_cache_bytes_per_token(torch.bfloat16) == cfg.num_hidden_layers * (64 + 16) * 2
    assert model.get_decoder().kv_cache_bytes_per_token(torch.float32) == cfg.num_hidden_layers * 80 * 4


def test_attention_mask_by_hand():
    pad = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    got = build_attention_mask(pad, 2, 4, 0, torch.device("cpu"))
    t, f = True, False
    want = torch.tensor([
        # row 0: the two pad queries see no real key, so they attend everywhere (finite, never read)
        [[t, t, t, t], [t, t, t, t], [f, f, t, f], [f, f, t, t]],
        [[t, f, f, f], [t, t, f, f], [t, t, t, f], [t, t, t, t]],
    ])
    assert not got.is_causal and torch.equal(got.mask[:, 0], want)
    # two new tokens after three cached ones: causal with an offset
    got = build_attention_mask(None, 1, 2, 3, torch.device("cpu"))
    assert torch.equal(got.mask[0, 0], torch.tensor([[t, t, t, t, f], [t, t, t, t, t]]))
    assert build_attention_mask(None, 1, 5, 0, torch.device("cpu")) == (None, True)
    assert build_attention_mask(None, 1, 1, 7, torch.device("cpu")) == (None, False)


def test_packed_rows_attend_only_within_each_example():
    """Positions restarting at 0 inside a row (SFT packing, no attention mask) keep examples apart."""
    import torch

    from model import DeepSeekConfig, DeepSeekForCausalLM

    torch.manual_seed(0)
    model = DeepSeekForCausalLM(DeepSeekConfig.from_preset("tiny", vocab_size=64)).eval()
    a, b = torch.randint(3, 64, (1, 5)), torch.randint(3, 64, (1, 7))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        together = model(packed, position_ids=positions).logits
        alone_a, alone_b = model(a).logits, model(b).logits
        joined = model(packed).logits  # plain causal: b sees a
    torch.testing.assert_close(together[:, :5], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[:, 5:], alone_b, atol=1e-5, rtol=0)
    assert not torch.allclose(joined[:, 5:], alone_b, atol=1e-3)
