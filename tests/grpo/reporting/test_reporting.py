"""Run logging and reports: crash-safe metrics log, TensorBoard scalars, plots, report numbers."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from grpo.reporting import MetricsLogger, charts, plot_metrics, read_metrics, recipe_settings, trackers, write_report
from model import files
from tests.helpers import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _strip_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def _write_run(run_dir: Path, lines: list[dict]) -> None:
    with MetricsLogger(run_dir, tensorboard=False) as logger:
        for line in lines:
            logger.log(line["phase"], line["step"], {k: v for k, v in line.items() if k not in ("phase", "step")})


# ------------------------------------------------------------------------------------------------ logger
def test_log_appends_one_json_line_per_call(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log("sft", 1, {"loss": 2.5})
        logger.log("sft", 2, {"loss": 2, "lr": torch.tensor(1e-4)})
        logger.log("rl_reason", 0, {"reward/mean": 0.25})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert list(first) == ["phase", "step", "time", "loss"]
    assert isinstance(first["time"], float) and first["time"] > 1e9
    assert _strip_time(read_metrics(tmp_path)) == [
        {"phase": "sft", "step": 1, "loss": 2.5},
        {"phase": "sft", "step": 2, "loss": 2.0, "lr": pytest.approx(1e-4)},
        {"phase": "rl_reason", "step": 0, "reward/mean": 0.25},
    ]
    with MetricsLogger(tmp_path, tensorboard=False) as logger:  # reopening appends
        logger.log("rl_reason", 1, {"reward/mean": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 0, 1]


def test_non_finite_values_are_written_as_null(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log("rl_reason", 1, {"kl": math.nan, "a": math.inf, "b": -math.inf, "c": None, "d": 1.5})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert '"kl": null' in line
    (record,) = read_metrics(tmp_path)
    assert (record["kl"], record["a"], record["b"], record["c"], record["d"]) == (None, None, None, None, 1.5)


@pytest.mark.parametrize("phase, step, metrics, match", [
    ("", 1, {"x": 1.0}, "phase"),
    ("a/b", 1, {"x": 1.0}, "phase"),
    ("sft", -1, {"x": 1.0}, "step"),
    ("sft", True, {"x": 1.0}, "step"),
    ("sft", 1.5, {"x": 1.0}, "step"),
    ("sft", 1, {"step": 1.0}, "reserved"),
    ("sft", 1, {"": 1.0}, "non-empty"),
    ("sft", 1, {"loss": "low"}, r"metrics\['loss'\]"),
    ("sft", 1, [("loss", 1.0)], "metrics"),
])
def test_log_rejects_bad_input_naming_the_field(tmp_path, phase, step, metrics, match):
    with MetricsLogger(tmp_path, tensorboard=False) as logger, pytest.raises((ValueError, TypeError), match=match):
        logger.log(phase, step, metrics)
    assert read_metrics(tmp_path) == []


def test_log_after_close_is_an_error(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.close()
    logger.close()
    with pytest.raises(ValueError, match="closed"):
        logger.log("sft", 1, {"loss": 1.0})


def test_lines_survive_a_killed_writer_and_a_partial_last_line_is_ignored(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from grpo.reporting import MetricsLogger
        logger = MetricsLogger({str(tmp_path)!r}, tensorboard=False)
        for step in range(1, 6):
            logger.log("rl_reason", step, {{"reward/mean": step / 10}})
        # a writer killed in the middle of a line: half a record, no newline, no close()
        logger._file.write('{{"phase": "rl_reason", "step": 6, "rew')
        logger._file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert (tmp_path / "metrics.jsonl").read_text().endswith('"step": 6, "rew')

    with pytest.warns(RuntimeWarning, match="incomplete last line"):
        records = read_metrics(tmp_path)
    assert [(r["step"], r["reward/mean"]) for r in records] == [(s, s / 10) for s in range(1, 6)]

    with pytest.warns(RuntimeWarning, match="incomplete last line"):
        logger = MetricsLogger(tmp_path, tensorboard=False)  # reopening cuts the partial line off
    with logger:
        logger.log("rl_reason", 6, {"reward/mean": 0.6})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_a_corrupt_complete_line_is_an_error_naming_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"phase": "sft", "step": 1, "loss": 1.0}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"phase": "sft", "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: expected .*'step'"):
        read_metrics(tmp_path)


def test_read_metrics_of_an_empty_run_and_a_missing_folder(tmp_path):
    assert read_metrics(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="run_dir"):
        read_metrics(tmp_path / "nope")


def test_truncate_after_makes_a_resumed_run_equal_an_uninterrupted_one(tmp_path):
    sft = [{"phase": "sft", "step": s, "loss": 3.0 - s} for s in (1, 2, 3)]
    rl = [{"phase": "rl_reason", "step": s, "reward/mean": s / 10} for s in range(1, 6)]
    _write_run(tmp_path / "a", sft + rl)

    crashed = [{"phase": "rl_reason", "step": s, "reward/mean": -1.0} for s in (4, 5)]
    _write_run(tmp_path / "b", sft + rl[:3] + crashed)
    with MetricsLogger(tmp_path / "b", tensorboard=False) as logger:
        assert logger.truncate_after("rl_reason", 3) == 2
        assert logger.truncate_after("sft", 3) == 0
        for line in rl[3:]:
            logger.log("rl_reason", line["step"], {"reward/mean": line["reward/mean"]})
    assert _strip_time(read_metrics(tmp_path / "b")) == _strip_time(read_metrics(tmp_path / "a")) == sft + rl


def test_truncate_after_keeps_other_phases_and_leaves_no_temp_files(tmp_path):
    lines = [{"phase": p, "step": s, "x": float(s)} for p in ("sft", "rl_reason", "rl_pref") for s in range(4)]
    _write_run(tmp_path, lines)
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        assert logger.truncate_after("rl_reason", 0) == 3
    got = [(r["phase"], r["step"]) for r in read_metrics(tmp_path)]
    assert got == [(p, s) for p in ("sft", "rl_reason", "rl_pref") for s in range(4) if p != "rl_reason" or s == 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# ------------------------------------------------------------------------------------------------ tensorboard
def _scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(tb_dir))
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_scalars_are_written_and_purged_on_resume(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        assert logger.tensorboard
        logger.log("sft", 1, {"loss": 2.0})
        for step in range(1, 6):
            logger.log("rl_reason", step, {"reward/mean": step / 4, "kl": math.nan if step == 2 else 0.5})
    tb = tmp_path / "tensorboard"
    assert list((tb / "rl_reason").glob("events.out.tfevents.*"))
    assert _scalars(tb / "sft", "sft/loss") == [(1, 2.0)]
    assert _scalars(tb / "rl_reason", "rl_reason/reward/mean") == [(s, s / 4) for s in range(1, 6)]
    assert _scalars(tb / "rl_reason", "rl_reason/kl") == [(1, 0.5), (3, 0.5), (4, 0.5), (5, 0.5)]

    with MetricsLogger(tmp_path) as logger:
        logger.truncate_after("rl_reason", 3)
        logger.log("rl_reason", 4, {"reward/mean": 2.0})
    assert _scalars(tb / "rl_reason", "rl_reason/reward/mean") == [(1, 0.25), (2, 0.5), (3, 0.75), (4, 2.0)]
    assert _scalars(tb / "sft", "sft/loss") == [(1, 2.0)]


@pytest.fixture
def no_tensorboard(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    trackers.summary_writer_class.cache_clear()
    yield
    trackers.summary_writer_class.cache_clear()


def test_missing_tensorboard_warns_once_and_keeps_the_json_log(tmp_path, caplog, no_tensorboard):
    with caplog.at_level(logging.WARNING, logger="grpo.reporting"):
        for run in ("a", "b"):
            with MetricsLogger(tmp_path / run) as logger:
                assert not logger.tensorboard
                logger.log("sft", 1, {"loss": 1.0})
    assert sum("TensorBoard logging disabled" in r.getMessage() for r in caplog.records) == 1
    assert [r["loss"] for r in read_metrics(tmp_path / "a")] == [1.0]
    assert not (tmp_path / "a" / "tensorboard").exists()


# ------------------------------------------------------------------------------------------------ plots
def _three_phase_lines() -> list[dict]:
    lines = [{"phase": "sft", "step": s, "loss": 3.0 / s} for s in range(1, 6)]
    lines += [{"phase": "rl_reason", "step": s, "reward/mean": 0.1 * s, "reward/std": 0.2, "reward/accuracy": 0.1 * s,
               "reward/format": 0.9, "kl": 0.01 * s, "completion/length_mean": 20.0 + s, "time/generate": 0.5,
               "time/update": 0.3 + 0.01 * s} for s in range(0, 6)]
    lines += [{"phase": "rl_pref", "step": s, "reward/mean": 0.5 + 0.05 * s, "reward/helpful": 0.3 + 0.1 * s,
               "kl": None if s == 2 else 0.02 * s, "completion/length_mean": 30.0 - s} for s in range(1, 5)]
    lines += [{"phase": "eval", "step": 0, "accuracy": 0.7}]
    return lines


def test_plot_metrics_writes_valid_pngs_for_three_phases(tmp_path):
    from PIL import Image

    _write_run(tmp_path, _three_phase_lines())
    paths = plot_metrics(tmp_path)
    assert [p.name for p in paths] == ["reward.png", "accuracy.png", "kl.png", "completion_length.png",
                                       "step_time.png", "sft_loss.png"]
    for path in paths:
        assert path.parent == tmp_path / "plots"
        assert path.read_bytes()[:8] == PNG_MAGIC
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] == 800 and img.size[1] >= 300
    with Image.open(tmp_path / "plots" / "reward.png") as img:  # mean + accuracy, format, helpful panels
        assert img.size[1] == 100 + 4 * 240
    with Image.open(tmp_path / "plots" / "step_time.png") as img:  # the parts stacked in one panel
        assert img.size[1] == 100 + 240


def test_plot_metrics_skips_plots_whose_keys_are_absent(tmp_path):
    _write_run(tmp_path / "sft_only", [{"phase": "sft", "step": s, "loss": 1.0} for s in (1, 2)])
    assert [p.name for p in plot_metrics(tmp_path / "sft_only")] == ["sft_loss.png"]

    lines = [{"phase": "rl_reason", "step": s, "kl": None, "accuracy": 0.5} for s in (1, 2)]
    _write_run(tmp_path / "null_kl", lines)
    out = tmp_path / "elsewhere"
    assert plot_metrics(tmp_path / "null_kl", out) == [out / "accuracy.png"]

    (tmp_path / "empty").mkdir()
    assert plot_metrics(tmp_path / "empty") == []
    assert not (tmp_path / "empty" / "plots").exists()


def test_rl_phases_are_laid_end_to_end_on_a_global_step_axis():
    records = [{"phase": p, "step": s} for p, steps in
               [("sft", range(1, 50)), ("rl_reason", range(0, 5)), ("rm", [1]), ("rl_pref", range(1, 4)),
                ("eval", [0])] for s in steps]
    axis = charts._rl_axis(records)
    assert axis.phases == ("rl_reason", "rl_pref")
    # rl_reason steps 0..4 -> x 1..5; rl_pref steps 1..3 -> x 6..8; boundary between them at 5.5
    assert [axis.x("rl_reason", s) for s in range(0, 5)] == [1, 2, 3, 4, 5]
    assert [axis.x("rl_pref", s) for s in range(1, 4)] == [6, 7, 8]
    assert axis.boundaries == (5.5,)


def test_series_keeps_the_last_value_of_a_repeated_step_and_nan_for_null():
    records = [{"phase": "rl", "step": 2, "kl": 0.5}, {"phase": "rl", "step": 1, "kl": None},
               {"phase": "rl", "step": 2, "kl": 0.7}, {"phase": "other", "step": 3, "kl": 9.0},
               {"phase": "rl", "step": 3, "loss": 1.0}]
    steps, values = charts._series(records, "rl", "kl")
    assert steps == [1, 2]
    assert math.isnan(values[0]) and values[1] == 0.7


# ------------------------------------------------------------------------------------------------ report
EVALS = {
    "base": {"accuracy": 0.10, "rewards": {"accuracy": 0.10, "format": 0.20}, "n": 200},
    "sft": {"accuracy": 0.40, "rewards": {"accuracy": 0.40, "format": 0.90, "rm:helpful": 0.10}, "n": 200,
            "format_rate": 0.9, "length_mean": 31.5},
    "rl_reason": {"accuracy": 0.55, "rewards": {"accuracy": 0.55, "format": 0.95, "rm:helpful": 0.15}, "n": 200,
                  "pass@4": 0.8},
    "rl_pref": {"accuracy": 0.52, "rewards": {"accuracy": 0.52, "format": 0.97, "rm:helpful": 0.45}, "n": 200},
}
RECIPE = {
    "name": "tiny", "seed": 0, "phases": ["sft", "rl_reason", "rm", "rl_pref", "eval"],
    "model": {"preset": "tiny", "path": None, "dtype": "float32"},
    "sft": {"train": {"lr": 1e-3, "epochs": 2, "batch_size": 8}},
    "rl_reason": {"steps": 10, "rewards": [{"name": "accuracy", "weight": 1.0, "key": None}],
                  "grpo": {"group_size": 8, "lr": 1e-6, "beta": 0.04, "kl": "k3"}},
    "rl_pref": {"steps": 5, "rewards": [{"name": "rm:helpful", "weight": 0.5, "key": None},
                                       {"name": "format", "weight": 0.25, "key": None}],
                "grpo": {"group_size": 8, "beta": 0.01}},
}


def _no_nan_json(path: Path) -> dict:
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_report_numbers_match_hand_computed_values(tmp_path):
    _write_run(tmp_path, _three_phase_lines())
    md_path, json_path = write_report(tmp_path, EVALS, recipe=RECIPE, notes=["tiny run, numbers are noisy"])
    assert (md_path, json_path) == (tmp_path / "report.md", tmp_path / "report.json")
    data = _no_nan_json(json_path)

    assert list(data["phases"]) == ["base", "sft", "rl_reason", "rl_pref"]
    assert data["phases"]["sft"] == {"accuracy": 0.40, "rewards": EVALS["sft"]["rewards"], "format_rate": 0.9,
                                     "length_mean": 31.5, "n": 200}
    assert data["phases"]["rl_reason"]["pass@4"] == 0.8
    s1 = data["deltas"]["stage1_accuracy_gain_points"]
    assert (s1["from"], s1["to"]) == ("sft", "rl_reason")
    assert s1["value"] == 15.0  # 100 * (0.55 - 0.40), float noise rounded off
    s2 = data["deltas"]["stage2_reward_change"]
    assert (s2["from"], s2["to"]) == ("rl_reason", "rl_pref")
    assert s2["values"] == pytest.approx({"accuracy": -0.03, "format": 0.02, "rm:helpful": 0.30})
    assert s2["preference"] == ["rm:helpful", "format"]  # the rewards rl_pref trained on, in recipe order
    assert data["alignment_tax"] == 3.0  # 100 * (0.55 - 0.52)
    assert data["plots"] == ["plots/reward.png", "plots/accuracy.png", "plots/kl.png",
                             "plots/completion_length.png", "plots/step_time.png", "plots/sft_loss.png"]
    assert data["summary"] == {
        "stage1": {"from": "sft", "to": "rl_reason", "accuracy_from": 0.40, "accuracy_to": 0.55, "gain_points": 15.0},
        "stage2": {"from": "rl_reason", "to": "rl_pref", "change": pytest.approx({"rm:helpful": 0.3, "format": 0.02})},
        "alignment_tax_points": 3.0}
    assert data["settings"]["rl_reason.grpo.beta"] == 0.04
    assert data["settings"]["rl_pref.rewards"] == "rm:helpful x 0.5 + format x 0.25"
    assert data["settings"]["phases"] == "sft, rl_reason, rm, rl_pref, eval"
    assert "model.path" not in data["settings"]  # None: not set
    assert data["notes"] == ["tiny run, numbers are noisy"]

    md = md_path.read_text()
    assert md.startswith(f"# Run report: {tmp_path.name}\n\n## Summary\n")
    assert "| phase | accuracy | format rate | length | n | pass@4 |" in md
    assert "| sft | 40.0% | 90.0% | 31.5 | 200 | n/a |" in md
    assert "| base | 10.0% | n/a | n/a | 200 | n/a |" in md
    # rewards: a row per reward, a column per phase; ``accuracy`` equals the held-out accuracy: not repeated
    assert "| reward | base | sft | rl_reason | rl_pref |" in md and "\n| accuracy |" not in md
    assert "| format | 0.200 | 0.900 | 0.950 | 0.970 |" in md and "| rm:helpful | n/a | 0.100 | 0.150 | 0.450 |" in md
    assert "**Stage 1** (sft -> rl_reason): held-out accuracy 40.0% -> 55.0%, +15.0 points" in md
    assert "**Stage 2** (rl_reason -> rl_pref): preference reward change rm:helpful +0.300, format +0.020" in md
    assert "**Alignment tax**: +3.0 points" in md
    assert "![reward](plots/reward.png)" in md and "![sft_loss](plots/sft_loss.png)" in md
    assert "| rl_reason.grpo.group_size | 8 |" in md and "| sft.train.epochs | 2 |" in md
    assert "- tiny run, numbers are noisy" in md
    for link in data["plots"]:
        assert (tmp_path / link).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "plots", "report.json", "report.md"]


def test_the_summary_leads_with_the_numbers_of_report_json_and_every_table_fits_100_columns(tmp_path):
    # the tiny pipeline's shape: stage-2 components over greedy and sampled completions, a long recipe value
    names = ("preference", "rm:helpful", "rm:safety", "accuracy (stage-2 prompts)", "format")
    evals = {phase: {"accuracy": acc, "n": 200, "format_rate": 1.0, "length_mean": 20.0 + i,
                     "rewards": {"accuracy": acc, **{n: -1.2345 + i + j / 10 for j, n in enumerate(names)},
                                 **{f"{n.removesuffix(' (stage-2 prompts)')} (sampled)": -2.5 + i
                                    for n in names}}}
             for i, (phase, acc) in enumerate([("base", 0.0), ("sft", 0.415), ("rl_reason", 0.705),
                                               ("rl_pref", 0.70)])}
    recipe = {**RECIPE, "rl_pref": {**RECIPE["rl_pref"], "rewards": [
        {"name": n, "weight": 0.25, "key": None, "when": {"category": ["harmful", "other"]}}
        for n in ("rm:helpful", "rm:safety", "accuracy", "format", "tests.helpers.some_module:reward")]}}
    wall = {"sft": 75.2, "rl_reason": 250.0, "rm": 21.0, "rl_pref": 60.4, "eval": 58.0}
    md_path, json_path = write_report(tmp_path, evals, recipe=recipe, wall_seconds=wall)
    data, md = _no_nan_json(json_path), md_path.read_text()
    summary = data["summary"]
    assert summary["stage1"]["gain_points"] == data["deltas"]["stage1_accuracy_gain_points"]["value"] == 29.0
    changes = data["deltas"]["stage2_reward_change"]["values"]
    assert summary["stage2"]["change"] == {"greedy": changes["preference"], "sampled": changes["preference (sampled)"]}
    assert summary["alignment_tax_points"] == data["alignment_tax"] == 0.5
    assert summary["wall_seconds"] == wall
    head = md.split("## Held-out")[0]
    assert head.startswith(f"# Run report: {tmp_path.name}\n\n## Summary\n")
    assert (f"held-out accuracy 41.5% -> 70.5%, {summary['stage1']['gain_points']:+.1f} points" in head
            and f"greedy {changes['preference']:+.3f}, sampled {changes['preference (sampled)']:+.3f}" in head
            and f"**Alignment tax**: {data['alignment_tax']:+.1f} points" in head)
    assert "**Wall time**: 7.7 min (sft 1.3 min, rl_reason 4.2 min, rm 21 s, rl_pref 1.0 min, eval 58 s)" in head
    assert "| preference | -1.23 / -2.50 | -0.23 / -1.50 | 0.77 / -0.50 | 1.77 / 0.50 |" in md
    assert "| accuracy (stage-2 prompts) | -0.93 / -2.50 |" in md  # paired with ``accuracy (sampled)``
    tables = [line for line in md.splitlines() if line.startswith("|")]
    assert len(tables) > 30 and max(map(len, tables)) <= 100, max(tables, key=len)
    assert "| rl_pref.rewards | rm:helpful x 0.25 + rm:safety x 0.25 + " in md and "... |" in md  # cut to fit


def test_stage2_preference_lists_sampled_rewards_and_the_stage2_prompt_accuracy(tmp_path):
    # ``accuracy`` is both the held-out metric and a stage-2 component: the component, measured on the stage-2
    # prompts, is the one that belongs to the preference reward
    recipe = {"rl_pref": {"rewards": [{"name": "rm:safety", "weight": 0.5}, {"name": "accuracy", "weight": 1.0}]}}
    names = ("preference", "rm:safety", "accuracy (stage-2 prompts)", "preference (sampled)", "accuracy (sampled)")
    evals = {"rl_reason": {"accuracy": 0.50, "rewards": {"accuracy": 0.50, **dict.fromkeys(names, 0.0)}},
             "rl_pref": {"accuracy": 0.45, "rewards": {"accuracy": 0.45, **dict.fromkeys(names, 0.5)}}}
    _, json_path = write_report(tmp_path, evals, recipe=recipe)
    s2 = _no_nan_json(json_path)["deltas"]["stage2_reward_change"]
    assert s2["preference"] == ["preference", "rm:safety", "accuracy (stage-2 prompts)", "preference (sampled)",
                                "accuracy (sampled)"]
    assert s2["values"]["accuracy"] == pytest.approx(-0.05)  # still reported, but not as a preference reward


def test_negative_alignment_tax_and_fallback_baselines(tmp_path):
    evals = {"base": {"accuracy": 0.2, "rewards": {"helpful": 0.1}},
             "rl_reason": {"accuracy": 0.5, "rewards": {"helpful": 0.0}},
             "rl_pref": {"accuracy": 0.55, "rewards": {"helpful": 0.25, "safety": 0.9}}}
    md_path, json_path = write_report(tmp_path, evals)
    data = _no_nan_json(json_path)
    assert data["alignment_tax"] == pytest.approx(-5.0)  # stage 2 gained 5 points: a negative tax
    s1 = data["deltas"]["stage1_accuracy_gain_points"]
    assert s1["from"] == "base" and s1["value"] == pytest.approx(30.0)  # no SFT eval: the phase before rl_reason
    s2 = data["deltas"]["stage2_reward_change"]
    assert s2["values"] == pytest.approx({"helpful": 0.25}) and s2["preference"] == ["helpful"]
    md = md_path.read_text()
    assert "**Alignment tax**: -5.0 points" in md
    assert "Training curves" not in md and "Recipe" not in md and data["plots"] == []


def test_missing_numbers_become_null_and_na(tmp_path):
    evals = {"sft": {"accuracy": None, "rewards": {"helpful": None}},
             "rl_reason": {"accuracy": 0.5, "rewards": {"helpful": math.nan}},
             "rl_pref": {"accuracy": math.nan, "rewards": {"helpful": 0.4}, "length_mean": None}}
    md_path, json_path = write_report(tmp_path, evals)
    data = _no_nan_json(json_path)
    assert data["phases"]["rl_pref"] == {"accuracy": None, "rewards": {"helpful": 0.4}}
    assert data["phases"]["rl_reason"]["rewards"] == {"helpful": None}
    assert data["deltas"]["stage1_accuracy_gain_points"]["value"] is None
    assert data["deltas"]["stage2_reward_change"]["values"] == {"helpful": None}
    assert data["alignment_tax"] is None
    md = md_path.read_text()
    assert "| sft | n/a |" in md and "| helpful | n/a | n/a | 0.400 |" in md
    assert "**Stage 1** (sft -> rl_reason): held-out accuracy n/a -> 50.0%, n/a" in md
    assert "**Alignment tax**: n/a" in md


def test_report_without_rl_phases_has_no_deltas(tmp_path):
    md_path, json_path = write_report(tmp_path, {"sft": {"accuracy": 0.3, "rewards": {}}})
    data = _no_nan_json(json_path)
    assert data["deltas"] == {"stage1_accuracy_gain_points": None, "stage2_reward_change": None}
    assert data["alignment_tax"] is None
    assert "## Summary" not in md_path.read_text() and data["summary"] == {}


@pytest.mark.parametrize("evals, error, match", [
    ({"sft": {"accuracy": 1.5, "rewards": {}}}, ValueError,
     r"evals\['sft'\]\['accuracy'\]: expected a finite number >= 0.0 and <= 1.0, got 1.5"),
    ({"sft": {"accuracy": 40, "rewards": {}}}, ValueError, r"evals\['sft'\]\['accuracy'\]"),
    ({"sft": {"rewards": {}}}, ValueError, r"evals\['sft'\]: missing \['accuracy'\]"),
    ({"sft": {"accuracy": 0.4}}, ValueError, r"evals\['sft'\]: missing \['rewards'\]"),
    ({"sft": {"accuracy": 0.4, "rewards": [0.1]}}, TypeError, r"evals\['sft'\]\['rewards'\]"),
    ({"sft": {"accuracy": 0.4, "rewards": {"helpful": "high"}}}, TypeError, r"\['rewards'\]\['helpful'\]"),
    ({"sft": {"accuracy": 0.4, "rewards": {}, "n": -1}}, ValueError, r"evals\['sft'\]\['n'\]"),
    ({"sft": {"accuracy": 0.4, "rewards": {}, "format_rate": 2.0}}, ValueError, r"\['format_rate'\]"),
    ({"sft": {"accuracy": 0.4, "rewards": {"kl": math.inf}}}, ValueError,
     r"\['rewards'\]\['kl'\]: expected a finite number, got inf"),
    ({"sft": {"accuracy": 0.4, "rewards": {}, "length_mean": -1}}, ValueError, r"\['length_mean'\]: .* >= 0.0, got"),
    ({"sft": 0.4}, TypeError, r"evals\['sft'\]: expected a mapping"),
])
def test_write_report_rejects_bad_evals(tmp_path, evals, error, match):
    with pytest.raises(error, match=match):
        write_report(tmp_path, evals)
    assert not (tmp_path / "report.json").exists()


def test_write_report_rejects_bad_notes_and_recipe(tmp_path):
    with pytest.raises(TypeError, match="notes"):
        write_report(tmp_path, {}, notes="one string")
    with pytest.raises(TypeError, match="recipe"):
        write_report(tmp_path, {}, recipe=["not", "a", "mapping"])


def test_a_failed_write_leaves_the_old_report_intact(tmp_path, monkeypatch):
    write_report(tmp_path, {"sft": {"accuracy": 0.3, "rewards": {}}})
    before = (tmp_path / "report.json").read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, {"sft": {"accuracy": 0.9, "rewards": {}}})
    assert (tmp_path / "report.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]


def test_recipe_settings_leave_out_phases_not_run_and_accept_a_dataclass():
    @dataclasses.dataclass
    class Grpo:
        beta: float = 0.04
        group_size: int = 4

    @dataclasses.dataclass
    class Stage:
        steps: int = 3
        grpo: Grpo = dataclasses.field(default_factory=Grpo)

    @dataclasses.dataclass
    class Recipe:
        name: str = "r"
        phases: list = dataclasses.field(default_factory=lambda: ["rl_reason"])
        rl_reason: Stage = dataclasses.field(default_factory=Stage)
        rl_pref: Stage = dataclasses.field(default_factory=Stage)

    assert recipe_settings(Recipe()) == {"name": "r", "phases": "rl_reason", "rl_reason.steps": 3,
                                                "rl_reason.grpo.group_size": 4, "rl_reason.grpo.beta": 0.04}


def test_recipe_table_shows_the_settings_the_run_logged():
    from grpo.reporting import ran_settings

    records = [{"phase": "rl_reason", "step": s, "lr": 1e-3, "beta": 0.04, "temperature": 1.0, "weight_decay": 0.0}
               for s in (1, 2)]
    records += [{"phase": "rl_pref", "step": s, "lr": lr, "beta": 0.1, "temperature": 0.7, "weight_decay": 0.05}
                for s, lr in ((1, 2e-4), (2, 1.5e-4), (3, 5e-5))]
    records += [{"phase": "sft", "step": 10, "lr": 3e-3}, {"phase": "eval", "step": 1, "eval/x": 1.0}]
    got = ran_settings(records)
    assert got["rl_reason.grpo.lr"] == "0.001" and got["rl_reason.grpo.beta"] == "0.04"
    assert got["rl_pref.grpo.lr"] == "0.0002 .. 0.0002 -> 5e-05 (first, peak, last of 3 steps)"
    assert got["rl_pref.grpo.temperature"] == "0.7" and got["rl_pref.grpo.weight_decay"] == "0.05"
    assert got["sft.train.lr"] == "0.003"


def test_the_report_shows_the_rollout_mismatch_per_phase(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step, (gap, top, kl, frac, routes) in enumerate([(0.01, 0.2, 1e-4, 0.0, 0.1), (0.03, 0.5, 3e-4, 0.1, 0.3)],
                                                            start=1):
            logger.log("rl_reason", step, {"mismatch/logp_abs_mean": gap, "mismatch/logp_abs_max": top,
                                           "mismatch/kl": kl, "mismatch/corrected_frac": frac,
                                           "mismatch/routing_disagreement": routes, "loss": 0.1})
        logger.log("rl_pref", 1, {"loss": 0.2})  # a phase without engine log-probs: no row
    md_path, json_path = write_report(tmp_path, {"sft": {"accuracy": 0.3, "rewards": {}}})
    mismatch = json.loads(json_path.read_text())["mismatch"]
    assert list(mismatch) == ["rl_reason"]
    assert mismatch["rl_reason"] == pytest.approx({"logp_abs_mean": 0.02, "logp_abs_max": 0.5, "kl": 2e-4,
                                                   "corrected_frac": 0.05, "routing_disagreement": 0.2, "steps": 2})
    md = md_path.read_text()
    assert "## Rollout-training mismatch" in md
    assert "| rl_reason | 2 | 0.02 | 0.5 | 0.0002 | 5.00% | 20.00% |" in md
    assert (tmp_path / "plots" / "mismatch.png").exists()


def test_the_mismatch_table_says_n_a_for_a_policy_without_routing(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log("rl_pref", 1, {"mismatch/logp_abs_mean": 0.01, "mismatch/logp_abs_max": 0.1, "mismatch/kl": 1e-4,
                                  "mismatch/corrected_frac": 0.0})  # a dense policy: no routing to compare
    md_path, json_path = write_report(tmp_path, {"sft": {"accuracy": 0.3, "rewards": {}}})
    assert "routing_disagreement" not in json.loads(json_path.read_text())["mismatch"]["rl_pref"]
    assert "| rl_pref | 1 | 0.01 | 0.1 | 0.0001 | 0.00% | n/a |" in md_path.read_text()
