"""The pipeline end to end on Ray: a kill mid-phase resumes to the uninterrupted result; recipes validate;
rollout workers spread over a 2-node cluster."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo.orchestration.recipe import RecipeError, bundled_recipes, load_recipe
from tests.helpers import ROOT
from tests.helpers.cli import child_env, grpo_cmd, run_grpo
from tests.helpers.recipes import ARITH, logged, micro_recipe


def rl_metrics(run_dir: Path):
    # how fast, and whether the batch sampled ahead was scored ahead (not after a resume): not what was trained
    skip = ("time", "tokens_per_s", "async/scores_prefetched", "async/reference_prefetched")
    return [{k: v for k, v in r.items() if not k.startswith(skip)} for r in logged(run_dir, "rl_reason")]


def test_recipe_errors_name_the_key():
    with pytest.raises(RecipeError, match=r"recipe key 'rl_reason.grpo.group_size': expected int, got 'x'"):
        load_recipe(None, ["rl_reason.grpo.group_size=x"])
    with pytest.raises(RecipeError, match=r"unknown recipe key\(s\) rl_reason.stepz"):
        load_recipe(None, ["rl_reason.stepz=3"])
    with pytest.raises(RecipeError, match=r"minibatch_size \(48\) must divide prompts_per_step \* group_size"):
        load_recipe(None, ["rl_reason.grpo.minibatch_size=48"])
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("no_such_recipe")
    with pytest.raises(RecipeError, match=r"'rl_pref.grpo.lr': expected float, got 'fast'"):
        load_recipe(None, ["rl_pref.grpo.lr=fast"])


def test_exponent_floats_without_a_dot_are_floats():
    # YAML 1.1 (PyYAML) reads ``1e-4`` as a string; a float-typed key takes it as the number it means
    recipe = load_recipe(None, ["rl_pref.grpo.lr=1e-4", "rl_reason.grpo.lr=3E-5"])
    assert recipe.rl_pref.grpo.lr == 1e-4 and recipe.rl_reason.grpo.lr == 3e-5


def test_every_bundled_recipe_parses():
    names = sorted(bundled_recipes())
    assert {"tiny", "hf_grpo", "deepseek_v2_lite"} <= set(names)
    for name in names:
        load_recipe(name)


KILL_STEPS = 24


ASYNC = ["rl_reason.grpo.async_rollouts=true"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The micro recipe run through once on one trainer rank (sync or async rollouts), on first use."""
    runs = {}

    def run(asynchronous: bool) -> Path:
        if asynchronous not in runs:
            out = tmp_path_factory.mktemp("uninterrupted")
            run_grpo("run", str(micro_recipe(out, KILL_STEPS)), *(ASYNC if asynchronous else []), timeout=600)
            runs[asynchronous] = out / "micro"
        return runs[asynchronous]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("ranks, resumed_ranks, asynchronous", [(1, 1, False), (2, 2, False), (2, 1, False),
                                                                (1, 1, True)])
def test_kill_mid_phase_then_resume_matches_uninterrupted(tmp_path, uninterrupted, ranks, resumed_ranks,
                                                          asynchronous):
    # A micro step takes ~0.1 s, so the phase runs many steps and the kill lands on whatever step is in flight
    # once a step-2 (or later) checkpoint exists. N trainer ranks compute one rank's update, and a checkpoint
    # written by N ranks resumes on any number of them. With async rollouts the batch sampled ahead is part of
    # the checkpoint, so the resumed run trains on the same prompts and completions.
    extra = ASYNC if asynchronous else []
    killed = micro_recipe(tmp_path / "b", KILL_STEPS)
    log = (tmp_path / "killed.log").open("w")  # the killed run's output, shown if it ends before the kill
    proc = subprocess.Popen(grpo_cmd("run", str(killed), f"ray.num_train_workers={ranks}", *extra),
                            env=child_env(), cwd=ROOT, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    state = tmp_path / "b" / "micro" / "state" / "rl_reason"

    def saved_step() -> int:
        text = (state / "latest").read_text().strip() if (state / "latest").exists() else ""
        return int(text.removeprefix("step_")) if text else 0

    deadline = time.time() + 600
    while saved_step() < 2:
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed:\n" + (tmp_path / "killed.log").read_text()[-4000:])
        assert time.time() < deadline, "no step-2 checkpoint appeared"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray and every worker
    proc.wait()
    assert not (tmp_path / "b" / "micro" / "checkpoints" / "rl_reason").exists()
    assert not list(state.glob(".*.tmp"))  # no half-written checkpoint is left where a reader looks
    shards = sorted(p.name for p in (state / (state / "latest").read_text().strip() / "shards").glob("*.distcp"))
    assert len(shards) == ranks, shards  # every rank wrote its own shards

    run_grpo("run", str(killed), "resume=true", f"ray.num_train_workers={resumed_ranks}", *extra, timeout=600)
    full = uninterrupted(asynchronous)
    a, b = rl_metrics(full), rl_metrics(tmp_path / "b" / "micro")
    assert all(r["async/staleness"] == (1.0 if asynchronous and r["step"] > 1 else 0.0) for r in b)
    assert [r["step"] for r in b] == list(range(1, KILL_STEPS + 1))
    for ra, rb in zip(a, b):
        for key, value in ra.items():
            if isinstance(value, float):
                assert rb[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (ra["step"], key)
    wa = load_file(str(full / "checkpoints" / "rl_reason" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "micro" / "checkpoints" / "rl_reason" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_rollout_workers_and_trainer_ranks_spread_over_two_nodes(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from grpo.orchestration.controller import Pipeline

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    try:
        path = micro_recipe(tmp_path, steps=1, ray={"address": cluster.address, "num_rollout_workers": 2,
                                                    "num_train_workers": 2, "train_placement": "spread",
                                                    "weight_transport": "collective"})
        # router replay through Ray's rollout workers and two sharded ranks
        recipe = load_recipe(str(path), ["phases=[rl_reason]", "rl_reason.grpo.router_replay=true"])
        ray.init(address=cluster.address)
        pipeline = Pipeline(recipe)
        pipeline.run()
        nodes = ray.get([w.node_id.remote() for w in pipeline.rollouts])
        assert len(set(nodes)) == 2, nodes
        trainer_nodes = pipeline.policy.node_ids()
        assert len(set(trainer_nodes)) == 2, trainer_nodes  # one trainer rank on each node, trained together
        assert [r["step"] for r in logged(recipe.run_dir, "rl_reason")] == [1]
        shards = (recipe.run_dir / "state" / "rl_reason" / "step_000001" / "shards").glob("*.distcp")
        assert len(list(shards)) == 2  # both ranks hold and saved their shards of the policy
        assert logged(recipe.run_dir, "rl_reason")[0]["sync/checked_tensors"] > 0  # broadcast, then checked
        assert (recipe.run_dir / "checkpoints" / "rl_reason" / "config.json").exists()
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_short_full_pipeline_writes_report_and_loadable_checkpoints(tmp_path):
    from transformers import AutoModelForCausalLM

    pref = {"source": "builtin:safety", "n": 16}
    rm_train = {"learning_rate": 1e-3, "batch_size": 8, "max_length": 64, "progress": False}
    path = micro_recipe(
        tmp_path, steps=2,
        phases=["sft", "rl_reason", "rm", "rl_pref", "eval"],
        rm={"models": {"helpful": {"data": {"source": "builtin:helpfulness", "schema": "preference", "n": 32},
                                   "train": rm_train},
                       "safety": {"data": {**pref, "schema": "preference", "n": 32}, "train": rm_train}}},
        rl_pref={"data": pref, "steps": 2,
                 "rewards": [{"name": "rm:helpful", "weight": 0.5},
                             {"name": "rm:safety", "weight": 0.5, "when": {"category": "harmful"}},
                             {"name": "format", "weight": 0.2}],
                 "grpo": {"group_size": 4, "prompts_per_step": 2, "minibatch_size": 8, "micro_batch_size": 8,
                          "lr": 1e-3, "beta": 0.0, "max_new_tokens": 12, "total_steps": 2}},
        eval={"data": {**ARITH, "split": "test", "n": 8}, "pref_data": {**pref, "split": "test", "n": 4},
              "max_new_tokens": 12},
    )
    run_grpo("run", str(path))
    run = tmp_path / "micro"
    report = json.loads((run / "report.json").read_text())
    assert list(report["phases"]) == ["base", "sft", "rl_reason", "rl_pref"]
    for phase in report["phases"].values():
        assert 0.0 <= phase["accuracy"] <= 1.0
        names = {"preference", "rm:helpful", "rm:safety", "format"}
        assert names | {f"{n} (sampled)" for n in names} <= set(phase["rewards"])
    assert report["alignment_tax"] is not None
    # one row in the held-out accuracy table, one in the rollout-mismatch table
    md = (run / "report.md").read_text()
    assert len([line for line in md.splitlines() if line.startswith("| rl_pref |")]) == 2
    assert list(report["summary"]["wall_seconds"]) == ["sft", "rl_reason", "rm", "rl_pref", "eval"]
    assert max(len(line) for line in md.splitlines() if line.startswith("|")) <= 100
    assert set(report["mismatch"]) == {"rl_reason", "rl_pref"}
    assert report["mismatch"]["rl_reason"]["logp_abs_mean"] < 1e-5  # our float32 engine: the trainer's numbers
    assert (run / "plots" / "reward.png").exists() and (run / "plots" / "mismatch.png").exists()
    phases = {json.loads(line)["phase"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert {"sft", "rl_reason", "rm", "rl_pref", "eval"} <= phases
    for name in ("sft", "rl_reason", "rl_pref"):
        AutoModelForCausalLM.from_pretrained(run / "checkpoints" / name)
    assert not (run / "offload").exists()
