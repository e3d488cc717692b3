"""The ``sft`` phase: supervised fine-tuning of the policy on the recipe's data, resumable step by step."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from grpo.data.loading import rows_of
from grpo.orchestration.feed import Feed
from grpo.orchestration.phases.registry import PHASE_RUNNERS
from grpo.phases import SFT

if TYPE_CHECKING:
    from grpo.orchestration.controller import Pipeline


@PHASE_RUNNERS.register(SFT)
def run(p: Pipeline) -> None:
    """Fine-tunes the policy worker's model on ``sft.data``; saves ``checkpoints/sft``."""
    cfg = p.recipe.sft
    rows = [row for spec in cfg.data for row in rows_of(spec)]
    policy = p.policy_worker()
    state_dir = p.run_dir / "state" / "sft"
    if p.recipe.resume:
        latest = (state_dir / "latest")
        p.logger.truncate_after("sft", int(latest.read_text().split("_")[1]) if latest.exists() else 0)
    train = dataclasses.replace(cfg.train, seed=p.recipe.seed + cfg.train.seed)
    feed, display = Feed(), p.console.phase("sft", "sft")

    def logged(record: dict) -> None:  # each logged step as the worker logs it: the log and the display
        step, total = int(record.pop("step")), int(record.pop("total"))
        p.logger.log("sft", step, record)
        display.update(step, record, total)

    try:
        feed.wait(policy.submit("sft", rows, train, str(state_dir), p.recipe.checkpoint_every, p.recipe.resume,
                                feed.queue), logged)
        display.finish()
    finally:
        display.close()
        feed.close()
    policy.call("save_pretrained", str(p.ckpt("sft")))
    p.progress.complete("sft", {"steps": display.total})
