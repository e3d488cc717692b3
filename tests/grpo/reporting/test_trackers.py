"""W&B (offline) and MLflow (local file store) get a run's scalars, its recipe and its report: the real libraries,
read back from what they wrote, no network."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grpo.reporting import MetricsLogger
from grpo.reporting.trackers import (
    IDS_FILE,
    MlflowConfig,
    MlflowTracker,
    WandbConfig,
    WandbTracker,
    build_trackers,
    check_loggers,
)
from tests.helpers.cli import run_grpo
from tests.helpers.recipes import logged, micro_recipe

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def wandb_records(folder: Path) -> list[dict]:
    """Every record of the newest W&B run under ``folder`` (its ``.wandb`` transaction log), read by W&B's own
    reader (``wandb leet inspect --json``)."""
    runs = sorted((folder / "wandb").glob("*run-*"), key=lambda p: p.stat().st_mtime)
    assert runs, f"no W&B run under {folder}"
    out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(runs[-1])],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def wandb_history(records: list[dict], key: str, phase: str) -> list[tuple[int, float]]:
    """``(phase step, value)`` of ``key`` in the logged history rows."""
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    return [(int(row[f"{phase}/step"]), row[key]) for row in rows if key in row]


def mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())


def test_both_trackers_get_the_scalars_the_config_and_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = {"name": "t", "rl_reason": {"steps": 2, "grpo": {"beta": 0.04}}}
    trackers = build_trackers(["wandb", "mlflow"], tmp_path, "t", config, WandbConfig(mode="offline"), MlflowConfig())
    assert [type(t) for t in trackers] == [WandbTracker, MlflowTracker]
    (tmp_path / "report.md").write_text("# report\n")
    with MetricsLogger(tmp_path, tensorboard=False, trackers=trackers) as logger:
        logger.log("sft", 1, {"loss": 2.5})
        logger.log("rl_reason", 1, {"reward/mean": 0.25, "kl": float("nan")})
        logger.log("rl_reason", 2, {"reward/mean": 0.5, "kl": 0.01})
        logger.log("eval", 1, {"eval/sft/accuracy (stage-2 prompts)": 0.75})  # parentheses: not an MLflow name
        logger.artifact([tmp_path / "report.md"])

    records = wandb_records(tmp_path)
    assert wandb_history(records, "rl_reason/reward/mean", "rl_reason") == [(1, 0.25), (2, 0.5)]
    assert wandb_history(records, "rl_reason/kl", "rl_reason") == [(2, 0.01)]  # NaN is not a scalar
    assert wandb_history(records, "sft/loss", "sft") == [(1, 2.5)]
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["config"]["update"]["rl_reason"]["grpo"]["beta"] == 0.04 and run["display_name"] == "t"
    artifact = next(r["artifact"] for r in records if r["type"] == "artifact")
    assert [c["path"] for c in artifact["manifest"]["contents"]] == ["report.md"]

    client, run_id = mlflow_client(tmp_path), json.loads((tmp_path / IDS_FILE).read_text())["mlflow"]
    history = client.get_metric_history(run_id, "rl_reason/reward/mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "sft/loss")] == [(1, 2.5)]
    assert [m.value for m in client.get_metric_history(run_id, "eval/eval/sft/accuracy stage-2 prompts")] == [0.75]
    assert wandb_history(records, "eval/eval/sft/accuracy (stage-2 prompts)", "eval") == [(1, 0.75)]
    mlrun = client.get_run(run_id)
    assert mlrun.data.params["rl_reason.grpo.beta"] == "0.04" and mlrun.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id)] == ["report.md"]


def test_an_unknown_or_missing_logger_is_refused_naming_it(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown logger 'comet'; known: mlflow, tensorboard, wandb"):
        check_loggers(["tensorboard", "comet"])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"'wandb' needs the wandb package: pip install 'grpo-toolkit\[wandb\]'"):
        check_loggers(["wandb"])


@pytest.mark.slow
def test_a_short_run_logs_to_wandb_offline_and_mlflow_and_a_resumed_run_continues_their_runs(tmp_path):
    recipe = micro_recipe(tmp_path, steps=3)
    args = ["run", str(recipe), "loggers=[tensorboard, wandb, mlflow]", "wandb.mode=offline"]
    run_grpo(*args, "phases=[sft]")
    run_dir = tmp_path / "micro"
    ids = json.loads((run_dir / IDS_FILE).read_text())
    run_grpo(*args, "phases=[sft, rl_reason]", "resume=true")  # a second process: the same tracker runs
    assert json.loads((run_dir / IDS_FILE).read_text()) == ids

    rl, sft = logged(run_dir, "rl_reason"), logged(run_dir, "sft")
    records = wandb_records(run_dir)  # the resumed process's part of the W&B run
    assert {r["run"]["run_id"] for r in records if r["type"] == "run"} == {ids["wandb"]}
    assert wandb_history(records, "rl_reason/reward/mean", "rl_reason") == [(r["step"], r["reward/mean"]) for r in rl]
    client = mlflow_client(run_dir)
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "rl_reason/kl")] == \
        [(r["step"], r["kl"]) for r in rl]
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "sft/loss")] == \
        [(r["step"], r["loss"]) for r in sft]
    assert client.get_run(ids["mlflow"]).data.params["rl_reason.steps"] == "3"
