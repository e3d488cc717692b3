"""code_exec: code extraction, test-case scoring through the sandbox, logged failure reasons."""

import json
import logging

import pytest

from rewards import CodeExecReward, extract_code, get_reward
from rewards.code_exec import normalize_output, parse_tests

DOUBLE_TESTS = [{"input": "2\n", "output": "4\n"}, {"input": "5", "output": "10"}, {"input": "0", "output": "0"}]


def fenced(code, lang="python"):
    return f"Here is my solution:\n```{lang}\n{code}\n```\nDone."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (fenced("print(1)"), "print(1)\n"),
        (fenced("print(1)", "py"), "print(1)\n"),
        (fenced("print(1)", "Python3"), "print(1)\n"),
        ("```python\nprint(1)\n```\nbetter:\n```python\nprint(2)\n```", "print(2)\n"),  # the last block
        ("```\nprint(1)\n```", None),  # no language: not taken as Python
        ("```js\nconsole.log(1)\n```", None),
        ("```python\nprint(1)", None),  # unclosed fence
        ("print(1)", None),
    ],
)
def test_extract_code(text, expected):
    assert extract_code(text) == expected


def test_normalize_output():
    assert normalize_output("4   \n5\t\n\n\n") == "4\n5"
    assert normalize_output("a\r\nb") == "a\nb"
    assert normalize_output(" 4") == " 4"  # leading whitespace matters


@pytest.fixture(scope="module")
def reward():
    return CodeExecReward(wall_time_s=2.0, cpu_time_s=1, max_concurrency=2)


def test_share_of_cases_passed(reward, caplog):
    completions = [
        fenced("print(2 * int(input()))"),  # all three
        fenced("x = int(input())\nprint(x * x)"),  # 2*2=4 and 0*0=0 pass, 5*5 does not
        "I would double the number.",  # no code
        fenced("print(2 * int(input())   )\nprint()\nprint('   ')"),  # trailing whitespace and blank lines
        fenced("while True:\n    pass"),  # never terminates
        fenced("def f(:\n    pass"),  # syntax error
        [{"role": "assistant", "content": fenced("n = int(input())\nprint(n + n)")}],
    ]
    with caplog.at_level(logging.INFO, logger="rewards.code_exec"):
        scores = reward(["double"] * 7, completions, tests=[DOUBLE_TESTS] * 7)
    assert scores == [1.0, pytest.approx(2 / 3), 0.0, 1.0, 0.0, 0.0, 1.0]
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "sample 1 case 1 failed: wrong_answer" in messages
    assert "sample 2: no ```python block" in messages
    assert "sample 4 case 0 failed: cpu_limit" in messages or "sample 4 case 0 failed: timeout" in messages
    assert "sample 5 case 0 failed: runtime_error" in messages and "SyntaxError" in messages


def test_attacks_score_zero(reward, tmp_path):
    target = tmp_path / "x.txt"
    completions = [fenced(f"open({str(target)!r}, 'w').write('x')\nprint(4)"),
                   fenced("import socket\nsocket.create_connection(('127.0.0.1', 9))\nprint(4)"),
                   fenced("x = bytearray(8 * 1024 ** 3)\nprint(4)")]
    tests = [[{"input": "2", "output": "4"}]] * 3
    assert reward(["q"] * 3, completions, tests=tests) == [0.0, 0.0, 0.0]
    assert not target.exists()


def test_tests_column_forms_and_errors(reward):
    as_json = json.dumps([{"input": "3", "output": "6"}])
    configured = get_reward("code_exec", wall_time_s=2.0)
    assert configured(["q"], [fenced("print(2 * int(input()))")], tests=[as_json]) == [1.0]
    assert parse_tests([{"output": "1"}], 0) == [("", "1")]  # input defaults to empty stdin
    with pytest.raises(KeyError, match="column 'tests' is required"):
        reward(["q"], [fenced("print(1)")])
    with pytest.raises(ValueError, match=r"tests\[0\] must be a non-empty list"):
        parse_tests([], 0)
    with pytest.raises(ValueError, match=r"tests\[3\]\[1\] must be a dict with a string 'output'"):
        parse_tests([{"output": "1"}, {"input": "1"}], 3)
    with pytest.raises(ValueError, match=r"tests\[0\]\[0\]\['input'\] must be a string"):
        parse_tests([{"input": 1, "output": "1"}], 0)
    with pytest.raises(ValueError, match=r"tests\[2\] is a string but not JSON"):
        parse_tests("[{", 2)
    with pytest.raises(ValueError, match="either config or sandbox fields"):
        CodeExecReward(config=reward.sandbox.config, wall_time_s=1.0)
