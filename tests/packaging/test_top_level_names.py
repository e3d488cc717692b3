"""Our top-level packages must not shadow, or be shadowed by, another installed distribution's modules.

Our kernels package was once named ``kernels``, the import name of Hugging Face's hub-kernels package; once
transformers (>= 5.25) depended on that package, ``import transformers`` found ours first and failed. These
tests check every one of our top-level names against what the installed distributions provide, that each
resolves to this checkout, and that transformers imports and runs its models next to them.
"""

import importlib.metadata
import importlib.util
from pathlib import Path

import torch

import grpo_kernels

ROOT = Path(__file__).resolve().parents[2]
OUR_TOP_LEVEL = ("grpo", "grpo_kernels", "model", "rollout", "rewards", "sft")

# transformers is imported inside the tests: it imports triton, and the kernel tests' Triton interpreter must
# be switched on before triton is first imported when they share a process with this file.


def _provided_by_others() -> dict[str, set[str]]:
    """Top-level import names -> the installed distributions other than ours that ship them."""
    found: dict[str, set[str]] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name is None or name.lower().replace("_", "-") == "grpo-toolkit":
            continue
        tops = (dist.read_text("top_level.txt") or "").split()
        tops += [Path(str(f)).parts[0].removesuffix(".py") for f in dist.files or ()
                 if not str(f).startswith(("..", "/"))]
        for top in tops:
            found.setdefault(top, set()).add(name)
    return found


def test_no_installed_distribution_ships_our_top_level_names():
    others = _provided_by_others()
    clashes = {top: sorted(others[top]) for top in OUR_TOP_LEVEL if top in others}
    assert not clashes, f"installed distributions ship modules with our package names: {clashes}"


def test_our_names_resolve_to_this_checkout():
    for top in OUR_TOP_LEVEL:
        spec = importlib.util.find_spec(top)
        assert spec is not None and spec.origin is not None, top
        assert Path(spec.origin).resolve() == ROOT / top / "__init__.py", (top, spec.origin)


def test_transformers_imports_and_runs_next_to_our_packages():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 7, 61) and torch.isfinite(out.loss)
    # The same logits through our kernel: log-probs of the next tokens from the final hidden states.
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, 16)
        logprobs, _ = grpo_kernels.token_logprobs(hidden, model.lm_head.weight, ids[:, 1:].reshape(-1))
    want = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).reshape(-1)
    torch.testing.assert_close(logprobs, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(-logprobs.mean(), out.loss, atol=1e-5, rtol=1e-5)
