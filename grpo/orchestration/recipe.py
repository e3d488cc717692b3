"""Recipes: YAML files plus ``key=value`` overrides, built into typed dataclasses and validated up front.

A recipe is data: every section maps onto a dataclass (the trainers' own configs are reused as they are), and
:func:`build` walks the dataclass types, so an unknown key, a value of the wrong type or an impossible
combination stops the run before anything starts, with one message naming the full key::

    recipe key 'rl_reason.grpo.group_size': expected int, got 'eight'
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml

from grpo.config import GRPOConfig
from grpo.data import DataSpec
from grpo.orchestration.transport import WEIGHT_TRANSPORTS
from grpo.phases import PHASES
from grpo.reporting.trackers import MlflowConfig, WandbConfig, check_loggers
from model.registry import check_fields
from rewards.answers import check_answer_mode
from rewards.combine import RewardSpec
from rewards.rm_train import RewardModelTrainConfig
from sft.trainer import SFTConfig

DEFAULT_RECIPE = "tiny"


class RecipeError(ValueError):
    """A recipe that cannot run: names the key and what was expected."""


# ------------------------------------------------------------------------------------------------ schema
@dataclass
class RayConfig:
    """Where the roles run.

    Attributes:
        address: None starts an embedded local Ray instance (its temp dir under the run folder, no dashboard,
            ignoring any ``RAY_ADDRESS``); ``auto`` or ``HOST:PORT`` joins a running cluster.
        num_cpus: CPUs of the embedded instance (None: all).
        num_rollout_workers: Rollout actors; prompts are split across them.
        rollout_cpus: CPUs reserved by each rollout actor.
        num_train_workers: Trainer ranks: the policy is sharded over them (FSDP2) and each computes its share of
            every minibatch (the update equals one rank's).
        train_cpus: CPUs reserved by each trainer rank.
        train_gpus / rollout_gpus / reference_gpus: GPUs reserved by each trainer rank, rollout worker and
            reference worker when ``model.device`` is ``cuda`` (Ray gives an actor that reserves none no GPU at
            all); a fraction lets roles share a device.
        train_placement: ``pack`` puts the trainer ranks on as few nodes as hold them; ``spread`` puts each on
            its own node.
        weight_transport: How trainer rank 0 sends weights to the rollout workers: ``object_store`` (Ray's,
            through host memory) or ``collective`` (a ``torch.distributed`` broadcast, NCCL between GPUs);
            see :mod:`grpo.orchestration.transport`.
        threads_per_worker: torch threads of each actor (None: all cores of its node; the roles take turns,
            so each may use them all, and trainer ranks packed on one node share them; in an RL stage with
            ``async_rollouts`` on CPU the trainer and the rollout side compute at once and get half each).
    """

    address: str | None = None
    num_cpus: int | None = None
    num_rollout_workers: int = 1
    rollout_cpus: float = 0.5
    num_train_workers: int = 1
    train_cpus: float = 0.5
    train_gpus: float = 1.0
    rollout_gpus: float = 1.0
    reference_gpus: float = 1.0
    train_placement: Literal["pack", "spread"] = "pack"
    weight_transport: str = "object_store"
    threads_per_worker: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_rollout_workers", "num_train_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.weight_transport not in WEIGHT_TRANSPORTS:
            raise ValueError(f"weight_transport must be one of {WEIGHT_TRANSPORTS.names()}, got "
                             f"{self.weight_transport!r}")


@dataclass
class ModelConfig:
    """The policy.

    Attributes:
        preset: A :meth:`model.DeepSeekConfig.from_preset` name: build a fresh model (set ``preset`` or ``path``,
            not both).
        path: A Hugging Face checkpoint folder (ours or any causal LM) to start from.
        overrides: Config fields changed on top of the preset (a fresh model only).
        tokenizer: A tokenizer folder; None builds the embedded tiny tokenizer (with a preset) or uses ``path``.
        dtype: ``float32`` or ``bfloat16``: the checkpoints', the rollout engines' and the reference's dtype.
        master_dtype: The trainer's own copy (weights, gradients, AdamW moments); None: ``dtype``. ``float32``
            with ``dtype: bfloat16`` keeps float32 master weights while N > 1 sharded trainer ranks compute in
            bfloat16 (FSDP2 mixed precision, gradients reduced in float32); one unsharded rank computes in its
            master dtype.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        gradient_checkpointing: Recompute activations in backward.
        seed: Seed of the fresh model's initialisation.
    """

    preset: str | None = "tiny"
    path: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    dtype: str = "float32"
    master_dtype: str | None = None
    device: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preset is None and self.path is None:
            raise ValueError("set model.preset (a fresh model) or model.path (a checkpoint folder)")
        if self.preset is not None and self.path is not None:
            raise ValueError(f"model.preset ({self.preset!r}) and model.path ({self.path!r}) are both set, but a "
                             f"run starts from one: a fresh preset model or the checkpoint folder. Pass "
                             f"model.preset=null to start from the folder")
        if self.path is not None and self.overrides:
            raise ValueError(f"model.overrides {sorted(self.overrides)} change a fresh preset model's config; a "
                             f"checkpoint folder (model.path) keeps its own config.json")
        for name in ("dtype", "master_dtype"):
            value = getattr(self, name)
            if value not in ("float32", "bfloat16") and (name == "dtype" or value is not None):
                raise ValueError(f"{name} must be float32 or bfloat16, got {value!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class SFTPhase:
    """Supervised fine-tuning on the concatenation of ``data`` (schema ``sft``: prompt + completion, or
    messages)."""

    data: list[DataSpec] = field(
        default_factory=lambda: [DataSpec(source="builtin:arithmetic", schema="sft", n=2000)])
    train: SFTConfig = field(default_factory=SFTConfig)


@dataclass
class RLPhase:
    """One GRPO stage.

    Attributes:
        data: Prompts (schema ``prompt``) with the columns the rewards read.
        rewards: Weighted reward components; ``rm:NAME`` names a reward model trained in the ``rm`` phase.
            With ``grpo.advantage: process``, exactly one process reward (see :class:`rewards.StepRewards`).
        reward_mode: ``sum`` or ``normalize-then-sum`` (see :mod:`rewards.combine`).
        steps: RL steps.
        grpo: The trainer's settings.
        engine: Rollout engine, ``torch`` or ``vllm`` (or another registered name); a stage whose engine differs
            from the previous stage's gets rollout workers of its own.
        eval_every: Every this many steps, greedy accuracy on the held-out set ``eval.data`` (answers checked in
            ``eval.answer_mode``), logged as ``eval/accuracy``; 0 turns it off (the ``eval`` phase still measures
            every checkpoint at the end).
    """

    data: DataSpec = field(default_factory=lambda: DataSpec(source="builtin:arithmetic", n=2000))
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("accuracy")])
    reward_mode: str = "sum"
    steps: int = 10
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    engine: str = "torch"
    eval_every: int = 0

    def __post_init__(self) -> None:
        if self.reward_mode not in ("sum", "normalize-then-sum"):
            raise ValueError(f"reward_mode must be sum or normalize-then-sum, got {self.reward_mode!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.rewards:
            raise ValueError("rewards must list at least one reward")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.grpo.total_steps is None:  # the schedule's horizon follows the stage's length
            self.grpo = dataclasses.replace(self.grpo, total_steps=self.steps)
        if self.grpo.advantage == "process" and len(self.rewards) != 1:
            raise ValueError(f"grpo.advantage 'process' takes one process reward (returning StepRewards), got "
                             f"{len(self.rewards)} rewards: step scores are not combined with weights")


@dataclass
class RewardModelSpec:
    """One reward model trained on preference pairs (schema ``preference``), initialised from the SFT policy."""

    data: DataSpec = field(default_factory=lambda: DataSpec(source="builtin:helpfulness", schema="preference",
                                                            n=512))
    eval_data: DataSpec | None = None
    train: RewardModelTrainConfig = field(default_factory=RewardModelTrainConfig)


@dataclass
class RMPhase:
    """Reward models by name (``helpful``, ``safety``, ...), referenced as ``rm:NAME`` in ``rl_pref.rewards``."""

    models: dict[str, RewardModelSpec] = field(default_factory=dict)


@dataclass
class EvalPhase:
    """Held-out evaluation of every policy checkpoint of the run.

    Accuracy and format rate are measured on greedy completions. The preference reward is measured on greedy
    completions and, with ``pref_samples > 0``, as the mean over sampled completions: the expected reward under
    the policy, the quantity RL maximises (greedy decoding can hide a change in the distribution).

    Attributes:
        data: Held-out prompts with answers: accuracy and format rate.
        pref_data: Held-out stage-2 prompts scored with ``pref_rewards`` (None: skip).
        pref_rewards: The preference reward's components (None: those of ``rl_pref``); ``rm:NAME`` allowed.
        pref_samples: Sampled completions per stage-2 prompt for the sampled preference reward (0: greedy only).
        pref_temperature: Sampling temperature of those samples (the stage-2 training temperature is the natural
            choice).
        checkpoints: Which phase checkpoints to evaluate (those that exist).
        max_new_tokens: Completion length limit.
        answer_mode: How accuracy finds final answers: ``strict`` (the R1 format the tiny recipe trains) or
            ``lenient`` (free-text answers of models not trained on that format); see :mod:`rewards.answers`.
    """

    data: DataSpec = field(default_factory=lambda: DataSpec(source="builtin:arithmetic", split="test", n=200))
    pref_data: DataSpec | None = None
    pref_rewards: list[RewardSpec] | None = None
    pref_samples: int = 4
    pref_temperature: float = 1.0
    checkpoints: list[str] = field(default_factory=lambda: ["base", "sft", "rl_reason", "rl_pref"])
    max_new_tokens: int = 64
    answer_mode: str = "strict"

    def __post_init__(self) -> None:
        check_answer_mode(self.answer_mode)
        if isinstance(self.pref_samples, bool) or not isinstance(self.pref_samples, int) or self.pref_samples < 0:
            raise ValueError(f"pref_samples must be an integer >= 0, got {self.pref_samples!r}")
        if not self.pref_temperature > 0:
            raise ValueError(f"pref_temperature must be > 0, got {self.pref_temperature!r}")


@dataclass
class Recipe:
    """A whole run.

    Attributes:
        name: Run name; the run folder is ``output_dir/name``.
        output_dir: Parent folder of run folders.
        seed: Global seed, added to every component's own seed: the fresh model's initialisation
            (``model.seed``), the SFT data order (``sft.train.seed``), each RL stage's sampling and prompt order
            (``grpo.seed``) and each reward model's training (``rm.models.*.train.seed``). The data sets keep
            their own seeds, so runs with different seeds train on the same data.
        phases: Phases to run, in order (a subset of ``sft, rl_reason, rm, rl_pref, eval``).
        resume: Continue from the run folder's last complete checkpoint.
        checkpoint_every: RL steps between checkpoints (the end of a phase is always saved).
        offload: Offload the idle side between phases (hybrid engine): ``auto`` (disk on CPU, CPU memory on a
            GPU), ``cpu``, ``disk`` or ``none``.
        check_memory: On a GPU run, stop before the first phase when the memory plan (``grpo plan``) says a
            role does not fit its device.
        loggers: Where the scalars go besides ``metrics.jsonl``: any of ``tensorboard``, ``wandb``, ``mlflow``
            (see :mod:`grpo.reporting.trackers`; W&B and MLflow are optional extras).
        wandb: W&B settings, read when ``loggers`` has ``wandb``.
        mlflow: MLflow settings, read when ``loggers`` has ``mlflow``.
    """

    name: str = "tiny"
    output_dir: str = "runs"
    seed: int = 0
    phases: list[str] = field(default_factory=lambda: list(PHASES))
    resume: bool = False
    checkpoint_every: int = 10
    offload: str = "auto"
    check_memory: bool = True
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTPhase = field(default_factory=SFTPhase)
    rl_reason: RLPhase = field(default_factory=RLPhase)
    rm: RMPhase = field(default_factory=RMPhase)
    rl_pref: RLPhase = field(default_factory=RLPhase)
    eval: EvalPhase = field(default_factory=EvalPhase)

    def __post_init__(self) -> None:
        bad = [p for p in self.phases if p not in PHASES]
        if bad:
            raise ValueError(f"phases: unknown phase(s) {bad}; known: {list(PHASES)}")
        if self.offload not in ("auto", "cpu", "disk", "none"):
            raise ValueError(f"offload must be auto, cpu, disk or none, got {self.offload!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        check_loggers(self.loggers)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ------------------------------------------------------------------------------------------------ building
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build_union(tp: Any, value: Any, key: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for option in (a for a in args if a is not type(None)):
        try:
            return _build_value(option, value, key)
        except RecipeError as exc:
            errors.append(str(exc))
    raise RecipeError(errors[0] if len(errors) == 1 else f"recipe key {key!r}: expected {_type_name(tp)}, "
                      f"got {value!r}")


def _build_container(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if origin in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"recipe key {key!r}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_build_value(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise RecipeError(f"recipe key {key!r}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_build_value(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if not isinstance(value, Mapping):
        raise RecipeError(f"recipe key {key!r}: expected a mapping, got {value!r}")
    item = args[1] if len(args) == 2 else Any
    return {k: _build_value(item, v, f"{key}.{k}") for k, v in value.items()}


_CONTAINERS = (list, tuple, dict, Sequence, Mapping)


def _build_value(tp: Any, value: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` (recursing into dataclasses and containers)."""
    if tp is Any:
        return value
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _build_union(tp, value, key)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build(tp, value, key)
    if (typing.get_origin(tp) or tp) in _CONTAINERS:
        return _build_container(tp, value, key)
    return _build_scalar(tp, value, key)


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # ``1e-4``: YAML 1.1 reads it as a string


def _build_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        value = float(value)
    if typing.get_origin(tp) is typing.Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(f"recipe key {key!r}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        return value
    if not ok:
        raise RecipeError(f"recipe key {key!r}: expected {tp.__name__}, got {value!r}")
    return float(value) if tp is float else value


def build(cls: type, data: Any, key: str = "") -> Any:
    """Builds dataclass ``cls`` from a mapping, checking keys and types; ``key`` is the path for messages.

    Raises:
        RecipeError: naming the full key of the first problem.
    """
    where = key or "recipe"
    if not isinstance(data, Mapping):
        raise RecipeError(f"recipe key {where!r}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    check_fields(cls, data, "recipe key(s)", prefix=f"{key}." if key else "", known_label=f"known under {where!r}",
                 error=RecipeError)
    kwargs = {name: _build_value(hints[name], data[name], f"{key}.{name}" if key else name)
              for name in names if name in data}
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"recipe section {where!r}: {exc}") from exc


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turns ``["a.b=1", "c=[x, y]"]`` into a nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise RecipeError(f"override {item!r}: expected key=value (e.g. rl_reason.steps=20)")
        node = tree
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {part!r} is set both as a value and as a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return tree


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merges ``update`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _bundled() -> dict[str, Traversable]:
    """The recipes shipped with the package (``grpo/recipes/*.yaml``), by name."""
    folder = importlib.resources.files("grpo") / "recipes"
    return {f.name.removesuffix(".yaml"): f for f in folder.iterdir() if f.name.endswith(".yaml")}


def bundled_recipes() -> dict[str, str]:
    """The bundled recipes' names and what each is for (the first sentence of its header comment)."""
    out = {}
    for name, file in sorted(_bundled().items()):
        header = []
        for line in file.read_text().splitlines():
            if not line.startswith("#") or not line.strip("# "):
                break
            header.append(line.lstrip("#").strip())
        text = " ".join(header)
        out[name] = text.split(". ")[0].rstrip(".") + "." if text else ""
    return out


def resolve_recipe_path(recipe: str | None) -> Path | Traversable:
    """A recipe file, or a bundled recipe by name (``tiny``; the default when None)."""
    if recipe is None:
        recipe = DEFAULT_RECIPE
    path = Path(recipe)
    if path.exists():
        return path
    bundled = _bundled()
    if recipe in bundled:
        return bundled[recipe]
    raise RecipeError(f"recipe {recipe!r} not found (not a file, and not one of the bundled recipes: "
                      f"{', '.join(sorted(bundled))})")


def load_recipe(recipe: str | None = None, overrides: Sequence[str] = ()) -> Recipe:
    """Loads a YAML recipe (the embedded tiny one when None) and applies ``key=value`` overrides."""
    path = resolve_recipe_path(recipe)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path}: a recipe must be a mapping at the top level")
    return build(Recipe, merge(dict(data), parse_overrides(overrides)))


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (for the run folder's ``recipe.yaml``)."""
    return dataclasses.asdict(recipe)
