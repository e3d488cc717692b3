"""The end-of-run report: ``report.md`` and ``report.json`` with held-out accuracy and rewards after each phase,
the deltas that matter (stage-1 gain, stage-2 preference change, alignment tax), the training curves and the
recipe's settings as they ran. Both files are written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo.phases import POLICY_PHASES, RL_PHASES, RL_PREF, RL_REASON, SFT
from grpo.reporting.charts import plot_metrics
from grpo.reporting.markdown import run_report
from grpo.reporting.metrics_log import METRICS_FILE, read_metrics
from model.files import atomic_write_text


def _optional_number(where: str, value: Any, low: float | None = None, high: float | None = None
                     ) -> float | None:
    """``value`` as a float; None / NaN mean "not measured"; out of ``[low, high]`` is an error."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: expected a number or None, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        return None
    if (low is not None and value < low) or (high is not None and value > high) or math.isinf(value):
        bounds = [f" >= {low}"] * (low is not None) + [f" <= {high}"] * (high is not None)
        raise ValueError(f"{where}: expected a finite number{' and'.join(bounds)}, got {value}")
    return value


@dataclass(frozen=True)
class PhaseEval:
    """The held-out evaluation after one phase (None: not measured).

    Attributes:
        accuracy: Share of correct answers, in [0, 1].
        rewards: Reward name -> mean over the held-out set.
        format_rate: Share of well-formatted completions, in [0, 1].
        length_mean: Mean completion length in tokens.
        n: Number of held-out prompts.
        extra: Other numbers the evaluation reported (``pass@k``, ``maj@k``, ...).
    """

    accuracy: float | None
    rewards: dict[str, float | None]
    format_rate: float | None = None
    length_mean: float | None = None
    n: int | None = None
    extra: dict[str, float | None] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_mapping(cls, phase: str, data: Any) -> PhaseEval:
        """Validates ``evals[phase]``; errors name the field, e.g. ``evals['sft']['accuracy']``."""
        where = f"evals[{phase!r}]"
        if not isinstance(data, Mapping):
            raise TypeError(f"{where}: expected a mapping with 'accuracy' and 'rewards', got {type(data).__name__}")
        missing = [k for k in ("accuracy", "rewards") if k not in data]
        if missing:
            raise ValueError(f"{where}: missing {missing} (expected 'accuracy' in [0, 1] and 'rewards': "
                             f"{{name: mean}})")
        if not isinstance(data["rewards"], Mapping):
            raise TypeError(f"{where}['rewards']: expected a mapping name -> mean, got {data['rewards']!r}")
        n = data.get("n")
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0):
            raise ValueError(f"{where}['n']: expected an integer >= 0, got {n!r}")
        known = {"accuracy", "rewards", "format_rate", "length_mean", "n"}
        return cls(
            accuracy=_optional_number(f"{where}['accuracy']", data["accuracy"], 0.0, 1.0),
            rewards={str(k): _optional_number(f"{where}['rewards'][{k!r}]", v) for k, v in data["rewards"].items()},
            format_rate=_optional_number(f"{where}['format_rate']", data.get("format_rate"), 0.0, 1.0),
            length_mean=_optional_number(f"{where}['length_mean']", data.get("length_mean"), 0.0),
            n=None if n is None else int(n),
            extra={str(k): _optional_number(f"{where}[{k!r}]", v) for k, v in data.items()
                   if k not in known and (v is None or isinstance(v, numbers.Real))},
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"accuracy": self.accuracy, "rewards": dict(self.rewards)}
        optional = {"format_rate": self.format_rate, "length_mean": self.length_mean, "n": self.n}
        out.update({k: v for k, v in optional.items() if v is not None})
        out.update(self.extra)
        return out


def _diff(a: float | None, b: float | None, scale: float = 1.0) -> float | None:
    """``scale * (b - a)`` rounded to 9 decimals (drops float noise like ``15.000000000000002``), or None when
    either is missing."""
    return None if a is None or b is None else round(scale * (b - a), 9)


def _baseline(phases: Sequence[str], target: str, preferred: str) -> str | None:
    """``preferred`` when it was evaluated before ``target``, else the phase evaluated just before it."""
    if target not in phases:
        return None
    before = phases[:phases.index(target)]
    return preferred if preferred in before else (before[-1] if before else None)


PREFERENCE_TOTAL = "preference"  # the weighted stage-2 reward itself, when an evaluation reports it
ON_STAGE2_PROMPTS = " (stage-2 prompts)"  # a stage-2 component sharing a held-out metric's name (``accuracy``)
SAMPLED = " (sampled)"  # a preference reward averaged over sampled completions


def _preference_names(recipe: Mapping[str, Any] | None) -> list[str]:
    """The preference total and components, over greedy then sampled completions (``NAME (sampled)``)."""
    specs = ((recipe or {}).get(RL_PREF) or {}).get("rewards") or []
    names = [s.get("key") or s.get("name") for s in specs if isinstance(s, Mapping)]
    names = [PREFERENCE_TOTAL, *names] if names else names
    return [*names, *(n + SAMPLED for n in names)]


def compute_deltas(evals: Mapping[str, PhaseEval], recipe: Mapping[str, Any] | None = None
                   ) -> tuple[dict[str, Any], float | None]:
    """The deltas that matter and the alignment tax.

    * ``stage1_accuracy_gain_points``: ``100 * (acc[rl_reason] - acc[sft])`` (the phase evaluated before
      ``rl_reason`` stands in for ``sft`` when SFT was not evaluated).
    * ``stage2_reward_change``: ``rewards[rl_pref] - rewards[baseline]`` for each reward both report, baseline
      ``rl_reason`` (or the phase before ``rl_pref``); ``preference`` lists the rewards ``rl_pref`` trained on
      (from the recipe; all shared rewards without one).
    * alignment tax: ``100 * (acc[rl_reason] - acc[rl_pref])``, accuracy points lost in stage 2 (negative: a gain).

    Returns:
        ``(deltas, alignment_tax)``; a delta whose phases were not evaluated is None, a value that cannot be
        computed (a missing number) is None inside it.
    """
    phases = list(evals)
    deltas: dict[str, Any] = {"stage1_accuracy_gain_points": None, "stage2_reward_change": None}
    base1 = _baseline(phases, RL_REASON, SFT)
    if base1 is not None:
        deltas["stage1_accuracy_gain_points"] = {
            "from": base1, "to": RL_REASON,
            "value": _diff(evals[base1].accuracy, evals[RL_REASON].accuracy, 100.0)}
    base2 = _baseline(phases, RL_PREF, RL_REASON)
    if base2 is not None:
        before, after = evals[base2].rewards, evals[RL_PREF].rewards
        shared = [k for k in after if k in before]
        # a component named like a held-out metric is evaluated on the stage-2 prompts under its own name
        names = [k + ON_STAGE2_PROMPTS if k + ON_STAGE2_PROMPTS in shared else k for k in _preference_names(recipe)]
        wanted = [k for k in names if k in shared]
        deltas["stage2_reward_change"] = {
            "from": base2, "to": RL_PREF, "values": {k: _diff(before[k], after[k]) for k in shared},
            "preference": wanted or shared}
    tax = None
    if RL_REASON in evals and RL_PREF in evals:
        tax = _diff(evals[RL_PREF].accuracy, evals[RL_REASON].accuracy, 100.0)
    return deltas, tax


RECIPE_SETTINGS = (
    "name", "seed", "phases", "model.preset", "model.path", "model.dtype",
    "sft.train.lr", "sft.train.epochs", "sft.train.batch_size",
    *(f"{p}.{k}" for p in RL_PHASES for k in (
        "steps", "rewards", "reward_mode", "grpo.group_size", "grpo.prompts_per_step", "grpo.lr", "grpo.lr_schedule",
        "grpo.beta", "grpo.weight_decay", "grpo.kl", "grpo.clip_low", "grpo.clip_high", "grpo.loss_agg",
        "grpo.advantage", "grpo.temperature", "grpo.max_new_tokens")),
)


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def recipe_settings(recipe: Any) -> dict[str, Any]:
    """The :data:`RECIPE_SETTINGS` present in ``recipe`` (a mapping or a recipe dataclass), in that order.

    Sections of phases the recipe does not run are left out; reward lists read ``name x weight`` and other lists
    are joined with commas.
    """
    if dataclasses.is_dataclass(recipe) and not isinstance(recipe, type):
        recipe = dataclasses.asdict(recipe)
    if not isinstance(recipe, Mapping):
        raise TypeError(f"recipe: expected a mapping (or a recipe dataclass), got {type(recipe).__name__}")
    phases = recipe.get("phases")
    out = {}
    for key in RECIPE_SETTINGS:
        section = key.split(".")[0]
        if isinstance(phases, (list, tuple)) and section in POLICY_PHASES and section not in phases:
            continue
        value = _lookup(recipe, key)
        if value is None:
            continue
        if key.endswith(".rewards") and isinstance(value, list):
            value = " + ".join(f"{r.get('key') or r.get('name')} x {r.get('weight', 1.0):g}"
                               for r in value if isinstance(r, Mapping))
        elif isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value))
        out[key] = value
    return out


# recipe keys whose value the report takes from what the run logged: (phase, logged metric, recipe key)
RAN_SETTINGS = (
    (SFT, "lr", "sft.train.lr"),
    *((p, k, f"{p}.grpo.{k}") for p in RL_PHASES for k in ("lr", "beta", "temperature",
                                                                          "weight_decay")),
)


def _ran_value(values: Sequence[float]) -> str:
    """One logged setting over a phase: the value, or its range and last value when it changed (a schedule)."""
    first, last, top = values[0], values[-1], max(values)
    if all(v == first for v in values):
        return f"{first:g}"
    return f"{first:.3g} .. {top:.3g} -> {last:.3g} (first, peak, last of {len(values)} steps)"


def ran_settings(records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The settings as the run logged them (:data:`RAN_SETTINGS`), for the report's recipe table: what ran."""
    out = {}
    for phase, metric, key in RAN_SETTINGS:
        values = [float(r[metric]) for r in records if r.get("phase") == phase and r.get(metric) is not None]
        if values:
            out[key] = _ran_value(values)
    return out


MISMATCH_KEYS = ("logp_abs_mean", "logp_abs_max", "kl", "corrected_frac")


def mismatch_by_phase(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per RL phase that logged it, the rollout-training mismatch over its steps: the means of the logged
    ``mismatch/*`` values (the max of ``logp_abs_max``), the mean ``routing_disagreement`` where the steps
    logged it (MoE policies with an engine that records its routing) and the number of steps."""
    out = {}
    for phase in RL_PHASES:
        rows = [r for r in records if r.get("phase") == phase and r.get("mismatch/logp_abs_mean") is not None]
        if rows:
            out[phase] = {k: (max if k == "logp_abs_max" else _mean)([float(r[f"mismatch/{k}"]) for r in rows])
                          for k in MISMATCH_KEYS}
            routing = [float(r["mismatch/routing_disagreement"]) for r in rows
                       if r.get("mismatch/routing_disagreement") is not None]
            if routing:
                out[phase]["routing_disagreement"] = _mean(routing)
            out[phase]["steps"] = float(len(rows))
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def summarize(evals: Mapping[str, PhaseEval], deltas: Mapping[str, Any], tax: float | None,
              wall_seconds: Mapping[str, float]) -> dict[str, Any]:
    """The report's summary: the stage-1 gain with the accuracies it is between, the stage-2 change of the
    preference reward (its total over ``greedy`` and ``sampled`` completions when evaluated, else the components
    it trained on), the alignment tax and the wall time per phase; each only when the run has it."""
    out: dict[str, Any] = {}
    s1 = deltas["stage1_accuracy_gain_points"]
    if s1 is not None:
        out["stage1"] = {"from": s1["from"], "to": s1["to"], "accuracy_from": evals[s1["from"]].accuracy,
                         "accuracy_to": evals[s1["to"]].accuracy, "gain_points": s1["value"]}
    s2 = deltas["stage2_reward_change"]
    if s2 is not None:
        totals = {label: s2["values"][k] for label, k in (("greedy", PREFERENCE_TOTAL),
                                                          ("sampled", PREFERENCE_TOTAL + SAMPLED)) if k in s2["values"]}
        out["stage2"] = {"from": s2["from"], "to": s2["to"],
                         "change": totals or {k: s2["values"][k] for k in s2["preference"]}}
    if RL_REASON in evals and RL_PREF in evals:
        out["alignment_tax_points"] = tax
    if wall_seconds:
        out["wall_seconds"] = {k: round(float(v), 3) for k, v in wall_seconds.items()}
    return out


def write_report(run_dir: str | Path, evals: Mapping[str, PhaseEval | Mapping[str, Any]], *,
                 recipe: Mapping[str, Any] | None = None, notes: Sequence[str] = (),
                 wall_seconds: Mapping[str, float] | None = None) -> tuple[Path, Path]:
    """Writes ``run_dir/report.md`` and ``run_dir/report.json`` (atomically), regenerating the plots first.

    Args:
        run_dir: The run folder.
        evals: Phase name (``base``, ``sft``, ``rl_reason``, ``rl_pref``, ...) in run order -> its held-out
            evaluation: a :class:`PhaseEval`, or a mapping validated into one (``accuracy`` (0..1) and ``rewards``
            ``{name: mean}`` required, ``format_rate``, ``length_mean``, ``n`` and other numbers (``pass@k``)
            optional; None or NaN means not measured).
        recipe: The run's recipe as plain data; its key settings are listed and ``rl_pref.rewards`` names the
            preference rewards.
        notes: Free-form lines appended to the report.
        wall_seconds: Phase -> the seconds it ran, for the summary.

    Returns:
        ``(report.md, report.json)``. The JSON holds ``summary`` (:func:`summarize`), ``phases``, ``deltas``
        (see :func:`compute_deltas`), ``alignment_tax`` (accuracy points), ``plots``, ``settings``,
        ``mismatch`` (:func:`mismatch_by_phase`) and ``notes``; missing numbers are null.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir {str(run_dir)!r} is not a folder")
    if not isinstance(evals, Mapping):
        raise TypeError(f"evals: expected a mapping phase -> evaluation, got {type(evals).__name__}")
    if isinstance(notes, str) or not all(isinstance(n, str) for n in notes):
        raise TypeError(f"notes: expected a list of strings, got {notes!r}")
    parsed = {str(phase): data if isinstance(data, PhaseEval) else PhaseEval.from_mapping(str(phase), data)
              for phase, data in evals.items()}
    settings = recipe_settings(recipe) if recipe is not None else {}
    records = read_metrics(run_dir) if (run_dir / METRICS_FILE).exists() else []
    settings.update(ran_settings(records))  # what ran, as logged, over what was asked for
    mismatch = mismatch_by_phase(records)
    recipe_data = dataclasses.asdict(recipe) if dataclasses.is_dataclass(recipe) else recipe
    deltas, tax = compute_deltas(parsed, recipe_data)
    plots = plot_metrics(run_dir) if (run_dir / METRICS_FILE).exists() else []
    report = {
        "summary": summarize(parsed, deltas, tax, wall_seconds or {}),
        "phases": {p: e.to_json() for p, e in parsed.items()},
        "deltas": deltas,
        "alignment_tax": tax,
        "plots": [Path(os.path.relpath(p, run_dir)).as_posix() for p in plots],
        "settings": settings,
        "mismatch": mismatch,
        "notes": list(notes),
    }
    md_path, json_path = run_dir / "report.md", run_dir / "report.json"
    atomic_write_text(json_path, json.dumps(report, indent=2, allow_nan=False, default=str) + "\n")
    atomic_write_text(md_path, run_report(run_dir, parsed, report, plots, (SAMPLED, ON_STAGE2_PROMPTS)))
    return md_path, json_path
