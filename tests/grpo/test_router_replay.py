"""Rollout routing replay (R3): the torch engine records the experts it routed every token to, and the trainer's
forward routes by them (100% agreement) while the router still gets gradients; every step measures how often the
trainer's router would choose otherwise (the routing mismatch)."""

import copy

import pytest
import torch

from grpo.config import GRPOConfig
from grpo.trainer import GRPOTrainer
from model import DeepSeekConfig, DeepSeekForCausalLM, build_tokenizer
from model.routing import moe_gates, recorded_routing, replayed_routing, routing_disagreement
from rollout.base import SamplingConfig
from rollout.torch_engine import TorchEngine

ROWS = [{"prompt": p} for p in ("1+2=", "13+4=", "7*3=", "20-5=")]


def _moe(tokenizer):
    torch.manual_seed(0)
    return DeepSeekForCausalLM(DeepSeekConfig.from_preset("tiny", vocab_size=len(tokenizer))).train()


def _zeros(prompts, completions, **_):
    return [0.0] * len(completions)


def _agreement(logs, routing, positions):
    """Share of (token, layer) decisions with the same expert set as ``routing`` where it was recorded."""
    same = total = 0
    for j, log in enumerate(logs):
        got = log[0].view(routing.shape[0], positions, -1).sort(-1).values  # [N, T', K]
        want = routing[:, :positions, j].sort(-1).values
        known = (want >= 0).all(-1)
        same += int(((got == want).all(-1) & known).sum())
        total += int(known.sum())
    return same / total


def test_the_engine_records_what_a_full_forward_of_its_model_routes():
    tokenizer = build_tokenizer()
    model = _moe(tokenizer).eval()
    engine = TorchEngine(model, tokenizer=tokenizer)
    prompts = [tokenizer.encode(r["prompt"]) for r in ROWS[:2]]
    for rollout in engine.generate(prompts, SamplingConfig(n=2, max_tokens=6, record_routing=True, seed=0)):
        assert rollout.routing.shape == (len(rollout.prompt_ids) + len(rollout.completion_ids) - 1, 3, 2)
        ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
        with torch.no_grad(), recorded_routing(model) as logs:
            model(input_ids=ids)
        full = torch.stack([log[0] for log in logs], dim=1)[: rollout.routing.shape[0]]
        assert torch.equal(full.sort(-1).values, rollout.routing.sort(-1).values)


def test_replay_reproduces_the_engines_choices_and_the_router_still_learns():
    tokenizer = build_tokenizer()
    policy = _moe(tokenizer)
    sampler = copy.deepcopy(policy).eval()
    with torch.no_grad():  # the engine's routers drifted from the trainer's
        for gate in moe_gates(sampler):
            gate.weight.add_(torch.randn_like(gate.weight))
    trainer = GRPOTrainer(policy, TorchEngine(sampler, tokenizer=tokenizer), _zeros, tokenizer,
                          GRPOConfig(group_size=2, prompts_per_step=4, minibatch_size=8, micro_batch_size=8, beta=0.0,
                                     max_new_tokens=8, router_replay=True, sync_check=False))
    rollouts = trainer.generate(ROWS)
    batch = trainer._trajectories(rollouts, torch.zeros(len(rollouts)), torch.zeros(len(rollouts)))
    assert batch.routing.shape[:2] == batch.input_ids.shape
    positions = batch.input_ids.shape[1] - 1  # the backbone runs every position but the last (grpo.logprobs)

    with recorded_routing(policy) as replayed:
        logp, _ = trainer._logprobs(policy, batch)
    assert _agreement(replayed, batch.routing, positions) == 1.0
    logp.sum().backward()
    for gate in moe_gates(policy):
        assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0

    trainer.config.share_prompts = False  # the same row-by-row layout, so that positions line up
    with torch.no_grad(), recorded_routing(policy) as own:
        trainer._logprobs(policy, batch.replace(routing=None))
    assert _agreement(own, batch.routing, positions) < 0.9  # without replay the drifted routers disagree


def test_a_step_with_replay_trains_and_a_wrong_routing_shape_is_refused():
    tokenizer = build_tokenizer()
    policy = _moe(tokenizer)
    trainer = GRPOTrainer(policy, TorchEngine(copy.deepcopy(policy), tokenizer=tokenizer), _zeros, tokenizer,
                          GRPOConfig(group_size=2, prompts_per_step=4, minibatch_size=8, micro_batch_size=4,
                                     beta=0.04, max_new_tokens=6, router_replay=True))
    metrics = trainer.step(ROWS)
    assert metrics["mismatch/logp_abs_mean"] < 1e-5  # replayed routes: the engine's numbers, the trainer's own
    with pytest.raises(ValueError, match=r"router replay: routing of shape \(2, 5, 2, 2\) does not fit a model "
                                         r"with 3 MoE layers"):
        with replayed_routing(policy, torch.zeros(2, 5, 2, 2, dtype=torch.long)):
            pass


def test_an_engine_that_cannot_record_routing_is_refused():
    from tests.helpers.tiny import tiny_llama, word_tokenizer

    policy, tokenizer = tiny_llama(0), word_tokenizer()
    with pytest.raises(ValueError, match="router_replay: TorchEngine.*cannot record"):
        GRPOTrainer(policy, TorchEngine(copy.deepcopy(policy), tokenizer=tokenizer), _zeros, tokenizer,
                    GRPOConfig(group_size=2, prompts_per_step=2, minibatch_size=4, micro_batch_size=4,
                               router_replay=True))


def _drifted_trainer(tokenizer, **overrides):
    """A trainer whose engine's routers drifted from the policy's (everything else the same)."""
    policy = _moe(tokenizer)
    sampler = copy.deepcopy(policy).eval()
    with torch.no_grad():
        for gate in moe_gates(sampler):
            gate.weight.add_(torch.randn_like(gate.weight))
    config = dict(group_size=2, prompts_per_step=4, minibatch_size=8, micro_batch_size=8, beta=0.0, max_new_tokens=8,
                  sync_check=False)
    return GRPOTrainer(policy, TorchEngine(sampler, tokenizer=tokenizer), _zeros, tokenizer,
                       GRPOConfig(**{**config, **overrides}))


def test_routing_disagreement_counts_other_expert_sets_where_the_engine_routed():
    routing = torch.tensor([[[[0, 1]], [[2, 3]], [[-1, -1]]],
                            [[[1, 0]], [[3, 1]], [[0, 2]]]])  # [N=2, T=3, M=1, K=2]; -1: not run by the engine
    own = [[torch.tensor([[1, 0], [2, 3], [5, 5], [0, 1], [1, 2], [2, 1]])]]  # [N * T, K]
    assert routing_disagreement(own, routing) == (2, 5)  # row 1: {1, 2} vs {1, 3} and {1, 2} vs {0, 2}
    first_two = [[torch.tensor([[1, 0], [2, 3], [0, 1], [1, 2]])]]  # a forward over the first 2 positions
    assert routing_disagreement(first_two, routing) == (1, 4)


def test_a_shared_prefix_forward_records_what_the_unshared_forward_routes():
    tokenizer = build_tokenizer()
    decoder = _moe(tokenizer).eval().get_decoder()
    prompt = tokenizer.encode("12+7=")
    ids = torch.tensor([prompt + tokenizer.encode(c) for c in ("19", "18", "20")])
    mask = torch.ones_like(ids)
    with torch.no_grad(), recorded_routing(decoder) as shared:
        decoder(input_ids=ids, attention_mask=mask, shared_prefix=len(prompt))
    with torch.no_grad(), recorded_routing(decoder) as plain:
        decoder(input_ids=ids, attention_mask=mask)
    for got, want in zip(shared, plain):
        assert got[0].shape == want[0].shape == (ids.numel(), 2)
        assert torch.equal(got[0].sort(-1).values, want[0].sort(-1).values)


@pytest.mark.parametrize("minibatch", [8, 4], ids=["on-policy", "off-policy"])
def test_the_routing_mismatch_of_our_engine_is_zero(minibatch):
    tokenizer = build_tokenizer()
    policy = _moe(tokenizer)
    trainer = GRPOTrainer(policy, TorchEngine(copy.deepcopy(policy), tokenizer=tokenizer), _zeros, tokenizer,
                          GRPOConfig(group_size=2, prompts_per_step=4, minibatch_size=minibatch, micro_batch_size=4,
                                     beta=0.0, max_new_tokens=8))
    assert trainer.step(ROWS)["mismatch/routing_disagreement"] == 0.0


def test_the_routing_mismatch_counts_what_a_drifted_engine_routes_otherwise():
    tokenizer = build_tokenizer()
    trainer = _drifted_trainer(tokenizer)
    rollouts = trainer.generate(ROWS)
    batch = trainer._trajectories(rollouts, torch.zeros(len(rollouts)), torch.zeros(len(rollouts)))
    trainer._mismatch = {}
    trainer._logprobs(trainer.policy, batch, measure=True)  # the shared-prefix layout
    measured = trainer._mismatch_metrics()["mismatch/routing_disagreement"]
    positions = batch.input_ids.shape[1] - 1
    trainer.config.share_prompts = False  # independently: the row-by-row forward and the test's own count
    with torch.no_grad(), recorded_routing(trainer.policy) as own:
        trainer._logprobs(trainer.policy, batch)
    assert measured == pytest.approx(1 - _agreement(own, batch.routing, positions), abs=1e-12)
    assert measured > 0.1
    assert trainer.step(ROWS)["mismatch/routing_disagreement"] > 0.1


def test_with_replay_the_mismatch_still_measures_the_routers_own_choice():
    tokenizer = build_tokenizer()
    trainer = _drifted_trainer(tokenizer, router_replay=True)
    # the routers route by the engine's experts, and the metric is how often they would have chosen others
    assert trainer.step(ROWS)["mismatch/routing_disagreement"] > 0.1
