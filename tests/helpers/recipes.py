"""Micro recipes for pipeline tests: a 2-layer, 32-wide version of the tiny MoE policy and a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

TINY_MODEL = {"preset": "tiny", "overrides": {"hidden_size": 32, "intermediate_size": 64,
                                              "moe_intermediate_size": 16, "num_hidden_layers": 2,
                                              "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                                              "qk_rope_head_dim": 8, "v_head_dim": 8}}
ARITH = {"source": "builtin:arithmetic", "n": 64, "options": {"digits": 1, "max_ops": 1}}


def micro_recipe(out: Path, steps: int = 4, **extra) -> Path:
    """Writes a recipe (SFT then a few GRPO steps on the micro model) to ``out/recipe.yaml``; ``extra`` replaces
    top-level sections."""
    recipe = {
        "name": "micro", "output_dir": str(out), "seed": 0, "checkpoint_every": 1,
        "phases": ["sft", "rl_reason"], "model": TINY_MODEL,
        "ray": {"num_cpus": 2},
        "sft": {"data": [{**ARITH, "schema": "sft"}],
                "train": {"lr": 3e-3, "batch_size": 16, "max_length": 64, "progress": False, "log_every": 1}},
        "rl_reason": {"data": ARITH, "steps": steps,
                      "rewards": [{"name": "accuracy"}, {"name": "format", "weight": 0.5}],
                      "grpo": {"group_size": 4, "prompts_per_step": 2, "minibatch_size": 8, "micro_batch_size": 8,
                               "lr": 1e-3, "beta": 0.04, "max_new_tokens": 12, "total_steps": steps}},
        **extra,
    }
    path = out / "recipe.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def logged(run_dir: Path, phase: str) -> list[dict]:
    """The metrics lines of ``phase`` in a run folder's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["phase"] == phase]
