"""The rollout engine interface: sampling settings, the rollout record, the engine ABC and its registry.

Every engine (the built-in PyTorch engine, vLLM) takes token ids and returns ``len(prompts) * n`` rollouts with
the ``n`` samples of a prompt contiguous, each carrying the per-token log-probs of the sampled tokens under the
sampling distribution (after temperature, before top-p/top-k truncation, which is what the GRPO ratio needs for
``temperature`` sampling; see :class:`SamplingConfig`). Backends are registered as dotted paths and imported only
when built, so importing :mod:`rollout` never imports vLLM.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from model.registry import Registry, import_dotted
from rollout.weights import WeightReport

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample completions.

    Attributes:
        n: Samples per prompt (GRPO's G).
        max_tokens: Maximum new tokens per sample.
        temperature: Softmax temperature; 0 means greedy.
        top_p: Nucleus mass kept (1.0 keeps all).
        top_k: Keep the k most likely tokens (0 or -1 keeps all).
        stop_token_ids: Token ids that end a sample (kept in the completion). The tokenizer's eos is added by the
            engine when it knows it.
        stop: Strings that end a sample (the completion is cut after the stop string's last token).
        min_tokens: Stop tokens cannot be sampled before this many new tokens.
        seed: Seed for reproducible sampling; None draws from the global generator.
        logprobs: Whether to return per-token log-probs of the sampled tokens.
        record_routing: Whether to return the experts the engine routed every token to (an MoE policy's
            rollout routing replay, :mod:`model.routing`); engines that cannot refuse it.
    """

    n: int = 1
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    seed: int | None = None
    logprobs: bool = True
    record_routing: bool = False

    def __post_init__(self) -> None:
        checks = [
            ("n", self.n >= 1, "an integer >= 1"),
            ("max_tokens", self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", self.temperature >= 0.0, "a float >= 0 (0 = greedy)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "a float in (0, 1]"),
            ("top_k", self.top_k >= -1, "an integer >= -1 (0 or -1 = off)"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "an integer in [0, max_tokens]"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"SamplingConfig.{name} must be {expected}, got {getattr(self, name)!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Rollout:
    """One sampled completion.

    Attributes:
        prompt_ids: Prompt token ids (no padding).
        completion_ids: Sampled token ids, including a final stop token when ``finish_reason == "stop"``.
        logprobs: Per completion token, the log-prob of the sampled token under ``softmax(logits / T)`` (``T``
            the temperature, 1 for greedy), before top-k/top-p truncation: with ``T = 1`` these are the model's
            own forward log-probs. ``len(logprobs) == len(completion_ids)``; empty when not requested.
        finish_reason: ``"stop"`` (a stop token or string) or ``"length"`` (``max_tokens`` reached).
        text: The decoded completion (empty when the engine has no tokenizer).
        prompt_index: Index of the prompt in the ``generate`` call.
        routing: With ``record_routing``, the experts chosen for every token the engine ran, prompt then
            completion (all but the last completion token, which is never fed back):
            ``[len(prompt_ids) + len(completion_ids) - 1, M, K]`` for ``M`` MoE layers; else None.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    text: str = ""
    prompt_index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    routing: Any = None


class PendingRollouts:
    """Rollouts being sampled: :meth:`result` waits for them (see :meth:`RolloutEngine.generate_async`); it may be
    called from several threads, and every call returns the same list."""

    def __init__(self, wait: Callable[[], list[Rollout]]) -> None:
        self._wait, self._done, self._lock = wait, None, threading.Lock()

    @classmethod
    def done(cls, rollouts: list[Rollout]) -> PendingRollouts:
        return cls(lambda: rollouts)

    def result(self) -> list[Rollout]:
        with self._lock:
            if self._done is None:
                self._done = self._wait()
            return self._done


class RolloutEngine(abc.ABC):
    """A generation backend the trainer drives: generate, take new weights, sleep and wake."""

    @abc.abstractmethod
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Rollout]:
        """Samples ``sampling.n`` completions for each prompt.

        Args:
            prompt_token_ids: One list of token ids per prompt.
            sampling: Sampling settings.

        Returns:
            ``len(prompt_token_ids) * sampling.n`` rollouts; the ``n`` samples of prompt ``i`` are at
            ``[i * n, (i + 1) * n)``.
        """

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads new weights given as (Hugging Face parameter name, tensor) pairs, possibly in several buckets.

        After the call the engine must sample exactly as a fresh engine built from the same weights would.
        """

    def accepted_weights(self) -> dict[str, tuple[int, ...]] | None:
        """Every (HF name, shape) :meth:`update_weights` accepts, or None when the engine cannot list them.

        The trainer checks the names it will send against this before its first sync, so a model the engine
        cannot take fails at once with the name, not after minutes of work.
        """
        return None

    def weight_fingerprints(self, names: Sequence[str]) -> dict[str, Any] | None:
        """Fingerprints (:class:`rollout.weights.Fingerprint`) of the tensors the engine holds under ``names``,
        computed from its own weights; None when the engine cannot (the trainer then probes log-probs)."""
        return None

    def probe_logprobs(self, token_ids: Sequence[int]) -> list[float] | None:
        """Log-probs (temperature 1) of ``token_ids[1:]`` given their prefixes under the engine's weights, or None
        when the engine cannot compute them. The stale-weight guard compares them with the trainer's."""
        return None

    def weight_reports(self, names: Sequence[str], probe_ids: Sequence[int]) -> list[Any]:
        """One :class:`rollout.weights.WeightReport` per replica of the engine (one here; a group of rollout
        workers gives one per worker): fingerprints of ``names``, else log-probs of ``probe_ids``."""
        fingerprints = self.weight_fingerprints(names)
        probe = self.probe_logprobs(probe_ids) if fingerprints is None else None
        return [WeightReport(self.description, fingerprints, probe)]

    def sleep(self) -> None:  # noqa: B027 - optional hook with a sensible default
        """Frees the engine's memory (KV cache, and weights where the backend can) until :meth:`wake_up`."""

    def wake_up(self) -> None:  # noqa: B027
        """Restores what :meth:`sleep` freed."""

    @property
    def is_sleeping(self) -> bool:
        return False

    @property
    def description(self) -> str:
        """The engine and its model, for messages."""
        return type(self).__name__

    def generate_async(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig
                       ) -> PendingRollouts:
        """Starts :meth:`generate` and returns at once where the engine runs elsewhere (rollout workers): the
        caller trains meanwhile. An in-process engine samples now and returns them done."""
        return PendingRollouts.done(self.generate(prompt_token_ids, sampling))

    @property
    def can_record_routing(self) -> bool:
        """Whether :meth:`generate` can honour ``SamplingConfig.record_routing``."""
        return False

    def can_return_logprobs(self, sampling: SamplingConfig) -> bool:
        """Whether :meth:`generate` can return log-probs under ``softmax(logits / T)`` with these settings."""
        return True

    @property
    def logprobs_match_trainer(self) -> bool:
        """Whether the engine's sampling log-probs are the trainer's own (the same model, dtype and kernels), so
        that no rollout correction is needed (``rollout_correction: auto``, see :mod:`grpo.correction`)."""
        return False



def decode_completion(tokenizer: Any, tokens: Sequence[int], stop_ids: Iterable[int]) -> str:
    """The text of a completion without its trailing stop tokens (``""`` for an engine without a tokenizer).

    Special tokens other than the trailing stops stay in the text: the reasoning tags may be special tokens.

    Args:
        tokenizer: A Hugging Face tokenizer, or ``None``.
        tokens: The completion's token ids.
        stop_ids: Token ids that end a completion (EOS and the sampling config's stop tokens).
    """
    if tokenizer is None:
        return ""
    stops = set(stop_ids)
    end = len(tokens)
    while end and tokens[end - 1] in stops:
        end -= 1
    return tokenizer.decode(list(tokens[:end]), skip_special_tokens=False)

ENGINES: Registry[str] = Registry("rollout engine")
ENGINES.register_lazy("torch", "rollout.torch_engine:TorchEngine")
ENGINES.register_lazy("vllm", "rollout.vllm_engine:VLLMEngine")


def build_engine(name: str, model_or_path: Any, **kwargs: Any) -> RolloutEngine:
    """Builds a registered engine.

    Args:
        name: ``"torch"``, ``"vllm"``, another registered name, or a dotted path ``"pkg.module:EngineClass"``.
        model_or_path: A model object (torch engine) or a Hugging Face checkpoint folder.
        **kwargs: Backend options (tokenizer, device, dtype, ...).

    Raises:
        KeyError: for an unknown engine name, listing the known ones.
    """
    if name not in ENGINES and ":" in name:
        engine_cls = import_dotted(name)
    else:
        engine_cls = ENGINES.get(name)
    return engine_cls(model_or_path, **kwargs)
