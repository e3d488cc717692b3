"""Evaluating checkpoints: accuracy, pass@k, maj@k, reward scores, lengths; a report; the ``grpo eval`` command.

For each checkpoint (a Hugging Face folder, ours or any causal LM, or an in-memory model or rollout engine) and a
set of rows with a ``prompt`` (a string or chat messages, rendered through the chat template by
:func:`grpo.trainer.encode_prompt`) and a reference ``answer``:

* one **greedy** completion per prompt (temperature 0) gives the greedy accuracy (the ``accuracy`` reward), the
  format rate (the ``format`` reward: ``<think>...</think><answer>...</answer>``), the answer rate (share with an
  extractable final answer), the mean score of every named reward and reward model, and length statistics;
* ``n`` **sampled** completions per prompt (``temperature``, ``top_p``) give pass@k and maj@k for each requested
  ``k`` (definitions, tie rule included, in :mod:`grpo.eval_metrics`). For maj@k, final answers are extracted
  as the ``accuracy`` reward does (:func:`rewards.answers.extract_answer`) and grouped into labels: a sample
  joins the first earlier label whose representative (its first answer) it matches
  (:func:`rewards.answers.answers_match`), so ``0.5`` and ``1/2`` vote together; a label is correct when its
  representative matches the reference.

With two or more checkpoints, :func:`compare` gives each later checkpoint's reward-model win rate against the
first (share of prompts where its greedy completion scores higher, ties counting half), and
:func:`write_report` writes ``results.json``, ``results.md`` (a side-by-side table), ``completions.jsonl``
and PNG bar charts.

Sampling is seeded per batch (``seed + batch index``), so sampled metrics are reproducible for a fixed
``batch_size``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpo.data import BUILTIN_PREFIX, DataError, DataSpec, load_data
from grpo.eval_metrics import LengthStats, length_stats, maj_at_k, majority_vote, mean_or_none, pass_at_k, win_rate
from rewards.answers import ANSWER_MODES

RewardFn = Callable[..., Sequence[Any]]
_RESERVED_COLUMNS = frozenset({"prompt", "prompts", "completions", "name", "on_error", "fn"})  # call_reward's own
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DEFAULT_BUILTIN_ROWS = 200


class EvalError(ValueError):
    """Unusable evaluation input (checkpoint, data, reward or setting); the message says what and why."""


# ----------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate.

    Attributes:
        n: Sampled completions per prompt for pass@k and maj@k (0: greedy completions only).
        k: Subset sizes of pass@k and maj@k, each in ``[1, n]``.
        temperature: Sampling temperature of the ``n`` samples.
        top_p: Nucleus mass of the ``n`` samples.
        max_tokens: Most new tokens per completion (greedy and sampled).
        rewards: Rule-based rewards by registry name or dotted path (``pkg.module:func``), averaged over the
            greedy completions.
        reward_models: Reward-model checkpoint folders, averaged over the greedy completions and used for win
            rates.
        accuracy: Whether the rows carry reference answers (greedy accuracy, pass@k, maj@k); without, only
            rewards, format rate and lengths are measured.
        answer_mode: How final answers are found (accuracy, answer rate, maj@k votes): ``strict`` (the R1
            format: ``<answer>`` tags, ``\\boxed{}``, ``####``, a reply that is only a number) or ``lenient`` (also
            an answer in free text, for models not trained on that format); see :mod:`rewards.answers`.
        batch_size: Prompts per generation call.
        seed: Base seed of the sampled completions.
        engine: Rollout engine for checkpoint folders (``torch`` or ``vllm``).
        device: Where a checkpoint folder is loaded (``None``: CUDA when available, else CPU); an in-memory model
            stays where it is.
        progress: Whether to show a progress bar.
    """

    n: int = 4
    k: tuple[int, ...] = (1, 4)
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    rewards: tuple[str, ...] = ()
    reward_models: tuple[str, ...] = ()
    accuracy: bool = True
    answer_mode: str = "strict"
    batch_size: int = 16
    seed: int = 0
    engine: str = "torch"
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", tuple(self.k))
        object.__setattr__(self, "rewards", tuple(self.rewards))
        object.__setattr__(self, "reward_models", tuple(str(p) for p in self.reward_models))
        checks = [
            ("n", _is_int(self.n) and self.n >= 0, "an integer >= 0 (0: greedy only)"),
            ("temperature", self.temperature > 0, "a float > 0 (the greedy pass always runs separately)"),
            ("top_p", 0 < self.top_p <= 1, "a float in (0, 1]"),
            ("max_tokens", _is_int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            ("batch_size", _is_int(self.batch_size) and self.batch_size >= 1, "an integer >= 1"),
            ("k", self.n == 0 or (len(self.k) > 0 and all(_is_int(k) and 1 <= k <= self.n for k in self.k)),
             f"a non-empty list of integers in [1, n={self.n}] (raise n or lower k)"),
            ("rewards", all(isinstance(r, str) and r for r in self.rewards), "names or dotted paths"),
            ("answer_mode", self.answer_mode in ANSWER_MODES, f"one of {list(ANSWER_MODES)}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise EvalError(f"EvalConfig.{name} must be {expected}, got {getattr(self, name)!r}")
        from rollout.base import ENGINES

        if self.engine not in ENGINES:
            raise EvalError(f"EvalConfig.engine must be one of {', '.join(ENGINES.names())}, got {self.engine!r}")
        object.__setattr__(self, "k", tuple(sorted(set(self.k))) if self.n else ())


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ----------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class PromptResult:
    """What one prompt got.

    Attributes:
        index: Row index.
        prompt: The prompt (string or messages).
        answer: The reference answer (``None`` without answers).
        greedy: The greedy completion's text.
        greedy_tokens: Its length in tokens.
        greedy_truncated: Whether it hit ``max_tokens``.
        scores: Score of the greedy completion under each reward (``accuracy``, ``format``, named rewards and
            reward models).
        samples_correct: Correct samples among the ``n`` (``None`` without samples or answers).
        sample_answers: Extracted final answer of each sample (``None`` where none was found).
        voted_answer: Majority vote of all samples (ties: the answer voted first), ``None`` without votes.
        sample_texts: The ``n`` sampled completions' texts (empty without samples).
    """

    index: int
    prompt: Any
    answer: str | None
    greedy: str
    greedy_tokens: int
    greedy_truncated: bool
    scores: dict[str, float | None]
    samples_correct: int | None = None
    sample_answers: tuple[str | None, ...] = ()
    voted_answer: str | None = None
    sample_texts: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalResult:
    """A checkpoint's evaluation.

    Attributes:
        name: Label of the checkpoint.
        num_prompts: Prompts evaluated.
        greedy_accuracy: Mean accuracy of the greedy completions (``None`` without answers).
        pass_at_k: ``{k: pass@k}`` averaged over prompts (empty without samples or answers).
        maj_at_k: ``{k: maj@k}`` averaged over prompts.
        format_rate: Share of greedy completions in the ``<think>``/``<answer>`` format.
        answer_rate: Share of greedy completions with an extractable final answer.
        rewards: Mean greedy score of each named reward and reward model (``None`` when it gave no scores).
        greedy_length: Greedy completion lengths.
        sample_length: Sampled completion lengths (``None`` without samples).
        prompts: Per-prompt details.
        config: The settings used.
    """

    name: str
    num_prompts: int
    greedy_accuracy: float | None
    pass_at_k: dict[int, float]
    maj_at_k: dict[int, float]
    format_rate: float
    answer_rate: float
    rewards: dict[str, float | None]
    greedy_length: LengthStats
    sample_length: LengthStats | None
    prompts: tuple[PromptResult, ...] = field(repr=False)
    config: EvalConfig = field(default_factory=EvalConfig, repr=False)

    def metrics(self) -> dict[str, float]:
        """Flat scalar metrics for logging (``greedy_accuracy``, ``pass@4``, ``reward/NAME``, ``length/p90``...)."""
        out: dict[str, float | None] = {"greedy_accuracy": self.greedy_accuracy, "format_rate": self.format_rate,
                                        "answer_rate": self.answer_rate}
        out.update({f"pass@{k}": v for k, v in self.pass_at_k.items()})
        out.update({f"maj@{k}": v for k, v in self.maj_at_k.items()})
        out.update({f"reward/{name}": v for name, v in self.rewards.items()})
        for prefix, stats in (("length", self.greedy_length), ("sample_length", self.sample_length)):
            if stats is not None:
                out.update({f"{prefix}/{key}": float(v) for key, v in dataclasses.asdict(stats).items()
                            if key != "count"})
        return {key: float(v) for key, v in out.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (without the per-prompt details)."""
        return {
            "name": self.name, "num_prompts": self.num_prompts, "greedy_accuracy": self.greedy_accuracy,
            "pass_at_k": {str(k): v for k, v in self.pass_at_k.items()},
            "maj_at_k": {str(k): v for k, v in self.maj_at_k.items()},
            "format_rate": self.format_rate, "answer_rate": self.answer_rate, "rewards": dict(self.rewards),
            "greedy_length": dataclasses.asdict(self.greedy_length),
            "sample_length": dataclasses.asdict(self.sample_length) if self.sample_length else None,
        }


# ----------------------------------------------------------------------------------------------- inputs
def check_checkpoint(path: str | Path) -> Path:
    """Checks that ``path`` is a checkpoint folder with a config and tokenizer files.

    Raises:
        EvalError: naming what is missing.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise EvalError(f"checkpoint {p} does not exist")
    if not p.is_dir():
        raise EvalError(f"checkpoint {p} is not a folder (expected a Hugging Face checkpoint folder)")
    if not (p / "config.json").is_file():
        raise EvalError(f"checkpoint {p} has no config.json (expected a Hugging Face checkpoint folder)")
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise EvalError(f"checkpoint {p} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); "
                        f"save the tokenizer with the model (save_pretrained(path, tokenizer))")
    return p


def check_rows(rows: Any, need_answer: bool) -> list[dict[str, Any]]:
    """Rows as a list of dicts, each with a ``prompt`` (and an ``answer`` when ``need_answer``).

    Args:
        rows: A ``datasets.Dataset`` or a sequence of mappings with canonical column names.
        need_answer: Whether the reference answer is required.

    Raises:
        EvalError: for no rows or a missing column (naming it and the available ones).
    """
    rows = rows.to_list() if hasattr(rows, "to_list") else [dict(r) for r in rows]
    if not rows:
        raise EvalError("no rows to evaluate")
    needed = ("prompt", "answer") if need_answer else ("prompt",)
    for i, row in enumerate(rows):
        for column in needed:
            if row.get(column) is None:
                raise EvalError(f"row {i}: column {column!r} is missing; columns: {', '.join(row) or '(none)'}")
    return rows


def load_rows(source: str, *, split: str | None = None, limit: int | None = None, prompt_column: str = "prompt",
              answer_column: str = "answer", need_answer: bool = True) -> list[dict[str, Any]]:
    """Loads evaluation rows (a file, a ``save_to_disk`` folder or ``builtin:NAME``) with canonical columns.

    Args:
        source: Where the data is (see :mod:`grpo.data`).
        split: Split to read; by default ``test`` for built-in tasks and saved ``DatasetDict`` folders, the file
            itself for files.
        limit: Keep the first ``limit`` rows (built-in tasks generate ``limit`` rows, 200 by default).
        prompt_column: Source column of the prompt.
        answer_column: Source column of the reference answer.
        need_answer: Whether the answer column is required.

    Raises:
        DataError: for a missing or empty source or a missing column (naming the available ones).
    """
    builtin = source.startswith(BUILTIN_PREFIX)
    spec = DataSpec(source=source, schema="prompt", split=split or default_split(source), prompt_column=prompt_column,
                    answer_column=answer_column, n=(limit or DEFAULT_BUILTIN_ROWS) if builtin else None)
    ds = _quietly(load_data, spec)
    if need_answer and "answer" not in ds.column_names:
        raise DataError(f"{source}: column {answer_column!r} not found (the reference answers for accuracy, pass@k "
                        f"and maj@k); columns: {', '.join(ds.column_names)}; set --answer-column, or pass "
                        f"--no-accuracy to measure rewards only")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.to_list()


def default_split(source: str) -> str:
    """``test`` for built-in tasks and saved ``DatasetDict`` folders; ``train`` (the file itself) otherwise."""
    if source.startswith(BUILTIN_PREFIX) or (Path(source).expanduser() / "dataset_dict.json").is_file():
        return "test"
    return "train"


def _quietly(fn: Callable[..., Any], *args: Any) -> Any:
    """Calls ``fn`` with ``datasets``' progress bars hidden (they would drown an error message)."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        return fn(*args)
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def _unique_labels(paths: Sequence[str]) -> list[str]:
    """Short labels for paths: the folder name, or the whole path where folder names collide."""
    names = [Path(p).name or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def build_rewards(config: EvalConfig) -> dict[str, RewardFn]:
    """The named rewards and reward models of ``config``, keyed by name (``rm:FOLDER`` for reward models).

    Raises:
        EvalError: for an unknown reward name, a bad dotted path or an unusable reward-model folder.
    """
    from rewards import get_reward
    from rewards.reward_model import load_reward_model_reward

    out: dict[str, RewardFn] = {}
    for name in config.rewards:
        try:
            out[name] = get_reward(name)
        except (KeyError, ValueError, TypeError) as exc:
            raise EvalError(f"--reward {name!r}: {exc.args[0] if exc.args else exc}") from None
    for label, path in zip(_unique_labels(config.reward_models), config.reward_models):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise EvalError(f"reward model {folder} does not exist or is not a folder")
        try:
            out[f"rm:{label}"] = load_reward_model_reward(folder, device=_device(config.device),
                                                          batch_size=config.batch_size)
        except (OSError, ValueError) as exc:
            raise EvalError(f"reward model {folder}: {exc}") from None
    return out


def _device(device: str | None) -> str:
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


ENGINE_OPTIONS: dict[str, Callable[[EvalConfig], dict[str, Any]]] = {
    "torch": lambda config: {"device": _device(config.device)},
}
"""Keyword arguments each engine gets when it loads a checkpoint folder (besides the tokenizer)."""


def _open(path_or_model: Any, tokenizer: Any, config: EvalConfig) -> tuple[Any, Any, str]:
    """(engine, tokenizer, label) for a checkpoint folder, a model or a rollout engine."""
    from rollout.base import RolloutEngine, build_engine

    if isinstance(path_or_model, (str, Path)):
        folder = check_checkpoint(path_or_model)
        try:
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(folder))
            options = ENGINE_OPTIONS.get(config.engine, lambda _: {})(config)
            engine = build_engine(config.engine, str(folder), tokenizer=tokenizer, **options)
        except (ImportError, OSError, ValueError) as exc:
            raise EvalError(f"checkpoint {folder} could not be loaded with the {config.engine} engine: {exc}") from None
        return engine, tokenizer, folder.name
    tokenizer = tokenizer if tokenizer is not None else getattr(path_or_model, "tokenizer", None)
    if tokenizer is None:
        raise EvalError("a tokenizer is required to evaluate an in-memory model or engine")
    if isinstance(path_or_model, RolloutEngine):
        return path_or_model, tokenizer, type(path_or_model).__name__
    engine = build_engine("torch", path_or_model, tokenizer=tokenizer, device=config.device)
    return engine, tokenizer, type(path_or_model).__name__


# ----------------------------------------------------------------------------------------------- running
def _generate(engine: Any, prompt_ids: list[list[int]], sampling: Any, config: EvalConfig, desc: str) -> list[Any]:
    """Generates in batches of ``config.batch_size`` prompts, seeding batch ``b`` with ``seed + b``."""
    from tqdm.auto import tqdm

    out: list[Any] = []
    with tqdm(total=len(prompt_ids), desc=desc, unit="prompt", disable=not config.progress, leave=False) as bar:
        for b, start in enumerate(range(0, len(prompt_ids), config.batch_size)):
            batch = prompt_ids[start : start + config.batch_size]
            seed = None if sampling.greedy else config.seed + b
            out.extend(engine.generate(batch, dataclasses.replace(sampling, seed=seed)))
            bar.update(len(batch))
    return out


def _score(rewards: Mapping[str, RewardFn], prompts: list[Any], rollouts: list[Any],
           columns: Mapping[str, list[Any]]) -> dict[str, list[float | None]]:
    """Scores of the rollouts under each reward; ``columns`` hold one value per rollout."""
    from rewards import call_reward

    texts = [r.text for r in rollouts]
    extra = {**columns, "completion_ids": [list(r.completion_ids) for r in rollouts]}
    return {name: call_reward(fn, prompts, texts, name=name, **extra) for name, fn in rewards.items()}


def answer_labels(texts: Sequence[str], answer: str, mode: str = "strict"
                  ) -> tuple[list[int | None], set[int], list[str]]:
    """Groups the final answers of samples into vote labels.

    Args:
        texts: Sample completions of one prompt.
        answer: The reference answer.
        mode: The answer extraction mode (see :func:`rewards.answers.extract_answer`).

    Returns:
        ``(labels, correct, representatives)``: each sample's label (``None`` without an answer), the correct
        labels, and each label's representative answer.
    """
    from rewards.answers import answers_match, extract_answer, gold_answer

    reps: list[str] = []
    labels: list[int | None] = []
    for text in texts:
        extracted = extract_answer(text, mode)
        if extracted is None:
            labels.append(None)
            continue
        match = next((i for i, rep in enumerate(reps) if extracted == rep or answers_match(extracted, rep)), None)
        if match is None:
            reps.append(extracted)
            match = len(reps) - 1
        labels.append(match)
    gold = gold_answer(answer)
    return labels, {i for i, rep in enumerate(reps) if answers_match(rep, gold)}, reps


@dataclass(frozen=True)
class _Samples:
    """Per-prompt sample outcomes."""

    texts: list[tuple[str, ...]]
    correct: list[int | None]
    answers: list[tuple[str | None, ...]]
    voted: list[str | None]
    pass_at_k: dict[int, float]
    maj_at_k: dict[int, float]
    length: LengthStats


def _sample_metrics(engine: Any, prompt_ids: list[list[int]], rows: list[dict[str, Any]], config: EvalConfig,
                    label: str) -> _Samples:
    from rewards.rules import AccuracyReward
    from rollout.base import SamplingConfig

    accuracy = AccuracyReward(config.answer_mode)
    n = config.n
    sampling = SamplingConfig(n=n, max_tokens=config.max_tokens, temperature=config.temperature,
                              top_p=config.top_p, logprobs=False)
    rollouts = _generate(engine, prompt_ids, sampling, config, f"{label} samples")
    length = length_stats([len(r.completion_ids) for r in rollouts], [r.finish_reason == "length" for r in rollouts])
    texts = [tuple(r.text for r in rollouts[i * n : (i + 1) * n]) for i in range(len(rows))]
    if not config.accuracy:
        return _Samples(texts, [None] * len(rows), [()] * len(rows), [None] * len(rows), {}, {}, length)
    prompts = [row["prompt"] for row in rows for _ in range(n)]
    answers = [row["answer"] for row in rows for _ in range(n)]
    hits = _score({"accuracy": accuracy}, prompts, rollouts, {"answer": answers})["accuracy"]
    correct, extracted, voted = [], [], []
    passes: dict[int, list[float]] = {k: [] for k in config.k}
    majs: dict[int, list[float]] = {k: [] for k in config.k}
    for i, row in enumerate(rows):
        group = rollouts[i * n : (i + 1) * n]
        c = sum(1 for s in hits[i * n : (i + 1) * n] if s == 1.0)
        labels, right, reps = answer_labels([r.text for r in group], row["answer"], config.answer_mode)
        correct.append(c)
        extracted.append(tuple(None if lab is None else reps[lab] for lab in labels))
        winner = majority_vote(labels)
        voted.append(None if winner is None else reps[winner])
        for k in config.k:
            passes[k].append(pass_at_k(n, c, k))
            majs[k].append(maj_at_k(labels, right, k))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return _Samples(texts, correct, extracted, voted, {k: mean(v) for k, v in passes.items()},
                    {k: mean(v) for k, v in majs.items()}, length)


def evaluate_checkpoint(path_or_model: Any, tokenizer: Any, rows: Any, config: EvalConfig | None = None, *,
                        rewards: Mapping[str, RewardFn] | None = None, name: str | None = None) -> EvalResult:
    """Evaluates one checkpoint on ``rows``.

    Args:
        path_or_model: A checkpoint folder, an ``nn.Module`` (ours or a transformers causal LM) or a
            :class:`rollout.base.RolloutEngine`.
        tokenizer: The tokenizer (loaded from the folder when ``None`` and given a folder).
        rows: A ``datasets.Dataset`` or sequence of mappings with ``prompt`` and, with ``config.accuracy``,
            ``answer`` (other columns reach the rewards as keyword arguments).
        config: Settings; defaults to :class:`EvalConfig`.
        rewards: Already built rewards (shared between checkpoints); by default built from ``config``.
        name: Label in the report (default: the folder name or the model's class name).

    Returns:
        The :class:`EvalResult`.

    Raises:
        EvalError: for unusable input.
    """
    config = config or EvalConfig()
    rows = check_rows(rows, config.accuracy)
    rewards = build_rewards(config) if rewards is None else dict(rewards)
    was_training = getattr(path_or_model, "training", None)  # an in-memory model gets its mode back
    engine, tokenizer, label = _open(path_or_model, tokenizer, config)
    try:
        return _evaluate(engine, tokenizer, name or label, rows, config, rewards)
    finally:
        if isinstance(was_training, bool):
            path_or_model.train(was_training)


def _evaluate(engine: Any, tokenizer: Any, label: str, rows: list[dict[str, Any]], config: EvalConfig,
              rewards: Mapping[str, RewardFn]) -> EvalResult:
    from grpo.trainer import encode_prompt
    from rewards.answers import extract_answer
    from rewards.rules import AccuracyReward, format_reward
    from rollout.base import SamplingConfig

    accuracy = AccuracyReward(config.answer_mode)
    prompts = [row["prompt"] for row in rows]
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]

    greedy_cfg = SamplingConfig(n=1, max_tokens=config.max_tokens, temperature=0.0, logprobs=False)
    greedy = _generate(engine, prompt_ids, greedy_cfg, config, f"{label} greedy")
    builtin = {"accuracy": accuracy, "format": format_reward} if config.accuracy else {"format": format_reward}
    columns = {key: [row.get(key) for row in rows] for key in rows[0] if key not in _RESERVED_COLUMNS}
    scores = _score({**builtin, **rewards}, prompts, greedy, columns)
    samples = _sample_metrics(engine, prompt_ids, rows, config, label) if config.n else None

    per_prompt = tuple(
        PromptResult(
            index=i, prompt=row["prompt"], answer=row.get("answer"), greedy=g.text,
            greedy_tokens=len(g.completion_ids), greedy_truncated=g.finish_reason == "length",
            scores={key: values[i] for key, values in scores.items()},
            samples_correct=samples.correct[i] if samples else None,
            sample_answers=samples.answers[i] if samples else (),
            voted_answer=samples.voted[i] if samples else None,
            sample_texts=samples.texts[i] if samples else (),
        )
        for i, (row, g) in enumerate(zip(rows, greedy))
    )
    return EvalResult(
        name=label, num_prompts=len(rows),
        greedy_accuracy=mean_or_none(scores["accuracy"]) if config.accuracy else None,
        pass_at_k=samples.pass_at_k if samples else {}, maj_at_k=samples.maj_at_k if samples else {},
        format_rate=mean_or_none(scores["format"]) or 0.0,
        answer_rate=sum(extract_answer(g.text, config.answer_mode) is not None for g in greedy) / len(greedy),
        rewards={key: mean_or_none(scores[key]) for key in rewards},
        greedy_length=length_stats([len(g.completion_ids) for g in greedy],
                                   [g.finish_reason == "length" for g in greedy]),
        sample_length=samples.length if samples else None, prompts=per_prompt, config=config,
    )


# ----------------------------------------------------------------------------------------------- comparison
@dataclass(frozen=True)
class Comparison:
    """Win rates of later checkpoints against the first.

    Attributes:
        baseline: Name of the first checkpoint (A).
        win_rates: ``{reward name: {checkpoint B: win rate of B over A}}`` (``None`` when no prompt has both
            scores).
    """

    baseline: str
    win_rates: dict[str, dict[str, float | None]]


def compare(results: Sequence[EvalResult], reward_names: Sequence[str]) -> Comparison:
    """Reward win rates of ``results[1:]`` over ``results[0]`` on the same prompts.

    Raises:
        EvalError: for fewer than two results, results on different prompts, or a reward a result lacks.
    """
    if len(results) < 2:
        raise EvalError(f"compare needs two or more results, got {len(results)}")
    base = results[0]
    for other in results[1:]:
        if [p.prompt for p in other.prompts] != [p.prompt for p in base.prompts]:
            raise EvalError(f"{other.name!r} and {base.name!r} were evaluated on different prompts")
    table: dict[str, dict[str, float | None]] = {}
    for reward in reward_names:
        if any(reward not in p.scores for r in results for p in r.prompts):
            raise EvalError(f"reward {reward!r} was not scored for every checkpoint")
        a = [p.scores[reward] for p in base.prompts]
        table[reward] = {other.name: win_rate(a, [p.scores[reward] for p in other.prompts]) for other in results[1:]}
    return Comparison(baseline=base.name, win_rates=table)


# ----------------------------------------------------------------------------------------------- report
def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _is_token_count(key: str) -> bool:
    return key.startswith(("length/", "sample_length/")) and not key.endswith("/truncated")


def summary_rows(results: Sequence[EvalResult]) -> list[tuple[str, list[float | None]]]:
    """Side-by-side metric rows: ``(metric, [value per checkpoint])`` in a fixed order."""
    keys: list[str] = []
    for r in results:
        keys.extend(k for k in r.metrics() if k not in keys)
    return [(key, [r.metrics().get(key) for r in results]) for key in keys]


def markdown_report(results: Sequence[EvalResult], comparison: Comparison | None) -> str:
    """A markdown table of every metric (one column per checkpoint) and, if given, the win-rate table."""
    lines = ["| metric | " + " | ".join(r.name for r in results) + " |",
             "| --- |" + " ---: |" * len(results)]
    for key, values in summary_rows(results):
        digits = 1 if _is_token_count(key) else 3
        lines.append(f"| {key} | " + " | ".join(_fmt(v, digits) for v in values) + " |")
    if comparison is not None and comparison.win_rates:
        challengers = list(next(iter(comparison.win_rates.values())))
        lines += ["", f"Win rate against {comparison.baseline} (greedy completions; ties count half)", "",
                  "| reward model | " + " | ".join(challengers) + " |", "| --- |" + " ---: |" * len(challengers)]
        for reward, row in comparison.win_rates.items():
            lines.append(f"| {reward} | " + " | ".join(_fmt(row[c]) for c in challengers) + " |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _Chart:
    """One bar chart of the report: which metrics it shows and its y range (``None``: automatic)."""

    title: str
    keep: Callable[[str], bool]
    ylim: tuple[float, float] | None = None


CHARTS: dict[str, _Chart] = {
    "accuracy": _Chart("accuracy and rates (greedy; pass@k, maj@k from samples)",
                       lambda k: k in ("greedy_accuracy", "format_rate", "answer_rate", "length/truncated")
                       or "@" in k, (0.0, 1.05)),
    "rewards": _Chart("mean reward of the greedy completions", lambda k: k.startswith("reward/")),
    "lengths": _Chart("greedy completion length (tokens)", lambda k: k.startswith("length/") and _is_token_count(k)),
}


def _bar_chart(path: Path, title: str, categories: list[str], series: Mapping[str, list[float | None]],
               ylim: tuple[float, float] | None = None, hline: float | None = None) -> None:
    """Grouped bars: one group per category, one bar per series, each labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 + 0.45 * len(categories) * (len(series) + 1)), 3.6))
    for j, (label, values) in enumerate(series.items()):
        xs = [i + j * width for i, v in enumerate(values) if v is not None]
        bars = ax.bar(xs, [v for v in values if v is not None], width=width, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize="x-small")
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(categories))], categories, rotation=20)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle="--", linewidth=0.8)
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _charts(out: Path, results: Sequence[EvalResult], comparison: Comparison | None) -> list[Path]:
    """Writes the bar charts of :data:`CHARTS` (and the win rates); returns their paths."""
    rows = summary_rows(results)
    written = []
    for name, chart in CHARTS.items():
        picked = [(key, values) for key, values in rows if chart.keep(key)]
        if picked:
            series = {r.name: [values[i] for _, values in picked] for i, r in enumerate(results)}
            _bar_chart(out / f"{name}.png", chart.title, [key for key, _ in picked], series, chart.ylim)
            written.append(out / f"{name}.png")
    if comparison is not None and comparison.win_rates:
        challengers = list(next(iter(comparison.win_rates.values())))
        series = {c: [row[c] for row in comparison.win_rates.values()] for c in challengers}
        _bar_chart(out / "win_rate.png", f"reward-model win rate against {comparison.baseline} (ties count half)",
                   list(comparison.win_rates), series, ylim=(0.0, 1.05), hline=0.5)
        written.append(out / "win_rate.png")
    return written


def write_report(out: str | Path, results: Sequence[EvalResult], comparison: Comparison | None = None,
                 meta: Mapping[str, Any] | None = None) -> list[Path]:
    """Writes ``results.json``, ``results.md``, ``completions.jsonl`` and PNG bar charts into ``out``.

    Returns:
        The paths written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": dict(meta or {}),
        "config": dataclasses.asdict(results[0].config) if results else None,
        "results": [r.to_dict() for r in results],
        "comparison": dataclasses.asdict(comparison) if comparison else None,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown_report(results, comparison))
    with (out / "completions.jsonl").open("w") as f:
        for r in results:
            for p in r.prompts:
                f.write(json.dumps({"checkpoint": r.name, **dataclasses.asdict(p)}, default=str) + "\n")
    return [out / "results.json", out / "results.md", out / "completions.jsonl", *_charts(out, results, comparison)]


# ----------------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    """The ``grpo eval`` argument parser."""
    p = argparse.ArgumentParser(prog="grpo eval", description="Evaluate checkpoints: greedy accuracy, pass@k, maj@k, "
                                "reward scores, format rate, completion lengths; writes JSON, markdown and charts.")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint folders (config.json + tokenizer)")
    p.add_argument("--data", required=True, help="a .jsonl/.json/.csv/.parquet file, a save_to_disk folder or "
                   "builtin:NAME")
    p.add_argument("--split", default=None, help="split to read (default: test for builtin tasks and DatasetDict "
                   "folders; a file is its own split)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N rows (builtin: generate N, "
                   f"default {DEFAULT_BUILTIN_ROWS})")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--answer-column", default="answer")
    p.add_argument("--no-accuracy", action="store_true", help="rows have no answers: measure rewards only")
    p.add_argument("--answer-mode", choices=ANSWER_MODES, default=EvalConfig.answer_mode,
                   help="how final answers are found: strict (the R1 format: <answer> tags, \\boxed{}, ####, a bare "
                        "number) or lenient (also 'the answer is 159', '80 + 79 = 159', a last number in free text)")
    p.add_argument("--n", type=int, default=EvalConfig.n, help="samples per prompt for pass@k/maj@k (0: greedy only)")
    p.add_argument("--k", type=_int_list, default=EvalConfig.k, help="comma-separated k values (default 1,4)")
    p.add_argument("--temperature", type=float, default=EvalConfig.temperature)
    p.add_argument("--top-p", type=float, default=EvalConfig.top_p)
    p.add_argument("--max-tokens", type=int, default=EvalConfig.max_tokens)
    p.add_argument("--reward", nargs="+", default=[], metavar="NAME", help="rule rewards by name or pkg.mod:func")
    p.add_argument("--reward-model", nargs="+", default=[], metavar="PATH", help="reward-model folders")
    p.add_argument("--engine", default=EvalConfig.engine, help="rollout engine: torch or vllm")
    p.add_argument("--device", default=None, help="device for checkpoints (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    p.add_argument("--seed", type=int, default=EvalConfig.seed)
    p.add_argument("--out", default=None, help="output folder (default runs/eval-<timestamp>)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4,8, got {text!r}") from None


def _run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise EvalError(f"--limit must be an integer >= 1, got {args.limit}")
    config = EvalConfig(n=args.n, k=args.k, temperature=args.temperature, top_p=args.top_p,
                        max_tokens=args.max_tokens, rewards=tuple(args.reward), reward_models=tuple(args.reward_model),
                        accuracy=not args.no_accuracy, answer_mode=args.answer_mode, batch_size=args.batch_size,
                        seed=args.seed, engine=args.engine,
                        device=args.device, progress=not args.no_progress)
    folders = [check_checkpoint(c) for c in args.checkpoints]
    rows = load_rows(args.data, split=args.split, limit=args.limit, prompt_column=args.prompt_column,
                     answer_column=args.answer_column, need_answer=config.accuracy)
    rewards = build_rewards(config)
    labels = _unique_labels([str(f) for f in folders])
    results = [evaluate_checkpoint(f, None, rows, config, rewards=rewards, name=label)
               for f, label in zip(folders, labels)]
    rm_names = [key for key in rewards if key.startswith("rm:")]
    comparison = compare(results, rm_names) if len(results) > 1 else None
    out = Path(args.out) if args.out else Path("runs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    meta = {"checkpoints": [str(f) for f in folders], "data": args.data,
            "split": args.split or default_split(args.data), "rows": len(rows)}
    write_report(out, results, comparison, meta)
    print(markdown_report(results, comparison))
    print(f"wrote {out}/results.json, results.md and charts")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``grpo eval``; returns the exit code (2 with one message for unusable input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return int(exc.code or 0)
    from rewards import RewardError

    try:
        return _run(args)
    except (EvalError, DataError, RewardError) as exc:
        print(f"grpo eval: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
