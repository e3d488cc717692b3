"""Hugging Face checkpoint I/O: ``config.json`` + safetensors (+ tokenizer files), validated on load.

On disk the routed experts are per-expert ``nn.Linear`` weights, as DeepSeek, transformers and vLLM store them::

    model.layers.{l}.mlp.experts.{i}.gate_proj.weight   [I, D]   = gate_up_proj[i, :I]
    model.layers.{l}.mlp.experts.{i}.up_proj.weight     [I, D]   = gate_up_proj[i, I:]
    model.layers.{l}.mlp.experts.{i}.down_proj.weight   [D, I]   = down_proj[i]

Every other tensor keeps its in-memory name. ``lm_head.weight`` is omitted when embeddings are tied. Loading
accepts folders written by us, by transformers' ``save_pretrained`` and by DeepSeek (single file or sharded with
``model.safetensors.index.json``; V3's multi-token-prediction layers ``model.layers.{L+k}.*`` are skipped).
A bad folder raises one :class:`CheckpointError` naming what is wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from model.config import DeepSeekConfig
from model.distributed import state_of, whole
from model.files import atomic_dir

if TYPE_CHECKING:
    from model.modeling import DeepSeekForCausalLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_EXPERT_RE = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<idx>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded: missing/unknown config, missing/unexpected/misshaped tensors."""


# ----------------------------------------------------------------------------------------------- names
def named_hf_weights(model: DeepSeekForCausalLM, state: Mapping[str, Tensor] | None = None
                     ) -> Iterator[tuple[str, Tensor]]:
    """Yields ``(HF name, tensor)`` for every persistent tensor; per-expert tensors are views (no copies).

    Args:
        model: The model.
        state: Its ``state_dict()``-named tensors to use instead of its own (e.g. a sharded model's, gathered).
            By default a sharded model's shards are gathered one tensor at a time as the iteration reaches
            them (every rank must iterate alike).
    """
    tied = model.config.tie_word_embeddings
    for name, tensor in (state if state is not None else state_of(model)).items():
        if tied and name == "lm_head.weight":
            continue
        tensor = whole(tensor)
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix, inter = name[: -len(".gate_up_proj")], tensor.shape[1] // 2
            for i in range(tensor.shape[0]):
                yield f"{prefix}.{i}.gate_proj.weight", tensor[i, :inter]
                yield f"{prefix}.{i}.up_proj.weight", tensor[i, inter:]
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for i in range(tensor.shape[0]):
                yield f"{prefix}.{i}.down_proj.weight", tensor[i]
        else:
            yield name, tensor


def expected_hf_shapes(config: DeepSeekConfig, model_cls: type[DeepSeekForCausalLM]) -> dict[str, tuple[int, ...]]:
    """``{HF name: shape}`` a checkpoint of ``model_cls`` for ``config`` must hold (from a weightless meta-device
    build)."""
    with torch.device("meta"):
        model = model_cls(config)
    return {name: tuple(t.shape) for name, t in named_hf_weights(model)}


def _target(model_tensors: dict[str, Tensor], name: str) -> Tensor | None:
    """The in-memory tensor (or expert slice) an HF name maps to, or None."""
    m = _EXPERT_RE.match(name)
    if m is None:
        return model_tensors.get(name)
    i, proj = int(m["idx"]), m["proj"]
    if proj == "down":
        stacked = model_tensors.get(f"{m['prefix']}.down_proj")
        return None if stacked is None or i >= stacked.shape[0] else stacked[i]
    stacked = model_tensors.get(f"{m['prefix']}.gate_up_proj")
    if stacked is None or i >= stacked.shape[0]:
        return None
    inter = stacked.shape[1] // 2
    return stacked[i, :inter] if proj == "gate" else stacked[i, inter:]


@torch.no_grad()
def load_hf_weights(model: DeepSeekForCausalLM, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
    """Copies ``(HF name, tensor)`` pairs into ``model`` in place (casting to each target's dtype/device).

    Raises:
        KeyError: for a name the model does not have.
        ValueError: for a shape mismatch (naming the tensor, expected and got).
    """
    tensors = dict(model.state_dict(keep_vars=True))
    for name, value in named_tensors:
        target = _target(tensors, name)
        if target is None:
            raise KeyError(f"load_hf_weights: the model has no tensor {name!r}")
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"load_hf_weights: {name!r} expects shape {tuple(target.shape)}, got "
                             f"{tuple(value.shape)}")
        target.copy_(value)


# ----------------------------------------------------------------------------------------------- save
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shards(named: list[tuple[str, Tensor]], max_bytes: int) -> list[list[tuple[str, Tensor]]]:
    shards: list[list[tuple[str, Tensor]]] = [[]]
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    return shards


def _write_weights(model: DeepSeekForCausalLM, folder: Path, max_shard_bytes: int,
                   state: Mapping[str, Tensor] | None) -> None:
    named = list(named_hf_weights(model, state))
    shards = _shards(named, max_shard_bytes)
    if len(shards) == 1:
        # safetensors refuses tensors sharing storage (the per-expert views): write copies
        save_file({n: t.detach().to("cpu").clone() for n, t in shards[0]}, folder / WEIGHTS_NAME,
                  metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: t.detach().to("cpu").clone() for n, t in shard}, folder / fname, metadata={"format": "pt"})
        for n, t in shard:
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2, sort_keys=True))


def save_pretrained(model: DeepSeekForCausalLM, path: str | Path, tokenizer: Any = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, state: Mapping[str, Tensor] | None = None
                    ) -> None:
    """Writes ``model`` (and ``tokenizer``) as a Hugging Face folder, atomically.

    Everything is written to a temporary folder beside ``path`` and renamed into place, so readers never see
    a half-written checkpoint; an existing ``path`` is replaced.

    Args:
        model: The model to save.
        path: Target folder.
        tokenizer: Anything with ``save_pretrained(folder)`` (a transformers tokenizer), optional.
        max_shard_bytes: Above this, weights are split into shards plus ``model.safetensors.index.json``.
        state: The weights to write under ``model``'s ``state_dict()`` names instead of its own (a sharded
            model's, gathered by :func:`model.distributed.whole_state`).
    """
    with atomic_dir(path) as tmp:
        cfg = model.config.to_hf_dict()
        dtype = next((t.dtype for t in (state or {}).values() if t.is_floating_point()), model.dtype)
        cfg["torch_dtype"] = cfg["dtype"] = _dtype_name(dtype)
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        _write_weights(model, tmp, max_shard_bytes, state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


# ----------------------------------------------------------------------------------------------- load
def read_config(path: str | Path) -> DeepSeekConfig:
    """The :class:`DeepSeekConfig` of a checkpoint folder.

    Raises:
        CheckpointError: no folder / no ``config.json`` / unreadable JSON / unknown model_type / invalid config.
    """
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a folder")
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {CONFIG_NAME}")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({err})") from err
    try:
        return DeepSeekConfig.from_hf_dict(raw)
    except ValueError as err:
        raise CheckpointError(f"{cfg_file}: {err}") from err


def _weight_files(path: Path) -> dict[str, Path]:
    """``{tensor name: file}`` over a single-file or sharded checkpoint."""
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / fname for name, fname in weight_map.items()}
    single = path / WEIGHTS_NAME
    if not single.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def _stored_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(files.values())):
        if not file.is_file():
            raise CheckpointError(f"weight file {str(file)!r} listed in {INDEX_NAME} does not exist")
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if files.get(name) == file:
                    shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _ignored(name: str, config: DeepSeekConfig) -> bool:
    """Checkpoint tensors we deliberately do not load: MTP layers, RoPE tables, a tied head's copy."""
    m = _LAYER_RE.match(name)
    if m and int(m.group(1)) >= config.num_hidden_layers and config.num_nextn_predict_layers > 0:
        return True
    if name.endswith("rotary_emb.inv_freq"):
        return True
    return config.tie_word_embeddings and name == "lm_head.weight"


def validate_checkpoint(path: str | Path, config: DeepSeekConfig, model_cls: type[DeepSeekForCausalLM]
                        ) -> dict[str, Path]:
    """Checks names and shapes against what ``model_cls`` builds for ``config``, without reading tensor data.

    Returns:
        ``{HF name: file}`` of the tensors to load.

    Raises:
        CheckpointError: listing missing tensors, unexpected tensors and shape mismatches.
    """
    files = _weight_files(Path(path))
    stored = _stored_shapes(files)
    expected = expected_hf_shapes(config, model_cls)
    problems = []
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(n for n in set(stored) - set(expected) if not _ignored(n, config))
    if missing:
        problems.append(f"missing tensor(s): {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s): {_list(unexpected)}")
    for name in sorted(set(expected) & set(stored)):
        if stored[name] != expected[name]:
            problems.append(f"tensor {name!r} has shape {list(stored[name])}, expected {list(expected[name])}")
    if problems:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match its config.json: " + "; ".join(problems))
    return {name: files[name] for name in expected}


def _list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _resolve_dtype(dtype: torch.dtype | str | None, path: Path) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        raw = json.loads((path / CONFIG_NAME).read_text())
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


def load_pretrained(model_cls: type[DeepSeekForCausalLM], path: str | Path, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None) -> DeepSeekForCausalLM:
    """Loads a checkpoint folder into a ``model_cls`` (a :class:`DeepSeekForCausalLM`) without a random init pass.

    Args:
        model_cls: The model class to build.
        path: The folder.
        dtype: Compute dtype; None / ``"auto"`` = the ``dtype`` recorded in config.json (else float32).
            ``e_score_correction_bias`` stays float32.
        device: Target device (default CPU).

    Raises:
        CheckpointError: for any mismatch between the folder and what its config describes.
    """
    path = Path(path)
    config = read_config(path)
    to_load = validate_checkpoint(path, config, model_cls)
    dtype = _resolve_dtype(dtype, path)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = model_cls(config)
    model.to(dtype)  # on meta: free; the correction bias stays float32
    model.to_empty(device=device)
    by_file: dict[Path, list[str]] = {}
    for name, file in to_load.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            load_hf_weights(model, ((n, f.get_tensor(n)) for n in names))
    for module in model.modules():
        init = getattr(module, "init_runtime_buffers", None)
        if init is not None:
            init(device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model
