"""``DeepSeekConfig``: the shapes and routing knobs of a DeepSeek-V2/V3 model, validated up front.

Field names are those of transformers' ``DeepseekV2Config`` / ``DeepseekV3Config`` (and of DeepSeek's own
``config.json``), so a config converts to and from a Hugging Face ``config.json`` dict without renaming
(:meth:`DeepSeekConfig.to_hf_dict`, :meth:`DeepSeekConfig.from_hf_dict`).

A ``model_type`` fixes what transformers and vLLM build for it: ``deepseek_v2`` is softmax routing
(``greedy`` or ``group_limited_greedy``) with interleaved RoPE pairs; ``deepseek_v3`` is sigmoid routing with the
aux-loss-free ``noaux_tc`` selection (RoPE pairs interleaved or rotate-half). Combinations that neither would
build the same way are rejected.

Example:
    >>> cfg = DeepSeekConfig.from_preset("tiny", vocab_size=96)
    >>> cfg.kv_cache_elements_per_token() == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
HIDDEN_ACTS = ("silu", "gelu", "relu")
ROPE_TYPES = ("yarn",)
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


@dataclass(frozen=True)
class ModelTypeSpec:
    """What transformers / vLLM implement for one ``model_type``.

    Attributes:
        architecture: The ``architectures`` entry of ``config.json``.
        scoring_funcs: Allowed ``scoring_func`` values.
        topk_methods: Allowed ``topk_method`` values.
        rope_interleave: Allowed ``rope_interleave`` values.
        heads_divide_hidden: transformers checks ``hidden_size % num_attention_heads == 0`` for this type.
        hf_defaults: transformers' defaults for keys a ``config.json`` may omit.
    """

    architecture: str
    scoring_funcs: tuple[str, ...]
    topk_methods: tuple[str, ...]
    rope_interleave: tuple[bool, ...]
    heads_divide_hidden: bool
    hf_defaults: dict[str, Any]


MODEL_TYPES: dict[str, ModelTypeSpec] = {
    "deepseek_v2": ModelTypeSpec(
        architecture="DeepseekV2ForCausalLM",
        scoring_funcs=("softmax",),
        topk_methods=("greedy", "group_limited_greedy"),
        rope_interleave=(True,),
        heads_divide_hidden=True,
        hf_defaults=dict(
            first_k_dense_replace=0, n_shared_experts=2, routed_scaling_factor=1.0, norm_topk_prob=False,
            topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1, max_position_embeddings=2048,
            bos_token_id=1, eos_token_id=2, q_lora_rank=1536, num_nextn_predict_layers=0,
        ),
    ),
    "deepseek_v3": ModelTypeSpec(
        architecture="DeepseekV3ForCausalLM",
        scoring_funcs=("sigmoid",),
        topk_methods=("noaux_tc",),
        rope_interleave=(True, False),
        heads_divide_hidden=False,
        hf_defaults=dict(
            first_k_dense_replace=3, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            topk_method="noaux_tc", scoring_func="sigmoid", n_group=8, topk_group=4, num_experts_per_tok=8,
            max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, q_lora_rank=1536,
            num_nextn_predict_layers=1,
        ),
    ),
}
# Defaults shared by both model types for keys a config.json may omit.
_COMMON_HF_DEFAULTS: dict[str, Any] = dict(
    moe_layer_freq=1, rope_theta=10000.0, rope_interleave=True, rms_norm_eps=1e-6, hidden_act="silu",
    tie_word_embeddings=False, attention_bias=False, pad_token_id=None, initializer_range=0.02,
)
# Keys every config.json must carry (the shapes); anything else falls back to transformers' defaults.
_REQUIRED_HF_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_routed_experts",
)


@dataclass(frozen=True)
class DeepSeekConfig:
    """Shapes and routing of a DeepSeek-V2/V3 decoder (defaults: the ``tiny`` preset).

    Every invalid value or combination raises ``ValueError`` in ``__post_init__``, naming the field and what
    is allowed. The config is frozen; derive variants with :func:`dataclasses.replace` or
    :meth:`from_preset` overrides.
    """

    # vocabulary and width
    vocab_size: int = 128
    hidden_size: int = 128
    intermediate_size: int = 512  # dense FFN width (the first ``first_k_dense_replace`` layers)
    moe_intermediate_size: int = 192  # width of one routed / shared expert
    num_hidden_layers: int = 4
    # mla
    num_attention_heads: int = 4
    q_lora_rank: int | None = 96  # d_c' (query compression); None -> a plain ``q_proj``
    kv_lora_rank: int = 64  # d_c (the cached latent)
    qk_nope_head_dim: int = 32  # d_h of the compressed (position-free) part of q/k
    qk_rope_head_dim: int = 16  # d_h^R of the decoupled RoPE part (shared by all heads for k)
    v_head_dim: int = 32
    attention_bias: bool = False
    # moe
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2  # K, routed experts per token
    first_k_dense_replace: int = 1  # the first k layers use a dense FFN
    moe_layer_freq: int = 1  # layer i >= first_k_dense_replace is MoE when i % moe_layer_freq == 0
    n_group: int = 4  # expert groups (devices in DeepSeek-V2's device-limited routing)
    topk_group: int = 2  # M, groups a token may route to
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    # rope
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None, or {"type": "yarn", "factor": ..., ...}
    rope_interleave: bool = True
    max_position_embeddings: int = 2048
    # misc
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    initializer_range: float = 0.02
    model_type: str = "deepseek_v3"
    num_nextn_predict_layers: int = 0  # V3's multi-token-prediction depth: counted, never built
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # unknown config.json keys, kept

    def __post_init__(self) -> None:
        self._validate_sizes()
        self._validate_moe()
        self._validate_rope()
        self._validate_model_type()
        self._validate_tokens()

    # ------------------------------------------------------------------ validation
    def _validate_sizes(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim",
                     "v_head_dim", "max_position_embeddings"):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("qk_nope_head_dim", self.qk_nope_head_dim, minimum=0)
        if self.q_lora_rank is not None:
            _require_int("q_lora_rank", self.q_lora_rank, minimum=1)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim: expected an even number (RoPE rotates pairs), got "
                             f"{self.qk_rope_head_dim}")
        _require_int("num_nextn_predict_layers", self.num_nextn_predict_layers, minimum=0)
        for name in ("rms_norm_eps", "initializer_range", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
        _require_choice("hidden_act", self.hidden_act, HIDDEN_ACTS)

    def _validate_moe(self) -> None:
        _require_int("n_routed_experts", self.n_routed_experts, minimum=1)
        _require_int("n_shared_experts", self.n_shared_experts, minimum=0)
        _require_int("first_k_dense_replace", self.first_k_dense_replace, minimum=0)
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(f"first_k_dense_replace: expected at most num_hidden_layers "
                             f"({self.num_hidden_layers}), got {self.first_k_dense_replace}")
        _require_int("moe_layer_freq", self.moe_layer_freq, minimum=1)
        _require_int("n_group", self.n_group, minimum=1)
        _require_int("topk_group", self.topk_group, minimum=1)
        _require_int("num_experts_per_tok", self.num_experts_per_tok, minimum=1)
        _require_choice("topk_method", self.topk_method, TOPK_METHODS)
        _require_choice("scoring_func", self.scoring_func, SCORING_FUNCS)
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group "
                             f"({self.n_group})")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be at most n_group ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        reachable = self.n_routed_experts if self.topk_method == "greedy" else self.topk_group * per_group
        if self.num_experts_per_tok > reachable:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the {reachable} experts "
                             f"reachable with topk_method={self.topk_method!r} (topk_group={self.topk_group} "
                             f"groups of {per_group})")
        if self.topk_method == "noaux_tc" and per_group < 2:
            raise ValueError(f"topk_method 'noaux_tc' scores a group by its top-2 experts: n_routed_experts / "
                             f"n_group must be at least 2, got {per_group}")
        if not isinstance(self.routed_scaling_factor, (int, float)) or not self.routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor: expected a positive number, got "
                             f"{self.routed_scaling_factor!r}")

    def _validate_rope(self) -> None:
        if self.rope_scaling is None:
            return
        if not isinstance(self.rope_scaling, dict):
            raise ValueError(f"rope_scaling: expected None or a dict, got {type(self.rope_scaling).__name__}")
        scaling = dict(self.rope_scaling)
        rope_type = scaling.pop("type", None) or scaling.pop("rope_type", None)
        scaling.pop("rope_type", None)
        _require_choice("rope_scaling['type']", rope_type, ROPE_TYPES)
        unknown = sorted(set(scaling) - set(YARN_KEYS))
        if unknown:
            raise ValueError(f"rope_scaling: unknown keys {unknown}; allowed: type, {', '.join(YARN_KEYS)}")
        for key in ("factor", "original_max_position_embeddings"):
            if key not in scaling:
                raise ValueError(f"rope_scaling['{key}']: required for yarn")
        if not scaling["factor"] >= 1:
            raise ValueError(f"rope_scaling['factor']: expected >= 1, got {scaling['factor']!r}")
        _require_int("rope_scaling['original_max_position_embeddings']",
                     scaling["original_max_position_embeddings"], minimum=1)
        # one canonical form: DeepSeek's own config.json layout
        object.__setattr__(self, "rope_scaling", {"type": rope_type, **scaling})

    def _validate_model_type(self) -> None:
        _require_choice("model_type", self.model_type, tuple(MODEL_TYPES))
        spec = MODEL_TYPES[self.model_type]
        checks = (("scoring_func", self.scoring_func, spec.scoring_funcs),
                  ("topk_method", self.topk_method, spec.topk_methods),
                  ("rope_interleave", self.rope_interleave, spec.rope_interleave))
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not what model_type {self.model_type!r} implements in "
                                 f"transformers/vLLM; allowed: {', '.join(map(repr, allowed))}")
        if spec.heads_divide_hidden and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads}) for model_type {self.model_type!r} (transformers "
                             f"checks it)")

    def _validate_tokens(self) -> None:
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        for name, values in (("bos_token_id", [self.bos_token_id]), ("eos_token_id", eos),
                             ("pad_token_id", [self.pad_token_id])):
            for value in values:
                if value is None:
                    continue
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
                    raise ValueError(f"{name}: expected None or an id in [0, vocab_size={self.vocab_size}), "
                                     f"got {value!r}")

    # ------------------------------------------------------------------ derived quantities
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width ``d_h + d_h^R``."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` uses DeepSeekMoE (else a dense FFN), as vLLM and DeepSeek decide."""
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    def softmax_scale(self) -> float:
        """Attention scale ``1/sqrt(d_h + d_h^R)``, times YaRN's ``mscale(factor, mscale_all_dim)^2``."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_scaling is not None and self.rope_scaling.get("mscale_all_dim"):
            m = yarn_get_mscale(self.rope_scaling["factor"], self.rope_scaling["mscale_all_dim"])
            scale = scale * m * m
        return scale

    def kv_cache_elements_per_token(self) -> int:
        """Values cached per token over all layers: ``layers * (d_c + d_h^R)``."""
        return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim)

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of latent KV cache per token over all layers at ``dtype``."""
        return self.kv_cache_elements_per_token() * torch.empty((), dtype=dtype).element_size()

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DeepSeekConfig:
        """A named configuration, with ``overrides`` applied (e.g. ``vocab_size=len(tokenizer)``).

        Args:
            name: One of ``tiny`` (a CPU demo, a few M parameters), ``deepseek-v2-lite``, ``deepseek-v2``,
                ``deepseek-v3`` (the published shapes).
            **overrides: Field values replacing the preset's.

        Raises:
            ValueError: for an unknown preset or field, or an invalid resulting config.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown DeepSeekConfig fields {unknown}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> DeepSeekConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face config.json
    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict transformers (5.x) and vLLM both read.

        Carries ``architectures``, ``num_key_value_heads = num_attention_heads``, every routing field vLLM
        reads, the legacy ``rope_theta`` / ``rope_scaling`` keys (DeepSeek's and vLLM's layout) and
        ``rope_parameters`` (transformers 5's layout).
        """
        out: dict[str, Any] = {"architectures": [MODEL_TYPES[self.model_type].architecture]}
        for f in fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out.update(self.extra)
        out["num_key_value_heads"] = self.num_attention_heads
        out["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling is not None else None
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        if self.rope_scaling is not None:
            rope_parameters.update({k: v for k, v in self.rope_scaling.items() if k != "type"})
            rope_parameters["rope_type"] = self.rope_scaling["type"]
        out["rope_parameters"] = rope_parameters
        out["attention_dropout"] = 0.0
        out["use_cache"] = True
        return out

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> DeepSeekConfig:
        """Builds a config from a ``config.json`` dict written by us, by transformers or by DeepSeek.

        Missing routing keys take transformers' defaults for that ``model_type``; keys this toolkit does not
        use are kept in ``extra`` and written back by :meth:`to_hf_dict`.

        Raises:
            ValueError: for an unknown ``model_type``, a missing shape key, or an invalid config.
        """
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type: expected one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
        missing = [k for k in _REQUIRED_HF_KEYS if k not in d]
        if missing:
            raise ValueError(f"config.json lacks required keys {missing}")
        kwargs = {**_COMMON_HF_DEFAULTS, **MODEL_TYPES[model_type].hf_defaults}
        names = {f.name for f in fields(cls)} - {"extra", "rope_scaling", "rope_theta"}
        kwargs.update({k: v for k, v in d.items() if k in names})
        if "num_nextn_predict_layers" not in d and "num_mtp_layers" in d:
            kwargs["num_nextn_predict_layers"] = d["num_mtp_layers"]
        kwargs["rope_theta"], kwargs["rope_scaling"] = _rope_from_hf(d)
        for key in ("n_group", "topk_group"):  # transformers' V2 uses None for "no groups"
            if kwargs[key] is None:
                kwargs[key] = 1
        kwargs["extra"] = {k: v for k, v in d.items() if k not in _HF_MANAGED_KEYS and k not in _DROPPED_HF_KEYS}
        return cls(**kwargs)


# keys to_hf_dict writes itself (or transformers derives); everything else in a config.json is kept in extra
_HF_MANAGED_KEYS = frozenset(
    {f.name for f in fields(DeepSeekConfig)}
    | {"architectures", "num_key_value_heads", "rope_parameters", "attention_dropout", "use_cache", "dtype",
       "torch_dtype", "transformers_version", "head_dim", "qk_head_dim", "num_mtp_layers", "_name_or_path",
       "output_router_logits", "pretraining_tp", "mlp_bias"}
)


# keys that describe remote code or quantized weights, neither of which applies to what we load and save
_DROPPED_HF_KEYS = frozenset({"auto_map", "quantization_config"})


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from legacy keys (preferred, as transformers does) or ``rope_parameters``."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or params
    theta = d.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    rest = {k: v for k, v in scaling.items() if k not in ("rope_type", "type", "rope_theta")}
    if rest.get("partial_rotary_factor", 1.0) == 1.0:
        rest.pop("partial_rotary_factor", None)
    return theta, {"type": rope_type, **rest}


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(scale) + 1`` (1 when ``scale <= 1``)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _require_int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def _require_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


_YARN_V2 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
_YARN_V3 = {**_YARN_V2, "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, dict[str, Any]] = {
    # A CPU demo: V3-style (sigmoid, noaux_tc, groups), 1 dense + 3 MoE layers, ~2.6M parameters.
    "tiny": {},
    # https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json
    "deepseek-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        first_k_dense_replace=1, moe_layer_freq=1, n_group=1, topk_group=1, topk_method="greedy",
        scoring_func="softmax", routed_scaling_factor=1.0, norm_topk_prob=False, rope_theta=10000.0,
        rope_scaling=_YARN_V2, max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001,
        pad_token_id=None, initializer_range=0.006, model_type="deepseek_v2",
    ),
    # https://huggingface.co/deepseek-ai/DeepSeek-V2/blob/main/config.json
    "deepseek-v2": dict(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6,
        first_k_dense_replace=1, moe_layer_freq=1, n_group=8, topk_group=3, topk_method="group_limited_greedy",
        scoring_func="softmax", routed_scaling_factor=16.0, norm_topk_prob=False, rope_theta=10000.0,
        rope_scaling=_YARN_V2, max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001,
        pad_token_id=None, initializer_range=0.006, model_type="deepseek_v2",
    ),
    # https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json
    "deepseek-v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
        first_k_dense_replace=3, moe_layer_freq=1, n_group=8, topk_group=4, topk_method="noaux_tc",
        scoring_func="sigmoid", routed_scaling_factor=2.5, norm_topk_prob=True, rope_theta=10000.0,
        rope_scaling=_YARN_V3, max_position_embeddings=163840, bos_token_id=0, eos_token_id=1,
        pad_token_id=None, initializer_range=0.006, model_type="deepseek_v3", num_nextn_predict_layers=1,
    ),
}
