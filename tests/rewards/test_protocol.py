"""Reward protocol, registry and weighted combination: hand-computed cases."""

import asyncio
import math
import subprocess
import sys

import pytest

from rewards import (
    REWARDS,
    OverlongReward,
    RewardError,
    RewardOutput,
    RewardSpec,
    WeightedReward,
    call_reward,
    combine,
    completion_text,
    get_reward,
    zscore,
)
from rewards.registry import reward_factory

PROMPTS = ["p0", "p1", "p2"]


def constant(values):
    def reward(prompts, completions, **columns):
        return list(values)

    return reward


def text_length(prompts, completions, **columns):
    return [float(len(completion_text(c))) for c in completions]


# ----------------------------------------------------------------------------------------------- protocol
def test_completion_text_forms():
    assert completion_text("abc") == "abc"
    assert completion_text([{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]) == "xy"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]) == "hi"
    assert completion_text({"role": "assistant", "content": "z"}) == "z"
    with pytest.raises(TypeError, match="chat messages"):
        completion_text(42)


def test_call_reward_passes_columns_and_messages():
    seen = {}

    def reward(prompts, completions, answer, **columns):
        seen.update(answer=answer, extra=columns)
        return [1, 0.5, True]

    completions = [[{"role": "assistant", "content": "x"}]] * 3
    out = call_reward(reward, PROMPTS, completions, answer=["a", "b", "c"], flag=7)
    assert out == [1.0, 0.5, 1.0] and all(type(v) is float for v in out)
    assert seen == {"answer": ["a", "b", "c"], "extra": {"flag": 7}}
    assert call_reward(text_length, PROMPTS, completions) == [1.0, 1.0, 1.0]


def test_call_reward_accepts_tensors_and_arrays():
    import numpy as np

    assert call_reward(lambda p, c, **k: np.array([0.5, 1.5, 2.5]), PROMPTS, ["a", "b", "c"]) == [0.5, 1.5, 2.5]
    assert call_reward(lambda p, c, **k: [np.array(1.0), np.float32(2.0), None], PROMPTS, ["a", "b", "c"]) == [
        1.0, 2.0, None]


def test_call_reward_awaits_async_rewards():
    async def reward(prompts, completions, **columns):
        await asyncio.sleep(0)
        return [float(i) for i in range(len(completions))]

    assert call_reward(reward, PROMPTS, ["a", "b", "c"]) == [0.0, 1.0, 2.0]

    async def inside_running_loop():  # the caller already runs an event loop
        return call_reward(reward, PROMPTS, ["a", "b", "c"])

    assert asyncio.run(inside_running_loop()) == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ([1.0, 2.0], "returned 2 scores for 3 completions"),
        ([1.0, "high", 0.0], "at sample 1: score must be a real number or None"),
        ([1.0, float("nan"), 0.0], "at sample 1: score must be finite"),
        (3.0, "must return a list of 3 numbers"),
        ("abc", "must return a list of 3 numbers"),
    ],
)
def test_call_reward_rejects_bad_output(result, message):
    with pytest.raises(RewardError, match=message) as info:
        call_reward(constant(result) if isinstance(result, list) else (lambda p, c, **k: result),
                    PROMPTS, ["a", "b", "c"], name="bad")
    assert info.value.reward == "bad"


def failing_on_b(prompts, completions, **columns):
    return [1 / 0 if c == "b" else 1.0 for c in completions]


@pytest.mark.parametrize(("on_error", "expected"), [("zero", [1.0, 0.0, 1.0]), ("skip", [1.0, None, 1.0])])
def test_call_reward_error_policies(on_error, expected):
    assert call_reward(failing_on_b, PROMPTS, ["a", "b", "c"], on_error=on_error) == expected


def test_call_reward_raise_names_reward_sample_and_exception():
    with pytest.raises(RewardError, match=r"reward 'fails' failed at sample 1: ZeroDivisionError") as info:
        call_reward(failing_on_b, PROMPTS, ["a", "b", "c"], name="fails", answer=["x", "y", "z"])
    assert info.value.index == 1 and isinstance(info.value.__cause__, ZeroDivisionError)


def test_call_reward_batch_only_failure():
    def needs_small_batches(prompts, completions, **columns):
        if len(completions) > 1:
            raise RuntimeError("batch too large")
        return [2.0]

    with pytest.raises(RewardError, match="every sample succeeded alone"):
        call_reward(needs_small_batches, PROMPTS, ["a", "b", "c"])
    assert call_reward(needs_small_batches, PROMPTS, ["a", "b", "c"], on_error="zero") == [2.0, 2.0, 2.0]


def test_call_reward_argument_checks():
    with pytest.raises(ValueError, match="on_error must be one of"):
        call_reward(text_length, PROMPTS, ["a", "b", "c"], on_error="ignore")
    with pytest.raises(ValueError, match="3 prompts but 2 completions"):
        call_reward(text_length, PROMPTS, ["a", "b"])
    assert call_reward(text_length, [], []) == []


# ----------------------------------------------------------------------------------------------- registry
def test_builtin_names_registered():
    assert {"accuracy", "format", "overlong", "language_consistency", "code_exec", "reward_model",
            "remote"} <= set(REWARDS.names())


def test_get_reward_factory_function_and_dotted_path():
    overlong = get_reward("overlong", max_length=10, cache_length=4)
    assert isinstance(overlong, OverlongReward) and overlong(["q"], ["x" * 8]) == [-0.5]
    assert get_reward("tests.rewards.test_protocol:text_length") is text_length
    bound = get_reward("tests.rewards.test_protocol:scaled_length", scale=10.0)
    assert bound(["q"], ["abc"]) == [30.0] and bound.__name__ == "scaled_length"
    assert get_reward("tests.rewards.test_protocol:make_constant", value=4.0)(["q", "q"], ["a", "b"]) == [4.0, 4.0]


def scaled_length(prompts, completions, scale=1.0, **columns):
    return [scale * len(c) for c in completions]


@reward_factory
def make_constant(value):
    return lambda prompts, completions, **columns: [value] * len(completions)


def test_get_reward_errors():
    with pytest.raises(KeyError, match=r"unknown reward 'nope'; known: .*accuracy"):
        get_reward("nope")
    with pytest.raises(ValueError, match="cannot import module"):
        get_reward("no_such_module_xyz:f")
    with pytest.raises(TypeError, match="reward 'overlong': bad configuration"):
        get_reward("overlong", max_len=3)
    with pytest.raises(ValueError, match="cache_length must be an integer in"):
        get_reward("overlong", max_length=4, cache_length=5)


def test_import_rewards_does_not_import_torch_or_ray():
    code = "import sys, rewards; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ----------------------------------------------------------------------------------------------- combine
def test_weighted_sum_with_none_contributing_nothing():
    wr = combine({"a": constant([1.0, None, 3.0]), "b": constant([2.0, 4.0, None])}, weights={"a": 0.5, "b": 2.0})
    out = wr(PROMPTS, ["x", "y", "z"])
    assert isinstance(out, RewardOutput)
    # 0.5*1 + 2*2 = 4.5; None + 2*4 = 8 (weights not renormalised); 0.5*3 + None = 1.5
    assert out.total == [4.5, 8.0, 1.5]
    assert out.breakdown == {"a": [1.0, None, 3.0], "b": [2.0, 4.0, None]}
    means = out.component_means()
    assert means["a"] == 2.0 and means["b"] == 3.0 and means["total"] == pytest.approx(14.0 / 3)


def test_all_none_policy():
    components = {"a": constant([None, 1.0]), "b": constant([None, 2.0])}
    with pytest.raises(RewardError, match=r"at sample 0: every component returned None"):
        combine(components)(["p", "q"], ["x", "y"])
    assert combine(components, all_none="zero")(["p", "q"], ["x", "y"]).total == [0.0, 3.0]


def test_normalize_then_sum_hand_computed():
    # a = [1, 2, 3]: mean 2, population std sqrt(2/3) -> z = [-1.2247, 0, 1.2247]
    # b = [10, None, 20]: mean 15, std 5 over the two present values -> z = [-1, None, 1]
    wr = combine({"a": constant([1.0, 2.0, 3.0]), "b": constant([10.0, None, 20.0])},
                 weights={"a": 1.0, "b": 3.0}, mode="normalize-then-sum", eps=0.0)
    za = 1 / math.sqrt(2 / 3)
    assert wr(PROMPTS, ["x", "y", "z"]).total == pytest.approx([-za - 3.0, 0.0, za + 3.0])


def test_sum_then_normalize_totals():
    wr = combine({"a": constant([1.0, 3.0])}, weights={"a": 2.0}, normalize=True, eps=0.0)
    assert wr(["p", "q"], ["x", "y"]).total == pytest.approx([-1.0, 1.0])


def test_zscore_edge_cases():
    assert zscore([5.0, 5.0, None], eps=0.0) == [0.0, 0.0, None]
    assert zscore([7.0, None]) == [0.0, None]
    assert zscore([1.0, None, 3.0], eps=0.0) == [-1.0, None, 1.0]


def test_component_error_policies_in_combination():
    components = {"ok": constant([1.0, 1.0, 1.0]), "bad": failing_on_b}
    with pytest.raises(RewardError, match="reward 'bad' failed at sample 1"):
        combine(components)(PROMPTS, ["a", "b", "c"])
    out = combine(components, on_error="skip")(PROMPTS, ["a", "b", "c"])
    assert out.breakdown["bad"] == [1.0, None, 1.0] and out.total == [2.0, 1.0, 2.0]


def test_specs_from_recipe_dicts():
    wr = WeightedReward([
        {"name": "overlong", "weight": 2.0, "kwargs": {"max_length": 4, "cache_length": 2}},
        {"name": "format", "key": "fmt", "weight": 0.5},
        RewardSpec(name="tests.rewards.test_protocol:text_length", key="len", weight=0.1),
    ])
    assert wr.weights == {"overlong": 2.0, "fmt": 0.5, "len": 0.1}
    out = wr(["q", "q"], ["<think>a</think><answer>1</answer>", "abc"])
    # overlong: 34 chars -> -1; 3 chars -> (2 - 3) / 2 = -0.5. format: 1, 0. length: 34, 3.
    assert out.breakdown == {"overlong": [-1.0, -0.5], "fmt": [1.0, 0.0], "len": [34.0, 3.0]}
    assert out.total == pytest.approx([-2.0 + 0.5 + 3.4, -1.0 + 0.0 + 0.3])


def test_combination_config_errors():
    with pytest.raises(ValueError, match=r"weights given for unknown reward\(s\) \['c'\]"):
        combine({"a": text_length}, weights={"c": 1.0})
    with pytest.raises(ValueError, match="weight of reward 'a' must be a finite number"):
        combine({"a": text_length}, weights={"a": float("inf")})
    with pytest.raises(ValueError, match="reward keys must be unique"):
        combine([{"name": "format"}, {"name": "format"}])
    with pytest.raises(KeyError, match="unknown reward combination mode 'avg'"):
        combine({"a": text_length}, mode="avg")
    with pytest.raises(ValueError, match="at least one component"):
        combine({})
    with pytest.raises(ValueError, match="all_none must be"):
        combine({"a": text_length}, all_none="skip")
    with pytest.raises(ValueError, match="reward spec field 'name'"):
        RewardSpec(name="")
    with pytest.raises(ValueError, match=r"unknown reward spec key\(s\) wieght in .*; known: name, weight"):
        combine([{"name": "format", "wieght": 2.0}])


def seen_by(prompts, completions, **columns):
    """Scores 10 * (position within the batch it was given) + len(completion): shows what it was passed."""
    return [10.0 * i + len(c) for i, c in enumerate(completions)]


def test_when_routes_a_component_to_matching_rows():
    specs = [
        {"name": "tests.rewards.test_protocol:seen_by", "key": "general", "weight": 0.5,
         "when": {"category": "harmful"}},
        {"name": "tests.rewards.test_protocol:text_length", "key": "len", "when": {"category": ["benign", "x"]}},
    ]
    completions, cats = ["a", "bb", "ccc", "dddd"], ["harmful", "benign", "harmful", "other"]
    out = combine(specs, all_none="zero")(["p"] * 4, completions, category=cats)
    # 'general' is called on rows 0 and 2 only, so it sees them as positions 0 and 1.
    assert out.breakdown == {"general": [1.0, None, 13.0, None], "len": [None, 2.0, None, None]}
    assert out.total == [0.5, 2.0, 6.5, 0.0]
    with pytest.raises(RewardError, match="failed at sample 3: every component returned None"):
        combine(specs)(["p"] * 4, completions, category=cats)
    # Several columns must all match; nothing matching never calls the reward.
    both = combine([{"name": "tests.rewards.test_protocol:seen_by", "when": {"category": "harmful", "lang": "en"}}],
                   all_none="zero")
    out = both(["p"] * 3, ["a", "bb", "ccc"], category=["harmful", "harmful", "benign"], lang=["fr", "en", "en"])
    assert out.breakdown["tests.rewards.test_protocol:seen_by"] == [None, 2.0, None]
    assert both(["p"], ["a"], category=["benign"], lang=["en"]).breakdown == {
        "tests.rewards.test_protocol:seen_by": [None]}


def test_when_errors_name_the_reward_and_the_whole_batch_index():
    routed = combine([{"name": "tests.rewards.test_protocol:failing_on_b", "key": "fb", "when": {"k": 1}}])
    with pytest.raises(RewardError, match=r"reward 'fb' failed at sample 3: ZeroDivisionError"):
        routed(["p"] * 4, ["b", "a", "a", "b"], k=[0, 1, 0, 1])
    with pytest.raises(RewardError, match=r"'when' reads the column 'k', which the batch does not have"):
        routed(["p"], ["a"], other=[1])
    with pytest.raises(ValueError, match=r"reward 'format': 'when' must be a non-empty mapping"):
        RewardSpec(name="format", when={})
    with pytest.raises(ValueError, match=r"'when.category' allows no value"):
        RewardSpec(name="format", when={"category": []})
