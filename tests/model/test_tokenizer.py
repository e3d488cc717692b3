import pytest
from transformers import AutoTokenizer

from model import DeepSeekConfig, build_tokenizer
from model.tokenizer import BASE_CHARACTERS, ROLE_TOKENS, TAG_TOKENS


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_ids_of_special_tokens_and_size(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 4 + len(ROLE_TOKENS) + len(TAG_TOKENS) + len(BASE_CHARACTERS) == 108
    assert len(tok) <= DeepSeekConfig.from_preset("tiny").vocab_size  # the tiny preset fits it


def test_arithmetic_is_one_token_per_character(tok):
    ids = tok("(12+3)*4=60", add_special_tokens=False)["input_ids"]
    assert [tok.convert_ids_to_tokens(i) for i in ids] == list("(12+3)*4=60")


def test_tags_are_single_tokens_and_survive_decoding(tok):
    text = "<think>2*3=6\n6+1=7</think> <answer>7</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for tag in TAG_TOKENS:
        assert tok.convert_tokens_to_ids(tag) in ids
    assert len(ids) == 4 + len("2*3=6\n6+1=7") + 1 + 1
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_unknown_characters_and_corpus_extension(tok):
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    bigger = build_tokenizer(corpus=["café ü"])
    ids = bigger("é", add_special_tokens=False)["input_ids"]
    assert ids != [bigger.unk_token_id] and bigger.decode(ids) == "é"
    assert len(bigger) == len(tok) + 2


def test_extra_tokens_and_duplicates():
    tok = build_tokenizer(extra_tokens=["<tool>"])
    assert tok("<tool>x", add_special_tokens=False)["input_ids"][0] == tok.convert_tokens_to_ids("<tool>")
    with pytest.raises(ValueError, match="extra_tokens: '<think>' duplicates an existing token"):
        build_tokenizer(extra_tokens=["<think>"])


def test_chat_template(tok):
    messages = [{"role": "system", "content": "Solve."}, {"role": "user", "content": "1+1"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<bos><|system|>Solve.<eos><|user|>1+1<eos><|assistant|>"
    done = messages + [{"role": "assistant", "content": "<answer>2</answer>"}]
    assert tok.apply_chat_template(done, tokenize=False).endswith("<|assistant|><answer>2</answer><eos>")
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    with pytest.raises(Exception, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_save_and_autotokenizer_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    back = AutoTokenizer.from_pretrained(tmp_path)
    text = "<think>9-4=5</think><answer>5</answer>"
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert back.decode(back(text)["input_ids"]) == text
    assert (back.pad_token, back.bos_token, back.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert back.padding_side == "left"
    messages = [{"role": "user", "content": "2*2"}]
    assert back.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = back(["1", "123"], padding=True)
    assert batch["input_ids"][0][:2] == [back.pad_token_id] * 2 and batch["attention_mask"][0] == [0, 0, 1]
