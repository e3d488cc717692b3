"""Experiment trackers a run's scalars also go to: TensorBoard (the default), Weights & Biases and MLflow.

A recipe chooses them with ``loggers: [tensorboard, wandb, mlflow]``. Every tracker gets the same scalars as
``metrics.jsonl`` (tagged ``{phase}/{metric}``, at the phase's step), the resolved recipe as its config, and
the report (``report.md``, ``report.json`` and the plots) as an artifact once the eval phase writes it.

* ``tensorboard``: ``runs/<name>/tensorboard/<phase>/``, one TensorBoard run per phase, so that a resumed phase
  purges the events a crashed attempt wrote past its checkpoint (``purge_step``).
* ``wandb`` (``pip install 'grpo-toolkit[wandb]'``): one W&B run per run folder, resumed by the id kept in
  ``runs/<name>/trackers.json``. Each phase has its own step axis (``{phase}/step``, W&B's ``define_metric``),
  because W&B's own step only grows. ``wandb.mode: offline`` writes it under ``runs/<name>/wandb/`` without a
  network (``wandb sync`` uploads it later); ``null`` follows ``WANDB_MODE`` / W&B's login.
* ``mlflow`` (``pip install 'grpo-toolkit[mlflow]'``): one MLflow run per run folder, resumed by its id, in
  experiment ``mlflow.experiment`` at ``mlflow.tracking_uri`` (default: a local file store
  ``runs/<name>/mlruns``, which ``mlflow ui --backend-store-uri runs/<name>/mlruns`` shows). Config values
  longer than MLflow's 6000-character limit for a parameter are cut, and characters MLflow refuses in a name
  are dropped (``eval/sft/accuracy (sampled)`` is ``eval/sft/accuracy sampled`` there).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.files import atomic_write_text
from model.registry import Registry

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
IDS_FILE = "trackers.json"  # the W&B and MLflow run ids of a run folder, so a resumed run continues them


@dataclass
class WandbConfig:
    """Weights & Biases settings (``loggers: [wandb]``).

    Attributes:
        project: W&B project.
        entity: W&B entity (team or user); None: the login's default.
        mode: ``online``, ``offline`` or ``disabled``; None: ``WANDB_MODE`` or W&B's default.
        dir: Where W&B writes its files (default: the run folder).
        tags: Tags of the W&B run.
    """

    project: str = "grpo"
    entity: str | None = None
    mode: str | None = None
    dir: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in (None, "online", "offline", "disabled"):
            raise ValueError(f"mode must be online, offline, disabled or null, got {self.mode!r}")


@dataclass
class MlflowConfig:
    """MLflow settings (``loggers: [mlflow]``).

    Attributes:
        tracking_uri: Where runs are stored (a server URL, ``file:...`` or a folder); None: the run folder's
            ``mlruns/`` file store.
        experiment: Experiment name.
    """

    tracking_uri: str | None = None
    experiment: str = "grpo"


class Tracker:
    """One destination for a run's scalars; subclasses override what they support."""

    def log(self, phase: str, step: int, values: Mapping[str, float]) -> None:
        """The finite scalars of one step of ``phase``."""

    def truncate_after(self, phase: str, step: int) -> None:
        """A resumed phase continues from ``step``: what was logged past it belongs to a crashed attempt."""

    def artifact(self, paths: Sequence[Path], root: Path) -> None:
        """Attaches files (the report), named by their path relative to ``root``."""

    def close(self) -> None:
        """Flushes and ends the tracker's run; closing twice is harmless."""


TRACKERS: Registry[type[Tracker]] = Registry("logger")
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}  # the package each optional tracker needs


def check_loggers(names: Sequence[str]) -> None:
    """Raises ValueError for an unknown logger, or one whose package is not installed (naming the extra)."""
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"unknown logger {name!r}; known: {', '.join(TRACKERS.names())}")
        package = PACKAGES.get(name)
        if package is not None and importlib.util.find_spec(package) is None:
            raise ValueError(f"logger {name!r} needs the {package} package: pip install 'grpo-toolkit[{name}]'")


def _ids(run_dir: Path) -> dict[str, str]:
    path = run_dir / IDS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _save_id(run_dir: Path, tracker: str, run_id: str) -> None:
    atomic_write_text(run_dir / IDS_FILE, json.dumps({**_ids(run_dir), tracker: run_id}, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ TensorBoard
@functools.cache
def summary_writer_class() -> type | None:
    """``torch.utils.tensorboard.SummaryWriter``, or None (after one warning) when it cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        log.warning("TensorBoard logging disabled: cannot import torch.utils.tensorboard (%s); "
                    "install the 'tensorboard' package", exc)
        return None
    return SummaryWriter


@TRACKERS.register("tensorboard")
class TensorBoardTracker(Tracker):
    """Scalars tagged ``{phase}/{metric}`` under ``run_dir/tensorboard/<phase>/``.

    Args:
        run_dir: The run folder.
        writer_class: ``SummaryWriter`` (see :func:`summary_writer_class`).
    """

    def __init__(self, run_dir: Path, writer_class: type, **_: Any) -> None:
        self.run_dir, self.writer_class = run_dir, writer_class
        self._writers: dict[str, Any] = {}
        self._purge_step: dict[str, int] = {}

    def log(self, phase: str, step: int, values: Mapping[str, float]) -> None:
        if phase not in self._writers:
            self._writers[phase] = self.writer_class(log_dir=str(self.run_dir / TENSORBOARD_DIR / phase),
                                                     purge_step=self._purge_step.pop(phase, None))
        writer = self._writers[phase]
        for key, value in values.items():
            writer.add_scalar(f"{phase}/{key}", value, global_step=step)
        writer.flush()

    def truncate_after(self, phase: str, step: int) -> None:
        if phase in self._writers:
            self._writers.pop(phase).close()
        self._purge_step[phase] = step + 1

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


# ------------------------------------------------------------------------------------------------ W&B
@TRACKERS.register("wandb")
class WandbTracker(Tracker):
    """A W&B run (see the module docstring).

    Args:
        run_dir: The run folder.
        name: The run's name.
        config: The resolved recipe, as plain data.
        wandb: Its settings.
    """

    def __init__(self, run_dir: Path, name: str, config: Mapping[str, Any], wandb: WandbConfig, **_: Any) -> None:
        import wandb as wb

        self.run_dir = run_dir
        folder = Path(wandb.dir) if wandb.dir else run_dir
        folder.mkdir(parents=True, exist_ok=True)
        run_id = _ids(run_dir).get("wandb")
        self.run = wb.init(project=wandb.project, entity=wandb.entity, mode=wandb.mode, dir=str(folder),
                           name=name, id=run_id, resume="allow", config=dict(config), tags=list(wandb.tags),
                           settings=wb.Settings(console="off", silent=True))
        _save_id(run_dir, "wandb", self.run.id)
        self._phases: set[str] = set()

    def log(self, phase: str, step: int, values: Mapping[str, float]) -> None:
        if phase not in self._phases:  # each phase on its own step axis
            self.run.define_metric(f"{phase}/step")
            self.run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
            self._phases.add(phase)
        self.run.log({f"{phase}/step": step, **{f"{phase}/{k}": v for k, v in values.items()}})

    def artifact(self, paths: Sequence[Path], root: Path) -> None:
        import wandb as wb

        report = wb.Artifact(f"{self.run.name or 'run'}-report", type="report")
        for path in paths:
            report.add_file(str(path), name=Path(os.path.relpath(path, root)).as_posix())
        self.run.log_artifact(report)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


# ------------------------------------------------------------------------------------------------ MLflow
MLFLOW_PARAM_LIMIT = 6000
_MLFLOW_UNNAMEABLE = re.compile(r"[^\w\-. :/]")  # MLflow names take letters, digits, _ - . space : / only


def mlflow_name(key: str) -> str:
    """``key`` as MLflow accepts it: other characters dropped (``accuracy (sampled)`` -> ``accuracy sampled``)."""
    return _MLFLOW_UNNAMEABLE.sub("", key)


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config as ``{"a.b": "value"}`` strings (MLflow parameters)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[mlflow_name(f"{prefix}{key}")] = json.dumps(value, default=str)[:MLFLOW_PARAM_LIMIT]
    return out


@TRACKERS.register("mlflow")
class MlflowTracker(Tracker):
    """An MLflow run (see the module docstring).

    Args:
        run_dir: The run folder.
        name: The run's name.
        config: The resolved recipe, as plain data (logged as parameters ``section.key``).
        mlflow: Its settings.
    """

    def __init__(self, run_dir: Path, name: str, config: Mapping[str, Any], mlflow: MlflowConfig,
                 **_: Any) -> None:
        uri = mlflow.tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # a local folder is what this tracker is for offline; MLflow 3 asks to confirm the file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        run_id = _ids(run_dir).get("mlflow")
        if run_id is None:
            from mlflow.entities import Param

            experiment = self.client.get_experiment_by_name(mlflow.experiment)
            experiment_id = experiment.experiment_id if experiment is not None else \
                self.client.create_experiment(mlflow.experiment)
            run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            _save_id(run_dir, "mlflow", run_id)
            params = list(_flat(config).items())
            for first in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                self.client.log_batch(run_id, params=[Param(k, v) for k, v in params[first:first + 100]])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id: str | None = run_id

    def log(self, phase: str, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_name(f"{phase}/{k}"), v, now, step) for k, v in values.items()]
        for first in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[first:first + 1000])

    def artifact(self, paths: Sequence[Path], root: Path) -> None:
        for path in paths:
            parent = Path(os.path.relpath(path, root)).parent.as_posix()
            self.client.log_artifact(self.run_id, str(path), artifact_path=None if parent == "." else parent)

    def close(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)
            self.run_id = None


def build_trackers(names: Sequence[str], run_dir: Path, name: str, config: Mapping[str, Any],
                   wandb: WandbConfig | None = None, mlflow: MlflowConfig | None = None) -> list[Tracker]:
    """The trackers ``names`` (``tensorboard`` is skipped with a warning when it cannot be imported)."""
    check_loggers(names)
    out: list[Tracker] = []
    for tracker in names:
        if tracker == "tensorboard":
            writer = summary_writer_class()
            if writer is not None:
                out.append(TensorBoardTracker(run_dir, writer))
            continue
        out.append(TRACKERS.get(tracker)(run_dir=run_dir, name=name, config=config, wandb=wandb or WandbConfig(),
                                         mlflow=mlflow or MlflowConfig()))
    return out
