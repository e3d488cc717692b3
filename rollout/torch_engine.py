"""The built-in PyTorch rollout engine: batched sampling of ``B * n`` completions with a KV cache.

How it stays fast on small hardware:
- every prompt is prefilled once, then its cache rows are shared by its ``n`` samples (``index_select``);
- all rows decode together, one token per step, left-padded with an attention mask;
- rows that finish are dropped from the batch (and from the cache), so they stop costing compute;
- our DeepSeek models decode through the absorbed MLA path over the latent cache (``d_c + d_h^R`` values per token
  per layer); any other Hugging Face causal LM decodes through its own ``DynamicCache``.
"""

from __future__ import annotations

import contextlib
import inspect
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from transformers import DynamicCache

from model import DeepSeekForCausalLM, LatentKVCache
from model.routing import moe_gates, recorded_routing
from rollout.base import Rollout, RolloutEngine, SamplingConfig, decode_completion
from rollout.loading import load_causal_lm, load_tokenizer
from rollout.offload import Offloader
from rollout.sampling import sample_next
from rollout.weights import check_names, fingerprint


class _DecodeBackend(Protocol):
    """One cache-holding model adapter the decode loop drives."""

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
                ) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
             ) -> torch.Tensor: ...

    def select(self, rows: torch.Tensor) -> None: ...


class _HFBackend:
    """Any transformers causal LM, decoding through its ``DynamicCache``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.cache: Any = None
        # transformers 5 names the cache argument ``cache`` (``past_key_values`` is deprecated); older ones
        # know only ``past_key_values``
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def _forward(self, input_ids, attention_mask, position_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **{self._cache_arg: self.cache})
        self.cache = out.cache if "cache" in getattr(out, "__dataclass_fields__", {}) else out.past_key_values
        return out.logits[:, -1, :]  # [B, V]

    def prefill(self, input_ids, attention_mask, position_ids):
        self.cache = DynamicCache(config=getattr(self.model, "config", None))
        return self._forward(input_ids, attention_mask, position_ids)

    def step(self, tokens, attention_mask, position_ids):
        return self._forward(tokens[:, None], attention_mask, position_ids)

    def select(self, rows):
        self.cache.reorder_cache(rows)


class _LatentBackend:
    """Our DeepSeek model, decoding through the absorbed MLA path over a preallocated latent cache."""

    def __init__(self, model: nn.Module, max_len: int) -> None:
        self.model = model
        self.max_len = max_len
        self.cache: Any = None

    def prefill(self, input_ids, attention_mask, position_ids):
        param = next(self.model.parameters())
        self.cache = LatentKVCache(self.model.config, batch_size=input_ids.shape[0], max_len=self.max_len,
                                   dtype=param.dtype, device=param.device)
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=self.cache,
                         logits_to_keep=1)
        return out.logits[:, -1, :]

    def step(self, tokens, attention_mask, position_ids):
        out = self.model(tokens[:, None], attention_mask=attention_mask, position_ids=position_ids,
                         cache=self.cache, logits_to_keep=1)
        return out.logits[:, -1, :]

    def select(self, rows):
        self.cache = self.cache.index_select(rows)


def _is_ours(model: nn.Module) -> bool:
    return isinstance(model, DeepSeekForCausalLM)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pads prompts into one batch.

    Returns:
        ``input_ids [B, L]``, ``attention_mask [B, L]`` (1 = token) and ``position_ids [B, L]`` (counting from 0
        at each prompt's first real token; pads get position 0).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must have at least one token")
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, length - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


class TorchEngine(RolloutEngine):
    """Samples from an in-memory model (ours or any transformers causal LM).

    Args:
        model: A model object, or a checkpoint folder (ours is loaded with :mod:`model`, others with
            ``AutoModelForCausalLM``; see :mod:`rollout.loading`).
        tokenizer: Used to decode texts, to find eos/pad ids and for stop strings; optional. A folder's own
            tokenizer files are used when there are any; without a tokenizer the engine works on token ids only
            (``Rollout.text`` is empty, stop strings are refused).
        device: Where to run; defaults to the model's device.
        dtype: Optional dtype to cast the model to.
    """

    def __init__(self, model: nn.Module | str, tokenizer: Any = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if isinstance(model, str):
            model, tokenizer = _load(model, tokenizer)
        self.model = model.eval()
        if dtype is not None or device is not None:
            self.model.to(device=device, dtype=dtype)
        self.tokenizer = tokenizer
        self.device = next(self.model.parameters()).device
        self._sleeping = False

    # -- generation -------------------------------------------------------------------------------------------
    def _stop_ids(self, sampling: SamplingConfig) -> set[int]:
        ids = set(sampling.stop_token_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(getattr(self.model, "config", None), "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
        return ids

    def _pad_id(self) -> int:
        for src in (self.tokenizer, getattr(self.model, "config", None)):
            pad = getattr(src, "pad_token_id", None)
            if isinstance(pad, int):
                return pad
        return 0

    def _hits_stop_string(self, tokens: list[int], stops: tuple[str, ...]) -> bool:
        tail = self.tokenizer.decode(tokens[-64:], skip_special_tokens=False)
        return any(s in tail for s in stops)

    @torch.inference_mode()  # less per-op bookkeeping than no_grad: decoding is op-bound
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Rollout]:
        if self._sleeping:
            raise RuntimeError("the engine is asleep: call wake_up() before generate()")
        if sampling.stop and self.tokenizer is None:
            raise ValueError("SamplingConfig.stop (stop strings) needs an engine built with a tokenizer")
        if sampling.record_routing and not self.can_record_routing:
            raise ValueError(f"SamplingConfig.record_routing: {self.description} has no MoE router of ours to "
                             f"record (router replay works with our DeepSeek models)")
        with recorded_routing(self.model) if sampling.record_routing else contextlib.nullcontext() as logs:
            rollouts, fed = self._generate(prompt_token_ids, sampling)
        if sampling.record_routing:
            _attach_routing(rollouts, logs, fed, sampling.n)
        return rollouts

    def _generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig
                  ) -> tuple[list[Rollout], list[torch.Tensor]]:
        """The rollouts, and the global sample index of every row of each decode step's forward."""
        n, stop_ids = sampling.n, self._stop_ids(sampling)
        ids, mask, pos = left_pad(prompt_token_ids, self._pad_id(), self.device)
        backend: _DecodeBackend = (_LatentBackend(self.model, ids.shape[1] + sampling.max_tokens)
                                   if _is_ours(self.model) else _HFBackend(self.model))
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)

        logits = backend.prefill(ids, mask, pos)  # [B, V]
        rows = torch.arange(len(prompt_token_ids), device=self.device).repeat_interleave(n)  # [B*n]
        backend.select(rows)
        logits, mask, next_pos = logits[rows], mask[rows], pos[rows, -1] + 1
        active = torch.arange(rows.numel(), device=self.device)  # global sample index of each live row
        completions: list[list[int]] = [[] for _ in range(rows.numel())]
        logprobs: list[list[float]] = [[] for _ in range(rows.numel())]
        finish: list[str] = ["length"] * rows.numel()
        stop_tensor = torch.tensor(sorted(stop_ids), dtype=torch.long, device=self.device)
        fed: list[torch.Tensor] = []  # the samples each decode forward ran, in its row order

        for step in range(sampling.max_tokens):
            banned = stop_tensor if step < sampling.min_tokens else None
            tokens, lps = sample_next(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator,
                                      banned)
            done = torch.isin(tokens, stop_tensor)
            for r, (g, t, lp) in enumerate(zip(active.tolist(), tokens.tolist(), lps.tolist())):
                completions[g].append(t)
                logprobs[g].append(lp)
                if sampling.stop and not done[r] and self._hits_stop_string(completions[g], sampling.stop):
                    done[r] = True
            for g in active[done].tolist():
                finish[g] = "stop"
            if step == sampling.max_tokens - 1 or bool(done.all()):
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(-1)
                backend.select(keep)
                tokens, mask, next_pos, active = tokens[keep], mask[keep], next_pos[keep], active[keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            fed.append(active.clone())
            logits = backend.step(tokens, mask, next_pos[:, None])
            next_pos = next_pos + 1

        return [
            Rollout(
                prompt_ids=list(prompt_token_ids[g // n]),
                completion_ids=completions[g],
                logprobs=logprobs[g] if sampling.logprobs else [],
                finish_reason=finish[g],  # type: ignore[arg-type]
                text=decode_completion(self.tokenizer, completions[g], stop_ids),
                prompt_index=g // n,
            )
            for g in range(rows.numel())
        ], fed

    # -- weights and memory -----------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every name the engine's model accepts (shared tensors under each of their names) -> its tensor."""
        named = getattr(self.model, "named_hf_weights", None)
        if named is not None:
            return dict(named())
        out = dict(self.model.named_parameters(remove_duplicate=False))
        out.update(dict(self.model.named_buffers(remove_duplicate=False)))
        return out

    def accepted_weights(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self._tensors().items()}

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies (HF name, tensor) pairs into the engine's model in place (casting to the engine's dtype).

        Every name and shape of the call is checked before anything is copied, so a bad tensor leaves the
        engine's weights as they were.

        Raises:
            KeyError: for a name the model does not have (naming the model); ValueError: for a shape mismatch.
        """
        if self._sleeping:
            raise RuntimeError("the engine is asleep: call wake_up() before update_weights()")
        named = list(named_tensors)
        tensors = self._tensors()
        check_names({n: tuple(t.shape) for n, t in named}, {n: tuple(t.shape) for n, t in tensors.items()},
                    self.description)
        for name, tensor in named:
            tensors[name].copy_(tensor)

    def weight_fingerprints(self, names: Sequence[str]) -> dict[str, Any]:
        """Fingerprints (:func:`rollout.weights.fingerprint`) of the tensors the model holds under ``names``."""
        tensors = self._tensors()
        return {name: fingerprint(tensors[name]) for name in names if name in tensors}

    @torch.inference_mode()
    def probe_logprobs(self, token_ids: Sequence[int]) -> list[float]:
        """Log-probs (temperature 1) of ``token_ids[1:]`` under the engine's model, one forward pass."""
        ids = torch.as_tensor([list(token_ids)], dtype=torch.long, device=self.device)
        logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1].float()  # [L-1, V]
        return logits.log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1).tolist()

    @property
    def can_record_routing(self) -> bool:
        """Our MoE models: their routers record what they chose (:mod:`model.routing`)."""
        return _is_ours(self.model) and bool(moe_gates(self.model))

    @property
    def logprobs_match_trainer(self) -> bool:
        """In float32 the engine runs the trainer's own model class and kernels: its log-probs are the trainer's
        up to float rounding (a bfloat16 copy of a float32 trainer is not)."""
        return next(self.model.parameters()).dtype == torch.float32

    @property
    def description(self) -> str:
        """The engine's model for messages: its class and where it was loaded from."""
        source = getattr(getattr(self.model, "config", None), "_name_or_path", "") or ""
        return f"TorchEngine[{type(self.model).__name__}" + (f" from {source}]" if source else "]")

    def sleep(self) -> None:
        """Frees the engine's weights until :meth:`wake_up`: to CPU memory on an accelerator, to a scratch
        folder on a CPU-only machine (see :mod:`rollout.offload`)."""
        if self._sleeping:
            return
        self._scratch = tempfile.mkdtemp(prefix="grpo-engine-")
        # removed on wake-up, or when the engine is collected or the process exits still asleep
        self._scratch_cleanup = weakref.finalize(self, shutil.rmtree, self._scratch, True)
        self._offloader = Offloader(self.model, None, folder=self._scratch)
        self._offloader.offload("auto")
        self._sleeping = True

    def wake_up(self) -> None:
        """Restores the weights exactly as they were before :meth:`sleep`."""
        if not self._sleeping:
            return
        self._offloader.onload()
        self._scratch_cleanup()
        self._sleeping = False

    @property
    def is_sleeping(self) -> bool:
        return self._sleeping


def _attach_routing(rollouts: list[Rollout], logs: list[list[torch.Tensor]], fed: list[torch.Tensor], n: int
                    ) -> None:
    """Sets each rollout's ``routing`` from the gates' records: the prefill's ``[B * P, K]`` (left-padded
    prompts) first, then one ``[A, K]`` per decode forward over the samples ``fed[s]``."""
    layers = len(logs)
    prompts = len(rollouts) // n
    prefill = torch.stack([log[0] for log in logs], dim=1).view(prompts, -1, layers, logs[0][0].shape[-1])
    steps = [torch.stack([log[1 + s] for log in logs], dim=1).cpu() for s in range(len(fed))]  # [A, M, K] each
    per_sample: list[list[torch.Tensor]] = [[] for _ in rollouts]
    for step, rows in zip(steps, fed):
        for r, g in enumerate(rows.tolist()):
            per_sample[g].append(step[r])
    width = prefill.shape[1]
    for g, rollout in enumerate(rollouts):
        prompt = prefill[g // n, width - len(rollout.prompt_ids):].cpu()  # [P_g, M, K]
        done = torch.stack(per_sample[g]) if per_sample[g] else prompt[:0]
        rollout.routing = torch.cat([prompt, done])  # [P_g + C_g - 1, M, K]


def _load(path: str, tokenizer: Any) -> tuple[nn.Module, Any]:
    """The model of a checkpoint folder, and its tokenizer when none is given and the folder has one (without
    tokenizer files the engine works on token ids only)."""
    model = load_causal_lm(path, dtype=None)
    if tokenizer is None:
        tokenizer = load_tokenizer(path, required=False)
    return model, tokenizer
