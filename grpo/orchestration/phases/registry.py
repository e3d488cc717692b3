"""The phase runners by name: each phase module registers one ``run(pipeline)`` under its phase's name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from model.registry import Registry

PHASE_RUNNERS: Registry[Callable[[Any], None]] = Registry("pipeline phase")
