"""The memory planner (``grpo plan``): what each role of a recipe holds on its device, before anything runs.

Everything is computed from the model's config (its parameters counted on the meta device: no memory, no
weights) and the recipe's batch shapes:

* **trainer rank** (one of ``ray.num_train_workers``, the policy sharded over them with FSDP2): its shards of the
  master weights, the gradients and AdamW's two moments (``P * bytes(master dtype) / N`` each, the moments
  twice); with N > 1 the whole blocks FSDP gathers for compute (the current and the prefetched decoder block and
  the root's embeddings and LM head, in the compute dtype, plus one block's gradient before its reduce-scatter);
  the weight-sync bucket (a decoder layer at least); the activations of one micro-batch kept for backward, with
  and without gradient checkpointing; the logits (SFT computes all of them; the GRPO log-probs go through the
  LM head in chunks of ``logprob_chunk_size`` tokens). The phase with the largest activations sets the peak.
* **rollout worker**: the weights in the run's dtype, the KV cache of its share of a step's sequences (prompt
  plus ``max_new_tokens`` each; for our MLA model only the latent ``d_c + d_h^R`` values per token per layer)
  and the sampling logits.
* **reference worker**: the weights in the run's dtype and a chunk of logits.

Activations per token and decoder layer are the tensors autograd saves, counted from the model's code (the
MLA projections and their norms, q/k/v at one width for SDPA, the router's scores, ``k`` routed experts'
inputs and intermediates, the shared experts); the tests compare the plan with a real step's peak. Counts are
estimates: allocator fragmentation and framework buffers (CUDA context, NCCL, vLLM's own reservation through
``gpu_memory_utilization``) come on top, so the fit check keeps :data:`HEADROOM` of each device free.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grpo.orchestration.recipe import Recipe
from grpo.phases import RL_PHASES, SFT
from model import DeepSeekConfig, DeepSeekForCausalLM, build_tokenizer
from model.distributed import decoder_blocks
from rollout.loading import is_ours, meta_causal_lm

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADROOM = 0.1
"""Share of each device the fit check leaves free (allocator fragmentation, CUDA context, communication)."""
SYNC_BUCKET_BYTES = 64 << 20
"""The weight sync's bucket size (:meth:`grpo.trainer.GRPOTrainer.sync_weights`)."""


# ------------------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from a model's config.

    Attributes:
        name: The preset or folder.
        params: Parameters, each shared tensor once.
        block_params: Parameters of the largest decoder block (what FSDP gathers at a time).
        root_params: Parameters outside the decoder blocks (embeddings, final norm, LM head).
        hidden: Hidden size.
        vocab: Vocabulary size.
        layer_activations: Per decoder layer, the elements autograd saves per token.
        kv_per_token: KV-cache elements per token, all layers together.
    """

    name: str
    params: int
    block_params: int
    root_params: int
    hidden: int
    vocab: int
    layer_activations: tuple[int, ...]
    kv_per_token: int

    @property
    def head_activations(self) -> int:
        """Elements saved per token outside the decoder layers (the final norm and the LM head's input)."""
        return 3 * self.hidden + 1


def _count(model: nn.Module) -> tuple[int, int, int]:
    """(all, largest block, outside the blocks) parameter counts of a (meta-device) model."""
    total = sum(p.numel() for p in model.parameters())  # parameters() lists a shared tensor once
    blocks = [sum(p.numel() for p in b.parameters()) for b in decoder_blocks(model)]
    return total, max(blocks), total - sum(blocks)


def _deepseek_layers(cfg: DeepSeekConfig) -> tuple[list[int], int]:
    """Saved elements per token of each decoder layer of our model, and the MLA cache's per token."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    dn, dr, dv, dc = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    norms = 2 * (2 * h + 1)
    query = h + 3 * cfg.q_lora_rank + 1 if cfg.q_lora_rank else h  # q_a's input, its norm, q_b's input
    latent = (2 * dc + dr + 1) + dc  # the kv_a norm (and k's rope part), then kv_b's input
    # q, k and v at one width for SDPA and its output; o_proj's input; the rotary intermediates
    attention = query + latent + 4 * heads * (dn + dr) + heads * dv + heads * dr // 2
    layers = []
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(i):
            routed = cfg.num_experts_per_tok * (2 * h + 5 * cfg.moe_intermediate_size)
            shared = 4 * cfg.n_shared_experts * cfg.moe_intermediate_size
            mlp = h + 4 * cfg.n_routed_experts + routed + shared
        else:
            mlp = h + 4 * cfg.intermediate_size
        layers.append(norms + attention + mlp)
    return layers, cfg.num_hidden_layers * (dc + dr)


def _generic_layers(cfg: Any) -> tuple[list[int], int]:
    """The same for a transformers decoder with (grouped-query) attention and a gated MLP (Llama, Qwen2, ...)."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or h // heads
    norms = 2 * (2 * h + 1)
    # q/k/v projections' input; q and k before and after rotary; v; k and v repeated to every head; the
    # attention's output and o_proj's input
    attention = h + 2 * (heads + kv_heads) * d + kv_heads * d + 2 * heads * d + 2 * heads * d
    mlp = h + 4 * cfg.intermediate_size
    return [norms + attention + mlp] * cfg.num_hidden_layers, cfg.num_hidden_layers * 2 * kv_heads * d


def model_shape(recipe: Recipe) -> ModelShape:
    """The recipe's policy as a :class:`ModelShape` (a preset, or a checkpoint folder's config).

    Raises:
        FileNotFoundError: when ``model.path`` has no ``config.json``.
    """
    cfg = recipe.model
    if cfg.path is None:
        config = DeepSeekConfig.from_preset(cfg.preset, **{"vocab_size": _preset_vocab(cfg), **cfg.overrides})
        with torch.device("meta"):
            model: nn.Module = DeepSeekForCausalLM(config)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        layers, kv = _deepseek_layers(config)
        name, hidden, vocab = f"preset {cfg.preset}", config.hidden_size, config.vocab_size
    else:
        if not (Path(cfg.path) / "config.json").is_file():
            raise FileNotFoundError(f"model.path {cfg.path}: no config.json to plan from (plan a preset with "
                                    f"model.path=null model.preset=NAME)")
        model = meta_causal_lm(cfg.path)
        config = model.config
        layers, kv = _deepseek_layers(config) if is_ours(cfg.path) else _generic_layers(config)
        name, hidden, vocab = cfg.path, config.hidden_size, config.vocab_size
    params, block, root = _count(model)
    return ModelShape(name, params, block, root, hidden, vocab, tuple(layers), kv)


def _preset_vocab(cfg: Any) -> int:
    """A preset's vocabulary: the tiny recipe's embedded tokenizer's size, else the preset's own."""
    if cfg.preset == "tiny" and cfg.tokenizer is None:
        return len(build_tokenizer())
    return DeepSeekConfig.from_preset(cfg.preset).vocab_size


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class RolePlan:
    """The bytes one worker of a role holds at its peak, by kind.

    Attributes:
        role: ``trainer rank``, ``rollout worker (torch, rl_reason)``, ...
        count: How many such workers the recipe starts.
        gpus: GPUs each reserves (0 on CPU).
        lines: Kind -> bytes, in the order shown; the total adds them all except ``notes``' kinds.
        alternatives: Kind -> bytes shown but not counted (activations without gradient checkpointing when
            checkpointing is on, and the reverse).
        notes: What set the numbers (e.g. which phase's micro-batch).
    """

    role: str
    count: int
    gpus: float
    lines: dict[str, int] = field(default_factory=dict)
    alternatives: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.lines.values())


@dataclass
class Plan:
    """Every role's :class:`RolePlan` for a recipe."""

    model: ModelShape
    roles: list[RolePlan]
    assumptions: list[str]

    @property
    def devices(self) -> int:
        """GPUs the recipe reserves at once (the trainer ranks, then each RL stage's workers, the larger)."""
        return math.ceil(sum(r.gpus * r.count for r in self.roles if r.role.startswith("trainer")) +
                         max([sum(r.gpus * r.count for r in self.roles if phase in r.role)
                              for phase in RL_PHASES] or [0]))

    def fits(self, device_memory: int) -> bool:
        """Whether every role's total fits in ``device_memory`` bytes less :data:`HEADROOM`."""
        return all(r.total <= device_memory * (1 - HEADROOM) for r in self.roles)

    def format(self, device_memory: int | None = None) -> str:
        """The plan as a text table per role (GiB), with the fit verdict when ``device_memory`` is given."""
        lines = [f"model: {self.model.name}: {self.model.params / 1e9:.3f}B parameters "
                 f"(largest decoder block {self.model.block_params / 1e6:.1f}M, embeddings and head "
                 f"{self.model.root_params / 1e6:.1f}M)", *(f"  {a}" for a in self.assumptions), ""]
        for role in self.roles:
            lines.append(f"{role.role} (x{role.count}{f', {role.gpus:g} GPU each' if role.gpus else ''})")
            for kind, value in role.lines.items():
                lines.append(f"  {kind:<52} {_gib(value):>11}")
            for kind, value in role.alternatives.items():
                lines.append(f"  {'(' + kind + ', not counted)':<52} {_gib(value):>11}")
            lines.append(f"  {'total':<52} {_gib(role.total):>11}")
            lines.extend(f"  note: {n}" for n in role.notes)
            lines.append("")
        if device_memory is not None:
            usable = device_memory * (1 - HEADROOM)
            verdict = "fits" if self.fits(device_memory) else "does NOT fit"
            lines.append(f"devices: {self.devices} GPU(s) reserved at once; {verdict} in {_gib(device_memory)} "
                         f"per device ({_gib(usable)} usable, {HEADROOM:.0%} kept free)")
            for role in self.roles:
                if role.total > usable:
                    lines.append(f"  {role.role} needs {_gib(role.total)}: over by {_gib(role.total - usable)}")
        return "\n".join(lines).rstrip() + "\n"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def parse_bytes(text: str) -> int:
    """``80GiB``, ``80GB``, ``512MiB``, ``1.5TiB`` or a plain number of bytes.

    Raises:
        ValueError: naming the text and the accepted forms.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"device memory {text!r}: expected a size like 80GiB, 80GB, 512MiB or a byte count")
    value, unit = float(match[1]), (match[2] or "").upper()
    scale = {"": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(value * scale)


def plan(recipe: Recipe, prompt_tokens: int = 512) -> Plan:
    """The memory plan of ``recipe`` (see the module docstring).

    Args:
        recipe: A validated recipe.
        prompt_tokens: Tokens per prompt assumed for the RL stages' sequences (prompts vary; take the longest
            the data allows).
    """
    shape = model_shape(recipe)
    cfg = recipe.model
    mixed = recipe.ray.num_train_workers > 1 and (cfg.master_dtype or cfg.dtype) != cfg.dtype
    assumptions = [
        f"trainer: {recipe.ray.num_train_workers} rank(s), master weights, gradients and AdamW moments in "
        f"{cfg.master_dtype or cfg.dtype}, compute in {cfg.dtype if mixed else cfg.master_dtype or cfg.dtype}; "
        f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}",
        f"RL sequences: {prompt_tokens} prompt tokens (--prompt-tokens) + each stage's max_new_tokens",
    ]
    return Plan(shape, [_trainer(recipe, shape, prompt_tokens), *_workers(recipe, shape, prompt_tokens)],
                assumptions)


def _on_gpu(recipe: Recipe) -> bool:
    device = recipe.model.device
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def _trainer(recipe: Recipe, shape: ModelShape, prompt_tokens: int) -> RolePlan:
    """One trainer rank's plan."""
    cfg, n = recipe.model, recipe.ray.num_train_workers
    master = DTYPE_BYTES[cfg.master_dtype or cfg.dtype]
    compute = DTYPE_BYTES[cfg.dtype] if n > 1 and (cfg.master_dtype or cfg.dtype) != cfg.dtype else master
    trainer = RolePlan("trainer rank", n, recipe.ray.train_gpus if _on_gpu(recipe) else 0)
    trainer.lines["weights (shard)"] = shape.params * master // n
    trainer.lines["gradients (shard)"] = shape.params * master // n
    trainer.lines["AdamW moments (shard)"] = 2 * shape.params * master // n
    if n > 1:
        trainer.lines["gathered blocks (2 blocks, root, 1 block grad)"] = (
            (2 * shape.block_params + shape.root_params) * compute + shape.block_params * 4)
    if any(phase in recipe.phases for phase in RL_PHASES):  # a bucket holds one decoder layer at least
        trainer.lines["weight-sync bucket"] = max(SYNC_BUCKET_BYTES, shape.block_params * master)
    micro = _micro_batches(recipe, prompt_tokens, shape.vocab)
    if not micro:
        return trainer
    full = {phase: tokens * (sum(shape.layer_activations) + shape.head_activations) * compute
            for phase, (tokens, _) in micro.items()}
    checkpointed = {phase: tokens * (shape.hidden * len(shape.layer_activations) +
                                     max(shape.layer_activations) + shape.head_activations) * compute
                    for phase, (tokens, _) in micro.items()}
    chosen, other = (checkpointed, full) if cfg.gradient_checkpointing else (full, checkpointed)
    peak = max(micro, key=lambda p: chosen[p] + micro[p][1])
    trainer.lines["activations of one micro-batch" + (" (checkpointed)" if cfg.gradient_checkpointing else "")] = (
        chosen[peak])
    trainer.lines["logits"] = micro[peak][1]
    trainer.alternatives["activations " + ("without" if cfg.gradient_checkpointing else "with") +
                         " checkpointing"] = other[peak]
    trainer.notes.append(f"the peak is {peak}'s micro-batch: {micro[peak][0]} tokens")
    return trainer


def _workers(recipe: Recipe, shape: ModelShape, prompt_tokens: int) -> list[RolePlan]:
    """Each RL stage's rollout worker and reference worker plans."""
    ray_cfg, gpu, weights = recipe.ray, _on_gpu(recipe), DTYPE_BYTES[recipe.model.dtype]
    roles = []
    for phase in RL_PHASES:
        if phase not in recipe.phases:
            continue
        stage = getattr(recipe, phase)
        g = stage.grpo
        seqs = math.ceil(g.prompts_per_step * g.group_size / ray_cfg.num_rollout_workers)
        length = prompt_tokens + g.max_new_tokens
        rollout = RolePlan(f"rollout worker ({stage.engine}, {phase})", ray_cfg.num_rollout_workers,
                           ray_cfg.rollout_gpus if gpu else 0)
        rollout.lines["weights"] = shape.params * weights
        rollout.lines[f"KV cache ({seqs} sequences x {length} tokens)"] = seqs * length * shape.kv_per_token * weights
        rollout.lines["sampling logits"] = seqs * shape.vocab * 4
        if stage.engine == "vllm":
            rollout.notes.append("vLLM reserves gpu_memory_utilization of its device whatever this needs")
        roles.append(rollout)
        if g.beta > 0:
            reference = RolePlan(f"reference worker ({phase})", 1, ray_cfg.reference_gpus if gpu else 0)
            reference.lines["weights"] = shape.params * weights
            reference.lines["activations and logits (no grad)"] = (
                g.micro_batch_size * length * (4 * shape.hidden) * weights
                + min(g.logprob_chunk_size, g.micro_batch_size * length) * shape.vocab * 4 * 2)
            roles.append(reference)
    return roles


def _micro_batches(recipe: Recipe, prompt_tokens: int, vocab: int) -> dict[str, tuple[int, int]]:
    """Phase -> (tokens per micro-batch, bytes of its logits) for the phases that train the policy."""
    out: dict[str, tuple[int, int]] = {}
    if SFT in recipe.phases:
        train = recipe.sft.train
        tokens = train.batch_size * train.max_length
        out[SFT] = (tokens, tokens * vocab * (4 + 4 + DTYPE_BYTES[recipe.model.dtype]))  # logits, fp32, CE
    for phase in RL_PHASES:
        if phase in recipe.phases:
            g = getattr(recipe, phase).grpo
            tokens = g.micro_batch_size * (prompt_tokens + g.max_new_tokens)
            out[phase] = (tokens, min(g.logprob_chunk_size, tokens) * vocab * 4 * 3)  # a chunk's logits
    return out
