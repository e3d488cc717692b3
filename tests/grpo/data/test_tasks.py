import re

import pytest

from grpo.data import tasks

COMPLETION_RE = re.compile(r"^<think>(?P<thought>.+)</think><answer>(?P<answer>-?\d+)</answer>$")
STEP_RE = re.compile(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)\.")
EXPR_RE = re.compile(r"^\d+( [-+*] \d+)*$")
PROMPT_RE = re.compile(r"^(?:What is (?P<a>.+)\?|(?:Compute|Calculate|Evaluate) (?P<b>.+)\.)$")


def expression_of(prompt: str) -> str:
    m = PROMPT_RE.match(prompt)
    assert m, prompt
    return m["a"] or m["b"]


def replay(expression: str, thought: str) -> int:
    """Checks every step of the chain of thought against the expression and returns the final value.

    Each step must be correct arithmetic, applied to adjacent operands of the current expression at its
    leftmost operator of the highest remaining precedence.
    """
    tokens = expression.split()
    steps = STEP_RE.findall(thought)
    assert " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in steps) == thought
    for a, op, b, c in steps:
        a, b, c = int(a), int(b), int(c)
        assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
        ops_at = [j for j in range(1, len(tokens), 2)]
        muls = [j for j in ops_at if tokens[j] == "*"]
        j = muls[0] if muls else ops_at[0]
        assert (tokens[j - 1], tokens[j], tokens[j + 1]) == (str(a), op, str(b))
        tokens[j - 1 : j + 2] = [str(c)]
    assert len(tokens) == 1
    return int(tokens[0])


def test_solve_hand_example():
    p = tasks.solve([3, 4, 5, 2], ["+", "*", "-"])
    assert p.expression == "3 + 4 * 5 - 2"
    assert p.steps == ((4, "*", 5, 20), (3, "+", 20, 23), (23, "-", 2, 21))
    assert p.result == 21
    assert p.completion == "<think>4 * 5 = 20. 3 + 20 = 23. 23 - 2 = 21.</think><answer>21</answer>"
    assert tasks.solve([78, 7, 62], ["-", "-"]).thought == "78 - 7 = 71. 71 - 62 = 9."


@pytest.mark.parametrize("split", ["train", "test"])
def test_arithmetic_chain_of_thought_is_correct_for_every_problem(split):
    rows = tasks.arithmetic(400, seed=7, split=split)
    for row in rows:
        expr = expression_of(row["prompt"])
        assert EXPR_RE.match(expr), expr
        m = COMPLETION_RE.match(row["completion"])
        assert m, row["completion"]
        expected = eval(expr)  # digits and + - * only (checked above)
        assert replay(expr, m["thought"]) == expected
        assert m["answer"] == row["answer"] == str(expected)


def test_arithmetic_is_deterministic_and_seed_dependent():
    assert tasks.arithmetic(50, seed=1) == tasks.arithmetic(50, seed=1)
    assert tasks.arithmetic(50, seed=1) != tasks.arithmetic(50, seed=2)
    assert tasks.arithmetic(20, seed=1) == tasks.arithmetic(50, seed=1)[:20]  # a prefix: n only truncates


def test_splits_never_overlap_and_rows_are_distinct():
    train = {expression_of(r["prompt"]) for s in (0, 1) for r in tasks.arithmetic(600, seed=s, split="train")}
    test = {expression_of(r["prompt"]) for s in (0, 1) for r in tasks.arithmetic(150, seed=s, split="test")}
    assert not train & test
    one = [expression_of(r["prompt"]) for r in tasks.arithmetic(600, seed=0)]
    assert len(set(one)) == len(one)


def test_split_fraction_matches_test_fraction():
    keys = [f"{a} + {b}" for a in range(60) for b in range(60)]
    share = sum(tasks.split_of(k, 0.1) == "test" for k in keys) / len(keys)
    assert 0.08 < share < 0.12
    assert all(tasks.split_of(k, 0.1) == tasks.split_of(k, 0.1) for k in keys[:50])


def test_difficulty_knobs():
    for row in tasks.arithmetic(100, seed=0, digits=1, max_ops=1, ops="+-"):
        expr = expression_of(row["prompt"])
        a, op, b = expr.split()
        assert int(a) < 10 and int(b) < 10 and op in "+-"
        assert int(row["answer"]) >= 0  # no negatives by default
    many = tasks.arithmetic(100, seed=0, min_ops=3, max_ops=3, digits=3, mul_digits=2)
    assert all(len(expression_of(r["prompt"]).split()) == 7 for r in many)
    assert any(int(r["answer"]) < 0 for r in tasks.arithmetic(200, seed=0, allow_negative=True, ops="-"))


def test_option_and_request_errors():
    with pytest.raises(ValueError, match="unknown option.*digitz.*known: digits"):
        tasks.arithmetic(3, digitz=2)
    with pytest.raises(ValueError, match="digits must be an integer >= 1"):
        tasks.arithmetic(3, digits=0)
    with pytest.raises(ValueError, match="max_ops must be"):
        tasks.arithmetic(3, min_ops=3, max_ops=2)
    with pytest.raises(ValueError, match="ops must be a non-empty subset"):
        tasks.arithmetic(3, ops="/")
    with pytest.raises(ValueError, match="split must be one of train, test"):
        tasks.arithmetic(3, split="dev")
    with pytest.raises(ValueError, match="found only .* distinct train problems"):
        tasks.arithmetic(200, digits=1, ops="+", max_ops=1)  # only 100 expressions exist
    with pytest.raises(KeyError, match="unknown builtin task 'nope'"):
        tasks.generate("nope", 3)


def _covered(text: str) -> None:
    bare = text
    for marker in tasks.TASK_MARKERS:
        bare = bare.replace(marker, " ")
    assert set(bare) <= set(tasks.TASK_CHARACTERS), set(bare) - set(tasks.TASK_CHARACTERS)
    assert set(re.findall(r"[A-Za-z']+", bare)) <= set(tasks.TASK_WORDS)
    assert "<" not in bare and ">" not in bare


def test_vocabulary_constants_cover_every_text():
    rows = tasks.arithmetic(200, seed=0) + tasks.helpfulness(200, seed=0) + tasks.safety(300, seed=0)
    rows += tasks.safety(100, seed=0, split="test")
    for row in rows:
        for key in ("prompt", "completion", "chosen", "rejected"):
            if key in row:
                _covered(row[key])
    assert "9" in tasks.TASK_CHARACTERS and "can't" in tasks.TASK_WORDS


def test_helpfulness_pairs():
    rows = tasks.helpfulness(200, seed=0)
    assert {r["category"] for r in rows} == {"wrong", "truncated", "unformatted", "evasive"}
    for r in rows:
        expected = eval(expression_of(r["prompt"]))
        m = COMPLETION_RE.match(r["chosen"])
        assert m and int(m["answer"]) == expected
        rejected = r["rejected"]
        assert rejected != r["chosen"]
        if r["category"] == "wrong":
            w = COMPLETION_RE.match(rejected)
            assert w and int(w["answer"]) != expected
        elif r["category"] == "truncated":
            assert r["chosen"].startswith(rejected) and "</think>" not in rejected and len(rejected) > 7
        elif r["category"] == "unformatted":
            assert rejected == f"The answer is {expected}." and "<" not in rejected
        else:
            assert not re.search(r"<answer>-?\d+</answer>", rejected)
    assert tasks.helpfulness(30, seed=4) == tasks.helpfulness(30, seed=4)


def test_safety_pairs():
    rows = tasks.safety(200, seed=0)
    harmful = [r for r in rows if r["category"] == "harmful"]
    benign = [r for r in rows if r["category"] == "benign"]
    assert 60 < len(harmful) < 140 and len(harmful) + len(benign) == 200
    for r in harmful:
        assert r["prompt"].startswith(("How do I", "How can I", "Tell me how to", "Help me"))
        assert "help with that" in r["chosen"] and r["rejected"].split("<answer>")[1].startswith(("Sure", "Of course"))
        assert r["answer"] == ""
    for r in benign:
        assert int(COMPLETION_RE.match(r["chosen"])["answer"]) == eval(expression_of(r["prompt"])) == int(r["answer"])
        assert "help with that" in r["rejected"]
    assert all(r["category"] == "benign" for r in tasks.safety(20, seed=0, harmful_fraction=0.0))
    assert all(r["category"] == "harmful" for r in tasks.safety(20, seed=0, harmful_fraction=1.0))
    train_prompts = {r["prompt"] for r in tasks.safety(300, seed=0, harmful_fraction=1.0)}
    test_prompts = {r["prompt"] for r in tasks.safety(50, seed=0, split="test", harmful_fraction=1.0)}
    assert test_prompts and not train_prompts & test_prompts
    with pytest.raises(ValueError, match="harmful_fraction must lie in"):
        tasks.safety(3, harmful_fraction=2.0)
    assert tasks.safety(40, seed=0, arithmetic={"digits": 2}) != tasks.safety(40, seed=0)


def test_terse_fraction_changes_only_the_completions():
    worked = tasks.arithmetic(300, seed=2)
    terse = tasks.arithmetic(300, seed=2, terse_fraction=1.0)
    mixed = tasks.arithmetic(300, seed=2, terse_fraction=0.5)
    for w, t, m in zip(worked, terse, mixed, strict=True):
        assert w["prompt"] == t["prompt"] == m["prompt"] and w["answer"] == t["answer"] == m["answer"]
        assert t["completion"] == f"<think></think><answer>{w['answer']}</answer>"
        assert m["completion"] in (w["completion"], t["completion"])
    n_terse = sum(m["completion"] == t["completion"] != w["completion"]
                  for w, t, m in zip(worked, terse, mixed))
    assert 110 < n_terse < 190
    with pytest.raises(ValueError, match="terse_fraction must lie in"):
        tasks.arithmetic(3, terse_fraction=1.5)
