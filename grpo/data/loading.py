"""Datasets for every phase: load, select and rename columns, validate rows with errors that point at the row.

A source is a file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``), a folder written by ``datasets``'
``save_to_disk``, or ``builtin:NAME`` (a generated task from :mod:`grpo.data.tasks`). Columns are renamed to the
canonical names of a *schema*:

==============  ===========================================  ==================
schema          required columns                             optional columns
==============  ===========================================  ==================
``prompt``      ``prompt``                                   ``answer``
``sft``         ``prompt``, ``completion``                   ``answer``
``chat``        ``messages``                                 (none)
``preference``  ``prompt``, ``chosen``, ``rejected``         (none)
==============  ===========================================  ==================

``prompt``, ``completion``, ``chosen`` and ``rejected`` are a non-empty string or a non-empty list of chat
messages (``{"role": str, "content": str}``); ``messages`` is such a list with at least one assistant turn;
``answer`` is a string (numbers, as CSV readers produce, are turned into strings). Other columns are kept as
they are, so they reach reward functions as keyword arguments.

A bad row raises one :class:`DataError` naming the file, the row (the 1-based line for JSONL, the 1-based data
row otherwise) and the field. A file holds one split: asking a file for ``split="test"`` is an error rather
than a silent read of the training data.

Example:
    >>> ds = load_data(DataSpec(source="builtin:arithmetic", n=4, seed=0))
    >>> ds.column_names
    ['prompt', 'completion', 'answer']
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from grpo.data import tasks
from model.registry import Registry, check_fields
from sft.messages import to_messages

BUILTIN_PREFIX = "builtin:"


class DataError(ValueError):
    """A data source or one of its rows is unusable; the message names the file, the row and the field."""


# ----------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class DataSpec:
    """Where a dataset comes from and how its columns map to the canonical names.

    Attributes:
        source: A file path, a ``save_to_disk`` folder, or ``builtin:NAME``.
        schema: Which canonical columns are required (``prompt``, ``sft``, ``chat`` or ``preference``).
        split: ``train`` or ``test`` for built-in tasks; a split name of a saved ``DatasetDict``; files hold
            only ``train``.
        n: Number of rows: required for built-in tasks; for other sources keeps the first ``n`` rows.
        seed: Seed of a built-in task.
        prompt_column: Source column holding the prompt.
        answer_column: Source column holding the reference answer.
        completion_column: Source column holding the SFT target.
        messages_column: Source column holding whole conversations.
        chosen_column: Source column holding the preferred response.
        rejected_column: Source column holding the dispreferred response.
        options: Options of a built-in task (e.g. ``{"digits": 3}``).
    """

    source: str
    schema: str = "prompt"
    split: str = "train"
    n: int | None = None
    seed: int = 0
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    completion_column: str = "completion"
    messages_column: str = "messages"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise DataError(f"data source must be a non-empty string, got {self.source!r}")
        if self.schema not in SCHEMAS:
            raise DataError(f"data schema must be one of {', '.join(SCHEMAS.names())}, got {self.schema!r}")
        if self.n is not None and (not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1):
            raise DataError(f"data n must be a positive integer or None, got {self.n!r}")
        for f in dataclasses.fields(self):
            if f.name.endswith("_column") and (not isinstance(getattr(self, f.name), str) or not getattr(self, f.name)):
                raise DataError(f"data {f.name} must be a non-empty string, got {getattr(self, f.name)!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataSpec:
        """Builds a spec from a mapping (a recipe section), refusing unknown keys."""
        check_fields(cls, d, "data key(s)", error=DataError)
        return cls(**d)

    def column(self, canonical: str) -> str:
        """The source column name for the canonical column ``canonical``."""
        return getattr(self, f"{canonical}_column")


@dataclass(frozen=True)
class Schema:
    """Canonical columns a phase needs (``required``) or uses when present (``optional``)."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()


SCHEMAS: Registry[Schema] = Registry("data schema")
SCHEMAS.add("prompt", Schema(required=("prompt",), optional=("answer",)))
SCHEMAS.add("sft", Schema(required=("prompt", "completion"), optional=("answer",)))
SCHEMAS.add("chat", Schema(required=("messages",)))
SCHEMAS.add("preference", Schema(required=("prompt", "chosen", "rejected")))


# ----------------------------------------------------------------------------------------------- field checks
class _FieldProblem(Exception):
    """Raised by a field check; the caller adds the file, row and field."""


def _check_messages(value: Any) -> list[dict[str, Any]]:
    if len(value) == 0:
        raise _FieldProblem("is an empty list of messages")
    for j, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise _FieldProblem(f"message {j} is a {type(m).__name__}, expected an object with role and content")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise _FieldProblem(f"message {j} has no role (expected a non-empty string)")
        if not isinstance(m.get("content"), str):
            raise _FieldProblem(f"message {j} content is {type(m.get('content')).__name__}, expected a string")
    return list(value)


def _check_text_or_messages(value: Any) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise _FieldProblem("is empty")
        return value
    if isinstance(value, (list, tuple)):
        return _check_messages(value)
    raise _FieldProblem(f"has type {type(value).__name__}, expected a string or a list of chat messages")


def _check_conversation(value: Any) -> Any:
    if not isinstance(value, (list, tuple)):
        raise _FieldProblem(f"has type {type(value).__name__}, expected a list of chat messages")
    msgs = _check_messages(value)
    if not any(m["role"] == "assistant" for m in msgs):
        raise _FieldProblem("has no assistant message (nothing to learn from)")
    return msgs


def _check_answer(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _FieldProblem(f"has type {type(value).__name__}, expected a string or a number")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _FieldProblem(f"is {value}, expected a finite number")
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


FIELD_CHECKS: Registry[Callable[[Any], Any]] = Registry("field check")
for _name in ("prompt", "completion", "chosen", "rejected"):
    FIELD_CHECKS.add(_name, _check_text_or_messages)
FIELD_CHECKS.add("messages", _check_conversation)
FIELD_CHECKS.add("answer", _check_answer)


# ----------------------------------------------------------------------------------------------- origins
@dataclass(frozen=True)
class _Origin:
    """Names a source and locates its rows in error messages."""

    name: str
    jsonl_path: Path | None = None

    def row(self, i: int) -> str:
        """Location of 0-based row ``i``: ``file line 7`` for JSONL, ``file row 7`` otherwise."""
        if self.jsonl_path is not None:
            lines = [k for k, line in enumerate(_read_lines(self.jsonl_path), 1) if line.strip()]
            if i < len(lines):
                return f"{self.name} line {lines[i]}"
        return f"{self.name} row {i + 1}"


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# ----------------------------------------------------------------------------------------------- loaders
def _load_with_datasets(kind: str) -> Callable[[Path, DataSpec], datasets.Dataset]:
    def load(path: Path, spec: DataSpec) -> datasets.Dataset:
        return datasets.load_dataset(kind, data_files=str(path), split="train")

    return load


def _load_jsonl(path: Path, spec: DataSpec) -> datasets.Dataset:
    try:
        return _load_with_datasets("json")(path, spec)
    except Exception as exc:  # the file is re-read below to name the bad line
        rows = _parse_jsonl(path)
        try:
            return _rows_to_dataset(rows, spec, _Origin(str(path), jsonl_path=path))
        except DataError:
            raise
        except Exception:
            raise DataError(f"{path}: could not load as JSON lines ({exc})") from exc


def _parse_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parses a JSON-lines file, naming the first malformed line."""
    rows = []
    for k, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {k}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {k}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _load_json(path: Path, spec: DataSpec) -> datasets.Dataset:
    try:
        return _load_with_datasets("json")(path, spec)
    except Exception as exc:
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as jexc:
            raise DataError(f"{path} line {jexc.lineno}: malformed JSON ({jexc.msg})") from None
        raise DataError(f"{path}: could not load as JSON ({exc})") from exc


def _csv_rows(path: Path) -> int:
    with path.open(newline="", encoding="utf-8") as f:
        return max(sum(1 for _ in csv.reader(f)) - 1, 0)  # minus the header


def _parquet_rows(path: Path) -> int:
    return pq.ParquetFile(str(path)).metadata.num_rows


def _wrap(kind: str, count_rows: Callable[[Path], int]) -> Callable[[Path, DataSpec], datasets.Dataset]:
    """A ``datasets`` loader whose failure names the file, and calls a file without rows empty."""
    inner = _load_with_datasets(kind)

    def load(path: Path, spec: DataSpec) -> datasets.Dataset:
        try:
            return inner(path, spec)
        except Exception as exc:
            try:
                empty = count_rows(path) == 0
            except Exception:
                empty = False
            if empty:
                raise DataError(f"{path} is empty (no rows)") from None
            cause = exc.__cause__ or exc
            raise DataError(f"{path}: could not load as {kind} ({cause})") from exc

    return load


LOADERS: Registry[Callable[[Path, DataSpec], datasets.Dataset]] = Registry("data file format")
LOADERS.add(".jsonl", _load_jsonl)
LOADERS.add(".json", _load_json)
LOADERS.add(".csv", _wrap("csv", _csv_rows))
LOADERS.add(".parquet", _wrap("parquet", _parquet_rows))


def _load_file(path: Path, spec: DataSpec) -> tuple[datasets.Dataset, _Origin]:
    if spec.split != "train":
        raise DataError(
            f"{path} is a single file (split 'train'); split {spec.split!r} was asked for: "
            f"point the source at that split's own file"
        )
    suffix = path.suffix.lower()
    if suffix not in LOADERS:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; supported: "
            f"{', '.join(LOADERS.names())} or a save_to_disk folder"
        )
    size = path.stat().st_size
    if size == 0 or (size <= 4096 and not path.read_bytes().strip()):
        raise DataError(f"{path} is empty")
    ds = LOADERS.get(suffix)(path, spec)
    return ds, _Origin(str(path), jsonl_path=path if suffix == ".jsonl" else None)


def _load_folder(path: Path, spec: DataSpec) -> tuple[datasets.Dataset, _Origin]:
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({exc})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if spec.split not in loaded:
            raise DataError(f"{path}: no split {spec.split!r}; splits: {', '.join(loaded)}")
        return loaded[spec.split], _Origin(f"{path} [{spec.split}]")
    if spec.split != "train":
        raise DataError(f"{path} holds a single split; split {spec.split!r} was asked for")
    return loaded, _Origin(str(path))


def _load_builtin(spec: DataSpec) -> tuple[datasets.Dataset, _Origin]:
    name = spec.source[len(BUILTIN_PREFIX) :]
    if spec.n is None:
        raise DataError(f"{spec.source}: n (the number of rows to generate) is required for a builtin task")
    try:
        rows = tasks.generate(name, spec.n, seed=spec.seed, split=spec.split, **dict(spec.options))
    except (KeyError, ValueError) as exc:
        raise DataError(f"{spec.source}: {exc.args[0] if exc.args else exc}") from exc
    return datasets.Dataset.from_list(rows), _Origin(f"{spec.source} [{spec.split}]")


def _load_source(spec: DataSpec) -> tuple[datasets.Dataset, _Origin]:
    if spec.source.startswith(BUILTIN_PREFIX):
        return _load_builtin(spec)
    if spec.options:
        raise DataError(f"{spec.source}: options {dict(spec.options)} apply to builtin tasks only")
    path = Path(spec.source).expanduser()
    if path.is_dir():
        return _load_folder(path, spec)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    return _load_file(path, spec)


# ----------------------------------------------------------------------------------------------- columns
def _select_columns(ds: datasets.Dataset, spec: DataSpec, origin: _Origin) -> datasets.Dataset:
    schema = SCHEMAS.get(spec.schema)
    renames = {}
    for canonical in (*schema.required, *schema.optional):
        src = spec.column(canonical)
        if src not in ds.column_names:
            if canonical in schema.required:
                raise DataError(
                    f"{origin.name}: column {src!r} not found (needed as {canonical!r} by schema "
                    f"{spec.schema!r}); columns: {', '.join(ds.column_names)}; set {canonical}_column"
                )
            continue
        if src != canonical:
            if canonical in ds.column_names:
                raise DataError(
                    f"{origin.name}: {canonical}_column={src!r} would be renamed to {canonical!r}, "
                    f"which already is a column; drop or rename one of them"
                )
            renames[src] = canonical
    return ds.rename_columns(renames) if renames else ds


def _validate_row(row: Mapping[str, Any], i: int, spec: DataSpec, origin: _Origin) -> None:
    """Checks one raw row (source column names) against the schema, to diagnose a file that fails to load."""
    schema = SCHEMAS.get(spec.schema)
    for canonical in (*schema.required, *schema.optional):
        src = spec.column(canonical)
        value = row.get(src)
        if value is None:
            if canonical in schema.required:
                raise DataError(f"{origin.row(i)}: field {src!r} is missing or null")
            continue
        try:
            FIELD_CHECKS.get(canonical)(value)
        except _FieldProblem as exc:
            raise DataError(f"{origin.row(i)}: field {src!r} {exc}") from None


_ROLE_OF = {"prompt": "user", "completion": "assistant", "chosen": "assistant", "rejected": "assistant"}


def _rows_to_dataset(rows: Sequence[Mapping[str, Any]], spec: DataSpec, origin: _Origin) -> datasets.Dataset:
    """Validates Python rows and builds a dataset from them.

    Arrow columns hold one type, so a text column that mixes strings and message lists gets its strings turned
    into one-message lists (a user message for prompts, an assistant message for responses), and answers
    become strings.
    """
    schema = SCHEMAS.get(spec.schema)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"{origin.row(i)}: expected a mapping of columns, got {type(row).__name__}")
        _validate_row(row, i, spec, origin)
    names = list(dict.fromkeys(k for row in rows for k in row))
    columns = {k: [row.get(k) for row in rows] for k in names}
    for canonical in (*schema.required, *schema.optional):
        src = spec.column(canonical)
        if src not in columns:
            continue
        values = columns[src]
        if canonical == "answer":
            columns[src] = [None if v is None else _check_answer(v) for v in values]
        elif canonical in _ROLE_OF and len({isinstance(v, str) for v in values if v is not None}) > 1:
            columns[src] = [to_messages(v, _ROLE_OF[canonical]) if isinstance(v, str) else v for v in values]
    return datasets.Dataset.from_dict(columns)


def _validate_columns(ds: datasets.Dataset, spec: DataSpec, origin: _Origin) -> datasets.Dataset:
    schema = SCHEMAS.get(spec.schema)
    for canonical in (*schema.required, *schema.optional):
        if canonical not in ds.column_names:
            continue
        check, src = FIELD_CHECKS.get(canonical), spec.column(canonical)
        values, normalised = ds[canonical], []
        for i, value in enumerate(values):
            if value is None:
                if canonical in schema.required:
                    raise DataError(f"{origin.row(i)}: field {src!r} is missing or null")
                normalised.append(None)
                continue
            try:
                normalised.append(check(value))
            except _FieldProblem as exc:
                raise DataError(f"{origin.row(i)}: field {src!r} {exc}") from None
        if canonical == "answer" and normalised != list(values):
            position = ds.column_names.index(canonical)
            ds = ds.remove_columns(canonical).add_column(canonical, normalised)
            order = [*ds.column_names[:position], canonical, *ds.column_names[position:-1]]
            ds = ds.select_columns(order)
    return ds


# ----------------------------------------------------------------------------------------------- entry points
def load_data(spec: DataSpec | Mapping[str, Any] | str, **overrides: Any) -> datasets.Dataset:
    """Loads, renames and validates a dataset.

    Args:
        spec: A :class:`DataSpec`, a mapping of its fields, or just the source.
        **overrides: Fields of :class:`DataSpec` that replace those of ``spec``.

    Returns:
        A ``datasets.Dataset`` whose schema columns carry their canonical names (other columns kept).

    Raises:
        DataError: naming the file, row and field of the first problem found.
    """
    if isinstance(spec, str):
        spec = DataSpec(source=spec, **overrides)
    elif isinstance(spec, Mapping):
        spec = DataSpec.from_dict({**spec, **overrides})
    elif overrides:
        spec = dataclasses.replace(spec, **overrides)
    ds, origin = _load_source(spec)
    if len(ds) == 0:
        raise DataError(f"{origin.name} is empty (no rows)")
    if spec.n is not None and not spec.source.startswith(BUILTIN_PREFIX):
        if spec.n > len(ds):
            raise DataError(f"{origin.name}: n={spec.n} rows asked for, but it holds only {len(ds)}")
        ds = ds.select(range(spec.n))
    ds = _select_columns(ds, spec, origin)
    return _validate_columns(ds, spec, origin)


def from_rows(
    rows: Sequence[Mapping[str, Any]], schema: str = "prompt", name: str = "<rows>", **columns: str
) -> datasets.Dataset:
    """Validates in-memory rows like a loaded file.

    Args:
        rows: The rows (dicts).
        schema: A name in :data:`SCHEMAS`.
        name: How errors name the source.
        **columns: ``*_column`` fields of :class:`DataSpec`.

    Returns:
        The validated dataset.
    """
    spec = DataSpec(source=name, schema=schema, **columns)
    origin = _Origin(name)
    if not rows:
        raise DataError(f"{name} is empty (no rows)")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"{origin.row(i)}: expected a mapping of columns, got {type(row).__name__}")
    ds = _select_columns(_rows_to_dataset(rows, spec, origin), spec, origin)
    return _validate_columns(ds, spec, origin)


def rows_of(spec: DataSpec | Mapping[str, Any] | str) -> list[dict[str, Any]]:
    """:func:`load_data` as a list of plain dicts (what a phase hands to its workers)."""
    return [dict(r) for r in load_data(spec)]
