import doctest
import math
import statistics

import pytest
import torch
from torch.testing import assert_close

import grpo.advantages as adv_mod
from grpo.advantages import ADVANTAGE_ESTIMATORS, compute_advantages

S2 = math.sqrt(2.0)


# ----------------------------------------------------------------------------------------------------------
# hand-computed values
# ----------------------------------------------------------------------------------------------------------
def test_grpo_two_groups_of_two():
    # rewards [1,0 | 0,1]: each group has mean 0.5 and unbiased std sqrt(((0.5)^2 + (0.5)^2) / 1) = 1/sqrt(2),
    # so A = +-0.5 * sqrt(2) = +-0.70711 (eps = 0 to compare exactly).
    got = compute_advantages("grpo", torch.tensor([1.0, 0.0, 0.0, 1.0]), 2, eps=0.0)
    assert_close(got, torch.tensor([1 / S2, -1 / S2, -1 / S2, 1 / S2]))


def test_grpo_group_of_four_and_eps():
    # [1,0,0,0]: mean 0.25, unbiased var (0.75^2 + 3 * 0.25^2) / 3 = 0.25, std 0.5 -> [1.5, -0.5, -0.5, -0.5].
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert_close(compute_advantages("grpo", r, 4, eps=0.0), torch.tensor([1.5, -0.5, -0.5, -0.5]))
    # with eps = 0.5 the divisor is 0.5 + 0.5 = 1 -> the centred values.
    assert_close(compute_advantages("grpo", r, 4, eps=0.5), torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_dr_grpo_is_mean_centred_only():
    # [1,0,0,0]: mean 0.25 -> [0.75, -0.25, -0.25, -0.25]; [3, 1]: mean 2 -> [1, -1].
    got = compute_advantages("dr_grpo", torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 2.0, 2.0]), 4)
    assert_close(got, torch.tensor([0.75, -0.25, -0.25, -0.25, 1.0, -1.0, 0.0, 0.0]))


def test_rloo_leave_one_out_baseline():
    # [1,0,0,0]: A_0 = 1 - mean(0,0,0) = 1; A_j = 0 - mean(1,0,0) = -1/3.
    # [3, 1]: A = [3 - 1, 1 - 3] = [2, -2].
    got = compute_advantages("rloo", torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    assert_close(got, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    assert_close(compute_advantages("rloo", torch.tensor([3.0, 1.0]), 2), torch.tensor([2.0, -2.0]))


def test_batch_scale():
    # rewards [1,0 | 2,2] G=2: centred (grpo/dr_grpo) [0.5,-0.5,0,0]; batch unbiased var (0.25+0.25)/3 = 1/6,
    # std 1/sqrt(6) -> +-0.5*sqrt(6) = +-sqrt(1.5).
    # rloo centred [1,-1,0,0]: var 2/3 -> +-1/sqrt(2/3) = +-sqrt(1.5).
    r = torch.tensor([1.0, 0.0, 2.0, 2.0])
    want = torch.tensor([math.sqrt(1.5), -math.sqrt(1.5), 0.0, 0.0])
    for name in ("grpo", "dr_grpo", "rloo"):
        assert_close(compute_advantages(name, r, 2, scale="batch", eps=0.0), want)


def test_group_scale_for_dr_grpo_equals_grpo_and_none_for_grpo_equals_dr_grpo():
    r = torch.tensor([1.0, 0.0, 0.5, 3.0, -1.0, 2.0])
    assert_close(compute_advantages("dr_grpo", r, 3, scale="group"), compute_advantages("grpo", r, 3))
    assert_close(compute_advantages("grpo", r, 3, scale="none"), compute_advantages("dr_grpo", r, 3))
    # rloo scaled per group: [3,-1,2] centred by leave-one-out: [3-0.5, -1-2.5, 2-1] = [2.5,-3.5,1], std of
    # [3,-1,2] = sqrt(((5/3)^2 + (7/3)^2 + (2/3)^2)/2) = sqrt(13/3).
    got = compute_advantages("rloo", r, 3, scale="group", eps=0.0)[3:]
    assert_close(got, torch.tensor([2.5, -3.5, 1.0]) / math.sqrt(13 / 3))


# ----------------------------------------------------------------------------------------------------------
# edge cases
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_spread_groups_are_exactly_zero(name, scale):
    # 7.3 is inexact in float32: the mean of three 7.3s is off by 4.8e-7 and std is ~0, so a naive
    # (r - mean) / (std + eps) gives -0.30 for each of them; zero-spread groups must read exactly 0.
    r = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.0, 7.3, 7.3, 7.3])
    got = compute_advantages(name, r, 3, scale=scale)
    assert torch.equal(got[:3], torch.zeros(3)) and torch.equal(got[6:], torch.zeros(3))
    assert torch.isfinite(got).all() and got[3] > 0
    everything_flat = compute_advantages(name, torch.full((6,), 7.3), 3, scale=scale)
    assert torch.equal(everything_flat, torch.zeros(6))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_size_one_gives_zero(name, scale):
    got = compute_advantages(name, torch.tensor([1.0, 2.0, 5.0]), 1, scale=scale)
    assert torch.equal(got, torch.zeros(3))


def test_rloo_group_size_one_is_an_error():
    with pytest.raises(ValueError, match="rloo needs group_size >= 2"):
        compute_advantages("rloo", torch.tensor([1.0, 2.0]), 1)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"len\(rewards\) \(5\) must be divisible by group_size \(2\)"):
        compute_advantages("grpo", torch.zeros(5), 2)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="group_size must be a positive int"):
            compute_advantages("grpo", torch.zeros(4), bad)
    with pytest.raises(ValueError, match=r"rewards must be 1-D \[B\*G\], got shape \(2, 2\)"):
        compute_advantages("grpo", torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="rewards must be finite"):
        compute_advantages("grpo", torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="scale must be one of"):
        compute_advantages("grpo", torch.zeros(4), 2, scale="global")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        compute_advantages("grpo", torch.zeros(4), 2, eps=-1.0)
    known = "unknown advantage estimator 'ppo'; known: dr_grpo, grpo, process, rloo"
    with pytest.raises(KeyError, match=known):
        compute_advantages("ppo", torch.zeros(4), 2)


def test_accepts_lists_and_integer_rewards():
    want = torch.tensor([0.5, -0.5, 0.0, 0.0])
    assert_close(compute_advantages("dr_grpo", [1, 0, 3, 3], 2), want)
    assert_close(compute_advantages("dr_grpo", torch.tensor([1, 0, 3, 3]), 2), want)
    assert compute_advantages("grpo", torch.tensor([1.0, 0.0], dtype=torch.float64), 2).dtype == torch.float64


def test_registry_lists_all_estimators():
    assert ADVANTAGE_ESTIMATORS.names() == ["dr_grpo", "grpo", "process", "rloo"]


# ----------------------------------------------------------------------------------------------------------
# vectorised vs a plain Python loop
# ----------------------------------------------------------------------------------------------------------
def _loop_reference(name, rewards, g, scale, eps):
    rs = [float(x) for x in rewards]
    out, centred_all, flat_all = [], [], []
    for k in range(0, len(rs), g):
        grp = rs[k : k + g]
        mean = sum(grp) / g
        flat = max(grp) == min(grp)
        for r in grp:
            if name == "rloo":
                c = r - (sum(grp) - r) / (g - 1)
            else:
                c = r - mean
            if scale == "group":
                c = c / ((statistics.stdev(grp) if g > 1 else 0.0) + eps)
            centred_all.append(c)
            flat_all.append(flat)
    if scale == "batch" and not all(flat_all):
        sd = statistics.stdev(centred_all)
        centred_all = [c / (sd + eps) for c in centred_all]
    for c, flat in zip(centred_all, flat_all, strict=True):
        out.append(0.0 if flat else c)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_vectorised_matches_loop(seed, name, scale):
    gen = torch.Generator().manual_seed(seed)
    g = [2, 3, 4, 8][seed]
    b = 5
    # binary rewards make some groups flat; add a continuous part to half of the groups
    r = torch.randint(0, 2, (b * g,), generator=gen).double()
    r[: b * g // 2] += torch.rand(b * g // 2, generator=gen, dtype=torch.float64)
    got = compute_advantages(name, r, g, scale=scale, eps=1e-6)
    assert_close(got, _loop_reference(name, r.tolist(), g, scale, 1e-6))


# ----------------------------------------------------------------------------------------------------------
# process supervision
# ----------------------------------------------------------------------------------------------------------
def test_process_hand_computed():
    # group 0: o0 steps r=[1, 0] ending at tokens [1, 3]; o1 step r=[0] ending at 2.
    #   step rewards [1, 0, 0]: mean 1/3, unbiased var ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3, std 1/sqrt(3);
    #   normalised: 1 -> (2/3) sqrt(3) = 1.1547, 0 -> -(1/3) sqrt(3) = -0.57735.
    #   o0: t=0,1 see both steps: 1.1547 - 0.57735 = 0.57735; t=2,3 see only the last: -0.57735.
    #   o1: t=0..2 see its step: -0.57735; t=3 is after it: 0.
    # group 1: all step rewards 0.5 -> zero spread -> 0 everywhere.
    a, b = 2 / math.sqrt(3), 1 / math.sqrt(3)
    got = compute_advantages(
        "process",
        [torch.tensor([1.0, 0.0]), [0.0], [0.5], [0.5, 0.5]],
        2,
        step_ends=[torch.tensor([1, 3]), [2], [0], [0, 3]],
        num_tokens=4,
        eps=0.0,
    )
    want = torch.tensor(
        [[a - b, a - b, -b, -b], [-b, -b, -b, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    )
    assert_close(got, want)


def test_process_scale_none_and_batch():
    # one group: steps [2 @ t0] and [0 @ t1]: mean 1 -> centred [1, -1]; G=2.
    kw = dict(step_ends=[[0], [1]], num_tokens=2)
    got = compute_advantages("process", [[2.0], [0.0]], 2, scale="none", **kw)
    assert_close(got, torch.tensor([[1.0, 0.0], [-1.0, -1.0]]))
    # batch: the centred step values [1, -1] have unbiased std sqrt(2) -> +-1/sqrt(2).
    got = compute_advantages("process", [[2.0], [0.0]], 2, scale="batch", eps=0.0, **kw)
    assert_close(got, torch.tensor([[1 / S2, 0.0], [-1 / S2, -1 / S2]]))


def test_process_edge_cases():
    # an output without steps gets a zero row; a group with one step in total (std undefined) gets zeros.
    got = compute_advantages("process", [[1.0], []], 2, step_ends=[[2], []], num_tokens=3)
    assert torch.equal(got, torch.zeros(2, 3))
    # G=1, group 0 has steps [1 @ t0, 0 @ t1] -> normalised [1/sqrt2, -1/sqrt2]; group 1 has a single step.
    got = compute_advantages("process", [[1.0, 0.0], [5.0]], 1, step_ends=[[0, 1], [1]], num_tokens=2, eps=0)
    assert_close(got, torch.tensor([[0.0, -1 / S2], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"step_ends must lie in \[0, num_tokens=3\)"):
        compute_advantages("process", [[1.0], [0.0]], 2, step_ends=[[3], [0]], num_tokens=3)
    with pytest.raises(ValueError, match="output 1: 1 step rewards but 2 step_ends"):
        compute_advantages("process", [[1.0], [0.0]], 2, step_ends=[[1], [0, 1]], num_tokens=3)
    with pytest.raises(ValueError, match="need step_ends"):
        compute_advantages("process", [[1.0], [0.0]], 2, num_tokens=3)
    with pytest.raises(ValueError, match="num_tokens must be a positive int"):
        compute_advantages("process", [[1.0], [0.0]], 2, step_ends=[[0], [0]])
    with pytest.raises(ValueError, match=r"len\(rewards\) \(3\) must be divisible by group_size \(2\)"):
        compute_advantages("process", [[1.0], [0.0], [1.0]], 2, step_ends=[[0], [0], [0]], num_tokens=2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_process_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    g, b, t = 3, 4, 7
    rewards, ends = [], []
    for _ in range(b * g):
        k = int(torch.randint(0, 4, (1,), generator=gen))
        rewards.append(torch.randint(0, 3, (k,), generator=gen).double() / 2)
        ends.append(torch.randint(0, t, (k,), generator=gen))
    got = compute_advantages("process", rewards, g, step_ends=ends, num_tokens=t, eps=1e-6)
    want = torch.zeros(b * g, t, dtype=torch.float64)
    for k in range(b):
        vals = [float(x) for i in range(k * g, k * g + g) for x in rewards[i]]
        if len(vals) < 2 or max(vals) == min(vals):
            continue
        mean, sd = sum(vals) / len(vals), statistics.stdev(vals)
        for i in range(k * g, k * g + g):
            for tok in range(t):
                want[i, tok] = sum(
                    (float(r) - mean) / (sd + 1e-6)
                    for r, e in zip(rewards[i], ends[i], strict=True)
                    if int(e) >= tok
                )
    assert_close(got, want)


def test_docstring_examples():
    assert doctest.testmod(adv_mod).failed == 0
