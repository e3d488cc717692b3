import io
import math
import re

import pytest
import torch

from grpo.data import load_data, tasks
from sft.trainer import SFTConfig, SFTTrainer, warmup_cosine
from tests.helpers.chat import tiny_llama

FORMAT = re.compile(r"^<think>[^<]+</think><answer>-?\d+</answer><\|end\|>$")


def test_warmup_cosine_hand_values():
    # warmup 2 of 10 steps: 1/2, 2/2, then cosine over steps 2..9 from 1 to min_ratio
    values = [warmup_cosine(s, total=10, warmup=2, min_ratio=0.1) for s in range(10)]
    assert values[:3] == [0.5, 1.0, 1.0]
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3.5 / 7))  # step 5.5 would be the middle
    assert values[5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 7)))
    assert values[9] == pytest.approx(0.1) and values[5] > mid > values[6]
    assert warmup_cosine(0, total=1, warmup=0, min_ratio=0.0) == 1.0


def test_config_validation():
    with pytest.raises(ValueError, match="sft batch_size must be a positive integer, got 0"):
        SFTConfig(batch_size=0)
    with pytest.raises(ValueError, match="sft lr must be > 0"):
        SFTConfig(lr=0.0)
    with pytest.raises(ValueError, match="sft warmup_ratio must lie in"):
        SFTConfig(warmup_ratio=1.5)
    with pytest.raises(ValueError, match="sft max_steps must be a positive integer or None"):
        SFTConfig(max_steps=0)


@pytest.fixture(scope="module")
def rows():
    return tasks.arithmetic(64, seed=0)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_grad_accumulation_matches_one_big_batch(chat_tok, rows):
    big = SFTTrainer(tiny_llama(len(chat_tok)), chat_tok, rows[:16], SFTConfig(lr=1e-2, batch_size=16, progress=False))
    small = SFTTrainer(
        tiny_llama(len(chat_tok)), chat_tok, rows[:16], SFTConfig(lr=1e-2, batch_size=4, grad_accum=4, progress=False)
    )
    grads = {}
    for name, trainer in (("big", big), ("small", small)):  # the accumulated gradient, as the optimizer sees it
        step = trainer.optimizer.step

        def capture(*args, _step=step, _name=name, _model=trainer.model, **kwargs):
            grads[_name] = [p.grad.detach().clone() for p in _model.parameters()]
            return _step(*args, **kwargs)

        trainer.optimizer.step = capture
    m_big, m_small = big.train_step(), small.train_step()
    assert m_big.n_targets == m_small.n_targets == sum(e.n_labels for e in big.examples)
    assert m_big.loss == pytest.approx(m_small.loss, rel=1e-5)
    for (name, _), g_big, g_small in zip(big.model.named_parameters(), grads["big"], grads["small"], strict=True):
        torch.testing.assert_close(g_small, g_big, rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    # after one Adam step (lr 1e-2): a weight whose gradient is near Adam's eps moves by lr * g / (|g| + eps), which
    # float rounding of g shifts by ~1e-6, so the weights agree to a small fraction of the step
    for k, v in weights(big.model).items():
        torch.testing.assert_close(v, small.model.state_dict()[k], rtol=1e-5, atol=1e-5)


def test_every_example_once_per_epoch_and_schedule(chat_tok, rows):
    trainer = SFTTrainer(
        tiny_llama(len(chat_tok)),
        chat_tok,
        rows,
        SFTConfig(lr=1e-2, batch_size=5, grad_accum=2, epochs=2, warmup_ratio=0.25, progress=False),
    )
    assert trainer.steps_per_epoch == 7 and trainer.total_steps == 14  # ceil(ceil(64 / 5) / 2)
    history = trainer.train()
    assert [m.step for m in history] == list(range(1, 15)) and trainer.done
    per_epoch = sum(e.n_labels for e in trainer.examples)
    assert sum(m.n_targets for m in history[:7]) == sum(m.n_targets for m in history[7:]) == per_epoch
    assert [m.epoch for m in history] == [0] * 7 + [1] * 7
    warmup = round(0.25 * 14)
    expected = [1e-2 * warmup_cosine(s, 14, warmup, 0.1) for s in range(14)]
    assert [m.lr for m in history] == pytest.approx(expected)
    assert all(m.tokens_per_s > 0 and m.grad_norm > 0 for m in history)
    with pytest.raises(RuntimeError, match="training is over"):
        trainer.train_step()


def test_hooks_are_called(chat_tok, rows):
    saved, logged = [], []
    trainer = SFTTrainer(
        tiny_llama(len(chat_tok)),
        chat_tok,
        rows[:24],
        SFTConfig(lr=1e-2, batch_size=4, log_every=2, progress=False),
        save_fn=lambda t: saved.append(t.step),
        save_every=4,
        log_fn=logged.append,
    )
    trainer.train()
    assert saved == [4, 6] and [m.step for m in logged] == [2, 4, 6]


@pytest.mark.parametrize("packing", [False, True])
def test_resume_from_state_dict_gives_the_same_final_weights(chat_tok, rows, packing):
    config = SFTConfig(lr=1e-2, batch_size=4, grad_accum=2, epochs=2, max_length=96, packing=packing, progress=False)

    def model(seed=1):  # dropout on, so the restored RNG state matters
        m = tiny_llama(len(chat_tok), seed=seed)
        m.config.attention_dropout = 0.1
        for layer in m.model.layers:
            layer.self_attn.attention_dropout = 0.1
        return m

    full = SFTTrainer(model(), chat_tok, rows[:40], config)
    full.train()
    first = SFTTrainer(model(), chat_tok, rows[:40], config)
    first.train(until_step=3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)  # disturb the global RNG: the state must restore it
    resumed = SFTTrainer(model(seed=2), chat_tok, rows[:40], config)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert resumed.step == 3
    resumed.train()
    assert resumed.step == full.step == full.total_steps
    for k, v in weights(full.model).items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    # the same resume without the RNG state would differ (dropout draws), so the check above can fail
    bad = SFTTrainer(model(), chat_tok, rows[:40], config)
    state = first.state_dict()
    state["rng"]["torch"] = torch.manual_seed(7).get_state()
    bad.load_state_dict(state)
    bad.train()
    assert any(not torch.equal(v, bad.model.state_dict()[k]) for k, v in weights(full.model).items())


def test_resume_refuses_other_data(chat_tok, rows):
    config = SFTConfig(lr=1e-2, batch_size=4, progress=False)
    state = SFTTrainer(tiny_llama(len(chat_tok)), chat_tok, rows[:20], config).state_dict()
    with pytest.raises(ValueError, match="saved with n_examples=20, this trainer has n_examples=24"):
        SFTTrainer(tiny_llama(len(chat_tok)), chat_tok, rows[:24], config).load_state_dict(state)


def test_sft_on_arithmetic_learns_the_format(chat_tok):
    # One-operation problems: 200 rows, 90 steps of 32 (about 14 epochs) on a 2-layer, 32-wide Llama.
    options = {"max_ops": 1}
    data = load_data("builtin:arithmetic", n=200, seed=0, schema="sft", options=options)
    model = tiny_llama(len(chat_tok), hidden=32)
    config = SFTConfig(lr=2e-2, batch_size=32, epochs=100, max_steps=90, warmup_ratio=0.1, progress=False)
    history = SFTTrainer(model, chat_tok, data, config).train()
    assert len(history) == 90
    first, last = history[0].loss, sum(m.loss for m in history[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    model.eval()
    test = load_data("builtin:arithmetic", n=8, seed=0, split="test", schema="sft", options=options)
    for row in test:
        prompt = chat_tok.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        out = model.generate(
            **prompt, max_new_tokens=40, do_sample=False, eos_token_id=chat_tok.eos_token_id,
            pad_token_id=chat_tok.pad_token_id
        )
        text = chat_tok.decode(out[0, prompt["input_ids"].shape[1] :])
        assert FORMAT.match(text), text
