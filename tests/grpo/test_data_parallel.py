"""Two sharded trainer ranks (FSDP2 over gloo) compute the update one unsharded rank computes on the same batch."""

import contextlib
import math

import pytest
import torch
from safetensors.torch import load_file

from model.distributed import SINGLE, DataParallel
from tests.helpers.data_parallel import GRPO_CASES, resume_from, run_cases, spawn_ranks


def test_share_pads_with_fillers_so_every_rank_runs_alike():
    assert DataParallel(0, 2).share(3) == [0, 2]
    assert DataParallel(1, 2).share(3) == [1, None]
    assert DataParallel(2, 3).share(7) == [2, 5, None]
    assert SINGLE.share(3) == [0, 1, 2]
    assert DataParallel(1, 2).grad_scale == 2.0
    with pytest.raises(ValueError, match="rank must be in 0 .. world_size - 1 = 1"):
        DataParallel(2, 2)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("dp")


@pytest.fixture(scope="module")
def runs(root):
    with one_thread():
        one = run_cases(SINGLE, root)
    return one, spawn_ranks(2, root)


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: CPU matmuls may round differently with other thread counts
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _same_run(got, want):
    for a, b in zip(want["losses"], got["losses"]):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7)
    assert got["state"].keys() == want["state"].keys()
    for name, value in want["state"].items():
        torch.testing.assert_close(got["state"][name], value, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_a_checkpoint_of_two_ranks_is_sharded_and_resumes_on_one(runs, root):
    files = sorted(p.name for p in (root / "sft2" / "step_000001" / "shards").glob("*.distcp"))
    assert files == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shards
    with one_thread():
        resumed = resume_from(SINGLE, root / "sft2")
    assert resumed["step"] == 1
    _same_run(resumed, runs[1]["saved"])


def test_a_checkpoint_of_one_rank_resumes_on_two(runs):
    assert runs[1]["resumed_from_one"]["step"] == 1
    _same_run(runs[1]["resumed_from_one"], runs[0]["saved"])


def test_each_rank_offloads_its_own_shards_bit_exactly(runs):
    out = runs[1]["offload"]
    for mode, (moved, left) in out["released"].items():
        assert moved > 0 and left == 0, mode  # every shard's memory was released while offloaded
    assert out["shared_storages"] > 0  # shards that are views of one storage come back, each with its values
    assert out["bit_exact"]
    assert out["loss_after"] > 0


@pytest.mark.parametrize("case", [*GRPO_CASES, "sft"])
def test_two_sharded_ranks_train_like_one(runs, case):
    one, two = runs[0][case], runs[1][case]
    assert len(one["losses"]) == len(two["losses"]) == 3
    for a, b in zip(one["losses"], two["losses"]):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7)
    for a, b in zip(one["grad_norms"], two["grad_norms"]):
        assert b == pytest.approx(a, rel=1e-4)
    assert one["state"].keys() == two["state"].keys()
    for name, want in one["state"].items():
        torch.testing.assert_close(two["state"][name], want, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    params = [n for n, t in one["initial"].items() if t.is_floating_point()]
    moved = [n for n in params if not torch.equal(one["initial"][n], one["state"][n])]
    assert len(moved) >= len(params) // 2, f"only {moved} changed"


@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_a_sharded_policy_syncs_the_engine_whole(runs, case):
    one, two = runs[0][case], runs[1][case]
    assert two["sync_bytes"] == one["sync_bytes"] > 0  # every tensor sent once, gathered whole
    engine, trainer = two["engine"], two["state"]
    assert len([n for n in engine if n not in trainer]) <= 1  # a tied head, listed once by the trainer
    for name in engine:
        if name in trainer:
            assert torch.equal(engine[name], trainer[name]), name  # the engine holds exactly the trainer's


def test_float32_master_weights_with_bfloat16_compute(runs):
    mixed, initial = runs[1]["mixed precision"], runs[1]["moe token-mean balance loss"]["initial"]
    assert mixed["master_dtypes"] == {torch.float32}
    assert all(math.isfinite(loss) for loss in mixed["losses"])
    assert any(not torch.equal(mixed["state"][n], initial[n]) for n in initial if initial[n].is_floating_point())
    engine = mixed["engine"]  # (every step's sync was checked against bfloat16 fingerprints of the masters)
    for name, value in mixed["state"].items():
        if name in engine and value.is_floating_point() and engine[name].dtype == torch.bfloat16:
            assert torch.equal(engine[name], value.to(torch.bfloat16)), name  # the engine holds the masters, cast


def test_two_ranks_train_the_reward_model_one_rank_trains(runs, root):
    one, two = runs[0]["reward model"], runs[1]["reward model"]
    assert len(one["losses"]) == len(two["losses"]) == 6  # 2 epochs of 3 batches
    for a, b in zip(one["losses"], two["losses"]):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7)
    assert one["accuracy"] == two["accuracy"]
    saved = [load_file(str(root / f"rm{n}" / "model.safetensors")) for n in (1, 2)]
    assert saved[0].keys() == saved[1].keys() and "score.weight" in saved[0]
    # rank 0 gathered the shards into a whole checkpoint; the weights moved ~5e-2 in 6 Adam steps at lr 1e-2, and
    # Adam's first steps turn rounding-level differences of near-zero gradients into up to ~1e-3 of a step
    for name, want in saved[0].items():
        torch.testing.assert_close(saved[1][name], want, rtol=1e-4, atol=1e-4, msg=name)
    initial = load_file(str(root / "rm_init" / "model.safetensors"))
    assert any(not torch.equal(saved[1][n], initial[n]) for n in saved[1] if n in initial)


def test_the_moe_case_uses_the_balance_loss_and_moves_the_router_bias(runs):
    one = runs[0]["moe token-mean balance loss"]
    assert all(a > 0 for a in one["aux"])
    bias = [t for n, t in one["state"].items() if n.endswith("e_score_correction_bias")]
    assert bias and any(bool(b.abs().sum() > 0) for b in bias)


def test_a_sharded_policy_without_a_reference_is_refused(runs):
    assert runs[0]["no_reference_error"] == ""  # one unsharded rank copies its policy
    assert "a sharded policy cannot be copied" in runs[1]["no_reference_error"]
