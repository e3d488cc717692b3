"""Helpers shared by the tests (tiny models, tokenizers, recipes, engines, kernel tolerances, the CLI)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
"""The repository root."""
