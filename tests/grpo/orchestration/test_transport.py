"""Weight transports: the collective broadcast leaves the rollout workers holding exactly what the object store
leaves, and what a fresh engine loaded from the same weights holds."""

import pytest
import torch

from grpo.orchestration.recipe import RecipeError, load_recipe
from grpo.orchestration.transport import from_wire, pack, to_wire, unpack
from model import DeepSeekConfig, DeepSeekForCausalLM, build_tokenizer
from rollout.weights import bucketed, named_weights
from tests.helpers import ROOT
from tests.helpers.recipes import TINY_MODEL


def test_pack_and_unpack_round_trip_a_bucket_of_mixed_dtypes():
    bucket = [("a", torch.randn(3, 4)), ("b", torch.arange(5)), ("c", torch.randn(2, 3).to(torch.bfloat16)),
              ("d", torch.randn(7)), ("e", torch.randn(()))]
    meta, buffers = pack(bucket)
    assert list(buffers) == ["bfloat16", "float32", "int64"]  # the broadcast order: sorted, the same everywhere
    assert buffers["float32"].numel() == 12 + 7 + 1
    out = unpack(meta, buffers)
    assert [n for n, _ in out] == [n for n, _ in bucket]
    for (_, got), (_, want) in zip(out, bucket):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_the_object_store_wire_format_round_trips_dtypes_shapes_and_strided_tensors():
    base = torch.randn(4, 6)
    bucket = [("a", base[:, ::2]), ("b", torch.arange(5)), ("c", torch.randn(2, 3).to(torch.bfloat16)),
              ("d", torch.randn(())), ("e", torch.tensor([True, False])), ("f", torch.empty(0, 3))]
    wire = to_wire(bucket)
    assert all(raw.dtype.name == "uint8" for _, raw, _, _ in wire)  # raw bytes: Ray stores them out of band
    assert wire[1][1].__array_interface__["data"][0] == bucket[1][1].data_ptr()  # contiguous: a view, no copy
    out = from_wire(wire)
    assert [n for n, _ in out] == [n for n, _ in bucket]
    for (_, got), (_, want) in zip(out, bucket):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_an_unknown_transport_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"weight_transport must be one of \['collective', 'object_store'\]"):
        load_recipe(None, ["ray.weight_transport=pigeon"])


@pytest.mark.slow
def test_the_collective_transport_pushes_what_the_object_store_and_a_fresh_engine_hold(tmp_path):
    import ray

    from grpo.orchestration.proxies import RolloutGroup
    from grpo.orchestration.workers import RolloutWorker, remote

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = DeepSeekConfig.from_preset("tiny", vocab_size=len(tokenizer), **TINY_MODEL["overrides"])
    policy = DeepSeekForCausalLM(config)
    policy.save_pretrained(tmp_path / "base", tokenizer=tokenizer)
    with torch.no_grad():  # the trainer moved on: every weight differs from the folder the workers start from
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    policy.save_pretrained(tmp_path / "moved", tokenizer=tokenizer)
    names = [n for n, _ in named_weights(policy)]

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        actor = remote(RolloutWorker, num_cpus=0.25)
        by_store, by_broadcast, also_by_broadcast, stale = (actor.remote(str(tmp_path / "base"), threads=1)
                                                           for _ in range(4))
        fresh = actor.remote(str(tmp_path / "moved"), threads=1)
        for group in (RolloutGroup([by_store], "object_store"),
                      RolloutGroup([by_broadcast, also_by_broadcast], "collective")):
            for bucket in bucketed(named_weights(policy), 1 << 14):  # several buckets, one group formed once
                group.update_weights(bucket)
        reports = ray.get([w.weight_report.remote(names, []) for w in
                           (by_store, by_broadcast, also_by_broadcast, fresh, stale)])
    finally:
        ray.shutdown()
    prints = [r.fingerprints for r in reports]
    assert prints[0] is not None and set(prints[0]) == set(names)
    assert prints[1] == prints[0] and prints[2] == prints[0]  # bit-identical weights, whichever way they came
    assert prints[3] == prints[0]  # and what loading the trainer's weights from a checkpoint gives
    assert prints[4] != prints[0]  # (the workers did start from other weights)
