"""Every phase runs with its own settings: each RL stage's optimizer, learning rate, weight decay and schedule
come from its own config (in one process and launched alone), the schedule's horizon follows the stage's steps,
a stage's engine is honoured, and settings nothing would read are refused."""

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from grpo.config import GRPOConfig
from grpo.orchestration.controller import Pipeline
from grpo.orchestration.recipe import RecipeError, load_recipe
from grpo.trainer import GRPOTrainer
from rollout.torch_engine import TorchEngine
from tests.helpers import ROOT
from tests.helpers.cli import run_grpo
from tests.helpers.recipes import TINY_MODEL
from tests.helpers.tiny import tiny_llama, word_tokenizer

ARITH = {"source": "builtin:arithmetic", "n": 32, "options": {"digits": 1, "max_ops": 1}}
SHAPE = {"group_size": 4, "prompts_per_step": 2, "minibatch_size": 8, "micro_batch_size": 8, "max_new_tokens": 10}


def two_stage_recipe(out: Path, phases: list[str]) -> Path:
    rewards = [{"name": "accuracy"}, {"name": "format", "weight": 0.5}]
    recipe = {
        "name": "stages", "output_dir": str(out), "seed": 0, "checkpoint_every": 1, "phases": phases,
        "model": TINY_MODEL, "ray": {"num_cpus": 2},
        "sft": {"data": [{**ARITH, "schema": "sft"}],
                "train": {"lr": 3e-3, "batch_size": 16, "max_length": 64, "progress": False, "log_every": 1}},
        "rl_reason": {"data": ARITH, "steps": 2, "rewards": rewards,
                      "grpo": {**SHAPE, "lr": 1e-3, "beta": 0.04, "weight_decay": 0.0}},
        "rl_pref": {"data": {**ARITH, "seed": 2}, "steps": 3, "rewards": rewards,
                    "grpo": {**SHAPE, "lr": 2e-4, "beta": 0.1, "weight_decay": 0.05, "lr_schedule": "cosine",
                             "temperature": 0.9}},
    }
    path = out / "recipe.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def logged(run: Path, phase: str, key: str) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if r["phase"] == phase]


def check_stage_settings(run: Path) -> None:
    assert logged(run, "rl_reason", "lr") == pytest.approx([1e-3, 1e-3])
    assert logged(run, "rl_reason", "weight_decay") == [0.0, 0.0]
    # cosine over the stage's 3 steps (one optimizer step each): factors 1, 0.75, 0.25 of 2e-4
    cosine = [2e-4 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(3)]
    assert logged(run, "rl_pref", "lr") == pytest.approx(cosine)
    assert logged(run, "rl_pref", "weight_decay") == [0.05] * 3
    assert logged(run, "rl_pref", "beta") == [0.1] * 3 and logged(run, "rl_pref", "temperature") == [0.9] * 3


@pytest.mark.slow
def test_each_stage_trains_with_its_own_settings_in_one_process_and_alone(tmp_path):
    both = two_stage_recipe(tmp_path / "a", ["sft", "rl_reason", "rl_pref"])
    run_grpo("run", str(both))
    check_stage_settings(tmp_path / "a" / "stages")

    alone = two_stage_recipe(tmp_path / "b", ["sft", "rl_reason", "rl_pref"])
    run_grpo("run", str(alone), "phases=[sft, rl_reason]")
    run_grpo("rl", str(alone), "--stage", "pref")
    check_stage_settings(tmp_path / "b" / "stages")


def make_trainer(**overrides):
    cfg = dict(group_size=4, prompts_per_step=2, minibatch_size=8, micro_batch_size=8, lr=1e-2, beta=0.0,
               max_new_tokens=3)
    cfg.update(overrides)
    policy = tiny_llama(0).train()
    engine = TorchEngine(copy.deepcopy(policy), tokenizer=word_tokenizer())
    reward = lambda prompts, completions, **_: [float(len(c) % 3) for c in completions]  # noqa: E731
    return GRPOTrainer(policy, engine, reward, word_tokenizer(), GRPOConfig(**cfg))


def test_carried_optimizer_state_keeps_the_moments_and_applies_the_new_settings():
    rows = [{"prompt": "t3 t4"}, {"prompt": "t5 t6"}]
    first = make_trainer(lr=1e-2, weight_decay=0.0)
    first.step(rows)
    carried = first.optimizer.state_dict()
    second = GRPOTrainer(first.policy, first.engine, first.reward_fn, first.tokenizer,
                         GRPOConfig(group_size=4, prompts_per_step=2, minibatch_size=8, micro_batch_size=8,
                                    lr=3e-4, weight_decay=0.1, beta=0.0, max_new_tokens=3,
                                    carry_optimizer_state=True),
                         optimizer_state=carried)
    for group in second.optimizer.param_groups:
        assert group["lr"] == 3e-4 and group["weight_decay"] == 0.1
    state = second.optimizer.state_dict()["state"]
    assert state.keys() == carried["state"].keys()
    for k in state:
        torch.testing.assert_close(state[k]["exp_avg"], carried["state"][k]["exp_avg"])
    metrics = second.step(rows)
    assert metrics["lr"] == pytest.approx(3e-4) and metrics["weight_decay"] == 0.1


def test_logged_lr_is_the_rate_the_step_used():
    trainer = make_trainer(lr=1e-2, warmup_steps=2)  # linear warmup: 1/2 then 2/2 of the peak
    rows = [{"prompt": "t3 t4"}, {"prompt": "t5 t6"}]
    assert [trainer.step(rows)["lr"] for _ in range(3)] == pytest.approx([5e-3, 1e-2, 1e-2])


def test_cosine_needs_a_horizon_outside_recipes():
    with pytest.raises(ValueError, match="lr_schedule 'cosine' needs total_steps"):
        make_trainer(lr_schedule="cosine")
    make_trainer(lr_schedule="cosine", total_steps=5)


def test_recipe_validation_of_stage_settings():
    recipe = load_recipe(None, ["rl_reason.steps=20"])
    assert recipe.rl_reason.grpo.total_steps == 20  # the horizon follows the stage's length
    assert load_recipe(None, ["rl_reason.steps=20", "rl_reason.grpo.total_steps=50"]).rl_reason.grpo.total_steps == 50
    with pytest.raises(RecipeError, match="group_size must be at least 2, got 1"):
        load_recipe(None, ["rl_reason.grpo.group_size=1", "rl_reason.grpo.minibatch_size=16",
                           "rl_reason.grpo.micro_batch_size=16"])
    with pytest.raises(RecipeError, match=r"model.preset \('tiny'\) and model.path .* both set.*model.preset=null"):
        load_recipe(None, ["model.path=/models/x"])
    assert load_recipe(None, ["model.path=/models/x", "model.preset=null"]).model.path == "/models/x"
    with pytest.raises(RecipeError, match="model.overrides"):
        load_recipe("hf_grpo", ["model.overrides={hidden_size: 8}"])
    with pytest.raises(RecipeError, match="eval_every must be >= 0"):
        load_recipe(None, ["rl_reason.eval_every=-1"])
    with pytest.raises(RecipeError, match="answer mode must be one of"):
        load_recipe(None, ["eval.answer_mode=loose"])


@pytest.mark.slow
def test_a_stage_engine_is_honoured_after_an_earlier_stage_built_workers(tmp_path):
    import ray

    from grpo.orchestration.controller import Pipeline

    path = two_stage_recipe(tmp_path, ["rl_reason", "rl_pref"])
    recipe = load_recipe(str(path), ["rl_pref.engine=tests.helpers.engines:OtherEngine", "rl_pref.steps=1",
                                     "rl_reason.steps=1", "rl_pref.grpo.lr_schedule=constant"])
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        pipeline = Pipeline(recipe)
        pipeline.run()
        described = ray.get([w.description.remote() for w in pipeline.rollouts])
        assert pipeline.rollout_engine == "tests.helpers.engines:OtherEngine"
        assert all(d.startswith("TorchEngine[") for d in described)  # OtherEngine subclasses TorchEngine
        names = ray.get([w.engine_class.remote() for w in pipeline.rollouts])
        assert names == ["OtherEngine"] * len(pipeline.rollouts)
    finally:
        ray.shutdown()


@pytest.mark.parametrize("overrides, cores, want_sync, want_async", [
    ([], 2, (2, 2), (1, 1)),  # the roles take turns; async: trainer and rollout side compute at once
    ([], 16, (16, 16), (8, 8)),
    (["ray.num_train_workers=2", "ray.num_rollout_workers=2"], 16, (8, 16), (4, 4)),  # packed ranks share
    (["ray.num_train_workers=2", "ray.train_placement=spread"], 16, (16, 16), (8, 8)),
    (["ray.threads_per_worker=3"], 16, (3, 3), (3, 3)),  # set: what runs
])
def test_threads_per_role_split_the_cores_when_async_rollouts_overlap_the_roles(overrides, cores, want_sync,
                                                                                want_async):
    pipeline = SimpleNamespace(recipe=load_recipe(None, overrides), threads=cores)
    assert Pipeline.role_threads(pipeline) == want_sync
    assert Pipeline.role_threads(pipeline, overlap=True) == want_async
