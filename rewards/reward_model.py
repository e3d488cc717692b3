"""Reward models: a causal-LM backbone plus a scalar head, saved and served in Hugging Face format.

A :class:`RewardModel` reads the backbone's last hidden state at each sequence's last non-pad token (the
rightmost position where ``attention_mask`` is 1, so left and right padding both work) and maps it to a scalar
with ``score = Linear(hidden, 1, bias=False)``; it is trained with the Bradley-Terry loss
``-log sigmoid(r_chosen - r_rejected)`` (:mod:`rewards.rm_train`). As in DeepSeek's recipe it starts from a
causal-LM (SFT) checkpoint: :meth:`RewardModel.from_causal_lm` keeps the decoder and drops the LM head.

Checkpoints use the layout of transformers' ``*ForSequenceClassification`` with ``num_labels=1``: one
``model.safetensors`` holding the backbone's weights under their Hugging Face names (``model.*``) plus
``score.weight``, a ``config.json`` (the backbone's config with the matching ``architectures``, ``num_labels=1``
and a ``grpo_reward_model`` entry marking it as a reward model), and the tokenizer files. So
``AutoModelForSequenceClassification.from_pretrained`` loads it too (it pools by ``pad_token_id`` rather than
the mask: the same scores with right padding), and so do serving engines that read that layout.

Backbones come from a loader in :data:`BACKBONE_LOADERS` (``"auto"``: ``transformers.AutoModel``) or a dotted
path to a class with ``from_pretrained`` (``"model:DeepSeekForCausalLM"``, our MLA/MoE policy): a causal LM's
decoder is taken with ``get_decoder()`` (or ``.model``). Any module whose output has ``last_hidden_state``
``[B, T, H]`` and whose config has ``hidden_size`` works. A model that names its tensors the Hugging Face way
(``named_hf_weights()``) is saved under those names and marked for reloading with ``"auto"``, so a reward
model trained on our policy is served by transformers (or anything that reads the layout) unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from model.registry import Registry, import_dotted
from rewards.protocol import completion_text, prompt_messages
from rewards.registry import reward_factory

MARKER = "grpo_reward_model"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"

BACKBONE_LOADERS: Registry[Callable[..., nn.Module]] = Registry("reward-model backbone loader")
"""Loaders ``(path, **kwargs) -> model``: the model is a causal LM (its decoder is used) or a bare backbone."""

NamedTensors = Callable[[], Iterator[tuple[str, torch.Tensor]]]


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (``get_decoder()`` or ``.model``); a bare backbone is returned as is."""
    if hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
        if decoder is not None:
            return decoder
    return getattr(model, "model", model)


@BACKBONE_LOADERS.register("auto")
def _load_auto(path: str | Path, **kwargs: Any) -> nn.Module:
    # A reward-model folder holds the scalar head too; transformers' load report would list it as unexpected.
    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return AutoModel.from_pretrained(str(path), **kwargs)
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def load_backbone(path: str | Path, loader: str = "auto", **kwargs: Any) -> tuple[nn.Module, NamedTensors | None]:
    """Loads the model stored at ``path`` with a registered loader or a dotted class path.

    Returns:
        The backbone (the decoder of a causal LM) and, when the loaded model can name its tensors the Hugging
        Face way (``named_hf_weights()``, as :class:`model.DeepSeekForCausalLM` does), a function yielding the
        backbone's ``(HF name, tensor)`` pairs without the LM head; else ``None``.
    """
    if loader in BACKBONE_LOADERS:
        loaded = BACKBONE_LOADERS.get(loader)(path, **kwargs)
    else:
        cls = import_dotted(loader)
        if not hasattr(cls, "from_pretrained"):
            raise TypeError(f"backbone loader {loader!r} must name a registered loader or a class with "
                            "from_pretrained")
        loaded = cls.from_pretrained(str(path), **kwargs)
    backbone = decoder_of(loaded)
    if hasattr(loaded, "named_hf_weights") and backbone is not loaded:
        return backbone, lambda: ((n, t) for n, t in loaded.named_hf_weights() if not n.startswith("lm_head."))
    return backbone, None


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the rightmost position with mask 1 in each row.

    Args:
        attention_mask: ``[B, T]`` of 0/1.

    Returns:
        ``[B]`` long tensor.

    Raises:
        ValueError: if a row has no 1.
    """
    mask = attention_mask.to(torch.bool)  # [B, T]
    if not bool(mask.any(dim=-1).all()):
        raise ValueError("attention_mask has a row without any token")
    seq_len = mask.shape[-1]
    return seq_len - 1 - mask.flip(-1).to(torch.int64).argmax(dim=-1)  # [B]


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean pairwise loss ``-log sigmoid(r_chosen - r_rejected - margin)``.

    Args:
        chosen: ``[N]`` scores of the preferred completions.
        rejected: ``[N]`` scores of the other completions.
        margin: Optional ``[N]`` required margins (Llama-2 style); none by default.

    Returns:
        Scalar loss.
    """
    diff = chosen - rejected  # [N]
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


class RewardModel(nn.Module):
    """A backbone plus a scalar head at the last non-pad token.

    Args:
        backbone: Module returning an output with ``last_hidden_state`` ``[B, T, H]``; its ``config`` has
            ``hidden_size``.
        loader: Name of the backbone loader, recorded in checkpoints unless the weights are saved with Hugging
            Face names (then ``"auto"`` reloads them with transformers).
        hf_weights: Yields the backbone's ``(HF name, tensor)`` pairs, for backbones whose own tensor names
            differ from the Hugging Face layout (see :func:`load_backbone`).
        seed: Seed of the score head's initialisation (normal, std ``initializer_range``); ``None`` draws from
            torch's global generator, whose state depends on whatever ran before in the process.
    """

    def __init__(self, backbone: nn.Module, loader: str = "auto", hf_weights: NamedTensors | None = None,
                 seed: int | None = None) -> None:
        super().__init__()
        hidden = getattr(getattr(backbone, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            raise ValueError("the backbone needs a config with an integer hidden_size")
        self.backbone = backbone
        self.loader = loader
        self._hf_weights = hf_weights
        self.score = nn.Linear(hidden, 1, bias=False)
        std = getattr(backbone.config, "initializer_range", 0.02)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        nn.init.normal_(self.score.weight, std=std, generator=generator)

    @property
    def config(self) -> Any:
        """The backbone's config."""
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores sequences.

        Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, T]``, 1 on tokens, 0 on padding.

        Returns:
            ``[B]`` scores.
        """
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        last = last_token_index(attention_mask)  # [B]
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]
        return self.score(pooled).squeeze(-1)  # [B]

    # ------------------------------------------------------------------------------------------ checkpoints
    @classmethod
    def from_causal_lm(cls, path: str | Path, loader: str = "auto", seed: int | None = None,
                       **kwargs: Any) -> RewardModel:
        """A reward model initialised from a causal-LM checkpoint folder (the LM head is dropped); ``seed`` seeds
        the new score head, ``kwargs`` go to the backbone loader."""
        backbone, hf_weights = load_backbone(path, loader, **kwargs)
        return cls(backbone, loader=loader, hf_weights=hf_weights, seed=seed)

    def _named_weights(self) -> tuple[dict[str, torch.Tensor], bool]:
        """Tensors to save (backbone with HF names plus ``score.weight``) and whether the names are HF names."""
        if self._hf_weights is not None:
            named, hf_names = dict(self._hf_weights()), True
        else:
            prefix = getattr(self.backbone, "base_model_prefix", "") or "model"
            named = {f"{prefix}.{k}": v for k, v in self.backbone.state_dict().items()}
            hf_names = _is_transformers_model(self.backbone)
        named["score.weight"] = self.score.weight
        tensors, seen = {}, set()
        for key, tensor in named.items():  # safetensors refuses shared or strided storage
            tensor = tensor.detach()
            ptr = tensor.untyped_storage().data_ptr()
            tensors[key] = tensor.clone().contiguous() if ptr in seen or not tensor.is_contiguous() else tensor
            seen.add(ptr)
        return tensors, hf_names

    def save_pretrained(self, path: str | Path, tokenizer: Any = None) -> None:
        """Saves weights, ``config.json`` (marked as a reward model) and, if given, the tokenizer to ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors, hf_names = self._named_weights()
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        config = self._config_dict(loader="auto" if hf_names else self.loader, tokenizer=tokenizer)
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))

    def _config_dict(self, loader: str, tokenizer: Any) -> dict[str, Any]:
        config = self.backbone.config
        out = dict(config.to_hf_dict() if hasattr(config, "to_hf_dict") else config.to_dict())
        classifier = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(out.get("model_type", ""))
        if classifier:
            out["architectures"] = [classifier]
        out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
            out["pad_token_id"] = tokenizer.pad_token_id
        out[MARKER] = {"format_version": FORMAT_VERSION, "backbone_loader": loader,
                       "pooling": "last_non_pad_token", "trained_with": self.loader}
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, loader: str | None = None, **kwargs: Any) -> RewardModel:
        """Loads a reward model saved by :meth:`save_pretrained`.

        Raises:
            ValueError: if ``path`` is not a reward-model checkpoint.
        """
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{path} has no config.json; not a checkpoint folder")
        marker = json.loads(config_file.read_text()).get(MARKER)
        if not isinstance(marker, dict):
            raise ValueError(f"{path} is not a reward-model checkpoint (config.json has no {MARKER!r} entry); "
                             "to start from a causal LM use RewardModel.from_causal_lm")
        loader = loader or marker.get("backbone_loader", "auto")
        backbone, hf_weights = load_backbone(path, loader, **kwargs)
        model = cls(backbone, loader=loader, hf_weights=hf_weights)
        head = _read_tensor(path, "score.weight")
        with torch.no_grad():
            model.score.weight.copy_(head.to(model.score.weight.dtype))
        return model

    # ------------------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_texts(self, tokenizer: Any, texts: Sequence[str], batch_size: int = 16, max_length: int = 1024,
                    add_special_tokens: bool = True) -> list[float]:
        """Scores full texts in batches (eval mode, no gradients); the module's training flag is restored."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        scores: list[float] = []
        try:
            for start in range(0, len(texts), batch_size):
                ids, mask = encode(tokenizer, texts[start : start + batch_size], max_length, add_special_tokens)
                scores.extend(self(ids.to(device), mask.to(device)).float().tolist())
        finally:
            self.train(was_training)
        return scores


def _is_transformers_model(module: nn.Module) -> bool:
    return isinstance(module, PreTrainedModel)


def _read_tensor(path: Path, key: str) -> torch.Tensor:
    """Reads one tensor from a (possibly sharded) safetensors checkpoint."""
    index = path / f"{WEIGHTS_NAME}.index.json"
    file = path / json.loads(index.read_text())["weight_map"][key] if index.is_file() else path / WEIGHTS_NAME
    with safe_open(str(file), framework="pt") as f:
        if key not in f.keys():
            raise ValueError(f"{file} has no tensor {key!r}")
        return f.get_tensor(key)


# ----------------------------------------------------------------------------------------------- text
def conversation_text(tokenizer: Any, prompt: Any, completion: Any) -> tuple[str, bool]:
    """The text a reward model reads for ``(prompt, completion)`` and whether a chat template made it.

    With a chat template: the prompt messages (a string becomes one user message) plus the completion as the
    assistant message. Without: the prompt text followed directly by the completion text.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = prompt_messages(prompt) + [{"role": "assistant", "content": completion_text(completion)}]
        return tokenizer.apply_chat_template(messages, tokenize=False), True
    prompt_text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt_messages(prompt))
    return prompt_text + completion_text(completion), False


def encode(tokenizer: Any, texts: Sequence[str], max_length: int, add_special_tokens: bool = True
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenises, keeps the last ``max_length`` tokens (the response end), right-pads.

    Returns:
        ``input_ids`` ``[B, T]`` and ``attention_mask`` ``[B, T]``.
    """
    rows = [ids[-max_length:] for ids in tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a text tokenised to zero tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, : len(r)] = 1
    return input_ids, attention_mask


def score_pairs_texts(tokenizer: Any, prompts: Sequence[Any], completions: Sequence[Any]) -> tuple[list[str], bool]:
    """Conversation texts of a batch and whether a chat template produced them."""
    made = [conversation_text(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
    return [t for t, _ in made], bool(made and made[0][1])


# ----------------------------------------------------------------------------------------------- serving
class RewardModelReward:
    """A reward model as a reward function: batched scoring of ``(prompt, completion)`` conversations.

    Args:
        model: The reward model (moved to ``device`` if given).
        tokenizer: Its tokenizer (the chat template, if any, formats the conversation).
        batch_size: Sequences per forward pass.
        max_length: Longest sequence; longer ones keep their last ``max_length`` tokens.
        device: Where to run.
        name: Name in breakdowns and errors.
    """

    def __init__(self, model: RewardModel, tokenizer: Any, *, batch_size: int = 16, max_length: int = 1024,
                 device: str | torch.device | None = None, name: str = "reward_model") -> None:
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
        self.model = model.to(device) if device is not None else model
        self.tokenizer, self.batch_size, self.max_length, self.name = tokenizer, batch_size, max_length, name

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        texts, templated = score_pairs_texts(self.tokenizer, prompts, completions)
        return list(self.model.score_texts(self.tokenizer, texts, self.batch_size, self.max_length,
                                           add_special_tokens=not templated))


@reward_factory
def load_reward_model_reward(path: str | Path, *, loader: str | None = None, device: str | None = None,
                             dtype: str | None = None, batch_size: int = 16, max_length: int = 1024,
                             name: str = "reward_model") -> RewardModelReward:
    """Loads a saved reward model and its tokenizer as a reward (registered as ``reward_model``)."""
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    model = RewardModel.from_pretrained(path, loader=loader, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return RewardModelReward(model, tokenizer, batch_size=batch_size, max_length=max_length, device=device, name=name)


class RewardModelActor:
    """Serves batched reward-model scores; wrap with Ray through :meth:`as_ray_actor` (ray is imported then).

    Args:
        path: A reward-model checkpoint folder.
        **kwargs: Passed to :func:`load_reward_model_reward`.

    Example:
        ``actor = RewardModelActor.as_ray_actor(num_cpus=1).remote("ckpt/rm")``;
        ``scores = ray.get(actor.score.remote(prompts, completions))``.
    """

    def __init__(self, path: str | Path, **kwargs: Any) -> None:
        self.reward = load_reward_model_reward(path, **kwargs)

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        """Scores a batch (the reward protocol, as an actor method)."""
        return self.reward(prompts, completions, **columns)

    @classmethod
    def as_ray_actor(cls, **options: Any) -> Any:
        """``ray.remote(**options)(cls)``: the Ray actor class."""
        import ray

        return ray.remote(**options)(cls) if options else ray.remote(cls)


class RayActorReward:
    """A reward function that forwards to an actor's ``score`` method (e.g. a :class:`RewardModelActor`).

    Args:
        actor: A Ray actor handle with ``score(prompts, completions, **columns)``.
        name: Name in breakdowns and errors.
    """

    def __init__(self, actor: Any, name: str = "reward_model") -> None:
        self.actor, self.name = actor, name

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        import ray

        return ray.get(self.actor.score.remote(list(prompts), list(completions), **columns))
