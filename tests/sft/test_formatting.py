import pytest

from sft.formatting import (
    IGNORE_INDEX,
    FormattingError,
    mask_method,
    row_to_messages,
    tokenize_conversation,
    tokenize_rows,
)
from tests.helpers.chat import DIFF_TEMPLATE, GENERATION_TEMPLATE, char_tokenizer

TWO_TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "ok"},
    {"role": "user", "content": "2+2"},
    {"role": "assistant", "content": "4"},
]


def show(tok, ex):
    """Tokens, and the labelled tokens with '_' for masked positions."""
    tokens = tok.convert_ids_to_tokens(ex.input_ids)
    labels = ["_" if lab == IGNORE_INDEX else tok.convert_ids_to_tokens(lab) for lab in ex.labels]
    return tokens, labels


@pytest.mark.parametrize("template", [DIFF_TEMPLATE, GENERATION_TEMPLATE])
def test_two_turn_mask_is_exactly_on_assistant_tokens(template):
    tok = char_tokenizer(template)
    ex = tokenize_conversation(tok, TWO_TURNS)
    tokens, labels = show(tok, ex)
    # fmt: off
    assert tokens == ["<|user|>", "H", "i", "<|end|>", "<|assistant|>", "o", "k", "<|end|>",
                      "<|user|>", "2", "+", "2", "<|end|>", "<|assistant|>", "4", "<|end|>"]
    assert labels == ["_", "_", "_", "_", "_", "o", "k", "<|end|>",
                      "_", "_", "_", "_", "_", "_", "4", "<|end|>"]
    # fmt: on
    assert ex.n_labels == 5
    assert [lab for lab in ex.labels if lab != IGNORE_INDEX] == [
        t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX
    ]


def test_mask_method_detection():
    assert mask_method(DIFF_TEMPLATE) == "diff"
    assert mask_method(GENERATION_TEMPLATE) == "generation"
    assert mask_method("{%- generation -%}x{% endgeneration %}") == "generation"


def test_eos_appended_when_template_does_not_close_the_turn():
    template = "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}"
    template += "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    tok = char_tokenizer(template)
    ex = tokenize_conversation(tok, TWO_TURNS[:2])
    tokens, labels = show(tok, ex)
    assert tokens == ["<|user|>", "H", "i", "<|assistant|>", "o", "k", "<|end|>"]
    assert labels == ["_", "_", "_", "_", "o", "k", "<|end|>"]
    ex = tokenize_conversation(tok, TWO_TURNS[:2], add_eos=False)
    assert show(tok, ex)[1] == ["_", "_", "_", "_", "o", "k"]


def test_eos_right_after_the_generation_block_is_labelled():
    template = GENERATION_TEMPLATE.replace(
        "m['content'] + '<|end|>' }}{% endgeneration %}", "m['content'] }}{% endgeneration %}{{ '<|end|>' }}"
    )
    assert template != GENERATION_TEMPLATE
    tok = char_tokenizer(template)
    assert show(tok, tokenize_conversation(tok, TWO_TURNS))[1][-3:] == ["_", "4", "<|end|>"]


def test_template_that_rewrites_earlier_turns_is_refused():
    # Earlier assistant turns are rendered without their content (as templates that drop old reasoning do).
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|assistant|><|end|>' }}"
        "{% else %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    tok = char_tokenizer(template)
    with pytest.raises(FormattingError, match="assistant turn 1: .* is not a token prefix .* generation %}"):
        tokenize_conversation(tok, TWO_TURNS)


def test_errors_for_missing_template_or_assistant():
    tok = char_tokenizer()
    with pytest.raises(FormattingError, match="no assistant turn"):
        tokenize_conversation(tok, TWO_TURNS[:1])
    with pytest.raises(FormattingError, match="opens with an assistant turn"):
        tokenize_conversation(tok, TWO_TURNS[1:])
    tok.chat_template = None
    with pytest.raises(FormattingError, match="no chat_template"):
        tokenize_conversation(tok, TWO_TURNS)
    assert tokenize_conversation(tok, TWO_TURNS, chat_template=DIFF_TEMPLATE).n_labels == 5


def test_rows_truncation_and_dropping():
    tok = char_tokenizer()
    rows = [
        {"prompt": "What is 1 + 2?", "completion": "<think>1 + 2 = 3.</think><answer>3</answer>"},
        {"messages": TWO_TURNS},
        {"prompt": "What is 10 + 20 + 30 + 40?", "completion": "100"},
    ]
    assert row_to_messages(rows[0]) == [
        {"role": "user", "content": rows[0]["prompt"]},
        {"role": "assistant", "content": rows[0]["completion"]},
    ]
    examples, dropped = tokenize_rows(rows, tok, max_length=20)
    assert dropped == 1 and len(examples) == 2  # the third row's answer starts past token 20
    assert all(len(ex) <= 20 for ex in examples)
    first_tokens, first_labels = show(tok, examples[0])
    assert first_tokens[:3] == ["<|user|>", "W", "h"] and first_labels[-4:] == ["_", "<think>", "1", " "]
    with pytest.raises(FormattingError, match="needs 'messages' or 'prompt' and 'completion'"):
        row_to_messages({"prompt": "x"})


def test_byte_level_bpe_with_a_chatml_template():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from grpo.data import tasks

    corpus = [r["prompt"] + " " + r["completion"] for r in tasks.arithmetic(300, seed=0)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|pad|>")
    chatml = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    messages = [{"role": "system", "content": "Think first."}, *TWO_TURNS]
    ex = tokenize_conversation(tok, messages, chat_template=chatml)
    spans, current = [], []
    for t, lab in zip(ex.input_ids, ex.labels, strict=True):
        if lab != IGNORE_INDEX:
            current.append(t)
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    assert spans == ["ok<|im_end|>\n", "4<|im_end|>\n"]
    generation = chatml.replace(
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}",
        "{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
        "{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endif %}",
    )
    assert tokenize_conversation(tok, messages, chat_template=generation) == ex
