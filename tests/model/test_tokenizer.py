import pytest
from transformers import AutoTokenizer

from model import DeepSeekConfig, build_tokenizer
from model.tokenizer import BASE_CHARACTERS, ROLE_TOKENS, TAG_TOKENS


def test_ids_of_special_tokens_and_size(tiny_tok):
    assert (tiny_tok.pad_token_id, tiny_tok.bos_token_id, tiny_tok.eos_token_id, tiny_tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tiny_tok) == 4 + len(ROLE_TOKENS) + len(TAG_TOKENS) + len(BASE_CHARACTERS) == 108
    assert len(tiny_tok) <= DeepSeekConfig.from_preset("tiny").vocab_size  # the tiny preset fits it


def test_arithmetic_is_one_token_per_character(tiny_tok):
    ids = tiny_tok("(12+3)*4=60", add_special_tokens=False)["input_ids"]
    assert [tiny_tok.convert_ids_to_tokens(i) for i in ids] == list("(12+3)*4=60")


def test_tags_are_single_tokens_and_survive_decoding(tiny_tok):
    text = "<think>2*3=6\n6+1=7</think> <answer>7</answer>"
    ids = tiny_tok(text, add_special_tokens=False)["input_ids"]
    for tag in TAG_TOKENS:
        assert tiny_tok.convert_tokens_to_ids(tag) in ids
    assert len(ids) == 4 + len("2*3=6\n6+1=7") + 1 + 1
    assert tiny_tok.decode(ids) == text
    assert tiny_tok.decode(ids, skip_special_tokens=True) == text


def test_unknown_characters_and_corpus_extension(tiny_tok):
    assert tiny_tok("é", add_special_tokens=False)["input_ids"] == [tiny_tok.unk_token_id]
    bigger = build_tokenizer(corpus=["café ü"])
    ids = bigger("é", add_special_tokens=False)["input_ids"]
    assert ids != [bigger.unk_token_id] and bigger.decode(ids) == "é"
    assert len(bigger) == len(tiny_tok) + 2


def test_extra_tokens_and_duplicates():
    tiny_tok = build_tokenizer(extra_tokens=["<tool>"])
    assert tiny_tok("<tool>x", add_special_tokens=False)["input_ids"][0] == tiny_tok.convert_tokens_to_ids("<tool>")
    with pytest.raises(ValueError, match="extra_tokens: '<think>' duplicates an existing token"):
        build_tokenizer(extra_tokens=["<think>"])


def test_chat_template(tiny_tok):
    messages = [{"role": "system", "content": "Solve."}, {"role": "user", "content": "1+1"}]
    text = tiny_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<bos><|system|>Solve.<eos><|user|>1+1<eos><|assistant|>"
    done = messages + [{"role": "assistant", "content": "<answer>2</answer>"}]
    assert tiny_tok.apply_chat_template(done, tokenize=False).endswith("<|assistant|><answer>2</answer><eos>")
    ids = tiny_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids[0] == tiny_tok.bos_token_id and ids[-1] == tiny_tok.convert_tokens_to_ids("<|assistant|>")
    with pytest.raises(Exception, match="unknown role tool"):
        tiny_tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_save_and_autotokenizer_round_trip(tiny_tok, tmp_path):
    tiny_tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    back = AutoTokenizer.from_pretrained(tmp_path)
    text = "<think>9-4=5</think><answer>5</answer>"
    assert back(text)["input_ids"] == tiny_tok(text)["input_ids"]
    assert back.decode(back(text)["input_ids"]) == text
    assert (back.pad_token, back.bos_token, back.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert back.padding_side == "left"
    messages = [{"role": "user", "content": "2*2"}]
    assert back.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tiny_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = back(["1", "123"], padding=True)
    assert batch["input_ids"][0][:2] == [back.pad_token_id] * 2 and batch["attention_mask"][0] == [0, 0, 1]
