"""SFT on our DeepSeek MLA/MoE policy with our arithmetic tokenizer."""

import io

import pytest
import torch

from grpo.data import tasks
from model import DeepSeekConfig, DeepSeekForCausalLM
from sft.formatting import IGNORE_INDEX, tokenize_conversation, tokenize_rows
from sft.packing import check_packing_isolation, first_fit_decreasing, pack_batch, pad_batch
from sft.trainer import SFTConfig, SFTTrainer, nll_sum


def policy(tiny_tok, seed=0):
    torch.manual_seed(seed)
    config = DeepSeekConfig.from_preset("tiny", vocab_size=len(tiny_tok), hidden_size=64, num_hidden_layers=2)
    return DeepSeekForCausalLM(config).float()


def test_two_turn_mask_with_our_tokenizer(tiny_tok):
    messages = [
        {"role": "user", "content": "1+1"},
        {"role": "assistant", "content": "<answer>2</answer>"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
    ]
    ex = tokenize_conversation(tiny_tok, messages)
    tokens = tiny_tok.convert_ids_to_tokens(ex.input_ids)
    labels = ["_" if lab == IGNORE_INDEX else tiny_tok.convert_ids_to_tokens(lab) for lab in ex.labels]
    # fmt: off
    assert tokens == ["<bos>", "<|user|>", "1", "+", "1", "<eos>", "<|assistant|>", "<answer>", "2", "</answer>",
                      "<eos>", "<|user|>", "h", "i", "<eos>", "<|assistant|>", "o", "k", "<eos>"]
    assert labels == ["_", "_", "_", "_", "_", "_", "_", "<answer>", "2", "</answer>",
                      "<eos>", "_", "_", "_", "_", "_", "o", "k", "<eos>"]
    # fmt: on


def test_sft_trains_every_parameter_and_lowers_the_loss(tiny_tok):
    model = policy(tiny_tok)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    config = SFTConfig(lr=3e-3, batch_size=16, max_steps=25, warmup_ratio=0.1, moe_aux_coef=0.01, progress=False)
    history = SFTTrainer(model, tiny_tok, tasks.arithmetic(400, seed=0), config).train()
    assert sum(m.loss for m in history[-3:]) / 3 < 0.6 * history[0].loss
    assert all(m.moe_aux_loss > 0 for m in history)  # the balance losses are read from the model's output
    unchanged = [k for k, v in model.named_parameters() if torch.equal(v, before[k])]
    assert not unchanged, unchanged


def test_resume_is_exact_with_our_policy(tiny_tok):
    rows = tasks.arithmetic(48, seed=1)
    config = SFTConfig(lr=3e-3, batch_size=8, grad_accum=2, epochs=2, moe_aux_coef=0.01, progress=False)
    full = SFTTrainer(policy(tiny_tok), tiny_tok, rows, config)
    full.train()
    first = SFTTrainer(policy(tiny_tok), tiny_tok, rows, config)
    first.train(until_step=2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = SFTTrainer(policy(tiny_tok, seed=5), tiny_tok, rows, config)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    resumed.train()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_packing_with_our_policy_is_exact_or_refused(tiny_tok):
    model = policy(tiny_tok).eval()
    examples, _ = tokenize_rows(tasks.arithmetic(6, seed=2), tiny_tok)
    padded = pad_batch(examples, tiny_tok.pad_token_id)
    bins = first_fit_decreasing([len(e) for e in examples], capacity=128)
    packed = pack_batch([[examples[i] for i in b] for b in bins], tiny_tok.pad_token_id)
    try:
        check_packing_isolation(model, len(tiny_tok))
    except RuntimeError as exc:  # the policy attends across packed examples: packing must be refused
        assert "attend to each other" in str(exc) and "packing=False" in str(exc)
        with pytest.raises(RuntimeError, match="attend to each other"):
            SFTTrainer(model, tiny_tok, tasks.arithmetic(6, seed=2), SFTConfig(packing=True, progress=False))
        return
    with torch.no_grad():
        torch.testing.assert_close(
            nll_sum(model, packed) / packed.n_targets, nll_sum(model, padded) / padded.n_targets, rtol=1e-5, atol=1e-5
        )
