"""GRPO step time: ours vs TRL's ``GRPOTrainer`` on the same tiny DeepSeek-V3-shaped model.

Both sides get the same checkpoint (our ``tiny`` preset: MLA, sigmoid ``noaux_tc`` routing with groups, shared +
routed experts; TRL loads it as transformers' ``DeepseekV3ForCausalLM``), the same chat prompts and reward, the
same G, prompts per step, completion length (every completion is forced to the full length so the work is equal),
number of optimizer updates per step (one), β (so both compute reference log-probs), loss aggregation
(``seq-mean-token-mean`` = TRL's ``loss_type="grpo"``) and thread count. The two trainers alternate, one step
each (ours runs between TRL's steps, outside TRL's clock), so a machine whose speed drifts slows both alike.
Each side runs ``--warmup`` steps, then ``--steps`` timed steps; the table shows the median and the fastest step
of each and the speed-up on both (on a shared machine the fastest step is the least disturbed measurement; the
median shows the typical one).

Run: ``python benchmarks/bench_grpo_step.py [--threads 1] [--steps 6] [--G 8] [--prompts 8] [--tokens 64]``
(needs ``trl``: ``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

from grpo.tasks import generate as generate_task


def format_reward(prompts, completions, **_):
    """1 when a completion mentions an answer tag: cheap, so the step time is the trainer's own."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float("<answer>" in t) for t in texts]


def make_checkpoint(path: str) -> None:
    from model import DeepSeekConfig, DeepSeekForCausalLM, build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = DeepSeekConfig.from_preset("tiny", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    DeepSeekForCausalLM(cfg).save_pretrained(path, tokenizer=tok)


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": r["prompt"]}] for r in generate_task("arithmetic", n, seed=0)]


class _FullLength:
    """Wraps an engine so every completion runs to ``max_tokens`` (stop tokens suppressed), like TRL's
    ``min_new_tokens``."""

    def __init__(self, engine, tokens: int) -> None:
        self.engine, self.tokens = engine, tokens

    def generate(self, prompt_ids, sampling):
        return self.engine.generate(prompt_ids, dataclasses.replace(sampling, min_tokens=self.tokens))

    def __getattr__(self, name):
        return getattr(self.engine, name)


def our_stepper(path: str, args) -> Callable[[int], float]:
    """Builds our trainer; returns ``step(i)``, which runs step ``i`` and returns its wall time in seconds."""
    from transformers import AutoTokenizer

    from grpo.config import GRPOConfig
    from grpo.trainer import GRPOTrainer
    from model import DeepSeekForCausalLM
    from rollout.torch_engine import TorchEngine

    tok = AutoTokenizer.from_pretrained(path)
    policy = DeepSeekForCausalLM.from_pretrained(path).train()
    engine = _FullLength(TorchEngine(copy.deepcopy(policy), tokenizer=tok), args.tokens)
    n = args.G * args.prompts
    cfg = GRPOConfig(group_size=args.G, prompts_per_step=args.prompts, minibatch_size=n, micro_batch_size=n,
                     lr=1e-6, beta=args.beta, max_new_tokens=args.tokens, temperature=1.0,
                     loss_agg="seq-mean-token-mean", max_grad_norm=1.0)
    trainer = GRPOTrainer(policy, engine, format_reward, tok, cfg)
    rows = [{"prompt": p} for p in prompts(args.prompts * (args.warmup + args.steps))]

    def step(i: int) -> float:
        start = time.perf_counter()
        metrics = trainer.step(rows[i * args.prompts:(i + 1) * args.prompts])
        elapsed = time.perf_counter() - start
        assert metrics["completion/length_mean"] == args.tokens
        return elapsed

    return step


def run_alternating(path: str, args) -> tuple[list[float], list[float]]:
    """Runs TRL's trainer and, after each of its steps, one of ours (outside TRL's clock), so both sides see
    the same machine conditions. Returns the timed (post-warm-up) step times ``(ours, trl)``."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer as TRLTrainer

    ours_step = our_stepper(path, args)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    n = args.G * args.prompts
    data = Dataset.from_dict({"prompt": prompts(args.prompts * (args.warmup + args.steps))})
    trl_times: list[float] = []
    our_times: list[float] = []

    class Alternate(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            trl_times.append(time.perf_counter() - self.start)
            our_times.append(ours_step(len(our_times)))

    with tempfile.TemporaryDirectory() as out:
        cfg = TRLConfig(output_dir=out, per_device_train_batch_size=n, gradient_accumulation_steps=1,
                        num_generations=args.G, max_completion_length=args.tokens, temperature=1.0,
                        beta=args.beta, num_iterations=1, loss_type="grpo", learning_rate=1e-6,
                        max_steps=args.warmup + args.steps, logging_steps=1, report_to="none", use_cpu=True,
                        save_strategy="no", bf16=False, seed=0, max_grad_norm=1.0,
                        generation_kwargs={"min_new_tokens": args.tokens}, disable_tqdm=True)
        trainer = TRLTrainer(model=model, reward_funcs=format_reward, args=cfg, train_dataset=data,
                             processing_class=tok, callbacks=[Alternate()])
        trainer.train()
    return our_times[args.warmup:], trl_times[args.warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--G", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.04)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as path:
        make_checkpoint(path)
        ours, trl = run_alternating(path, args)
    mo, mt = statistics.median(ours), statistics.median(trl)
    fo, ft = min(ours), min(trl)
    print(f"\nGRPO step, tiny DeepSeek-V3-shaped MoE, G={args.G}, prompts/step={args.prompts}, "
          f"{args.tokens} new tokens, beta={args.beta}, threads={args.threads}, {args.steps} timed steps")
    print("| trainer | s/step (median) | s/step (fastest) | speed-up vs TRL (median) | speed-up vs TRL (fastest) |")
    print("|---|---|---|---|---|")
    print(f"| ours (torch engine) | {mo:.2f} | {fo:.2f} | {mt / mo:.2f}x | {ft / fo:.2f}x |")
    print(f"| TRL GRPOTrainer | {mt:.2f} | {ft:.2f} | 1.00x | 1.00x |")


if __name__ == "__main__":
    main()
