"""Evaluating checkpoints: accuracy, pass@k, maj@k, reward scores, lengths; a report; the ``grpo eval`` command.

For each checkpoint (a Hugging Face folder, ours or any causal LM, or an in-memory model or rollout engine) and a
set of rows with a ``prompt`` (a string or chat messages, rendered through the chat template by
:func:`grpo.trainer.encode_prompt`) and a reference ``answer``:

* one **greedy** completion per prompt (temperature 0) gives the greedy accuracy (the ``accuracy`` reward), the
  format rate (the ``format`` reward: ``<think>...</think><answer>...</answer>``), the answer rate (share with an
  extractable final answer), the mean score of every named reward and reward model, and length statistics;
* ``n`` **sampled** completions per prompt (``temperature``, ``top_p``) give pass@k and maj@k for each requested
  ``k`` (definitions, tie rule included, in :mod:`grpo.evaluation.metrics`). For maj@k, final answers are extracted
  as the ``accuracy`` reward does (:func:`rewards.answers.extract_answer`) and grouped into labels: a sample
  joins the first earlier label whose representative (its first answer) it matches
  (:func:`rewards.answers.answers_match`), so ``0.5`` and ``1/2`` vote together; a label is correct when its
  representative matches the reference.

With two or more checkpoints, :func:`compare` gives each later checkpoint's reward-model win rate against the
first (share of prompts where its greedy completion scores higher, ties counting half), and
:func:`grpo.evaluation.results.write_results` writes ``results.json``, ``results.md`` (a side-by-side
table), ``completions.jsonl`` and PNG bar charts.

Sampling is seeded per batch (``seed + batch index``), so sampled metrics are reproducible for a fixed
``batch_size``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from grpo.evaluation.config import EvalConfig
from grpo.evaluation.inputs import RewardFn, build_rewards, check_rows, open_engine
from grpo.evaluation.metrics import LengthStats, length_stats, maj_at_k, majority_vote, mean_or_none, pass_at_k
from rewards import call_reward
from rewards.answers import answers_match, extract_answer, gold_answer
from rewards.rules import AccuracyReward, format_reward
from rollout.base import SamplingConfig
from sft.formatting import encode_prompt

_RESERVED_COLUMNS = frozenset({"prompt", "prompts", "completions", "name", "on_error", "fn"})  # call_reward's own


@dataclass(frozen=True)
class PromptResult:
    """What one prompt got.

    Attributes:
        index: Row index.
        prompt: The prompt (string or messages).
        answer: The reference answer (``None`` without answers).
        greedy: The greedy completion's text.
        greedy_tokens: Its length in tokens.
        greedy_truncated: Whether it hit ``max_new_tokens``.
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


def _generate(engine: Any, prompt_ids: list[list[int]], sampling: Any, config: EvalConfig, desc: str) -> list[Any]:
    """Generates in batches of ``config.batch_size`` prompts, seeding batch ``b`` with ``seed + b``."""
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
    accuracy = AccuracyReward(config.answer_mode)
    n = config.n
    sampling = SamplingConfig(n=n, max_tokens=config.max_new_tokens, temperature=config.temperature,
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
    engine, tokenizer, label = open_engine(path_or_model, tokenizer, config)
    try:
        return _evaluate(engine, tokenizer, name or label, rows, config, rewards)
    finally:
        if isinstance(was_training, bool):
            path_or_model.train(was_training)


def _evaluate(engine: Any, tokenizer: Any, label: str, rows: list[dict[str, Any]], config: EvalConfig,
              rewards: Mapping[str, RewardFn]) -> EvalResult:
    accuracy = AccuracyReward(config.answer_mode)
    prompts = [row["prompt"] for row in rows]
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]

    greedy_cfg = SamplingConfig(n=1, max_tokens=config.max_new_tokens, temperature=0.0, logprobs=False)
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
