"""Data: loading datasets into canonical columns (:mod:`grpo.data.loading`) and the built-in generated tasks
(:mod:`grpo.data.tasks`, reached as ``builtin:NAME``)."""

from grpo.data import tasks
from grpo.data.loading import BUILTIN_PREFIX, SCHEMAS, DataError, DataSpec, from_rows, load_data

__all__ = ["BUILTIN_PREFIX", "SCHEMAS", "DataError", "DataSpec", "from_rows", "load_data", "tasks"]
