"""Our top-level package is named ``kernels``, like the Hugging Face package transformers probes for.

transformers gates its hub-kernel integration on ``is_kernels_available()``, which reads the version of the
distribution providing ``kernels`` (ours, 0.1.0) and wants [0.18.2, 0.19). It must stay False so that
transformers never tries to use our package as the hub one, and model forwards must run unchanged.
"""

import importlib.metadata

import torch
from packaging import version

import kernels

# transformers is imported inside the tests: it imports triton, and the kernel tests' Triton interpreter must
# be switched on before triton is first imported when they share a process with this file.


def _probe() -> bool:
    from transformers.utils import import_utils

    probe = import_utils.is_kernels_available
    if hasattr(probe, "cache_clear"):
        probe.cache_clear()
    return probe()


def test_our_package_is_the_importable_kernels():
    assert kernels.__file__.endswith("kernels/__init__.py")
    assert callable(kernels.token_logprobs)


def test_transformers_does_not_take_it_for_the_hub_kernels_package():
    from transformers.utils import import_utils

    assert _probe() is False
    found, found_version = import_utils._is_package_available("kernels", return_version=True)
    assert found  # the probe sees our package ...
    low, high = version.parse(import_utils.KERNELS_MIN_VERSION), version.parse(import_utils.KERNELS_MAX_VERSION)
    assert not (low <= version.parse(found_version) < high)  # ... and rejects its version
    assert not (low <= version.parse(importlib.metadata.version("grpo-toolkit")) < high)
    ours = getattr(kernels, "__version__", None)
    assert ours is None or not (low <= version.parse(ours) < high)


def test_llama_forward_runs_with_our_package_imported():
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
        logprobs, _ = kernels.token_logprobs(hidden, model.lm_head.weight, ids[:, 1:].reshape(-1))
    want = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).reshape(-1)
    torch.testing.assert_close(logprobs, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(-logprobs.mean(), out.loss, atol=1e-5, rtol=1e-5)
    assert _probe() is False
