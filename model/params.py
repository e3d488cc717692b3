"""Parameter counts of a :class:`DeepSeekConfig`, by formula (no weights are allocated).

Convention (the one under which the published numbers come out: V2 236B/21B, V2-Lite 15.7B/2.4B,
V3 671B/37B):

- ``total`` counts every trainable parameter of the model we build: the input embedding, the output head (once
  when tied), every attention, norm, dense FFN, shared and routed expert and gate weight. Buffers are not
  parameters: V3's ``e_score_correction_bias`` is not counted. V3's multi-token-prediction (MTP) module is not
  built and is excluded by default, as the V3 paper's 671B excludes its 14B MTP module; ``include_mtp=True``
  adds ``num_nextn_predict_layers`` modules as the released checkpoint stores them (each with its own copy of the
  embedding and output head, an ``eh_proj`` of ``2D x D``, three RMSNorms and one MoE decoder layer).
- ``active`` counts the parameters one token touches in a forward pass: one embedding row (``D``), every
  attention and norm weight, the dense FFNs, and per MoE layer the gate, the shared experts and ``K`` routed
  experts, plus the output head.

Example:
    >>> from model.config import DeepSeekConfig
    >>> total, active = count_parameters(DeepSeekConfig.from_preset("deepseek-v3"))
    >>> round(total / 1e9), round(active / 1e9)
    (671, 37)
"""

from __future__ import annotations

from model.config import DeepSeekConfig


def attention_parameters(config: DeepSeekConfig) -> int:
    """Parameters of one MLA block (projections and the latent RMSNorms)."""
    c = config
    d, h = c.hidden_size, c.num_attention_heads
    bias = int(c.attention_bias)
    if c.q_lora_rank is None:
        q = d * h * c.qk_head_dim
    else:
        q = d * c.q_lora_rank + bias * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim
    kv_a = (d + bias) * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    kv_b = c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    o = h * c.v_head_dim * d + bias * d
    return q + kv_a + kv_b + o


def ffn_parameters(config: DeepSeekConfig, intermediate_size: int) -> int:
    """Parameters of one SwiGLU FFN (gate, up, down) of the given width."""
    return 3 * config.hidden_size * intermediate_size


def _moe_parts(config: DeepSeekConfig) -> tuple[int, int, int]:
    """(gate, shared experts, one routed expert) parameters of a MoE layer."""
    gate = config.n_routed_experts * config.hidden_size
    shared = ffn_parameters(config, config.moe_intermediate_size * config.n_shared_experts)
    return gate, shared, ffn_parameters(config, config.moe_intermediate_size)


def _layer_parameters(config: DeepSeekConfig, moe: bool) -> tuple[int, int]:
    """(total, active) parameters of one decoder layer."""
    base = attention_parameters(config) + 2 * config.hidden_size  # + input / post-attention norms
    if not moe:
        dense = ffn_parameters(config, config.intermediate_size)
        return base + dense, base + dense
    gate, shared, expert = _moe_parts(config)
    total = base + gate + shared + config.n_routed_experts * expert
    active = base + gate + shared + config.num_experts_per_tok * expert
    return total, active


def count_parameters(config: DeepSeekConfig, include_mtp: bool = False) -> tuple[int, int]:
    """``(total, active_per_token)`` parameters of ``config`` (see the module docstring for the convention).

    Args:
        config: The model shape.
        include_mtp: Add V3's multi-token-prediction modules to ``total`` (never to ``active``).

    Returns:
        ``(total, active)`` integer counts.
    """
    d, v = config.hidden_size, config.vocab_size
    head = 0 if config.tie_word_embeddings else v * d  # a tied head is the embedding matrix
    total = v * d + head + d  # embedding, head, final norm
    active = d + v * d + d  # one embedding row, the head's matmul, final norm
    for i in range(config.num_hidden_layers):
        layer_total, layer_active = _layer_parameters(config, config.is_moe_layer(i))
        total += layer_total
        active += layer_active
    if include_mtp:
        mtp_block = _layer_parameters(config, moe=True)[0]
        per_module = 2 * v * d + 3 * d + 2 * d * d + mtp_block
        total += config.num_nextn_predict_layers * per_module
    return total, active
