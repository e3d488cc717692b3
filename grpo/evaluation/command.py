"""The ``grpo eval`` command: evaluate checkpoint folders on a data set and write a results folder."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from grpo.data import DataError
from grpo.evaluation.comparison import compare
from grpo.evaluation.config import EvalConfig, EvalError
from grpo.evaluation.inputs import (
    DEFAULT_BUILTIN_ROWS,
    build_rewards,
    check_checkpoint,
    default_split,
    load_rows,
    unique_labels,
)
from grpo.evaluation.results import results_markdown, write_results
from grpo.evaluation.runner import evaluate_checkpoint
from grpo.phases import reward_model_name
from rewards import RewardError
from rewards.answers import ANSWER_MODES

EXAMPLES = """examples:
  grpo eval runs/tiny/checkpoints/sft runs/tiny/checkpoints/rl_reason --data builtin:arithmetic --n 8 --k 1,4,8
  grpo eval /models/my-model --data data/test.jsonl --answer-mode lenient --max-new-tokens 512
  grpo eval runs/tiny/checkpoints/rl_pref --data prompts.jsonl --no-accuracy \\
      --reward-model runs/tiny/checkpoints/rm_helpful
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``grpo eval`` argument parser."""
    p = argparse.ArgumentParser(prog="grpo eval", description="Evaluate checkpoints: greedy accuracy, pass@k, maj@k, "
                                "reward scores, format rate, completion lengths; writes JSON, markdown and charts.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
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
    p.add_argument("--max-new-tokens", type=int, default=EvalConfig.max_new_tokens,
                   help=f"most new tokens per completion, as max_new_tokens in recipes (default "
                        f"{EvalConfig.max_new_tokens})")
    p.add_argument("--max-tokens", action=_Renamed, new="--max-new-tokens", help=argparse.SUPPRESS)
    p.add_argument("--reward", nargs="+", default=[], metavar="NAME", help="rule rewards by name or pkg.mod:func")
    p.add_argument("--reward-model", nargs="+", default=[], metavar="PATH", help="reward-model folders")
    p.add_argument("--engine", default=EvalConfig.engine, help="rollout engine: torch or vllm")
    p.add_argument("--device", default=None, help="device for checkpoints (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    p.add_argument("--seed", type=int, default=EvalConfig.seed)
    p.add_argument("--out", default=None, help="output folder (default runs/eval-<timestamp>)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


class _Renamed(argparse.Action):
    """A flag that was renamed: using it is an error that names the new one."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs="?", **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} was renamed {self.new} (the name recipes use, max_new_tokens)")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4,8, got {text!r}") from None


def _run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise EvalError(f"--limit must be an integer >= 1, got {args.limit}")
    config = EvalConfig(n=args.n, k=args.k, temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=args.max_new_tokens, rewards=tuple(args.reward),
                        reward_models=tuple(args.reward_model),
                        accuracy=not args.no_accuracy, answer_mode=args.answer_mode, batch_size=args.batch_size,
                        seed=args.seed, engine=args.engine,
                        device=args.device, progress=not args.no_progress)
    folders = [check_checkpoint(c) for c in args.checkpoints]
    rows = load_rows(args.data, split=args.split, limit=args.limit, prompt_column=args.prompt_column,
                     answer_column=args.answer_column, need_answer=config.accuracy)
    rewards = build_rewards(config)
    labels = unique_labels([str(f) for f in folders])
    results = [evaluate_checkpoint(f, None, rows, config, rewards=rewards, name=label)
               for f, label in zip(folders, labels)]
    rm_names = [key for key in rewards if reward_model_name(key) is not None]
    comparison = compare(results, rm_names) if len(results) > 1 else None
    out = Path(args.out) if args.out else Path("runs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    meta = {"checkpoints": [str(f) for f in folders], "data": args.data,
            "split": args.split or default_split(args.data), "rows": len(rows)}
    write_results(out, results, comparison, meta)
    print(results_markdown(results, comparison))
    print(f"wrote {out}/results.json, results.md and charts")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``grpo eval``; returns the exit code (2 with one message for unusable input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return int(exc.code or 0)
    try:
        return _run(args)
    except (EvalError, DataError, RewardError) as exc:
        print(f"grpo eval: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
