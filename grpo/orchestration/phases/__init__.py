"""The pipeline's phases, one module each; importing this package registers every runner in
:data:`grpo.orchestration.phases.registry.PHASE_RUNNERS` under its name from :mod:`grpo.phases`."""

from grpo.orchestration.phases import evaluate, rl, rm, sft
from grpo.orchestration.phases.registry import PHASE_RUNNERS

__all__ = ["PHASE_RUNNERS", "evaluate", "rl", "rm", "sft"]
