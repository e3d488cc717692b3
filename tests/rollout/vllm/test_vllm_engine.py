"""The vLLM rollout engine against our model: log-probs, greedy outputs, weight updates, sleep (CPU, vLLM env).

Runs only where vLLM is installed (``bash scripts/ci_vllm.sh`` sets up ``.venv-vllm``); elsewhere the module is
skipped. The tiny DeepSeek-V3 model uses ``kv_lora_rank + qk_rope_head_dim = 512 + 64 = 576``, the shape vLLM's
CPU MLA kernel requires, so vLLM runs its real MLA path (absorbed ``W_UK``/``W_UV`` over the latent cache), not
``VLLM_MLA_DISABLE=1``. It has one dense and one MoE layer, so a weight update goes through the CPU MoE
re-packing: with an expert width of 32 (no padding) vLLM's own update path would copy unpacked weights into the
packed storage and sample silently wrong tokens; one more test uses width 48, which the kernel pads to 64.
Weights are drawn with std 0.2 (not 0.02) so the logits are far from uniform and a wrong weight shows up in the
outputs.

Tolerance: everything runs in float32; vLLM's log-probs match our model's forward to 1e-4 (measured: ~5e-6).
"""

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # share the cores with other processes
if os.environ.get("GRPO_REQUIRE_VLLM") == "1":  # scripts/ci_vllm.sh: a missing vLLM is an error, not a skip
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")

import torch  # noqa: E402

from model import DeepSeekConfig, DeepSeekForCausalLM  # noqa: E402
from rollout.base import SamplingConfig, build_engine  # noqa: E402
from rollout.torch_engine import TorchEngine  # noqa: E402
from rollout.vllm_engine import VLLMEngine, WeightStream, layer_key  # noqa: E402

ATOL = 1e-4
PROMPTS = [[1, 5, 9, 11, 20], [1, 7, 7, 30], [1, 40, 41, 42, 43, 44, 45]]
ENGINE_KW = dict(dtype="float32", max_model_len=256, max_num_seqs=32)


def tiny_config(vocab_size: int, moe_intermediate_size: int = 32) -> DeepSeekConfig:
    return DeepSeekConfig.from_preset(
        "tiny", vocab_size=vocab_size, hidden_size=64, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=512,
        qk_rope_head_dim=64, qk_nope_head_dim=16, v_head_dim=16, intermediate_size=128,
        moe_intermediate_size=moe_intermediate_size, num_hidden_layers=2, first_k_dense_replace=1,
        max_position_embeddings=256, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_model(seed: int, vocab_size: int, moe_intermediate_size: int = 32) -> DeepSeekForCausalLM:
    torch.manual_seed(seed)
    return DeepSeekForCausalLM(tiny_config(vocab_size, moe_intermediate_size)).eval()


@pytest.fixture(scope="module")
def model_a(tiny_tok):
    return tiny_model(0, len(tiny_tok))


@pytest.fixture(scope="module")
def model_b(tiny_tok):
    return tiny_model(1, len(tiny_tok))


@pytest.fixture(scope="module")
def engine_a(model_a, tiny_tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "a"
    model_a.save_pretrained(path, tokenizer=tiny_tok)
    return build_engine("vllm", str(path), **ENGINE_KW)


@pytest.fixture(scope="module")
def engine_b(model_b, tiny_tok):
    """Built from the model object (the engine writes the checkpoint itself)."""
    return VLLMEngine(model_b, tokenizer=tiny_tok, **ENGINE_KW)


@pytest.fixture(scope="module")
def engine_ab(model_a, tiny_tok, tmp_path_factory):
    """Built from A; the update test pushes B's weights into it. Module-scoped like the others: vLLM's parallel
    state is process-global, and an engine torn down mid-module would take it from the engines still in use."""
    path = tmp_path_factory.mktemp("ckpt") / "a"
    model_a.save_pretrained(path, tokenizer=tiny_tok)
    return VLLMEngine(str(path), **ENGINE_KW)


def forward_logprobs(model, prompt, completion, temperature=1.0):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    lp = (logits[len(prompt) - 1:-1] / temperature).log_softmax(-1)  # [C, V]
    return lp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1), logits[len(prompt) - 1:-1]


def assert_logprobs_match_forward(model, rollouts, temperature=1.0):
    for r in rollouts:
        assert len(r.logprobs) == len(r.completion_ids) > 0
        ref, _ = forward_logprobs(model, r.prompt_ids, r.completion_ids, temperature)
        torch.testing.assert_close(torch.tensor(r.logprobs), ref, atol=ATOL, rtol=0)


def test_sampled_logprobs_equal_model_forward_and_groups_are_contiguous(engine_a, model_a):
    outs = engine_a.generate(PROMPTS, SamplingConfig(n=3, max_tokens=10, temperature=1.0, seed=3))
    assert len(outs) == 9
    assert [r.prompt_index for r in outs] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(r.prompt_ids == PROMPTS[r.prompt_index] for r in outs)
    assert len({tuple(r.completion_ids) for r in outs[:3]}) > 1  # the 3 samples of a prompt differ
    assert_logprobs_match_forward(model_a, outs)


def test_logprobs_are_after_temperature(engine_a, model_a):
    outs = engine_a.generate(PROMPTS[:2], SamplingConfig(n=2, max_tokens=8, temperature=0.6, seed=1))
    assert_logprobs_match_forward(model_a, outs, temperature=0.6)
    raw, _ = forward_logprobs(model_a, outs[0].prompt_ids, outs[0].completion_ids, 1.0)
    assert (torch.tensor(outs[0].logprobs) - raw).abs().max() > 1e-2  # T actually changes them


def test_top_k_samples_inside_the_top_k_and_reports_untruncated_logprobs(engine_a, model_a):
    outs = engine_a.generate(PROMPTS, SamplingConfig(n=2, max_tokens=8, temperature=1.0, top_k=3, seed=5))
    for r in outs:
        _, logits = forward_logprobs(model_a, r.prompt_ids, r.completion_ids)
        top3 = logits.topk(3, dim=-1).indices  # [C, 3]
        assert all(t in top3[j].tolist() for j, t in enumerate(r.completion_ids))
    assert_logprobs_match_forward(model_a, outs)  # log_softmax(logits), not renormalised over the top 3


def test_truncation_with_temperature_and_logprobs_is_refused(engine_a):
    with pytest.raises(ValueError, match="before top-k/top-p/min_tokens filtering"):
        engine_a.generate(PROMPTS, SamplingConfig(n=2, temperature=0.7, top_p=0.9))
    outs = engine_a.generate(PROMPTS, SamplingConfig(n=2, max_tokens=4, temperature=0.7, top_p=0.9,
                                                     logprobs=False))
    assert len(outs) == 6 and all(r.logprobs == [] and 1 <= len(r.completion_ids) <= 4 for r in outs)


def test_greedy_equals_torch_engine(engine_a, model_a, tiny_tok):
    sampling = SamplingConfig(n=2, max_tokens=12, temperature=0.0)
    ours = TorchEngine(model_a, tokenizer=tiny_tok).generate(PROMPTS, sampling)
    theirs = engine_a.generate(PROMPTS, sampling)
    assert [r.completion_ids for r in theirs] == [r.completion_ids for r in ours]
    assert [r.finish_reason for r in theirs] == [r.finish_reason for r in ours]
    assert [r.text for r in theirs] == [r.text for r in ours]
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=ATOL, rtol=0)


def test_stop_token_ends_a_sample_and_is_kept(engine_a, model_a, tiny_tok):
    free = engine_a.generate(PROMPTS[:1], SamplingConfig(max_tokens=12, temperature=0.0))[0]
    stop = free.completion_ids[3]
    cut = free.completion_ids.index(stop) + 1
    sampling = SamplingConfig(max_tokens=12, temperature=0.0, stop_token_ids=(stop,))
    out = engine_a.generate(PROMPTS[:1], sampling)[0]
    assert out.completion_ids == free.completion_ids[:cut] and out.finish_reason == "stop"
    torch_out = TorchEngine(model_a, tokenizer=tiny_tok).generate(PROMPTS[:1], sampling)[0]
    assert out.completion_ids == torch_out.completion_ids
    assert len(out.logprobs) == cut


def test_stop_string_ends_a_sample_like_the_torch_engine(engine_a, model_a, tiny_tok):
    free = engine_a.generate(PROMPTS, SamplingConfig(max_tokens=12, temperature=0.0))
    stop = tiny_tok.decode(free[0].completion_ids[2:4], skip_special_tokens=False)
    sampling = SamplingConfig(max_tokens=12, temperature=0.0, stop=(stop,))
    outs = engine_a.generate(PROMPTS, sampling)
    ours = TorchEngine(model_a, tokenizer=tiny_tok).generate(PROMPTS, sampling)
    assert [r.completion_ids for r in outs] == [r.completion_ids for r in ours]
    assert [r.finish_reason for r in outs] == [r.finish_reason for r in ours]
    assert outs[0].finish_reason == "stop" and len(outs[0].completion_ids) <= 4
    assert outs[0].text.endswith(stop)


def test_min_tokens_bans_stop_tokens_like_the_torch_engine(engine_a, model_a, tiny_tok):
    free = engine_a.generate(PROMPTS[:1], SamplingConfig(max_tokens=12, temperature=0.0))[0]
    stop = free.completion_ids[1]
    torch_engine = TorchEngine(model_a, tokenizer=tiny_tok)
    for sampling in (SamplingConfig(n=2, max_tokens=12, temperature=0.0, stop_token_ids=(stop,), min_tokens=6),
                     SamplingConfig(n=3, max_tokens=12, temperature=1.0, stop_token_ids=(stop,), min_tokens=6,
                                    seed=4)):
        outs = engine_a.generate(PROMPTS, sampling)
        assert all(len(r.completion_ids) >= 6 and stop not in r.completion_ids[:6] for r in outs)
        assert_logprobs_match_forward(model_a, outs)  # the ban changes what is sampled, not the log-probs
        if sampling.greedy:
            assert [r.completion_ids for r in outs] == [r.completion_ids for r in torch_engine.generate(PROMPTS,
                                                                                                        sampling)]
    assert free.completion_ids.index(stop) < 6  # without min_tokens the stop token comes early


def test_update_weights_equals_fresh_engine(engine_ab, engine_b, model_a, model_b):
    # an engine loaded with A and then pushed B's weights (a different model, MoE experts included)
    engine = engine_ab
    greedy = SamplingConfig(n=1, max_tokens=12, temperature=0.0)
    sampled = SamplingConfig(n=2, max_tokens=10, temperature=1.0, seed=11)
    before = engine.generate(PROMPTS, greedy)
    assert [r.completion_ids for r in before] != [r.completion_ids for r in engine_b.generate(PROMPTS, greedy)]

    engine.update_weights(model_b.named_hf_weights())
    assert engine.repacked_moe_layers == 1
    for sampling in (greedy, sampled):
        pushed, fresh = engine.generate(PROMPTS, sampling), engine_b.generate(PROMPTS, sampling)
        assert [r.completion_ids for r in pushed] == [r.completion_ids for r in fresh]
        for a, b in zip(pushed, fresh):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=ATOL, rtol=0)
        assert_logprobs_match_forward(model_b, pushed)

    # and back to A, streamed from a generator of float64 tensors (vLLM casts them to the engine's float32)
    engine.update_weights((n, t.double()) for n, t in model_a.named_hf_weights())
    after = engine.generate(PROMPTS, greedy)
    assert [r.completion_ids for r in after] == [r.completion_ids for r in before]
    for a, b in zip(after, before):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def padded(tiny_tok, tmp_path_factory):
    """Two models with expert width 48 (padded to 64 by the CPU MoE kernel) and an engine built from the first."""
    vocab = len(tiny_tok)
    a, b = tiny_model(2, vocab, moe_intermediate_size=48), tiny_model(3, vocab, moe_intermediate_size=48)
    path = tmp_path_factory.mktemp("ckpt") / "a48"
    a.save_pretrained(path, tokenizer=tiny_tok)
    return VLLMEngine(str(path), **ENGINE_KW), a, b


def test_update_weights_with_padded_expert_width(padded):
    engine, a, b = padded
    sampling = SamplingConfig(n=2, max_tokens=8, temperature=1.0, seed=2)
    assert_logprobs_match_forward(a, engine.generate(PROMPTS, sampling))
    engine.update_weights(b.named_hf_weights())
    assert_logprobs_match_forward(b, engine.generate(PROMPTS, sampling))


def test_bad_updates_are_refused_and_leave_the_engine_working(engine_a, model_a):
    greedy = SamplingConfig(n=1, max_tokens=8, temperature=0.0)
    before = [r.completion_ids for r in engine_a.generate(PROMPTS, greedy)]
    weights = list(model_a.named_hf_weights())
    layer0 = [(n, t) for n, t in weights if n.startswith("model.layers.0.")]
    with pytest.raises(KeyError, match="no tensor 'model.layers.0.nope'"):
        engine_a.update_weights([("model.layers.0.nope", torch.zeros(1))])
    with pytest.raises(ValueError, match="expects shape"):
        engine_a.update_weights([(weights[0][0], torch.zeros(3, 3))])
    with pytest.raises(ValueError, match="model.layers.0 is incomplete"):
        engine_a.update_weights(layer0[:-1] + [w for w in weights if w[0].startswith("model.layers.1.")])
    with pytest.raises(ValueError, match="not contiguous"):
        engine_a.update_weights(layer0 + [weights[-1]] + layer0[:1])  # A's own values: loading them changes nothing
    assert [r.completion_ids for r in engine_a.generate(PROMPTS, greedy)] == before


def test_weight_stream_groups_whole_layers():
    expected = {"model.embed_tokens.weight": (4, 2), "model.layers.0.a.weight": (2,), "model.layers.0.b.weight": (3,),
                "model.layers.1.a.weight": (2,), "lm_head.weight": (4, 2)}
    t = {name: torch.zeros(shape) for name, shape in expected.items()}
    assert layer_key("model.layers.12.mlp.experts.3.up_proj.weight") == "model.layers.12"
    assert layer_key("lm_head.weight") == "lm_head.weight"
    stream = WeightStream([(n, t[n]) for n in ("model.layers.0.b.weight", "model.layers.0.a.weight",
                                               "lm_head.weight")], expected)
    assert [n for n, _ in stream] == ["model.layers.0.b.weight", "model.layers.0.a.weight", "lm_head.weight"]
    seen = []
    with pytest.raises(ValueError, match="model.layers.0 is incomplete"):
        for name, _ in WeightStream([(n, t[n]) for n in ("lm_head.weight", "model.layers.0.a.weight",
                                                         "model.layers.1.a.weight")], expected):
            seen.append(name)
    assert seen == ["lm_head.weight"]  # the incomplete layer never reached the consumer


def test_sleep_and_wake_up_on_cpu_are_logged_noops(engine_a, caplog):
    greedy = SamplingConfig(n=1, max_tokens=6, temperature=0.0)
    before = engine_a.generate(PROMPTS, greedy)
    assert not engine_a.sleep_available  # vLLM refuses sleep mode on the CPU
    with caplog.at_level("INFO", logger="rollout.vllm_engine"):
        engine_a.sleep()
    assert engine_a.is_sleeping and "sleep mode is not available" in caplog.text
    with pytest.raises(RuntimeError, match="asleep"):
        engine_a.generate(PROMPTS, greedy)
    with pytest.raises(RuntimeError, match="asleep"):
        engine_a.update_weights([])
    engine_a.wake_up()
    assert not engine_a.is_sleeping
    assert [r.completion_ids for r in engine_a.generate(PROMPTS, greedy)] == [r.completion_ids for r in before]


def test_bad_requests_name_the_problem(engine_a, tmp_path):
    with pytest.raises(ValueError, match="at least one token"):
        engine_a.generate([[1, 2], []], SamplingConfig())
    with pytest.raises(FileNotFoundError, match="no config.json"):
        VLLMEngine(str(tmp_path))
    with pytest.raises(ValueError, match="save_pretrained"):
        VLLMEngine(object())


def test_probe_logprobs_equal_model_forward(engine_a, model_a):
    ids = [1, 5, 9, 11, 20, 33, 7]
    ref, _ = forward_logprobs(model_a, ids[:1], ids[1:])
    torch.testing.assert_close(torch.tensor(engine_a.probe_logprobs(ids)), ref, atol=ATOL, rtol=0)
    assert engine_a.weight_fingerprints(["model.norm.weight"]) is None  # fused weights: probed instead
    assert set(engine_a.accepted_weights()) == {n for n, _ in model_a.named_hf_weights()}


def test_the_stale_weight_guard_checks_a_vllm_engine_by_probe(engine_a, model_a, model_b, tiny_tok):
    import copy

    from grpo.config import GRPOConfig
    from grpo.trainer import GRPOTrainer
    from rollout.weights import StaleWeightsError

    cfg = GRPOConfig(group_size=2, prompts_per_step=1, minibatch_size=2, micro_batch_size=2, beta=0.0,
                     sync_probe_tol=1e-3)
    trainer = GRPOTrainer(copy.deepcopy(model_a), engine_a, lambda p, c, **k: [0.0] * len(c), tiny_tok, cfg)
    metrics = {}
    trainer.sync_weights(metrics=metrics)  # the engine already holds A: the probe agrees
    assert "time/sync_check" in metrics and metrics["sync/checked_tensors"] == 0
    stale = GRPOTrainer(copy.deepcopy(model_b), engine_a, lambda p, c, **k: [0.0] * len(c), tiny_tok, cfg)
    with pytest.raises(StaleWeightsError, match="log-probs of the probe sequence that differ"):
        stale.check_sync(dict(stale.policy.named_hf_weights()))  # B's weights were never sent


def test_routing_is_refused_without_enable_return_routed_experts(engine_a):
    assert not engine_a.can_record_routing
    assert engine_a.can_return_logprobs(SamplingConfig(temperature=1.0, top_p=0.9))  # re-scored at T = 1
    assert not engine_a.can_return_logprobs(SamplingConfig(temperature=0.7, top_p=0.9))
    with pytest.raises(ValueError, match="build the vLLM engine with enable_return_routed_experts=True"):
        engine_a.generate([[5, 6, 7]], SamplingConfig(max_tokens=2, record_routing=True))


def test_returning_routed_experts_is_refused_on_the_cpu_by_its_reason(model_a, tiny_tok):
    """vLLM 0.32 captures routed experts only in its V2 model runner, which needs Triton on a GPU."""
    with pytest.raises(ValueError, match="only from its V2 model runner, which needs Triton on a GPU"):
        VLLMEngine(model_a, tokenizer=tiny_tok, enable_return_routed_experts=True, **ENGINE_KW)
