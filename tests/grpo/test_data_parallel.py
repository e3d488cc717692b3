"""Two sharded trainer ranks (FSDP2 over gloo) compute the update one unsharded rank computes on the same batch."""

import pytest
import torch

from model.distributed import SINGLE, DataParallel
from tests.helpers.data_parallel import GRPO_CASES, run_cases, spawn_ranks


def test_share_pads_with_fillers_so_every_rank_runs_alike():
    assert DataParallel(0, 2).share(3) == [0, 2]
    assert DataParallel(1, 2).share(3) == [1, None]
    assert DataParallel(2, 3).share(7) == [2, 5, None]
    assert SINGLE.share(3) == [0, 1, 2]
    assert DataParallel(1, 2).grad_scale == 2.0
    with pytest.raises(ValueError, match="rank must be in 0 .. world_size - 1 = 1"):
        DataParallel(2, 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: CPU matmuls may round differently with other thread counts
    try:
        one = run_cases(SINGLE)
    finally:
        torch.set_num_threads(threads)
    return one, spawn_ranks(2, tmp_path_factory.mktemp("dp"))


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


def test_the_moe_case_uses_the_balance_loss_and_moves_the_router_bias(runs):
    one = runs[0]["moe token-mean balance loss"]
    assert all(a > 0 for a in one["aux"])
    bias = [t for n, t in one["state"].items() if n.endswith("e_score_correction_bias")]
    assert bias and any(bool(b.abs().sum() > 0) for b in bias)


def test_a_sharded_policy_without_a_reference_is_refused(runs):
    assert runs[0]["no_reference_error"] == ""  # one unsharded rank copies its policy
    assert "a sharded policy cannot be copied" in runs[1]["no_reference_error"]
