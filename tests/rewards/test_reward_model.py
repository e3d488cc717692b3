"""Reward models: pooling, Bradley-Terry loss, training on synthetic preferences, HF-format save/load, serving."""

import math
import random
import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rewards import call_reward, get_reward
from rewards.reward_model import (
    RewardModel,
    RewardModelActor,
    RewardModelReward,
    bradley_terry_loss,
    conversation_text,
    encode,
    last_token_index,
)
from rewards.rm_train import (
    RewardModelTrainConfig,
    check_pairs,
    pairwise_accuracy,
    train_reward_model,
    train_reward_model_from_checkpoint,
)

TASKS = ["my homework", "the essay", "this bug", "my taxes", "the garden", "a recipe", "the move", "my resume",
         "the report", "a poem", "the budget", "my code", "the slides", "a letter", "the plan", "my bike"]
HELD_OUT_TASKS = ["the exam", "a speech", "the trip", "my cat"]
POLITE = ["Of course , happy to help with {t} .", "Sure , I would be glad to help with {t} !",
          "Thank you for asking , let us work on {t} together .", "Happy to help : here is a plan for {t} ."]
RUDE = ["No . Do {t} yourself .", "Go away , {t} is your problem .", "Stop asking me about {t} .",
        "Whatever , {t} is boring ."]
ASKS = ["Can you help me with {t} ?", "Please help with {t} .", "I need help with {t} ."]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"


def preference_pairs(tasks, n, seed):
    rng = random.Random(seed)
    return [{"prompt": rng.choice(ASKS).format(t=t), "chosen": rng.choice(POLITE).format(t=t),
             "rejected": rng.choice(RUDE).format(t=t)}
            for t in (rng.choice(tasks) for _ in range(n))]


def build_tokenizer():
    texts = [*TASKS, *HELD_OUT_TASKS, *POLITE, *RUDE, *ASKS, "user : assistant :"]
    words = sorted({w for text in texts for w in text.replace("{t}", " ").split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def causal_lm_dir(tmp_path_factory, tokenizer):
    """A tiny causal-LM checkpoint folder with its tokenizer, standing in for the SFT model."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("sft")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, causal_lm_dir, tokenizer):
    """Trains a reward model on synthetic preferences (polite beats rude), evaluates on unseen tasks, saves."""
    torch.manual_seed(0)
    train, held_out = preference_pairs(TASKS, 192, seed=1), preference_pairs(HELD_OUT_TASKS, 64, seed=2)
    out = tmp_path_factory.mktemp("rm")
    config = RewardModelTrainConfig(learning_rate=3e-3, epochs=3, batch_size=16, max_length=64, progress=False)
    start = time.perf_counter()
    result = train_reward_model_from_checkpoint(causal_lm_dir, out, train, config, eval_pairs=held_out)
    seconds = time.perf_counter() - start
    print(f"\nreward model: {result.steps} steps in {seconds:.1f} s (train loop {result.seconds:.1f} s); "
          f"held-out pairwise accuracy {result.eval_accuracy_before:.3f} -> {result.eval_accuracy:.3f}; "
          f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
    return result, out, held_out


# ----------------------------------------------------------------------------------------------- pieces
def test_last_token_index_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 1]
    with pytest.raises(ValueError, match="a row without any token"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


def test_bradley_terry_loss_hand_computed():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2  # 0.31326, 2.12693
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), torch.tensor(expected))
    with_margin = bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(with_margin, torch.tensor((math.log(2.0) + math.log1p(math.exp(2.0))) / 2))


def test_scores_do_not_depend_on_padding(causal_lm_dir, tokenizer):
    model = RewardModel.from_causal_lm(causal_lm_dir).eval()
    texts = ["user : Please help with the plan . assistant : No .", "user : hi"]
    alone = [model(*encode(tokenizer, [t], 64)).item() for t in texts]
    ids, mask = encode(tokenizer, texts, 64)  # right-padded batch
    torch.testing.assert_close(model(ids, mask), torch.tensor(alone))
    lengths = mask.sum(-1)
    left_ids, left_mask = torch.full_like(ids, tokenizer.pad_token_id), torch.zeros_like(mask)
    for i, n in enumerate(lengths.tolist()):
        left_ids[i, -n:], left_mask[i, -n:] = ids[i, :n], 1
    torch.testing.assert_close(model(left_ids, left_mask), torch.tensor(alone), atol=1e-5, rtol=1e-5)
    # the head reads the backbone's hidden state at the last token
    n = int(lengths[1])
    hidden = model.backbone(input_ids=ids[1:, :n], attention_mask=mask[1:, :n]).last_hidden_state[0, -1]
    torch.testing.assert_close(model.score.weight[0] @ hidden, torch.tensor(alone[1]))


def test_conversation_text_and_encode(tokenizer):
    text, templated = conversation_text(tokenizer, "Please help with {t} .", [{"role": "assistant", "content": "No ."}])
    assert templated and text == "user : Please help with {t} . assistant : No . "
    plain = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, pad_token="[PAD]")
    assert conversation_text(plain, "a", "b") == ("ab", False)
    ids, mask = encode(tokenizer, ["user : hi", "user : Please help with my code ."], max_length=4)
    assert ids.shape == (2, 4) and mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert tokenizer.decode(ids[1]) == "with my code ."  # the last tokens are kept


def test_check_pairs_names_missing_fields():
    with pytest.raises(ValueError, match=r"preference pair 1 lacks field\(s\) \['rejected'\]"):
        check_pairs([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(ValueError, match="no preference pairs"):
        check_pairs([])
    with pytest.raises(ValueError, match="learning_rate must be a positive number"):
        RewardModelTrainConfig(learning_rate=0.0)


def test_one_step_updates_every_parameter(causal_lm_dir, tokenizer):
    torch.manual_seed(0)
    model = RewardModel.from_causal_lm(causal_lm_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_reward_model(model, tokenizer, preference_pairs(TASKS, 8, seed=3),
                                RewardModelTrainConfig(learning_rate=1e-2, batch_size=8, progress=False))
    assert result.steps == 1 and math.isfinite(result.losses[0])
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []



def test_training_from_a_checkpoint_depends_on_its_seed_not_on_the_global_generator(causal_lm_dir, tmp_path):
    # A Ray worker's global generator holds whatever ran in that process before: the run must not see it.
    pairs = preference_pairs(TASKS, 16, seed=4)
    runs = {}
    for global_seed, seed in ((1, 0), (2, 0), (1, 5)):
        torch.manual_seed(global_seed)
        config = RewardModelTrainConfig(learning_rate=1e-2, batch_size=8, max_length=64, seed=seed, progress=False)
        result = train_reward_model_from_checkpoint(causal_lm_dir, tmp_path / f"{global_seed}-{seed}", pairs, config)
        runs[global_seed, seed] = result.losses
    assert runs[1, 0] == runs[2, 0]
    assert runs[1, 0] != runs[1, 5]

# ----------------------------------------------------------------------------------------------- end to end
def test_training_beats_90_percent_on_held_out_pairs(trained):
    result, _, _ = trained
    assert result.eval_accuracy_before < 0.9  # not solved by the random initialisation
    assert result.eval_accuracy > 0.9
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4


def test_checkpoint_loads_back_with_identical_scores(trained, tokenizer):
    result, path, held_out = trained
    model = RewardModel.from_pretrained(path)
    assert pairwise_accuracy(model, tokenizer, held_out, max_length=64) == result.eval_accuracy
    reloaded = RewardModel.from_pretrained(path)
    texts = [conversation_text(tokenizer, p["prompt"], p["chosen"])[0] for p in held_out[:8]]
    first = model.score_texts(tokenizer, texts, add_special_tokens=False)
    assert reloaded.score_texts(tokenizer, texts, add_special_tokens=False) == first


def test_checkpoint_is_a_hf_sequence_classifier(trained, tokenizer):
    _, path, held_out = trained
    import json

    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["grpo_reward_model"]["backbone_loader"] == "auto" and config["pad_token_id"] == 0
    ours = RewardModel.from_pretrained(path).eval()
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    texts = [conversation_text(tokenizer, p["prompt"], p["rejected"])[0] for p in held_out[:6]]
    ids, mask = encode(tokenizer, texts, 64, add_special_tokens=False)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits[:, 0], ours(ids, mask))


def test_not_a_reward_model_checkpoint(causal_lm_dir, tmp_path):
    with pytest.raises(ValueError, match="is not a reward-model checkpoint"):
        RewardModel.from_pretrained(causal_lm_dir)
    with pytest.raises(ValueError, match="has no config.json"):
        RewardModel.from_pretrained(tmp_path)


def test_reward_protocol_and_registry(trained, tokenizer):
    _, path, held_out = trained
    reward = get_reward("reward_model", path=str(path), batch_size=3, max_length=64)
    assert isinstance(reward, RewardModelReward)
    prompts = [p["prompt"] for p in held_out[:5]]
    chosen = [[{"role": "assistant", "content": p["chosen"]}] for p in held_out[:5]]
    rejected = [p["rejected"] for p in held_out[:5]]
    good, bad = call_reward(reward, prompts, chosen), call_reward(reward, prompts, rejected)
    assert sum(g > b for g, b in zip(good, bad)) >= 4
    model = RewardModel.from_pretrained(path)
    texts = [conversation_text(tokenizer, p, c)[0] for p, c in zip(prompts, rejected)]
    assert bad == pytest.approx(model.score_texts(tokenizer, texts, add_special_tokens=False), abs=1e-5)
    actor = RewardModelActor(path, max_length=64)  # the class the Ray actor wraps, used in-process
    assert actor.score(prompts, rejected) == pytest.approx(bad, abs=1e-5)


@pytest.mark.slow
def test_ray_actor_serves_scores(trained):
    ray = pytest.importorskip("ray")
    _, path, held_out = trained
    prompts, rejected = [p["prompt"] for p in held_out[:4]], [p["rejected"] for p in held_out[:4]]
    expected = RewardModelActor(path, max_length=64).score(prompts, rejected)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        from rewards.reward_model import RayActorReward

        actor = RewardModelActor.as_ray_actor(num_cpus=1).remote(str(path), max_length=64)
        scores = call_reward(RayActorReward(actor), prompts, rejected)
    finally:
        ray.shutdown()
    assert scores == pytest.approx(expected, abs=1e-5)


def test_deepseek_backbone_plugs_in(tmp_path):
    """Our MLA/MoE policy as a reward-model backbone: same scores as transformers' DeepSeek-V3 on the same
    weights, trained with ours, saved with Hugging Face names and loaded back by transformers."""
    from model import DeepSeekConfig, DeepSeekForCausalLM, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    DeepSeekForCausalLM(DeepSeekConfig.from_preset("tiny")).save_pretrained(tmp_path / "sft", tokenizer=tok)
    ours = RewardModel.from_causal_lm(tmp_path / "sft", loader="model:DeepSeekForCausalLM")
    reference = RewardModel.from_causal_lm(tmp_path / "sft")  # transformers' DeepseekV3Model
    assert type(ours.backbone).__module__ == "model.modeling" and "transformers" in type(reference.backbone).__module__
    with torch.no_grad():
        reference.score.weight.copy_(ours.score.weight)
    texts = [conversation_text(tok, "What is 3 + 4?", "<answer>7</answer>")[0], "<|user|>hi<eos>"]
    ids, mask = encode(tok, texts, 64, add_special_tokens=False)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids, mask), reference.eval()(ids, mask), atol=1e-5, rtol=1e-4)
    pairs = [{"prompt": "What is 3 + 4?", "chosen": "<answer>7</answer>", "rejected": "<answer>9</answer>"}] * 4
    train_reward_model(ours, tok, pairs, RewardModelTrainConfig(learning_rate=1e-2, batch_size=4, progress=False))
    ours.save_pretrained(tmp_path / "rm", tokenizer=tok)
    back = RewardModel.from_pretrained(tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    with torch.no_grad():
        expected = ours.eval()(ids, mask)
        torch.testing.assert_close(back.eval()(ids, mask), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(hf.eval()(input_ids=ids, attention_mask=mask).logits[:, 0], expected,
                                   atol=1e-5, rtol=1e-4)

