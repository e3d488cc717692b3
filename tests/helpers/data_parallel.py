"""Training runs that every trainer rank executes alike, for comparing N sharded ranks with one unsharded rank.

:func:`run_cases` is the body of each rank: GRPO steps for a transformers Llama (two aggregation modes) and for our
MoE model (balance loss and bias update on), and SFT steps; it returns rank 0's losses and whole weights.
:func:`spawn_ranks` runs it on N gloo ranks in fresh processes.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from grpo.config import GRPOConfig
from grpo.data import tasks
from grpo.orchestration.checkpointing import StepCheckpoints
from grpo.trainer import GRPOTrainer
from model import DeepSeekConfig, DeepSeekForCausalLM
from model.distributed import DataParallel, reshard, shard_model
from rewards.rm_train import RewardModelTrainConfig, train_reward_model_from_checkpoint
from rollout.offload import Offloader
from rollout.torch_engine import TorchEngine
from sft.trainer import SFTConfig, SFTTrainer
from tests.helpers.chat import char_tokenizer
from tests.helpers.chat import tiny_llama as chat_llama
from tests.helpers.tiny import count_target, tiny_llama, word_tokenizer

PROMPT_ROWS = [{"prompt": f"t{3 + i} t{9 + i} t{20 + i}", "parity": i % 2} for i in range(3)]
# 3 prompts x 4 samples = 12 rows, one minibatch of 12 (on-policy) or two of 6 (off-policy: old log-probs), in
# micro-batches of 4 or 2: an odd number of micro-batches, so one rank runs a filler
GRPO_CASES: dict[str, dict[str, Any]] = {
    "llama token-mean": dict(model="llama", loss_agg="token-mean", minibatch_size=12, micro_batch_size=4),
    "llama seq-mean-token-mean off-policy": dict(model="llama", loss_agg="seq-mean-token-mean", minibatch_size=6,
                                                 micro_batch_size=2),
    "moe token-mean balance loss": dict(model="moe", loss_agg="token-mean", minibatch_size=12, micro_batch_size=4,
                                        moe_aux_coef=0.01, moe_bias_gamma=1e-3),
    # one-step off-policy: rank 0 samples the next batch before the update, every rank applies its correction
    "moe async rollouts": dict(model="moe", loss_agg="token-mean", minibatch_size=12, micro_batch_size=4,
                               moe_bias_gamma=1e-3, async_rollouts=True),
}
STEPS = 3


def _policy(kind: str, tokenizer: Any) -> torch.nn.Module:
    if kind == "llama":
        return tiny_llama(seed=0).train()
    torch.manual_seed(0)
    cfg = DeepSeekConfig.from_preset("tiny", vocab_size=len(tokenizer), hidden_size=32, moe_intermediate_size=16,
                                     intermediate_size=64, num_hidden_layers=2, eos_token_id=1, bos_token_id=2,
                                     pad_token_id=0)
    return DeepSeekForCausalLM(cfg).train()


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, a sharded ``model``'s parameters (and buffers) are whole plain tensors on every rank
    (a collective); identity for an unsharded model."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        reshard(model)


def _whole_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a whole plain tensor (a collective for a sharded model)."""
    with gathered(model):
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
        state.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return state


def grpo_case(dp: DataParallel, model: str, **settings: Any) -> dict[str, Any]:
    """``STEPS`` GRPO steps (β > 0, a reference copy on every rank); rank 0 samples and scores."""
    tokenizer = word_tokenizer()
    policy = _policy(model, tokenizer)
    initial = _whole_state(policy)
    ref = copy.deepcopy(policy).eval()
    engine = TorchEngine(copy.deepcopy(policy).eval(), tokenizer=tokenizer) if dp.is_main else None
    shard_model(policy, dp)
    config = GRPOConfig(group_size=4, prompts_per_step=3, lr=1e-2, beta=0.04, max_new_tokens=4, temperature=1.0,
                        seed=0, **settings)
    trainer = GRPOTrainer(policy, engine, count_target if dp.is_main else None, tokenizer, config, ref_model=ref,
                          dp=dp)
    ahead = settings.get("async_rollouts", False)  # the next step's rows: sampled during this step's update
    steps = [trainer.step(PROMPT_ROWS, next_rows=PROMPT_ROWS if ahead and k + 1 < STEPS else None)
             for k in range(STEPS)]
    if ahead and dp.is_main:
        assert [m["async/staleness"] for m in steps] == [0.0, 1.0, 1.0] and trainer.correction == "tis"
    engine_state = {n: t.clone() for n, t in engine.model.state_dict().items()} if dp.is_main else None
    return {"losses": [m["loss"] for m in steps], "grad_norms": [m["grad_norm"] for m in steps],
            "aux": [m["moe_aux_loss"] for m in steps], "initial": initial, "state": _whole_state(policy),
            "engine": engine_state, "sync_bytes": steps[-1].get("sync/bytes")}


def mixed_precision_case(dp: DataParallel) -> dict[str, Any]:
    """GRPO steps of our MoE model with float32 master weights and bfloat16 compute (FSDP2 mixed precision), the
    rollout engine in bfloat16 as a run's engines are."""
    tokenizer = word_tokenizer()
    policy = _policy("moe", tokenizer)
    ref = copy.deepcopy(policy).eval()
    engine = TorchEngine(copy.deepcopy(policy).to(torch.bfloat16).eval(), tokenizer=tokenizer) if dp.is_main else None
    shard_model(policy, dp, param_dtype=torch.bfloat16)
    config = GRPOConfig(group_size=4, prompts_per_step=3, lr=1e-2, beta=0.04, max_new_tokens=4, seed=0,
                        minibatch_size=12, micro_batch_size=4)
    trainer = GRPOTrainer(policy, engine, count_target if dp.is_main else None, tokenizer, config, ref_model=ref,
                          dp=dp)
    steps = [trainer.step(PROMPT_ROWS) for _ in range(STEPS)]  # each sync is checked (bfloat16 fingerprints)
    master_dtypes = {p.dtype for p in policy.parameters()}
    engine_state = {n: t.clone() for n, t in engine.model.state_dict().items()} if dp.is_main else None
    return {"losses": [m["loss"] for m in steps], "master_dtypes": master_dtypes, "state": _whole_state(policy),
            "engine": engine_state}


def sft_case(dp: DataParallel) -> dict[str, Any]:
    """``STEPS`` SFT steps of 3 micro-batches each (one rank runs a filler)."""
    tokenizer = char_tokenizer()
    model = chat_llama(len(tokenizer)).train()
    initial = _whole_state(model)
    shard_model(model, dp)
    trainer = SFTTrainer(model, tokenizer, tasks.arithmetic(36, seed=0),
                         SFTConfig(lr=1e-2, batch_size=4, grad_accum=3, progress=False, seed=0), dp=dp)
    steps = [trainer.train_step() for _ in range(STEPS)]
    return {"losses": [m.loss for m in steps], "grad_norms": [m.grad_norm for m in steps],
            "initial": initial, "state": _whole_state(model)}


def _sft_trainer(dp: DataParallel) -> SFTTrainer:
    tokenizer = char_tokenizer()
    model = shard_model(chat_llama(len(tokenizer)).train(), dp)
    return SFTTrainer(model, tokenizer, tasks.arithmetic(36, seed=0),
                      SFTConfig(lr=1e-2, batch_size=4, grad_accum=3, progress=False, seed=0), dp=dp)


def save_and_continue(dp: DataParallel, root: Path) -> dict[str, Any]:
    """One SFT step, a trainer checkpoint in ``root`` (each rank writes its shards), then two more steps."""
    trainer = _sft_trainer(dp)
    trainer.train_step()
    StepCheckpoints(root).save_trainer(trainer.step, trainer.model, trainer.optimizer,
                                       trainer.state_dict(weights=False), dp)
    losses = [trainer.train_step().loss for _ in range(2)]
    return {"losses": losses, "state": _whole_state(trainer.model)}


def resume_from(dp: DataParallel, root: Path) -> dict[str, Any]:
    """A fresh trainer restored from ``root``'s checkpoint (saved with any number of ranks), then two steps."""
    trainer = _sft_trainer(dp)
    step, state = StepCheckpoints(root).load_trainer(trainer.model, trainer.optimizer, dp)
    trainer.load_state_dict(state)
    losses = [trainer.train_step().loss for _ in range(2)]
    return {"step": step, "losses": losses, "state": _whole_state(trainer.model)}


def offload_case(dp: DataParallel, folder: Path) -> dict[str, Any]:
    """Offloads a sharded trainer (parameters, gradients, Adam moments) and brings it back, in both modes."""
    trainer = _sft_trainer(dp)
    trainer.train_step()
    # gradients exist too, as FSDP leaves them: a block's reduce-scattered into one buffer, its shards views of it
    trainer.model(input_ids=torch.arange(1, 9)[None]).logits.float().square().mean().backward()
    grads = [p.grad.to_local() for p in trainer.model.parameters() if p.grad.to_local().numel()]
    shared = len(grads) - len({g.untyped_storage().data_ptr() for g in grads})

    def tensors() -> list[torch.Tensor]:
        out = [p.to_local() for p in trainer.model.parameters()] + [p.grad.to_local() for p in
                                                                   trainer.model.parameters()]
        out += [v.to_local() for st in trainer.optimizer.state.values() for v in st.values()
                if isinstance(v, DTensor)]  # the moments (Adam's step counts are plain scalars)
        return out

    before = [t.clone() for t in tensors()]
    released = {}
    for mode in ("disk", "cpu"):
        offloader = Offloader(trainer.model, trainer.optimizer, folder=folder / f"rank{dp.rank}")
        moved = offloader.offload(mode)
        released[mode] = (moved, sum(t.untyped_storage().nbytes() for t in tensors()))
        offloader.onload()
    return {"released": released, "bit_exact": all(torch.equal(a, b) for a, b in zip(before, tensors())),
            "shared_storages": shared, "loss_after": trainer.train_step().loss}


def _pairs(n: int, seed: int) -> list[dict[str, str]]:
    rows = tasks.arithmetic(n, seed=seed)
    return [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": str(int(r["answer"]) + 1)} for r in rows]


def reward_model_case(dp: DataParallel, root: Path) -> dict[str, Any]:
    """A reward model trained from a Llama checkpoint (7 pairs in batches of 3, one rank short of pairs in the
    last batch; 4 held-out pairs in batches of 3) and saved to ``root/rm<N>``."""
    init = root / "rm_init"
    if dp.is_main and not init.exists():
        tokenizer = char_tokenizer()
        chat_llama(len(tokenizer)).save_pretrained(init)
        tokenizer.save_pretrained(init)
    dp.barrier()
    config = RewardModelTrainConfig(learning_rate=1e-2, epochs=2, batch_size=3, max_length=48, eval_batch_size=3,
                                    progress=False, seed=0)
    result = train_reward_model_from_checkpoint(init, root / f"rm{dp.world_size}", _pairs(7, 1), config,
                                                _pairs(4, 2), dp=dp)
    return {"losses": result.losses, "accuracy": (result.eval_accuracy_before, result.eval_accuracy)}


def no_reference_error(dp: DataParallel) -> str:
    """The error of a trainer asked to copy a sharded policy into its reference (empty when there is none)."""
    tokenizer = word_tokenizer()
    policy = shard_model(tiny_llama(seed=0), dp)
    config = GRPOConfig(group_size=4, prompts_per_step=3, minibatch_size=12, micro_batch_size=4, beta=0.04)
    try:
        GRPOTrainer(policy, None, count_target, tokenizer, config, dp=dp)
    except ValueError as exc:
        return str(exc)
    return ""


def run_cases(dp: DataParallel, root: Path) -> dict[str, Any]:
    """Every case, in order (each rank runs them all: their collectives pair up). Checkpoints go to
    ``root/sft<N>``; the one-rank run comes first, so N ranks also resume from its checkpoint."""
    out: dict[str, Any] = {name: grpo_case(dp, **settings) for name, settings in GRPO_CASES.items()}
    out["sft"] = sft_case(dp)
    out["no_reference_error"] = no_reference_error(dp)
    out["saved"] = save_and_continue(dp, root / f"sft{dp.world_size}")
    out["reward model"] = reward_model_case(dp, root)
    if dp.enabled:
        out["mixed precision"] = mixed_precision_case(dp)
        out["resumed_from_one"] = resume_from(dp, root / "sft1")
        out["offload"] = offload_case(dp, root / "offload")
    return out


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = run_cases(DataParallel.current(), Path(out).parent)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(world: int, out_dir: Path) -> dict[str, dict[str, Any]]:
    """Runs :func:`run_cases` on ``world`` gloo ranks (fresh processes); returns rank 0's results."""
    out = out_dir / f"ranks{world}.pt"
    for attempt in range(3):  # the free port may be taken by another process before rank 0 binds it
        try:
            mp.spawn(_rank, args=(world, free_port(), str(out)), nprocs=world, join=True)
            break
        except mp.ProcessRaisedException as exc:
            if attempt == 2 or "address already in use" not in str(exc).lower():
                raise
    return torch.load(out, weights_only=False)
