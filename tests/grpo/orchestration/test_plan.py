"""The memory planner: parameter, gradient and optimizer bytes by hand for two presets, the tiny model's plan
against a real step's peak, the V2-Lite recipe on 8 x 80 GB, the command and the run-time check."""

import pytest
import torch

from grpo.orchestration.cli import main
from grpo.orchestration.plan import HEADROOM, model_shape, parse_bytes, plan
from grpo.orchestration.recipe import load_recipe
from model import DeepSeekConfig, DeepSeekForCausalLM, build_tokenizer
from sft.formatting import TokenizedExample
from sft.packing import pad_batch
from sft.trainer import batch_losses
from tests.helpers.memory import peak_allocated

V2_LITE = ["model.path=null", "model.preset=deepseek-v2-lite"]


def hand_count(c: DeepSeekConfig) -> int:
    """Our model's parameters, counted from the paper's shapes (MLA, DeepSeekMoE), not from the module."""
    h, heads, qk = c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    if c.q_lora_rank:
        query = h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * heads * qk  # W^DQ, its norm, W^UQ/W^QR
    else:
        query = h * heads * qk
    kv = h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank  # W^DKV and W^KR, the latent's norm
    kv += c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim)  # W^UK, W^UV
    attention = query + kv + heads * c.v_head_dim * h  # W^O
    dense = 3 * h * c.intermediate_size
    moe = (c.n_routed_experts * h  # the router's centroids
           + (c.n_routed_experts + c.n_shared_experts) * 3 * h * c.moe_intermediate_size)
    layers = sum(attention + 2 * h + (moe if c.is_moe_layer(i) else dense) for i in range(c.num_hidden_layers))
    return c.vocab_size * h * (1 if c.tie_word_embeddings else 2) + layers + h  # embeddings, head, final norm


@pytest.mark.parametrize("overrides, ranks, master, params", [
    ([], 1, 4, hand_count(DeepSeekConfig.from_preset("tiny", vocab_size=len(build_tokenizer())))),
    ([*V2_LITE, "model.dtype=bfloat16", "model.master_dtype=float32"], 4, 4,
     hand_count(DeepSeekConfig.from_preset("deepseek-v2-lite"))),
    ([*V2_LITE, "model.dtype=bfloat16", "model.master_dtype=null"], 8, 2,
     hand_count(DeepSeekConfig.from_preset("deepseek-v2-lite"))),
])
def test_weights_gradients_and_moments_are_the_hand_computed_bytes(overrides, ranks, master, params):
    recipe = load_recipe("deepseek_v2_lite" if overrides else "tiny",
                         [*overrides, f"ray.num_train_workers={ranks}"])
    assert model_shape(recipe).params == params
    trainer = plan(recipe).roles[0]
    assert trainer.lines["weights (shard)"] == params * master // ranks
    assert trainer.lines["gradients (shard)"] == params * master // ranks
    assert trainer.lines["AdamW moments (shard)"] == 2 * params * master // ranks


def test_v2_lite_has_the_published_size_and_its_recipe_fits_eight_80gb_devices():
    assert hand_count(DeepSeekConfig.from_preset("deepseek-v2-lite")) == pytest.approx(15.7e9, rel=0.005)
    result = plan(load_recipe("deepseek_v2_lite", V2_LITE))
    assert result.devices == 8
    assert result.fits(parse_bytes("80GiB"))
    assert not result.fits(parse_bytes("40GiB"))
    one_rank = plan(load_recipe("deepseek_v2_lite", [*V2_LITE, "ray.num_train_workers=1"]))
    assert one_rank.roles[0].total > 200 * 2**30  # ~16 bytes a parameter on one device: the reason for N ranks


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_tiny_plan_is_within_30_percent_of_a_real_steps_peak(checkpointing):
    B, T = 8, 64
    recipe = load_recipe("tiny", ["phases=[sft]", f"sft.train.batch_size={B}", f"sft.train.max_length={T}",
                                  f"model.gradient_checkpointing={str(checkpointing).lower()}"])
    planned = plan(recipe).roles[0].total

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(DeepSeekConfig.from_preset("tiny", vocab_size=len(tokenizer))).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, len(tokenizer), (B, T), generator=torch.Generator().manual_seed(0)).tolist()
    batch = pad_batch([TokenizedExample(row, row) for row in ids], tokenizer.pad_token_id)

    def step() -> None:  # the SFT trainer's micro-batch: full logits, float32 cross-entropy, AdamW
        nll, aux = batch_losses(model, batch)
        (nll / batch.n_targets + 0.01 * aux).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's moments exist from here on
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    held += sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values())
    measured = held + peak_allocated(step)
    assert planned == pytest.approx(measured, rel=0.3), (planned / 2**20, measured / 2**20)


def test_grpo_plan_prints_the_plan_and_fails_when_a_role_does_not_fit(capsys):
    assert main(["plan", "tiny", "--device-memory", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "trainer rank (x1)" in out and "rollout worker (torch, rl_reason)" in out and "fits in 8.00 GiB" in out
    assert main(["plan", "tiny", "--device-memory", "100MiB"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["plan", "tiny", "--device-memory", "lots"]) == 2
    assert "expected a size like 80GiB" in capsys.readouterr().err


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1.5 TiB") == int(1.5 * 2**40)
    assert parse_bytes("4096") == 4096


def test_a_gpu_run_that_does_not_fit_stops_before_its_first_phase_with_the_plan(tmp_path, monkeypatch):
    from grpo.orchestration.controller import Pipeline

    class Device:
        total_memory = 64 * 2**20

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Device())
    recipe = load_recipe("tiny", [f"output_dir={tmp_path}", "model.device=cuda"])
    with pytest.raises(MemoryError, match=r"(?s)does not fit.*trainer rank.*check_memory=false"):
        Pipeline(recipe).check_memory()
    Pipeline(load_recipe("tiny", [f"output_dir={tmp_path}", "name=b", "model.device=cuda",
                                  "check_memory=false"])).check_memory()
    assert 0 < HEADROOM < 0.5
