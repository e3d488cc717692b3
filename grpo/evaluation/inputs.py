"""What an evaluation reads: checkpoint folders, rows of prompts and answers, rewards and reward models, and
the rollout engine a checkpoint runs on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets.utils import logging as ds_logging

from grpo.data import BUILTIN_PREFIX, DataError, DataSpec, load_data
from grpo.evaluation.config import EvalConfig, EvalError
from grpo.phases import RM_PREFIX
from model.registry import Registry
from rewards import get_reward
from rewards.reward_model import load_reward_model_reward
from rollout.base import RolloutEngine, build_engine
from rollout.loading import TOKENIZER_FILES, load_tokenizer

RewardFn = Callable[..., Sequence[Any]]
DEFAULT_BUILTIN_ROWS = 200


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
    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        return fn(*args)
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def unique_labels(paths: Sequence[str]) -> list[str]:
    """Short labels for paths: the folder name, or the whole path where folder names collide."""
    names = [Path(p).name or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def build_rewards(config: EvalConfig) -> dict[str, RewardFn]:
    """The named rewards and reward models of ``config``, keyed by name (``rm:FOLDER`` for reward models).

    Raises:
        EvalError: for an unknown reward name, a bad dotted path or an unusable reward-model folder.
    """
    out: dict[str, RewardFn] = {}
    for name in config.rewards:
        try:
            out[name] = get_reward(name)
        except (KeyError, ValueError, TypeError) as exc:
            raise EvalError(f"--reward {name!r}: {exc.args[0] if exc.args else exc}") from None
    for label, path in zip(unique_labels(config.reward_models), config.reward_models):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise EvalError(f"reward model {folder} does not exist or is not a folder")
        try:
            out[f"{RM_PREFIX}{label}"] = load_reward_model_reward(folder, device=_device(config.device),
                                                          batch_size=config.batch_size)
        except (OSError, ValueError) as exc:
            raise EvalError(f"reward model {folder}: {exc}") from None
    return out


def _device(device: str | None) -> str:
    if device is not None:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


ENGINE_OPTIONS: Registry[Callable[[EvalConfig], dict[str, Any]]] = Registry("engine options")
"""Keyword arguments an engine gets when it loads a checkpoint folder for an evaluation (besides the tokenizer);
an engine without an entry gets none."""
ENGINE_OPTIONS.add("torch", lambda config: {"device": _device(config.device)})


def open_engine(path_or_model: Any, tokenizer: Any, config: EvalConfig) -> tuple[Any, Any, str]:
    """(engine, tokenizer, label) for a checkpoint folder, a model or a rollout engine."""
    if isinstance(path_or_model, (str, Path)):
        folder = check_checkpoint(path_or_model)
        try:
            if tokenizer is None:
                tokenizer = load_tokenizer(folder)
            options = ENGINE_OPTIONS.get(config.engine)(config) if config.engine in ENGINE_OPTIONS else {}
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
