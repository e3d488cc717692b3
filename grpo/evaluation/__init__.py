"""Evaluation: checkpoints on held-out prompts (accuracy, pass@k, maj@k, rewards, lengths), compared side by
side, written to a results folder; and the ``grpo eval`` command."""

from grpo.evaluation.comparison import Comparison, compare, summary_rows
from grpo.evaluation.config import EvalConfig, EvalError
from grpo.evaluation.inputs import build_rewards, check_checkpoint, check_rows, default_split, load_rows, open_engine
from grpo.evaluation.results import results_markdown, write_results
from grpo.evaluation.runner import EvalResult, PromptResult, answer_labels, evaluate_checkpoint

__all__ = ["Comparison", "EvalConfig", "EvalError", "EvalResult", "PromptResult", "answer_labels",
           "build_rewards", "check_checkpoint", "check_rows", "compare", "default_split", "evaluate_checkpoint",
           "load_rows", "open_engine", "results_markdown", "summary_rows", "write_results"]
