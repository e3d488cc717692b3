"""``grpo run hf_grpo`` end to end through the CLI (SFT, RL, eval) on the Hugging Face model shapes users bring."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers.cli import run_grpo
from tests.helpers.hf_models import llama_folder, qwen2_folder

ARITH = {"source": "builtin:arithmetic", "options": {"digits": 1, "max_ops": 1}}


def overrides(out: Path, model: Path) -> list[str]:
    rl_data = json.dumps({**ARITH, "n": 32, "seed": 1})
    return [
        f"model.path={model}", f"output_dir={out}", "name=hf", "checkpoint_every=2", "ray.num_cpus=2",
        "phases=[sft, rl_reason, eval]",
        f"sft.data=[{json.dumps({**ARITH, 'n': 48, 'schema': 'sft'})}]",
        "sft.train={lr: 3.0e-3, batch_size: 16, max_length: 64, progress: false, log_every: 1}",
        f"rl_reason.data={rl_data}", "rl_reason.steps=3", "rl_reason.eval_every=3",
        "rl_reason.rewards=[{name: accuracy, kwargs: {mode: lenient}}, "
        "{name: 'tests.helpers.hf_models:digit_share', weight: 0.5}]",
        "rl_reason.grpo={group_size: 4, prompts_per_step: 2, minibatch_size: 8, micro_batch_size: 4, lr: 1.0e-3, "
        "beta: 0.04, max_new_tokens: 12, weight_decay: 0.01}",
        f"eval.data={json.dumps({**ARITH, 'split': 'test', 'n': 8})}", "eval.max_new_tokens=12",
        "eval.checkpoints=[base, sft, rl_reason]", "eval.answer_mode=lenient",
    ]


def weights(folder: Path) -> dict:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("build", [llama_folder, qwen2_folder], ids=["llama-tied-chat", "qwen2-bias-plain-bf16"])
def test_hf_grpo_runs_sft_rl_and_eval_on_real_model_shapes(tmp_path, build):
    model = build(tmp_path / "model")
    run_grpo("run", "hf_grpo", *overrides(tmp_path / "runs", model))
    run = tmp_path / "runs" / "hf"
    base, sft, rl = (weights(run / "checkpoints" / p) for p in ("base", "sft", "rl_reason"))
    assert base.keys() == sft.keys() == rl.keys()
    changed = [n for n in rl if not (rl[n].float() - sft[n].float()).abs().max() == 0]
    assert len(changed) == len(rl), f"unchanged by RL: {sorted(set(rl) - set(changed))}"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["phase"] == "rl_reason"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:  # every sync was checked tensor by tensor: the engine held exactly the trainer's weights
        assert r["sync/checked_tensors"] == len(rl), r["step"]
        assert r["lr"] == pytest.approx(1e-3) and r["weight_decay"] == pytest.approx(0.01) and r["beta"] == 0.04
    assert "eval/accuracy" in steps[-1]
    report = json.loads((run / "report.json").read_text())
    assert list(report["phases"]) == ["base", "sft", "rl_reason"]
    assert report["settings"]["rl_reason.grpo.lr"] == "0.001"


@pytest.mark.slow
def test_a_corrupted_engine_weight_stops_the_run_naming_it(tmp_path):
    model = llama_folder(tmp_path / "model")
    args = [*overrides(tmp_path / "runs", model), "phases=[rl_reason]",
            "rl_reason.engine=tests.helpers.engines:CorruptingEngine"]
    proc = run_grpo("run", "hf_grpo", *args, expect=2)
    assert ("holds a different 'model.layers.1.mlp.down_proj.weight' than the trainer sent" in proc.stderr
            and "rollout worker 0" in proc.stderr), proc.stderr[-4000:]
    assert not (tmp_path / "runs" / "hf" / "checkpoints" / "rl_reason").exists()
