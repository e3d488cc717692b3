"""Weight sync from the trainer to a rollout engine on real Hugging Face shapes (tied embeddings, attention biases,
bf16 engines), whole-layer buckets, and the stale-weight guard that stops a run on a corrupted engine weight."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from grpo.config import GRPOConfig
from grpo.trainer import GRPOTrainer
from rollout.loading import load_tokenizer
from rollout.torch_engine import TorchEngine
from rollout.weights import (
    StaleWeightsError,
    bucketed,
    check_names,
    compare_fingerprints,
    fingerprint,
    layer_key,
    named_weights,
)
from tests.helpers.engines import CorruptingEngine, ProbeOnlyEngine, StaleProbeEngine
from tests.helpers.tiny import EOS, PAD, VOCAB, count_target, word_tokenizer

ROWS = [{"prompt": f"t{3 + i} t{9 + i}", "parity": i % 2} for i in range(4)]
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, eos_token_id=EOS, pad_token_id=PAD, max_position_embeddings=64)


def tied_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=True))


def qwen2(seed=0):
    """Qwen2: biases on the q, k and v projections."""
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=False))


def trainer_for(policy, engine=None, **overrides):
    cfg = dict(group_size=4, prompts_per_step=4, minibatch_size=16, micro_batch_size=8, lr=1e-2, beta=0.0,
               max_new_tokens=4, temperature=1.0)
    cfg.update(overrides)
    tokenizer = word_tokenizer()
    engine = engine or TorchEngine(copy.deepcopy(policy).eval(), tokenizer=tokenizer)
    return GRPOTrainer(policy.train(), engine, count_target, tokenizer, GRPOConfig(**cfg))


def test_tied_embeddings_are_sent_once_and_accepted_under_both_names():
    model = tied_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = [n for n, _ in named_weights(model)]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert len(names) == len(set(names)) == len(list(model.parameters()))
    engine = TorchEngine(copy.deepcopy(model))
    accepted = engine.accepted_weights()
    assert "lm_head.weight" in accepted and "model.embed_tokens.weight" in accepted
    new = torch.randn(VOCAB, 32)
    engine.update_weights([("model.embed_tokens.weight", new)])
    assert torch.equal(engine.model.lm_head.weight, new)  # the engine's copy is tied the same way


@pytest.mark.parametrize("build", [tied_llama, qwen2], ids=["llama-tied", "qwen2-biases"])
def test_steps_train_every_parameter_and_leave_the_engine_equal_to_the_trainer(build):
    policy = build()
    if build is qwen2:
        assert policy.model.layers[0].self_attn.q_proj.bias is not None
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainer = trainer_for(policy)
    for _ in range(2):
        metrics = trainer.step(ROWS)
    assert metrics["sync/checked_tensors"] == len(list(named_weights(policy)))
    assert "time/sync_check" in metrics and metrics["sync/bytes"] > 0
    for name, p in policy.named_parameters():
        assert not torch.equal(before[name], p.detach()), f"{name} did not change"
    engine_tensors = dict(trainer.engine.model.named_parameters(remove_duplicate=False))
    for name, p in policy.named_parameters(remove_duplicate=False):
        assert torch.equal(engine_tensors[name], p.detach()), f"engine {name} is stale"


def test_bucketed_never_splits_a_decoder_layer():
    named = list(named_weights(qwen2()))
    buckets = list(bucketed(named, bucket_bytes=1))  # every tensor over the limit: one bucket per layer
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]
    layers = [{layer_key(n) for n, _ in b} for b in buckets]
    assert all(len(keys) == 1 for keys in layers)
    assert [next(iter(k)) for k in layers].count("model.layers.0") == 1
    assert len(list(bucketed(named, bucket_bytes=1 << 30))) == 1


def test_fingerprints_compare_exactly_in_the_engine_dtype():
    torch.manual_seed(0)
    master = torch.randn(64, 32)
    engine_copy = master.to(torch.bfloat16)
    held = {"w": fingerprint(engine_copy)}
    compare_fingerprints({"w": master}, held, "bf16 engine")  # the trainer casts as the engine did: equal
    bumped = engine_copy.clone()
    bumped[3, 7] += 0.0625
    with pytest.raises(StaleWeightsError, match=r"bf16 engine holds a different 'w' than the trainer sent"):
        compare_fingerprints({"w": master}, {"w": fingerprint(bumped)}, "bf16 engine")
    with pytest.raises(StaleWeightsError, match="reports no tensor 'w'"):
        compare_fingerprints({"w": master}, {}, "bf16 engine")


def test_bf16_engine_passes_the_guard():
    policy = tied_llama()
    engine = TorchEngine(copy.deepcopy(policy).eval(), tokenizer=word_tokenizer(), dtype=torch.bfloat16)
    metrics = trainer_for(policy, engine).step(ROWS)
    assert metrics["sync/checked_tensors"] > 0
    assert next(engine.model.parameters()).dtype == torch.bfloat16


def test_a_corrupted_engine_weight_stops_the_step_naming_it():
    policy = tied_llama()
    trainer_engine = CorruptingEngine(copy.deepcopy(policy).eval(), tokenizer=word_tokenizer())
    with pytest.raises(StaleWeightsError, match=r"holds a different 'model\.layers\.1\.mlp\.down_proj\.weight'"):
        trainer_for(policy, trainer_engine).step(ROWS)
    trainer = trainer_for(tied_llama(), CorruptingEngine(copy.deepcopy(tied_llama()).eval()), sync_check=False)
    trainer.step(ROWS)  # the guard can be turned off


def test_engines_without_fingerprints_are_checked_by_probe():
    policy = tied_llama()
    ok = trainer_for(policy, ProbeOnlyEngine(copy.deepcopy(policy).eval(), tokenizer=word_tokenizer()))
    metrics = ok.step(ROWS)
    assert metrics["sync/checked_tensors"] == 0 and "time/sync_check" in metrics
    policy = tied_llama()
    stale = trainer_for(policy, StaleProbeEngine(copy.deepcopy(policy).eval(), tokenizer=word_tokenizer()))
    with pytest.raises(StaleWeightsError, match="log-probs of the probe sequence that differ"):
        stale.step(ROWS)


def test_unknown_names_fail_before_anything_is_copied_naming_the_model():
    engine = TorchEngine(qwen2().eval())
    before = engine.model.model.norm.weight.detach().clone()
    with pytest.raises(KeyError, match=r"TorchEngine\[Qwen2ForCausalLM.*has no tensor 'model\.nope\.weight'"):
        engine.update_weights([("model.norm.weight", torch.zeros(32)), ("model.nope.weight", torch.zeros(1))])
    assert torch.equal(engine.model.model.norm.weight, before)
    with pytest.raises(ValueError, match=r"holds 'model\.norm\.weight' with shape \(32,\), the trainer sends"):
        check_names({"model.norm.weight": (16,)}, engine.accepted_weights(), "M")


def test_a_trainer_refuses_an_engine_that_lacks_its_tensors_before_training():
    untied = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          tie_word_embeddings=False))
    engine = TorchEngine(LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=1, num_attention_heads=4,
                                                      num_key_value_heads=2)).eval())
    trainer = trainer_for(untied, engine)
    with pytest.raises(KeyError, match=r"has no tensor 'model\.layers\.1\."):
        trainer.sync_weights()


def test_folder_without_tokenizer_files_works_on_token_ids(tmp_path):
    model = qwen2().eval()
    model.save_pretrained(tmp_path / "m")
    engine = TorchEngine(str(tmp_path / "m"))
    assert engine.tokenizer is None
    from rollout.base import SamplingConfig

    out = engine.generate([[5, 6, 7]], SamplingConfig(n=2, max_tokens=3, seed=0))
    assert len(out) == 2 and all(r.text == "" and 1 <= len(r.completion_ids) <= 3 for r in out)
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer files \(looked for tokenizer\.json"):
        load_tokenizer(tmp_path / "m")


def test_preflight_names_what_an_engine_would_refuse_before_a_run_starts(tmp_path):
    from safetensors.torch import load_file, save_file

    from grpo.orchestration.workers import preflight_weight_sync

    folder = tmp_path / "m"
    tied_llama().save_pretrained(folder)
    preflight_weight_sync(str(folder), "torch")
    preflight_weight_sync(str(folder), "vllm")  # tied: the checkpoint has no lm_head, and none is sent
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"\(vllm engine, .*\) has no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        preflight_weight_sync(str(folder), "vllm")
