"""Evaluating checkpoints: greedy accuracy against transformers' generate, our model against a plain decode,
sampled metrics against brute force, the command's outputs, and one clear message for bad input."""

import itertools
import json
import math
import re
import shutil
from collections import Counter
from fractions import Fraction

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grpo.evaluation import (
    EvalConfig,
    EvalError,
    EvalResult,
    PromptResult,
    answer_labels,
    compare,
    evaluate_checkpoint,
)
from grpo.evaluation.command import main
from grpo.evaluation.metrics import length_stats
from model import DeepSeekConfig, DeepSeekForCausalLM, build_tokenizer
from rewards.rules import accuracy

PROMPTS = [f"Compute {i}+{3 * i + 7}" for i in range(8)]


def digit_llama(tok, seed=0):
    """A tiny Llama that only ever emits digits or eos, and whose output depends on the prompt.

    The LM head rows of the ten digits come in opposite pairs (w, -w), so some digit always has a positive logit
    while every other token's row (eos aside) is zero; larger embeddings and residual outputs make the greedy
    completion vary with the prompt's last tokens.
    """
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    digits = tok.convert_tokens_to_ids(list("0123456789"))
    with torch.no_grad():
        head = model.lm_head.weight  # [V, H]
        base = torch.randn(5, head.shape[1]) * 3
        head.zero_()
        for j in range(5):
            head[digits[2 * j]], head[digits[2 * j + 1]] = base[j], -base[j]
        head[tok.eos_token_id] = torch.randn(head.shape[1]) * 3
        model.model.embed_tokens.weight.normal_(0, 1.0)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(20)
            layer.self_attn.o_proj.weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def plain_tok():
    tok = build_tokenizer()
    tok.chat_template = None  # prompts are tokenised as they are, so their last tokens differ
    return tok


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, plain_tok):
    path = tmp_path_factory.mktemp("ckpts") / "llama"
    digit_llama(plain_tok).save_pretrained(path)
    plain_tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(DeepSeekConfig.from_preset("tiny", num_hidden_layers=2, vocab_size=len(tok)))
    path = tmp_path_factory.mktemp("ckpts") / "ours"
    model.save_pretrained(path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, llama_dir, plain_tok):
    from rewards.reward_model import RewardModel

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("rms") / "rm"
    RewardModel.from_causal_lm(llama_dir).save_pretrained(path, tokenizer=plain_tok)
    return path


def hf_greedy(model, tok, prompt, max_new):
    ids = tok(prompt)["input_ids"]
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    new = out[0, len(ids):].tolist()
    return tok.decode(new, skip_special_tokens=True), new


def cfg(**kw):
    return EvalConfig(**{"progress": False, "device": "cpu", **kw})


# ----------------------------------------------------------------------------------------------- greedy
def test_greedy_accuracy_equals_transformers_generate(llama_dir, plain_tok):
    model = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    decoded = [hf_greedy(model, plain_tok, p, 6) for p in PROMPTS]
    texts = [t for t, _ in decoded]
    assert len(set(texts)) >= 3, texts  # the model's output depends on the prompt
    # every other row's answer is what the model says; the rest get a different number
    answers = [t if i % 2 == 0 and t else str(int(t or "0") + 1) for i, t in enumerate(texts)]
    expected = sum(accuracy(PROMPTS, texts, answer=answers)) / len(PROMPTS)
    assert 0 < expected < 1

    rows = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, answers)]
    result = evaluate_checkpoint(str(llama_dir), None, rows, cfg(n=0, max_new_tokens=6, batch_size=3))
    assert result.greedy_accuracy == expected
    assert [p.greedy for p in result.prompts] == texts
    eos = plain_tok.eos_token_id
    lengths = [len(ids) for _, ids in decoded]
    truncated = [ids[-1:] != [eos] for _, ids in decoded]
    assert result.greedy_length == length_stats(lengths, truncated)
    assert result.answer_rate == sum(bool(t) for t in texts) / len(texts)  # a digit string is a bare number
    assert result.format_rate == 0.0 and result.pass_at_k == {} and result.sample_length is None

    model.train()  # an in-memory model (as the training pipeline passes it) gives the same result, keeps its mode
    in_memory = evaluate_checkpoint(model, plain_tok, rows, cfg(n=0, max_new_tokens=6, batch_size=8), name="live")
    assert model.training
    assert [p.greedy for p in in_memory.prompts] == texts and in_memory.greedy_accuracy == expected
    assert in_memory.name == "live" and in_memory.metrics()["greedy_accuracy"] == expected


def test_our_model_greedy_equals_a_full_forward_decode(deepseek_dir):
    tok = build_tokenizer()
    model = DeepSeekForCausalLM.from_pretrained(deepseek_dir).eval()
    rows = [{"prompt": p, "answer": "1"} for p in PROMPTS[:4]]
    expected = []
    for row in rows:
        ids = list(tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"])
        new = []
        with torch.no_grad():
            for _ in range(5):
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        expected.append(tok.decode(new, skip_special_tokens=False))
    result = evaluate_checkpoint(str(deepseek_dir), None, rows, cfg(n=2, k=(1, 2), max_new_tokens=5, batch_size=4))
    assert [p.greedy for p in result.prompts] == expected
    assert result.name == "ours" and result.sample_length.count == 2 * len(rows)
    assert set(result.pass_at_k) == set(result.maj_at_k) == {1, 2}


# ----------------------------------------------------------------------------------------------- sampled metrics
def brute_pass(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def brute_maj(labels, gold, k):
    total, subsets = Fraction(0), list(itertools.combinations(labels, k))
    for subset in subsets:
        counts = Counter(x for x in subset if x is not None)
        if counts:
            tied = [x for x, v in counts.items() if v == max(counts.values())]
            total += Fraction(sum(x == gold for x in tied), len(tied))
    return total / len(subsets)


def test_sampled_metrics_equal_brute_force_over_the_recorded_samples(llama_dir):
    # one token per completion: samples are single digits (or empty), so votes and hits are frequent
    rows = [{"prompt": p, "answer": str(i % 10)} for i, p in enumerate(PROMPTS)]
    n, ks = 6, (1, 2, 6)
    result = evaluate_checkpoint(str(llama_dir), None, rows, cfg(n=n, k=ks, max_new_tokens=1, temperature=3.0, seed=3))
    pass_k, maj_k = {k: [] for k in ks}, {k: [] for k in ks}
    for p in result.prompts:
        assert len(p.sample_answers) == n
        c = sum(a == p.answer for a in p.sample_answers)
        assert p.samples_correct == c
        for k in ks:
            pass_k[k].append(brute_pass(n, c, k))
            maj_k[k].append(brute_maj(p.sample_answers, p.answer, k))
    for k in ks:
        assert result.pass_at_k[k] == pytest.approx(float(sum(pass_k[k]) / len(rows)), abs=1e-12)
        assert result.maj_at_k[k] == pytest.approx(float(sum(maj_k[k]) / len(rows)), abs=1e-12)
    assert 0 < result.pass_at_k[1] < result.pass_at_k[6]  # the data leaves room to improve with k
    again = evaluate_checkpoint(str(llama_dir), None, rows, cfg(n=n, k=ks, max_new_tokens=1, temperature=3.0, seed=3))
    assert [p.sample_answers for p in again.prompts] == [p.sample_answers for p in result.prompts]


def test_answer_labels_group_equivalent_answers():
    labels, correct, reps = answer_labels(["<answer>0.5</answer>", "1/2", "no idea", "3", "0.50"], "1/2")
    assert labels == [0, 0, None, 1, 0]
    assert correct == {0} and reps == ["0.5", "3"]


def _result(name, rm_scores):
    prompts = tuple(PromptResult(index=i, prompt=f"q{i}", answer=None, greedy="", greedy_tokens=0,
                                 greedy_truncated=False, scores={"rm:x": s}) for i, s in enumerate(rm_scores))
    return EvalResult(name=name, num_prompts=len(prompts), greedy_accuracy=None, pass_at_k={}, maj_at_k={},
                      format_rate=0.0, answer_rate=0.0, rewards={"rm:x": None},
                      greedy_length=length_stats([0], [False]), sample_length=None, prompts=prompts)


def test_compare_gives_each_later_checkpoint_its_win_rate_against_the_first():
    a, b, c = _result("a", [0.0, 1.0, 2.0, 3.0]), _result("b", [1.0, 1.0, 0.0, 4.0]), _result("c", [0.0] * 4)
    comparison = compare([a, b, c], ["rm:x"])
    assert comparison.baseline == "a"
    assert comparison.win_rates == {"rm:x": {"b": (1 + 0.5 + 0 + 1) / 4, "c": (0.5 + 0 + 0 + 0) / 4}}
    with pytest.raises(EvalError, match="different prompts"):
        compare([a, _result("d", [0.0] * 3)], ["rm:x"])
    with pytest.raises(EvalError, match="'rm:y' was not scored"):
        compare([a, b], ["rm:y"])


# ----------------------------------------------------------------------------------------------- the command
def test_command_writes_json_markdown_and_charts(tmp_path, llama_dir, rm_dir, plain_tok):
    from rewards.reward_model import RewardModel

    twin = tmp_path / "llama_twin"
    shutil.copytree(llama_dir, twin)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": p, "answer": str(i)}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "out"
    rc = main([str(llama_dir), str(twin), "--data", str(data), "--prompt-column", "question", "--limit", "5",
               "--n", "2", "--k", "1,2", "--max-new-tokens", "4", "--reward", "format", "accuracy",
               "--reward-model", str(rm_dir), "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "completions.jsonl", "accuracy.png",
                                                "rewards.png", "lengths.png", "win_rate.png"}
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in report["results"]] == ["llama", "llama_twin"]
    assert report["results"][0]["num_prompts"] == 5 and report["meta"]["rows"] == 5
    assert set(report["results"][0]["pass_at_k"]) == {"1", "2"}
    assert set(report["results"][0]["rewards"]) == {"format", "accuracy", "rm:rm"}
    # identical checkpoints: every prompt is a tie, and ties count half
    assert report["comparison"] == {"baseline": "llama", "win_rates": {"rm:rm": {"llama_twin": 0.5}}}
    # the reward-model mean equals the reward model scoring prompt + greedy completion itself
    lines = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    mine = [rec for rec in lines if rec["checkpoint"] == "llama"]
    rm = RewardModel.from_pretrained(rm_dir)
    direct = rm.score_texts(plain_tok, [rec["prompt"] + rec["greedy"] for rec in mine])
    assert [rec["scores"]["rm:rm"] for rec in mine] == pytest.approx(direct, abs=1e-5)
    assert report["results"][0]["rewards"]["rm:rm"] == pytest.approx(sum(direct) / len(direct), abs=1e-5)
    table = (out / "results.md").read_text()
    assert "| metric | llama | llama_twin |" in table and "| pass@2 |" in table and "| rm:rm | 0.500 |" in table


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "grpo eval" in capsys.readouterr().out


def _bad(tmp_path, llama_dir, case):
    """Arguments for one kind of bad input."""
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "Compute 1+2", "answer": "3"}) + "\n")
    no_tok = tmp_path / "no_tok"
    if case == "no_tokenizer":
        no_tok.mkdir()
        shutil.copy(llama_dir / "config.json", no_tok / "config.json")
        shutil.copy(llama_dir / "model.safetensors", no_tok / "model.safetensors")
        return [str(no_tok), "--data", str(data)]
    if case == "missing_prompt":
        data.write_text(json.dumps({"question": "Compute 1+2", "solution": "3"}) + "\n")
        return [str(llama_dir), "--data", str(data)]
    if case == "missing_answer":
        data.write_text(json.dumps({"prompt": "Compute 1+2", "solution": "3"}) + "\n")
        return [str(llama_dir), "--data", str(data)]
    if case == "empty":
        data.write_text("")
        return [str(llama_dir), "--data", str(data)]
    return {
        "no_checkpoint": [str(tmp_path / "nowhere"), "--data", str(data)],
        "no_data": [str(llama_dir), "--data", str(tmp_path / "missing.jsonl")],
        "unknown_reward": [str(llama_dir), "--data", str(data), "--reward", "no_such_reward"],
        "k_above_n": [str(llama_dir), "--data", str(data), "--n", "2", "--k", "1,4"],
        "no_reward_model": [str(llama_dir), "--data", str(data), "--reward-model", str(tmp_path / "rm_missing")],
    }[case]


@pytest.mark.parametrize(("case", "expected"), [
    ("no_checkpoint", r"checkpoint \S*nowhere does not exist"),
    ("no_tokenizer", r"no_tok has no tokenizer files \(expected one of tokenizer.json"),
    ("missing_prompt", r"column 'prompt' not found .*columns: question, solution"),
    ("missing_answer", r"column 'answer' not found .*columns: prompt, solution"),
    ("empty", r"data.jsonl is empty"),
    ("no_data", r"missing.jsonl does not exist"),
    ("unknown_reward", r"--reward 'no_such_reward': unknown reward 'no_such_reward'; known: accuracy"),
    ("k_above_n", r"EvalConfig.k must be a non-empty list of integers in \[1, n=2\]"),
    ("no_reward_model", r"reward model \S*rm_missing does not exist"),
])
def test_bad_input_gives_one_message_and_exit_code_2(tmp_path, llama_dir, capsys, case, expected):
    rc = main([*_bad(tmp_path, llama_dir, case), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("grpo eval: error: "), err
    assert re.search(expected, lines[0]), lines[0]


def test_api_rejects_rows_without_the_needed_columns(llama_dir):
    with pytest.raises(EvalError, match=r"row 0: column 'answer' is missing; columns: prompt"):
        evaluate_checkpoint(str(llama_dir), None, [{"prompt": "Compute 1+2"}], cfg(n=0))
    with pytest.raises(EvalError, match="no rows to evaluate"):
        evaluate_checkpoint(str(llama_dir), None, [], cfg(n=0))
    result = evaluate_checkpoint(str(llama_dir), None, [{"prompt": "Compute 1+2"}], cfg(n=0, accuracy=False,
                                                                                        max_new_tokens=2))
    assert result.greedy_accuracy is None and "greedy_accuracy" not in result.metrics()


def test_load_rows_default_splits_and_limit(tmp_path):
    import datasets

    from grpo.data import load_data
    from grpo.evaluation import default_split, load_rows

    rows = load_rows("builtin:arithmetic", limit=3)
    assert rows == load_data("builtin:arithmetic", split="test", n=3).to_list()  # builtin tasks: the test split
    assert default_split("builtin:arithmetic") == "test" and default_split(str(tmp_path / "a.jsonl")) == "train"
    folder = tmp_path / "dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"q": "Compute 1+1", "a": "2"}]),
        "test": datasets.Dataset.from_list([{"q": f"Compute {i}+1", "a": str(i + 1)} for i in range(4)]),
    }).save_to_disk(str(folder))
    rows = load_rows(str(folder), limit=2, prompt_column="q", answer_column="a")
    assert rows == [{"prompt": "Compute 0+1", "answer": "1"}, {"prompt": "Compute 1+1", "answer": "2"}]
    assert len(load_rows(str(folder), split="train", prompt_column="q", answer_column="a")) == 1


def test_an_engine_that_cannot_load_is_one_message(tmp_path, llama_dir, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here, so the vllm engine can load")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "Compute 1+2", "answer": "3"}) + "\n")
    rc = main([str(llama_dir), "--data", str(data), "--engine", "vllm", "--n", "0", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"grpo eval: error: checkpoint {llama_dir} could not be loaded with the vllm engine")
