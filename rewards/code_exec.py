"""``code_exec``: run the completion's last fenced Python block against test cases in the sandbox.

The ``tests`` column holds, per sample, a list of ``{"input": stdin, "output": expected stdout}`` (or that list as
a JSON string). The reward is the share of cases whose run ends normally with the expected output; outputs are
compared after stripping trailing whitespace from every line and trailing blank lines. A completion without a
```` ```python ```` (or ```` ```py ````) block scores 0.0. Every failed case is logged (logger
``rewards.code_exec``) with the sandbox's structured reason (timeout, memory_limit, violation, ...).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rewards.protocol import column_value, completion_texts
from rewards.sandbox import Sandbox, SandboxConfig, SandboxResult

logger = logging.getLogger("rewards.code_exec")

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str | None:
    """The content of the last fenced Python block, or ``None``.

    Example:
        >>> extract_code("try:\\n```python\\nprint(1)\\n```\\nbetter:\\n```py\\nprint(2)\\n```")
        'print(2)\\n'
    """
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else None


def normalize_output(text: str) -> str:
    """Strips trailing whitespace from every line and drops trailing blank lines."""
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def parse_tests(value: Any, index: int) -> list[tuple[str, str]]:
    """Checks one sample's ``tests`` value and returns ``[(stdin, expected_stdout), ...]``.

    Raises:
        ValueError: naming the sample and what is wrong.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"tests[{index}] is a string but not JSON: {exc}") from None
    if isinstance(value, Mapping) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"tests[{index}] must be a non-empty list of {{'input', 'output'}}, got {value!r:.80}")
    cases = []
    for j, case in enumerate(value):
        if not isinstance(case, Mapping) or not isinstance(case.get("output"), str):
            raise ValueError(f"tests[{index}][{j}] must be a dict with a string 'output', got {case!r:.80}")
        stdin = case.get("input", "")
        if not isinstance(stdin, str):
            raise ValueError(f"tests[{index}][{j}]['input'] must be a string, got {type(stdin).__name__}")
        cases.append((stdin, case["output"]))
    return cases


class CodeExecReward:
    """Share of test cases passed by the completion's last Python block (see the module docstring).

    Test cases of all completions of a batch run in parallel threads, at most ``max_concurrency`` sandboxes at
    a time.

    Args:
        config: Sandbox limits; or pass :class:`rewards.sandbox.SandboxConfig` fields as keyword arguments.

    Example:
        >>> reward = CodeExecReward(wall_time_s=5)
        >>> reward(["double it"], ["```python\\nprint(2 * int(input()))\\n```"],
        ...        tests=[[{"input": "2", "output": "4"}, {"input": "5", "output": "11"}]])
        [0.5]
    """

    name = "code_exec"

    def __init__(self, config: SandboxConfig | None = None, **limits: Any) -> None:
        if config is not None and limits:
            raise ValueError("code_exec: pass either config or sandbox fields, not both")
        self.sandbox = Sandbox(config or SandboxConfig(**limits))

    def run_tests(self, code: str, cases: Sequence[tuple[str, str]]) -> list[SandboxResult]:
        """Runs ``code`` on each case's stdin (in parallel, bounded)."""
        return self.sandbox.run_many(code, [stdin for stdin, _ in cases])

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        texts = completion_texts(completions)
        cases = [parse_tests(column_value(columns, "tests", i, len(texts)), i) for i in range(len(texts))]
        codes = [extract_code(t) for t in texts]
        jobs = [(i, j) for i, code in enumerate(codes) if code is not None for j in range(len(cases[i]))]
        workers = max(1, min(len(jobs), self.sandbox.config.max_concurrency))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda job: self.sandbox.run(codes[job[0]], cases[job[0]][job[1]][0]), jobs))
        passed = [0] * len(texts)
        for (i, j), result in zip(jobs, results):
            expected = cases[i][j][1]
            if result.ok and normalize_output(result.stdout) == normalize_output(expected):
                passed[i] += 1
            else:
                reason = result.reason if not result.ok else "wrong_answer"
                logger.info("code_exec sample %d case %d failed: %s %s", i, j, reason, result.detail)
        for i, code in enumerate(codes):
            if code is None:
                logger.info("code_exec sample %d: no ```python block in the completion", i)
        return [passed[i] / len(cases[i]) for i in range(len(texts))]
