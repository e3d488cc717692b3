"""The DeepSeek-V2/V3-style policy model: MLA attention, DeepSeekMoE, latent KV cache, HF checkpoint I/O."""
