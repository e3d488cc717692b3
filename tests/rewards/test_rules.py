"""Rule-based rewards on hand-made completions: accuracy, format, overlong, language consistency."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from rewards import LanguageConsistencyReward, OverlongReward, accuracy, call_reward, format_reward, get_reward
from rewards.answers import answers_match, extract_answer, gold_answer, last_boxed
from rewards.language import chain_of_thought, script_units


# ----------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>2+2</think><answer>4</answer>", "4"),
        ("<answer> 1 </answer> then <answer>2</answer>", "2"),  # the last block wins
        ("<answer>so \\boxed{\\frac{3}{4}}</answer>", "\\frac{3}{4}"),  # boxed inside the block
        ("the result is \\boxed{\\frac{a^{2}}{b}} ok", "\\frac{a^{2}}{b}"),  # nested braces
        ("\\boxed{1} and later \\boxed{ 2 }", "2"),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("#### 1,000\n", "1,000"),
        ("42", "42"),
        ("  -7.5.\n", "-7.5"),
        ("3/4", "3/4"),
        ("<answer></answer>", None),  # empty answer block
        ("<answer>5", None),  # unclosed tag, and not a bare number
        ("\\boxed{3/4", None),  # unbalanced braces
        ("The answer is 42", None),  # prose: no extractable answer
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# Completions of two kinds: a model trained on the R1 format, and an instruct model answering in free text.
R1_STYLE = [
    ("<think>80 + 79 = 159.</think><answer>159</answer>", "159"),
    ("<think>2 * 3 = 6.</think><answer>\\boxed{6}</answer>", "6"),
    ("We add them.\n#### 159", "159"),
    ("159", "159"),
]
FREE_TEXT = [
    ("80 + 79 = 159", "159"),
    ("The answer is 159.", "159"),
    ("To find the sum, add 80 and 79. The final answer is: 159. Let me know if you need more help!", "159"),
    ("Answer: 3/4 of the pie", "3/4"),
    ("First 6 * 7 = 42, then 42 + 8 = 50, so we get 50", "50"),
    ("I get $\\frac{1}{2}$", "\\frac{1}{2}"),
    ("There are 12 apples and 13 pears, 25 fruits in all.", "25"),
]


@pytest.mark.parametrize(("text", "expected"), R1_STYLE)
def test_both_modes_read_the_r1_format_alike(text, expected):
    assert extract_answer(text, "strict") == extract_answer(text, "lenient") == expected


@pytest.mark.parametrize(("text", "expected"), FREE_TEXT)
def test_lenient_mode_finds_free_text_answers_strict_mode_does_not(text, expected):
    assert extract_answer(text, "strict") is None
    assert extract_answer(text, "lenient") == expected


def test_lenient_prefers_the_format_and_stated_answers_over_later_numbers():
    assert extract_answer("<answer>5</answer> but maybe 7", "lenient") == "5"
    assert extract_answer("The answer is 12, since 5 + 7 = 12 and 3 more is 15", "lenient") == "12"
    assert extract_answer("no numbers at all", "lenient") is None
    with pytest.raises(ValueError, match="answer mode must be one of"):
        extract_answer("1", "loose")


def test_accuracy_reward_modes_per_reward():
    completions = ["80 + 79 = 159", "<answer>159</answer>", "The answer is 158."]
    answers = ["159"] * 3
    assert get_reward("accuracy")(["q"] * 3, completions, answer=answers) == [0.0, 1.0, 0.0]
    assert get_reward("accuracy", mode="lenient")(["q"] * 3, completions, answer=answers) == [1.0, 1.0, 0.0]
    assert accuracy(["q"], ["80 + 79 = 159"], answer=["159"]) == [0.0]  # the module-level reward is strict
    with pytest.raises(ValueError, match="answer mode"):
        get_reward("accuracy", mode="loose")


def test_last_boxed_and_gold_forms():
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("no box") is None
    assert gold_answer(72) == "72"
    assert gold_answer("He has 3 + 4 = 7 apples.\n#### 7") == "7"
    assert gold_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        ("3/4", "0.75", True),
        ("1/2", "0.5", True),
        ("\\frac{1}{2}", "0.5", True),
        ("\\dfrac{3}{4}", "3/4", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("1,000", "1000", True),
        ("-5", "-5.0", True),
        ("x = 3", "3", True),
        ("0.76", "0.75", False),
        ("7", "-7", False),
        ("abc", "3", False),
    ],
)
def test_answers_match(predicted, gold, expected):
    assert answers_match(predicted, gold) is expected


# ----------------------------------------------------------------------------------------------- accuracy
def test_accuracy_tricky_forms():
    completions = [
        "<think>3 of 4 parts</think><answer>\\boxed{3/4}</answer>",  # boxed fraction vs decimal gold
        "so the total is \\boxed{\\frac{1}{2}}",
        "Adding up: 48 + 24 = 72\n#### 72",
        "85",  # bare integer (arithmetic toy task)
        "<think>...</think><answer>84</answer>",  # wrong
        "I am not sure.",  # nothing extractable
        "<answer>12",  # malformed: unclosed tag
        [{"role": "assistant", "content": "<answer>0.5</answer>"}],  # chat-message completion
    ]
    golds = ["0.75", "0.5", "Natalia sold 48 + 24 = 72 clips.\n#### 72", 85, "85", "3", "12", "1/2"]
    assert accuracy(["q"] * 8, completions, answer=golds) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_accuracy_in_worker_threads():  # math-verify's SIGALRM timeouts only work in the main thread
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(accuracy, ["q"], ["\\boxed{\\dfrac{1}{2}}"], answer=["0.5"]) for _ in range(2)]
        assert [f.result() for f in futures] == [[1.0], [1.0]]


def test_accuracy_has_no_opinion_without_a_reference():
    scores = accuracy(["q"] * 4, ["<answer>3</answer>", "<answer>3</answer>", "<answer>4</answer>", "x"],
                      answer=["3", None, "3", "  "])
    assert scores == [1.0, None, 0.0, None]


def test_accuracy_missing_answer_column():
    with pytest.raises(KeyError, match="column 'answer' is required"):
        accuracy(["q"], ["1"])
    with pytest.raises(ValueError, match="column 'answer' must be a list with one value per sample"):
        accuracy(["q", "q"], ["1", "2"], answer=["1"])


# ----------------------------------------------------------------------------------------------- format
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>reason</think><answer>4</answer>", 1.0),
        ("  <think>\nreason\n</think>\n\n<answer> 4 </answer>\n", 1.0),
        ("<think></think><answer>4</answer>", 1.0),  # an empty thought is still the format
        ("<answer>4</answer>", 0.0),
        ("<think>reason</think>", 0.0),
        ("<answer>4</answer><think>reason</think>", 0.0),  # wrong order
        ("Sure! <think>reason</think><answer>4</answer>", 0.0),  # text before
        ("<think>reason</think><answer>4</answer> done", 0.0),  # text after
        ("<think>a</think>b<answer>4</answer>", 0.0),  # text between
        ("<think>a<think>b</think><answer>4</answer>", 0.0),  # a repeated tag
        ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),
        ("<think>a</think><answer> </answer>", 0.0),  # empty answer
        ("<think>a</think><answer>4", 0.0),  # unclosed
    ],
)
def test_format(text, expected):
    assert format_reward(["q"], [text]) == [expected]
    assert get_reward("format")(["q"], [[{"role": "assistant", "content": text}]]) == [expected]


# ----------------------------------------------------------------------------------------------- overlong
def test_overlong_characters_hand_computed():
    reward = OverlongReward(max_length=10, cache_length=4)
    lengths = [0, 6, 7, 8, 10, 11, 50]
    # soft window (6, 10]: (6 - n) / 4
    assert reward(["q"] * 7, ["x" * n for n in lengths]) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]


def test_overlong_token_lengths():
    reward = OverlongReward(max_length=4, cache_length=2)
    ids = [[1], [1, 2, 3], [1, 2, 3, 4, 5]]
    # completion_ids wins over the (long) text: lengths 1, 3, 5 -> 0, (2 - 3) / 2, -1
    assert reward(["q"] * 3, ["x" * 100] * 3, completion_ids=ids) == [0.0, -0.5, -1.0]

    class WordTokenizer:
        def encode(self, text, add_special_tokens=True):
            return text.split()

    worded = OverlongReward(max_length=4, cache_length=2, tokenizer=WordTokenizer())
    assert worded(["q"] * 2, ["a b c", "a b c d e f"]) == [-0.5, -1.0]


def test_overlong_hard_cut_and_validation():
    assert OverlongReward(max_length=3, cache_length=0)(["q"] * 2, ["abc", "abcd"]) == [0.0, -1.0]
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        OverlongReward(max_length=0, cache_length=0)
    with pytest.raises(ValueError, match=r"cache_length must be an integer in \[0, max_length=3\]"):
        OverlongReward(max_length=3, cache_length=4)
    with pytest.raises(TypeError, match="tokenizer must have an encode"):
        OverlongReward(max_length=3, cache_length=1, tokenizer=object())


# ----------------------------------------------------------------------------------------------- language
def test_script_units_and_chain_of_thought():
    assert script_units("Let me 计算 this") == ["latin", "latin", "han", "han", "latin"]
    assert script_units("これは test, 42!") == ["hiragana", "hiragana", "hiragana", "latin"]
    assert script_units("Привет мир") == ["cyrillic", "cyrillic"]
    assert chain_of_thought("<think>abc</think><answer>1</answer>") == "abc"
    assert chain_of_thought("<think>unclosed 中") == "unclosed 中"
    assert chain_of_thought("no tags") == "no tags"


def test_language_consistency_hand_computed():
    completions = [
        "<think>Let me 计算 this</think><answer>5</answer>",  # 3 Latin words, 2 Han characters
        "<think>这是 test</think>",  # 2 Han, 1 Latin
        "<think>12 + 3 = 15</think>",  # no letters: no opinion
        "plain English reasoning, no tags",
    ]
    en = LanguageConsistencyReward("en")(["q"] * 4, completions)
    assert en == [pytest.approx(3 / 5), pytest.approx(1 / 3), None, 1.0]
    per_sample = get_reward("language_consistency")(["q"] * 4, completions, language=["zh", "zh", "zh", "en"])
    assert per_sample == [pytest.approx(2 / 5), pytest.approx(2 / 3), None, 1.0]
    assert LanguageConsistencyReward("ja")(["q"], ["<think>これは漢字 test</think>"]) == [pytest.approx(5 / 6)]


def test_language_consistency_errors():
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        LanguageConsistencyReward("xx")
    with pytest.raises(ValueError, match="needs a 'language' column or a language= setting"):
        LanguageConsistencyReward()(["q"], ["text"])
    with pytest.raises(ValueError, match="column 'language' must be a list"):
        LanguageConsistencyReward()(["q", "q"], ["a", "b"], language="en")
    with pytest.raises(ValueError, match="unknown language 'klingon'"):
        LanguageConsistencyReward()(["q"], ["a"], language=["klingon"])


def test_rules_through_call_reward_on_malformed_completions():
    with pytest.raises(Exception, match="reward 'format' failed at sample 1: TypeError: completions"):
        call_reward(format_reward, ["q", "q"], ["<think>a</think><answer>1</answer>", 12345])
    assert call_reward(format_reward, ["q", "q"], ["<think>a</think><answer>1</answer>", 12345],
                       on_error="zero") == [1.0, 0.0]
