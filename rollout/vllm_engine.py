"""The vLLM rollout engine: an in-process ``vllm.LLM`` behind :class:`rollout.base.RolloutEngine`.

vLLM is imported only when an engine is built, so importing :mod:`rollout` never needs it.

How it maps our contract onto vLLM (checked against vLLM 0.32, CPU and GPU code paths):

- **Samples.** ``SamplingConfig.n`` becomes ``SamplingParams.n`` (vLLM gives each of the ``n`` children its own
  seed ``seed + i``). vLLM refuses ``n > 1`` for greedy decoding, so a greedy request sends each prompt ``n``
  times with ``n = 1``; the ``n`` samples of a prompt are contiguous either way.
- **Log-probs.** vLLM's default ``raw_logprobs`` are ``log_softmax(logits)`` before temperature. The engine runs
  with ``logprobs_mode="processed_logprobs"``: ``log_softmax(logits / T)`` after temperature *and* after every
  filter (top-k / top-p masking, the ``min_tokens`` ban of stop tokens). That is our definition (after
  temperature, before filtering) whenever no filter is active, and ``log_softmax(logits)`` for greedy requests
  without ``min_tokens``. With a filter active and ``T = 1`` (or greedy) the engine re-scores the completions
  with one prefill pass (vLLM's prompt log-probs are the model's own ``log_softmax(logits)``). With a filter and
  another temperature vLLM exposes no way to get the unfiltered normaliser, so asking for log-probs raises
  ``ValueError`` (pass ``logprobs=False``).
- **Weights.** :meth:`VLLMEngine.update_weights` streams (Hugging Face name, tensor) pairs into vLLM's in-place
  reload (``reload_weights(is_checkpoint_format=True)``), which re-runs each layer's
  ``process_weights_after_loading`` (MLA's absorbed ``W_UK``/``W_UV``, CPU GEMM packing). vLLM 0.32 skips the
  CPU fused-MoE experts' re-packing on a weight update (it only copies the new, unpacked weights into the
  packed storage, which gives silently wrong outputs); the engine detaches those layers' MoE kernels for the
  reload so vLLM pads, packs and rebuilds them as on the first load. Each call must carry whole decoder
  layers (vLLM processes a layer once all of its tensors arrived); the prefix cache is reset afterwards.
- **Routing.** ``SamplingConfig.record_routing`` (rollout routing replay, and the routing mismatch) needs an
  engine built with ``enable_return_routed_experts=True``: vLLM 0.32 then returns every sample's routed experts
  (``CompletionOutput.routed_experts``), which :mod:`rollout.vllm_routing` turns into our ``[S, M, K]``
  routing. Only vLLM's V2 model runner captures them; it needs Triton, so a GPU: the engine sets
  ``VLLM_USE_V2_MODEL_RUNNER=1`` when unset and refuses the option on the CPU (use the torch engine there).
  Without the option, ``record_routing`` is refused.
- **Sleep.** On platforms with vLLM sleep mode (CUDA) the engine is built with ``enable_sleep_mode=True`` and
  :meth:`sleep` frees the KV cache and offloads the weights (level 1). vLLM refuses sleep mode on the CPU:
  there :meth:`sleep` / :meth:`wake_up` only log that nothing is freed and track the state.
- **CPU fixes.** vLLM 0.32's CPU ``rotary_embedding`` kernel rotates a ``[tokens, heads, dim]`` query wrongly
  when there is more than one head (DeepSeek's MLA passes exactly that), so on the CPU the engine disables that
  custom op (``compilation_config.custom_ops += ["-rotary_embedding"]``) and vLLM uses its PyTorch rotary; it
  also runs eager by default there (compiling costs about a minute of start-up on two cores). vLLM's CPU MLA
  kernel needs ``kv_lora_rank + qk_rope_head_dim == 576`` (or ``VLLM_MLA_DISABLE=1``). On CPUs with AMX tiles
  vLLM prefers its AMX MLA backend, which packs bfloat16 weights only (and head widths in multiples of 32): an
  MLA model in any other dtype gets the reference ``CPU_MLA`` backend unless ``attention_backend`` is given.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from rollout.base import Rollout, RolloutEngine, SamplingConfig, decode_completion
from rollout.loading import has_tokenizer
from rollout.vllm_routing import moe_layer_indices, routing_from_vllm
from rollout.weights import layer_key

logger = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
def checkpoint_tensor_shapes(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor stored in a Hugging Face folder's safetensors files."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint {str(folder)!r} has no *.safetensors files")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def expected_weights(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The tensors a weight update of an engine built from ``folder`` takes: the checkpoint's decoder tensors
    (the multi-token-prediction layers past ``num_hidden_layers``, which vLLM's decoder skips, left out)."""
    num_layers = int(json.loads((Path(folder) / "config.json").read_text())["num_hidden_layers"])
    return {n: s for n, s in checkpoint_tensor_shapes(folder).items() if _is_decoder_tensor(n, num_layers)}


class WeightStream:
    """Checks (name, tensor) pairs against a checkpoint's tensors and yields them one whole layer at a time.

    vLLM processes a layer (packing, MLA absorption) once all of its tensors have arrived; a layer that gets only
    some of its tensors would be processed with the others left uninitialised. This stream holds back the tensors
    of one decoder layer until the layer is complete and raises before yielding an incomplete, unknown or
    misshaped one.

    Args:
        named_tensors: (Hugging Face name, tensor) pairs, the tensors of a decoder layer contiguous.
        expected: Name -> shape of every tensor the engine's checkpoint holds.
    """

    def __init__(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                 expected: dict[str, tuple[int, ...]]) -> None:
        self._source = iter(named_tensors)
        self._expected = expected
        self._groups: dict[str, set[str]] = {}
        for name in expected:
            self._groups.setdefault(layer_key(name), set()).add(name)
        self.loaded: list[str] = []

    def _check(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._expected:
            raise KeyError(f"update_weights: the engine's checkpoint has no tensor {name!r}")
        if tuple(tensor.shape) != self._expected[name]:
            raise ValueError(f"update_weights: {name!r} expects shape {self._expected[name]}, "
                             f"got {tuple(tensor.shape)}")

    def _complete(self, key: str, group: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        missing = sorted(self._groups[key] - {n for n, _ in group})
        if missing:
            raise ValueError(f"update_weights: {key} is incomplete (missing {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''}); each call must carry whole decoder layers, "
                             f"their tensors contiguous")
        return group

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        done: set[str] = set()
        key, group = None, []
        for name, tensor in self._source:
            self._check(name, tensor)
            k = layer_key(name)
            if k != key:
                if key is not None:
                    yield from self._complete(key, group)
                    done.add(key)
                if k in done:
                    raise ValueError(f"update_weights: tensors of {k} are not contiguous ({name!r} came after "
                                     f"another layer's tensors)")
                key, group = k, []
            group.append((name, tensor))
            self.loaded.append(name)
        if key is not None:
            yield from self._complete(key, group)


def _reload_in_worker(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Runs inside the vLLM worker: in-place reload, with the CPU fused-MoE experts re-packed.

    vLLM's unquantized MoE method re-runs the experts' own ``process_weights_after_loading`` (the CPU kernels'
    padding and packing) only while its ``moe_kernel`` is unset; on a weight update it copies the unpacked
    weights into the packed storage. Unsetting the kernel of those layers for the reload makes vLLM process
    them as on the first load; a layer the reload did not touch gets its old kernel back.

    If the weights stream raises (a bad tensor), the layers not yet loaded get their old tensors back, so the
    engine stays usable: layers before the bad one hold the new weights, the others the old ones.

    Returns:
        The number of MoE layers re-packed.
    """
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

    model, held = worker.get_model(), {}
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        kernel = getattr(method, "moe_kernel", None)
        if kernel is not None and isinstance(getattr(kernel, "fused_experts", None), CPUUnquantizedExperts):
            held[method] = kernel
            method.moe_kernel = None
    try:
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    except BaseException:
        with set_current_vllm_config(worker.vllm_config):
            finalize_layerwise_reload(model, worker.model_config)
        raise
    finally:
        for method, kernel in held.items():
            if method.moe_kernel is None:
                method.moe_kernel = kernel
    return len(held)


class VLLMEngine(RolloutEngine):
    """Samples with an in-process ``vllm.LLM``.

    Args:
        model_or_path: A Hugging Face checkpoint folder, or a model with ``save_pretrained(folder, tokenizer=)``
            (ours), which is written to a temporary folder kept for the engine's lifetime.
        tokenizer: A tokenizer object or folder, used to decode texts and for stop strings; by default the
            checkpoint's own tokenizer files, if any (without any, texts are empty and stop strings refused).
        **engine_kwargs: Passed to ``vllm.LLM`` (``dtype``, ``max_model_len``, ``gpu_memory_utilization``,
            ``enforce_eager``, ``seed``, ...), over the engine's defaults. ``sleep_level`` (1 or 2) picks what
            :meth:`sleep` frees on platforms with sleep mode. ``enable_return_routed_experts=True`` makes the
            engine return every sample's routing (``SamplingConfig.record_routing``; GPU only, see the module
            docstring).

    Raises:
        ValueError: for a model object without ``save_pretrained``, ``VLLM_ENABLE_V1_MULTIPROCESSING=1``
            (weights are streamed to an in-process worker), or ``enable_return_routed_experts`` on the CPU, with
            ``VLLM_USE_V2_MODEL_RUNNER=0`` or for a model without routed experts.
    """

    def __init__(self, model_or_path: Any, tokenizer: Any = None, **engine_kwargs: Any) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="grpo-vllm-")
        self.path = self._checkpoint_folder(model_or_path, tokenizer)
        self.tokenizer, vllm_tokenizer = self._tokenizers(tokenizer)
        self._expected = expected_weights(self.path)
        self._sleep_level = int(engine_kwargs.pop("sleep_level", 1))
        if self._sleep_level not in (1, 2):
            raise ValueError(f"sleep_level: expected 1 or 2, got {self._sleep_level!r}")
        self._llm = self._build(vllm_tokenizer, engine_kwargs)
        self._sleeping = False
        self.repacked_moe_layers = 0

    # -- construction -----------------------------------------------------------------------------------------
    def _checkpoint_folder(self, model_or_path: Any, tokenizer: Any) -> Path:
        if isinstance(model_or_path, (str, os.PathLike)):
            path = Path(model_or_path)
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"model_or_path: {str(path)!r} is not a checkpoint folder (no config.json)")
            return path
        if not callable(getattr(model_or_path, "save_pretrained", None)):
            raise ValueError(f"model_or_path: expected a checkpoint folder or a model with save_pretrained(), got "
                             f"{type(model_or_path).__name__}")
        path = Path(self._tmp.name) / "model"
        saved_tok = tokenizer if callable(getattr(tokenizer, "save_pretrained", None)) else None
        model_or_path.save_pretrained(path, tokenizer=saved_tok)
        return path

    def _tokenizers(self, tokenizer: Any) -> tuple[Any, str | None]:
        """Our decoding tokenizer (or None) and the tokenizer folder vLLM loads (or None: no tokenizer)."""
        if tokenizer is None:
            if not has_tokenizer(self.path):
                return None, None
            return AutoTokenizer.from_pretrained(str(self.path)), str(self.path)
        if isinstance(tokenizer, (str, os.PathLike)):
            return AutoTokenizer.from_pretrained(str(tokenizer)), str(tokenizer)
        if has_tokenizer(self.path):
            return tokenizer, str(self.path)
        folder = Path(self._tmp.name) / "tokenizer"
        tokenizer.save_pretrained(str(folder))
        return tokenizer, str(folder)

    def _build(self, vllm_tokenizer: str | None, engine_kwargs: dict[str, Any]) -> Any:
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise ValueError("VLLM_ENABLE_V1_MULTIPROCESSING must be 0 (or unset): the engine streams weights to "
                             "an in-process vLLM worker")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        from vllm.platforms import current_platform

        kwargs: dict[str, Any] = dict(
            model=str(self.path), tokenizer=vllm_tokenizer, skip_tokenizer_init=vllm_tokenizer is None,
            logprobs_mode="processed_logprobs", generation_config="vllm", seed=0, disable_log_stats=True,
        )
        self.sleep_available = bool(current_platform.is_sleep_mode_available())
        if self.sleep_available:
            kwargs["enable_sleep_mode"] = True
        if current_platform.is_cpu():
            kwargs["enforce_eager"] = True
        kwargs.update(engine_kwargs)
        if current_platform.is_cpu():
            kwargs["compilation_config"] = _without_cpu_rotary_kernel(kwargs.get("compilation_config"))
            if self._uses_mla() and _not_bf16(kwargs.get("dtype")) and not (
                    "attention_backend" in kwargs or "attention_config" in kwargs):
                kwargs["attention_backend"] = "CPU_MLA"  # AMX MLA packs bf16 weights only (see the docstring)
        self.records_routing = bool(kwargs.get("enable_return_routed_experts"))
        if self.records_routing:
            self._routing_layout = self._prepare_routing(current_platform)
        if kwargs["logprobs_mode"] != "processed_logprobs":
            raise ValueError(f"logprobs_mode: the engine needs 'processed_logprobs', got {kwargs['logprobs_mode']!r}")
        self.vllm_tokenizer = vllm_tokenizer
        return LLM(**kwargs)

    def _prepare_routing(self, platform: Any) -> tuple[list[int], int, int]:
        """Checks that this vLLM can return routed experts and asks for its V2 model runner; returns the layout
        :func:`rollout.vllm_routing.routing_from_vllm` converts (MoE layers, decoder layers, top-k)."""
        if platform.is_cpu():
            raise ValueError("enable_return_routed_experts: vLLM returns routed experts only from its V2 model "
                             "runner, which needs Triton on a GPU; on the CPU use the torch engine for router replay")
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "1").lower() in ("0", "false"):
            raise ValueError("enable_return_routed_experts needs vLLM's V2 model runner: unset "
                             "VLLM_USE_V2_MODEL_RUNNER=0")
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
        config = json.loads((self.path / "config.json").read_text())
        layers = moe_layer_indices(config)
        if not layers:
            raise ValueError(f"enable_return_routed_experts: {self.path} is not an MoE model (no routed experts)")
        return layers, int(config["num_hidden_layers"]), int(config["num_experts_per_tok"])

    @property
    def can_record_routing(self) -> bool:
        """Whether the engine was built with ``enable_return_routed_experts=True`` (see the module docstring)."""
        return self.records_routing

    def _uses_mla(self) -> bool:
        return "kv_lora_rank" in json.loads((self.path / "config.json").read_text())

    # -- generation -------------------------------------------------------------------------------------------
    def _stop_ids(self, sampling: SamplingConfig) -> list[int]:
        ids = set(sampling.stop_token_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            eos = json.loads((self.path / "config.json").read_text()).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
        return sorted(ids)

    def _check_request(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> None:
        if self._sleeping:
            raise RuntimeError("the engine is asleep: call wake_up() before generate()")
        if not prompt_token_ids or any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("every prompt must have at least one token")
        if sampling.stop and self.vllm_tokenizer is None:
            raise ValueError("SamplingConfig.stop (stop strings) needs an engine with a tokenizer")
        if sampling.record_routing and not self.records_routing:
            raise ValueError("SamplingConfig.record_routing: build the vLLM engine with "
                             "enable_return_routed_experts=True (vLLM's V2 model runner, on a GPU) to have it return "
                             "routed experts, or use the torch engine")
        if sampling.logprobs and not _vllm_logprobs_exact(sampling) and not _rescorable(sampling):
            raise ValueError(
                f"SamplingConfig: vLLM cannot return log-probs under softmax(logits / T) before top-k/top-p/"
                f"min_tokens filtering with temperature={sampling.temperature} and top_k={sampling.top_k}, "
                f"top_p={sampling.top_p}, min_tokens={sampling.min_tokens}; use temperature 1.0, no filter, or "
                f"logprobs=False")

    def _sampling_params(self, sampling: SamplingConfig, stop_ids: list[int]) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=1 if sampling.greedy else sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=max(sampling.top_k, 0), max_tokens=sampling.max_tokens, min_tokens=sampling.min_tokens,
            stop_token_ids=stop_ids,
            stop=list(sampling.stop) or None, include_stop_str_in_output=True, seed=sampling.seed,
            logprobs=0 if sampling.logprobs else None, detokenize=bool(sampling.stop), skip_special_tokens=False,
        )

    @torch.no_grad()
    def can_return_logprobs(self, sampling: SamplingConfig) -> bool:
        """vLLM's filtered log-probs are ours without a filter, or re-scored by a prefill at T = 1 (module
        docstring)."""
        return _vllm_logprobs_exact(sampling) or _rescorable(sampling)

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Rollout]:
        from vllm.inputs import TokensPrompt

        self._check_request(prompt_token_ids, sampling)
        stop_ids = self._stop_ids(sampling)
        copies = sampling.n if sampling.greedy else 1
        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompt_token_ids
                    for _ in range(copies)]
        outputs = self._llm.generate(requests, self._sampling_params(sampling, stop_ids), use_tqdm=False)
        rollouts = []
        for i, out in enumerate(outputs):
            for sample in sorted(out.outputs, key=lambda s: s.index):
                rollouts.append(self._rollout(i // copies, prompt_token_ids[i // copies], sample, sampling, stop_ids))
        if sampling.logprobs and not _vllm_logprobs_exact(sampling):
            self._rescore(rollouts)
        return rollouts

    def _rollout(self, index: int, prompt: Sequence[int], sample: Any, sampling: SamplingConfig,
                 stop_ids: list[int]) -> Rollout:
        ids = [int(t) for t in sample.token_ids]
        logprobs = []
        if sampling.logprobs:
            logprobs = [float(sample.logprobs[j][t].logprob) for j, t in enumerate(ids)]
        routing = (routing_from_vllm(getattr(sample, "routed_experts", None), len(prompt), len(ids),
                                     *self._routing_layout) if sampling.record_routing else None)
        return Rollout(prompt_ids=list(prompt), completion_ids=ids, logprobs=logprobs,
                       finish_reason="length" if sample.finish_reason == "length" else "stop",
                       text=decode_completion(self.tokenizer, ids, stop_ids), prompt_index=index, routing=routing)

    def _rescore(self, rollouts: list[Rollout]) -> None:
        """Replaces filtered (top-k/top-p/min_tokens) log-probs by the model's ``log_softmax(logits)``, in place."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=r.prompt_ids + r.completion_ids) for r in rollouts]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        for r, out in zip(rollouts, self._llm.generate(requests, params, use_tqdm=False)):
            start = len(r.prompt_ids)
            r.logprobs = [float(out.prompt_logprobs[start + j][t].logprob) for j, t in enumerate(r.completion_ids)]

    # -- weights and memory -----------------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads (HF name, tensor) pairs into the running engine, whole decoder layers at a time.

        Args:
            named_tensors: (Hugging Face name, tensor) pairs, e.g. ``model.named_hf_weights()``; any iterable
                (streamed: at most one decoder layer is held back at a time). Any dtype; vLLM casts.

        Raises:
            RuntimeError: while asleep.
            KeyError / ValueError: for an unknown name, a wrong shape, or an incomplete or split layer (checked
                before that layer reaches vLLM; the layers before it keep the new weights).
        """
        if self._sleeping:
            raise RuntimeError("the engine is asleep: call wake_up() before update_weights()")
        stream = WeightStream(named_tensors, self._expected)
        try:
            self.repacked_moe_layers = self._llm.collective_rpc(_reload_in_worker, args=(stream,))[0]
        finally:
            self._llm.reset_prefix_cache()
        logger.info("vLLM engine: loaded %d tensors (%d CPU MoE layers re-packed)", len(stream.loaded),
                    self.repacked_moe_layers)

    def accepted_weights(self) -> dict[str, tuple[int, ...]]:
        """The decoder tensors of the engine's checkpoint: what :meth:`update_weights` takes."""
        return dict(self._expected)

    def probe_logprobs(self, token_ids: Sequence[int]) -> list[float]:
        """vLLM's prompt log-probs (``log_softmax(logits)``) of ``token_ids[1:]``, for the stale-weight guard.

        vLLM fuses and re-packs weights as it loads them (``qkv_proj``, ``gate_up_proj``, the MoE experts, CPU
        GEMM layouts), so the tensors it holds are not the Hugging Face tensors it was sent and cannot be
        fingerprinted one by one; the trainer compares these log-probs with its own instead.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self._sleeping:
            raise RuntimeError("the engine is asleep: call wake_up() before probe_logprobs()")
        ids = [int(t) for t in token_ids]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        out = self._llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        return [float(out.prompt_logprobs[j][t].logprob) for j, t in enumerate(ids) if j > 0]

    @property
    def description(self) -> str:
        return f"VLLMEngine[{self.path}]"

    def sleep(self) -> None:
        """Frees the KV cache and offloads the weights (sleep level 1) where vLLM has sleep mode; else logs."""
        if self._sleeping:
            return
        if self.sleep_available:
            self._llm.sleep(level=self._sleep_level)
        else:
            logger.info("vLLM engine: sleep mode is not available on this platform (CPU); sleep() frees nothing")
        self._sleeping = True

    def wake_up(self) -> None:
        if not self._sleeping:
            return
        if self.sleep_available:
            self._llm.wake_up()
        else:
            logger.info("vLLM engine: sleep mode is not available on this platform (CPU); wake_up() restores nothing")
        self._sleeping = False

    @property
    def is_sleeping(self) -> bool:
        return self._sleeping


def _vllm_logprobs_exact(sampling: SamplingConfig) -> bool:
    """Whether vLLM's processed log-probs are ours: no filter changed the distribution they are taken from."""
    if sampling.greedy:
        return sampling.min_tokens == 0
    return sampling.top_k <= 0 and sampling.top_p >= 1.0 and sampling.min_tokens == 0


def _rescorable(sampling: SamplingConfig) -> bool:
    """Whether a prefill pass (log-probs at T = 1) gives our log-probs."""
    return sampling.greedy or sampling.temperature == 1.0


def _is_decoder_tensor(name: str, num_layers: int) -> bool:
    """False for the multi-token-prediction layers ``model.layers.{L+k}`` that vLLM's decoder skips."""
    match = _LAYER_RE.match(name)
    return match is None or int(match.group(1)) < num_layers


def _not_bf16(dtype: Any) -> bool:
    """Whether an engine ``dtype`` setting asks for something other than bfloat16 (``auto`` and None: the
    checkpoint's dtype, which is float32 for ours)."""
    return str(dtype).removeprefix("torch.") not in ("bfloat16", "bf16")


def _without_cpu_rotary_kernel(compilation_config: Any) -> Any:
    """``compilation_config`` with vLLM's CPU rotary kernel disabled (unless the caller set ``±rotary_embedding``)."""
    if compilation_config is None:
        return {"custom_ops": ["-rotary_embedding"]}
    if isinstance(compilation_config, dict):
        ops = list(compilation_config.get("custom_ops", []))
        if not any(op.endswith("rotary_embedding") for op in ops):
            ops.append("-rotary_embedding")
        return {**compilation_config, "custom_ops": ops}
    ops = list(getattr(compilation_config, "custom_ops", []))
    if not any(op.endswith("rotary_embedding") for op in ops):
        compilation_config.custom_ops = [*ops, "-rotary_embedding"]
    return compilation_config
