"""GRPO step time: ours vs TRL's ``GRPOTrainer`` on the same model: our tiny DeepSeek-V3-shaped MoE, or any local
Hugging Face causal LM (``--model PATH``).

Both sides get the same checkpoint (by default our ``tiny`` preset: MLA, sigmoid ``noaux_tc`` routing with groups,
shared + routed experts, which TRL loads as transformers' ``DeepseekV3ForCausalLM``; with ``--model`` any folder,
ours or a transformers model such as a Llama or Qwen2), the same chat prompts and reward, the
same G, prompts per step, completion length (every completion is forced to the full length so the work is equal),
number of optimizer updates per step (one), β (so both compute reference log-probs), loss aggregation
(``seq-mean-token-mean`` = TRL's ``loss_type="grpo"``) and thread count. The two trainers alternate, one step
each (ours runs between TRL's steps, outside TRL's clock), so a machine whose speed drifts slows both alike.
Each side runs ``--warmup`` steps, then ``--steps`` timed steps; the table shows the median and the fastest step
of each and the speed-up on both (on a shared machine the fastest step is the least disturbed measurement; the
median shows the typical one).

After the table, our step is broken down by part (generate, score, reference/old log-probs, update, weight sync
and its check), as shares of our median step.

Run: ``python benchmarks/bench_grpo_step.py [--threads 1] [--steps 6] [--G 8] [--prompts 8] [--tokens 64]
[--model PATH]`` (needs ``trl``: ``pip install -e ".[bench]"``). Without a model hub,
``--make-model llama-135m DIR`` first writes a randomly initialised model of SmolLM2-135M's shape (a 30-layer,
576-wide Llama with tied embeddings and a 49,152-token vocabulary) and a word-level tokenizer with a chat
template to ``DIR``, which ``--model DIR`` then benchmarks (random weights take the same time per step as trained
ones: every completion runs to the full length).
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

from grpo.data.tasks import generate as generate_task


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


LLAMA_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
                  rms_norm_eps=1e-5, rope_theta=10000.0)


def make_llama_135m(path: str) -> None:
    """A random SmolLM2-135M-shaped Llama and a 49,152-word tokenizer (the task's characters and markers first)
    with a ChatML-like template, saved as a Hugging Face folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from grpo.data import tasks

    specials = ["<|pad|>", "<|unk|>", "<|im_start|>", "<|im_end|>", *tasks.TASK_MARKERS]
    words = [*specials, *tasks.TASK_CHARACTERS, "user", "assistant", "\n"]
    words += [f"<w{i}>" for i in range(LLAMA_135M["vocab_size"] - len(words))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|unk|>", pad_token="<|pad|>",
                                   eos_token="<|im_end|>", extra_special_tokens={})
    fast.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                          "'<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                          "{% endif %}")
    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_135M, pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id,
                         bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)


def our_stepper(path: str, args, breakdown: list[dict[str, float]]) -> Callable[[int], float]:
    """Builds our trainer; returns ``step(i)``, which runs step ``i`` and returns its wall time in seconds (the
    step's own metrics are appended to ``breakdown``)."""
    from grpo.config import GRPOConfig
    from grpo.trainer import GRPOTrainer
    from rollout.loading import load_causal_lm, load_tokenizer
    from rollout.torch_engine import TorchEngine

    tok = load_tokenizer(path)
    policy = load_causal_lm(path).train()
    engine = _FullLength(TorchEngine(copy.deepcopy(policy), tokenizer=tok), args.tokens)
    n = args.G * args.prompts
    cfg = GRPOConfig(group_size=args.G, prompts_per_step=args.prompts, minibatch_size=n, micro_batch_size=n,
                     lr=1e-6, beta=args.beta, max_new_tokens=args.tokens, temperature=1.0,
                     loss_agg="seq-mean-token-mean", max_grad_norm=1.0, share_prompts=not args.no_share_prompts)
    trainer = GRPOTrainer(policy, engine, format_reward, tok, cfg)
    rows = [{"prompt": p} for p in prompts(args.prompts * (args.warmup + args.steps))]

    def step(i: int) -> float:
        start = time.perf_counter()
        metrics = trainer.step(rows[i * args.prompts:(i + 1) * args.prompts])
        elapsed = time.perf_counter() - start
        assert metrics["completion/length_mean"] == args.tokens
        breakdown.append({**metrics, "time/step": elapsed})
        return elapsed

    return step


def run_alternating(path: str, args, breakdown: list[dict[str, float]]) -> tuple[list[float], list[float]]:
    """Runs TRL's trainer and, after each of its steps, one of ours (outside TRL's clock), so both sides see
    the same machine conditions. Returns the timed (post-warm-up) step times ``(ours, trl)``."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer as TRLTrainer

    ours_step = our_stepper(path, args, breakdown)
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


PARTS = ("generate", "score", "advantages", "logprobs", "update", "sync", "sync_check")


def breakdown_table(metrics: list[dict[str, float]]) -> list[str]:
    """Median seconds and share of the median step of each part of our step."""
    step = statistics.median(m["time/step"] for m in metrics)
    lines = ["| part of our step | s (median) | share |", "|---|---|---|"]
    for part in PARTS:
        values = [m.get(f"time/{part}", 0.0) for m in metrics]
        lines.append(f"| {part} | {statistics.median(values):.3f} | {100 * statistics.median(values) / step:.0f}% |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--G", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--ours-only", action="store_true",
                        help="time only our trainer (no TRL): the breakdown of our step, e.g. to compare settings")
    parser.add_argument("--no-share-prompts", action="store_true",
                        help="run every row's prompt in full in our log-prob passes (GRPOConfig.share_prompts)")
    parser.add_argument("--model", default=None, help="a local Hugging Face causal-LM folder (default: our tiny MoE)")
    parser.add_argument("--make-model", nargs=2, metavar=("SHAPE", "DIR"), default=None,
                        help="write a random model of SHAPE (llama-135m) to DIR and exit")
    args = parser.parse_args()
    if args.make_model:
        shape, folder = args.make_model
        if shape != "llama-135m":
            raise SystemExit(f"--make-model: unknown shape {shape!r} (known: llama-135m)")
        make_llama_135m(folder)
        print(f"wrote a random {shape} model to {folder}")
        return
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    breakdown: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tmp
        if args.model is None:
            make_checkpoint(path)
        if args.ours_only:
            step = our_stepper(path, args, breakdown)
            ours = [step(i) for i in range(args.warmup + args.steps)][args.warmup:]
        else:
            ours, trl = run_alternating(path, args, breakdown)
    what = args.model or "tiny DeepSeek-V3-shaped MoE"
    if args.ours_only:
        print(f"\nOur GRPO step, {what}, G={args.G}, prompts/step={args.prompts}, {args.tokens} new tokens, "
              f"beta={args.beta}, threads={args.threads}, share_prompts={not args.no_share_prompts}: "
              f"{statistics.median(ours):.2f} s/step median, {min(ours):.2f} fastest")
        print("\n".join(breakdown_table(breakdown[args.warmup:])))
        return
    mo, mt = statistics.median(ours), statistics.median(trl)
    fo, ft = min(ours), min(trl)
    print(f"\nGRPO step, {what}, G={args.G}, prompts/step={args.prompts}, "
          f"{args.tokens} new tokens, beta={args.beta}, threads={args.threads}, {args.steps} timed steps")
    print("| trainer | s/step (median) | s/step (fastest) | speed-up vs TRL (median) | speed-up vs TRL (fastest) |")
    print("|---|---|---|---|---|")
    print(f"| ours (torch engine) | {mo:.2f} | {fo:.2f} | {mt / mo:.2f}x | {ft / fo:.2f}x |")
    print(f"| TRL GRPOTrainer | {mt:.2f} | {ft:.2f} | 1.00x | 1.00x |")
    print()
    print("\n".join(breakdown_table(breakdown[args.warmup:])))


if __name__ == "__main__":
    main()
