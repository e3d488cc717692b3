"""The ``grpo`` command.

::

    grpo run [RECIPE] [key=value ...]        the whole pipeline (the embedded tiny recipe when no RECIPE)
    grpo sft [RECIPE] [key=value ...]        only the SFT phase of the run
    grpo rl  [RECIPE] [--stage reason|pref] [key=value ...]   one GRPO stage of the run
    grpo rm  [RECIPE] [key=value ...]        only the reward-model phase
    grpo eval CKPT [CKPT ...] --data ...     evaluate checkpoints (see ``grpo eval --help``)
    grpo plan [RECIPE] [key=value ...] [--device-memory 80GiB]   the memory each role needs
    grpo recipes                             list the bundled recipes

RECIPE is a YAML file or the name of a bundled recipe (``tiny``, ``deepseek_v2_lite``, ``hf_grpo``).
``key=value`` overrides any recipe key with a dotted path, e.g. ``rl_reason.steps=20 output_dir=/tmp/runs``.
Single phases continue the run folder of the same recipe (they imply ``resume=true``). ``grpo COMMAND --help``
shows a command's options and examples.

Examples::

    grpo run                                           the tiny pipeline on a local Ray instance (runs/tiny)
    grpo run tiny rl_reason.steps=20 name=short        a shorter stage 1, in runs/short
    grpo run hf_grpo model.path=/models/my-model       GRPO on a local Hugging Face model folder
    grpo eval runs/tiny/checkpoints/rl_reason --data builtin:arithmetic --n 8 --k 1,8
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from grpo.evaluation.command import main as eval_main
from grpo.orchestration.controller import Pipeline
from grpo.orchestration.plan import parse_bytes, plan
from grpo.orchestration.recipe import bundled_recipes, load_recipe
from model.registry import Registry
from rollout.weights import StaleWeightsError

COMMANDS: Registry[Callable[[list[str]], int]] = Registry("grpo command")
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, StaleWeightsError, MemoryError)


def _recipe_parser(prog: str, description: str, examples: Sequence[str], stage: bool = False,
                   runs: bool = True) -> argparse.ArgumentParser:
    epilog = ("Overrides are key=value with dotted keys, e.g. rl_reason.steps=20 ray.address=auto "
              "output_dir=/tmp/runs.\n\nexamples:\n" + "\n".join(f"  {line}" for line in examples))
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default=None,
                        help="recipe YAML file or bundled recipe name (default: the embedded tiny recipe)")
    parser.add_argument("overrides", nargs="*", default=[], help="key=value overrides of recipe keys")
    if stage:
        parser.add_argument("--stage", choices=["reason", "pref"], default="reason",
                            help="which GRPO stage to run (default: reason)")
    if runs:
        parser.add_argument("--verbose", action="store_true",
                            help="show the workers' and libraries' output on the terminal as it comes (by default "
                                 "it goes to the run's logs/ folder and the terminal shows one progress display "
                                 "per phase)")
    return parser


def _split(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """A bare ``key=value`` in the recipe slot is an override, not a recipe name."""
    if args.recipe is not None and "=" in args.recipe:
        return None, [args.recipe, *args.overrides]
    return args.recipe, list(args.overrides)


def _run_phases(args: argparse.Namespace, phases: list[str] | None) -> int:
    recipe_name, overrides = _split(args)
    if phases is not None:
        overrides = [*overrides, f"phases={phases}", "resume=true"]
    recipe = load_recipe(recipe_name, overrides)
    run_dir = Pipeline(recipe, verbose=args.verbose).run()
    print(f"[grpo] done: {run_dir}")
    return 0


@COMMANDS.register("run")
def cmd_run(argv: list[str]) -> int:
    args = _recipe_parser("grpo run", "Run the whole pipeline: sft -> rl_reason -> rm -> rl_pref -> eval.", [
        "grpo run                                     the tiny recipe on a local Ray instance, in runs/tiny",
        "grpo run tiny rl_reason.steps=20 name=short  a shorter stage 1, in runs/short",
        "grpo run my_recipe.yaml rl_reason.grpo.beta=0.001",
        "grpo run resume=true                         continue runs/tiny from its last complete step",
        "grpo run deepseek_v2_lite model.path=/models/DeepSeek-V2-Lite-Chat ray.address=auto",
    ]).parse_args(argv)
    return _run_phases(args, phases=None)


@COMMANDS.register("sft")
def cmd_sft(argv: list[str]) -> int:
    args = _recipe_parser("grpo sft", "Run (or resume) the SFT phase of a run.", [
        "grpo sft                         the tiny recipe's SFT phase, in runs/tiny",
        "grpo sft tiny sft.train.epochs=2",
    ]).parse_args(argv)
    return _run_phases(args, phases=["sft"])


@COMMANDS.register("rl")
def cmd_rl(argv: list[str]) -> int:
    args = _recipe_parser("grpo rl", "Run (or resume) one GRPO stage of a run.", [
        "grpo rl                                  stage 1 (reasoning) of runs/tiny, from its SFT checkpoint",
        "grpo rl --stage pref rl_pref.steps=10    stage 2 (preference), after grpo rm",
    ], stage=True).parse_args(argv)
    return _run_phases(args, phases=[f"rl_{args.stage}"])


@COMMANDS.register("rm")
def cmd_rm(argv: list[str]) -> int:
    args = _recipe_parser("grpo rm", "Train (or resume) the reward models of a run.", [
        "grpo rm                          the tiny recipe's reward models, from runs/tiny's SFT checkpoint",
    ]).parse_args(argv)
    return _run_phases(args, phases=["rm"])


@COMMANDS.register("eval")
def cmd_eval(argv: list[str]) -> int:
    return eval_main(argv)


@COMMANDS.register("plan")
def cmd_plan(argv: list[str]) -> int:
    parser = _recipe_parser("grpo plan", "Print the memory each role of a recipe needs per device (trainer "
                            "ranks, rollout and reference workers) and whether it fits; nothing runs.", [
                                "grpo plan                                      the tiny recipe",
                                "grpo plan deepseek_v2_lite model.path=null model.preset=deepseek-v2-lite "
                                "--device-memory 80GiB",
                            ], runs=False)
    parser.add_argument("--device-memory", default=None,
                        help="memory of one device, e.g. 80GiB: say whether every role fits")
    parser.add_argument("--prompt-tokens", type=int, default=512,
                        help="tokens per RL prompt assumed (default: 512)")
    args = parser.parse_args(argv)
    recipe = load_recipe(*_split(args))
    memory = parse_bytes(args.device_memory) if args.device_memory else None
    result = plan(recipe, prompt_tokens=args.prompt_tokens)
    print(result.format(memory), end="")
    return 0 if memory is None or result.fits(memory) else 1


@COMMANDS.register("recipes")
def cmd_recipes(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="grpo recipes", description="List the recipes shipped with the toolkit "
                            "(run one with `grpo run NAME`).", epilog="example:\n  grpo recipes",
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    for name, what in bundled_recipes().items():
        print(f"{name:<18} {what}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``grpo`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"grpo: unknown command {command!r}; expected one of: {', '.join(COMMANDS.names())}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS.get(command)(rest)
    except _USER_ERRORS as exc:
        cause = getattr(exc, "cause", None)  # an error raised in a Ray actor carries the original
        print(f"grpo {command}: error: {cause if isinstance(cause, Exception) else exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
