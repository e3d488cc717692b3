import random

import pytest
import torch

from sft.formatting import IGNORE_INDEX, TokenizedExample, tokenize_rows
from sft.packing import (
    check_packing_isolation,
    first_fit_decreasing,
    pack_batch,
    pad_batch,
    shift_targets,
)
from sft.trainer import nll_sum
from tests.helpers.chat import char_tokenizer, tiny_llama


def example(ids, n_prompt):
    """An example whose first ``n_prompt`` tokens are masked."""
    return TokenizedExample(list(ids), [IGNORE_INDEX] * n_prompt + list(ids[n_prompt:]))


def test_first_fit_decreasing_hand_example():
    # Longest first: 5 opens bin 0 (room 2), 4 opens bin 1 (room 3), 3 joins bin 1, 2 joins bin 0.
    assert first_fit_decreasing([3, 5, 2, 4], capacity=7) == [[1, 2], [3, 0]]
    assert first_fit_decreasing([4, 4, 4], capacity=4) == [[0], [1], [2]]
    assert first_fit_decreasing([], capacity=4) == []
    with pytest.raises(ValueError, match="item 1 has length 9, expected 1..8"):
        first_fit_decreasing([3, 9], capacity=8)


def test_first_fit_decreasing_places_every_item_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    bins = first_fit_decreasing(lengths, capacity=64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= 11 / 9 * (sum(lengths) / 64) + 1  # FFD's worst-case bound over the optimum
    # first fit: no item fits into an earlier bin than the one it went to, at the time it was placed
    naive: list[list[int]] = []
    for i in sorted(range(500), key=lambda i: (-lengths[i], i)):
        for b in naive:
            if sum(lengths[j] for j in b) + lengths[i] <= 64:
                b.append(i)
                break
        else:
            naive.append([i])
    assert bins == naive


def test_shift_targets():
    assert shift_targets([IGNORE_INDEX, IGNORE_INDEX, 7, 8]) == [IGNORE_INDEX, 7, 8, IGNORE_INDEX]


def test_pad_batch_hand_example():
    b = pad_batch([example([1, 2, 3], 1), example([4, 5], 1)], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert b.targets.tolist() == [[2, 3, IGNORE_INDEX], [5, IGNORE_INDEX, IGNORE_INDEX]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert (b.n_tokens, b.n_targets) == (5, 3)


def test_pack_batch_keeps_every_token_once_and_restarts_positions():
    a, b, c = example([1, 2, 3], 1), example([4, 5], 1), example([6, 7, 8, 9], 2)
    batch = pack_batch([[a, b], [c]], pad_id=0)
    assert batch.attention_mask is None
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    # the last token of `a` has no target: it must not learn to predict `b`'s first token
    assert batch.targets.tolist() == [
        [2, 3, IGNORE_INDEX, 5, IGNORE_INDEX],
        [IGNORE_INDEX, 8, 9, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert (batch.n_tokens, batch.n_targets) == (9, 5)


def test_packing_random_examples_keeps_every_token_exactly_once():
    rng = random.Random(1)
    examples = [example([rng.randint(1, 50) for _ in range(rng.randint(2, 30))], 1) for _ in range(60)]
    bins = first_fit_decreasing([len(e) for e in examples], capacity=32)
    batch = pack_batch([[examples[i] for i in b] for b in bins], pad_id=0)
    seen = []
    for r, b in enumerate(bins):
        at = 0
        for i in b:
            n = len(examples[i])
            assert batch.input_ids[r, at : at + n].tolist() == examples[i].input_ids
            assert batch.position_ids[r, at : at + n].tolist() == list(range(n))
            seen.append(i)
            at += n
    assert sorted(seen) == list(range(60))
    assert batch.n_tokens == sum(len(e) for e in examples)
    assert batch.n_targets == sum(e.n_labels for e in examples)


@pytest.fixture(scope="module")
def tok_model_examples():
    tok = char_tokenizer()
    rows = [
        {"prompt": "What is 3 + 4?", "completion": "<think>3 + 4 = 7.</think><answer>7</answer>"},
        {"prompt": "Compute 9 * 8 - 5.", "completion": "<think>9 * 8 = 72. 72 - 5 = 67.</think><answer>67</answer>"},
        {"prompt": "Evaluate 2 - 1.", "completion": "<think>2 - 1 = 1.</think><answer>1</answer>"},
        {"prompt": "What is 5 * 5?", "completion": "<think>5 * 5 = 25.</think><answer>25</answer>"},
    ]
    examples, _ = tokenize_rows(rows, tok)
    model = tiny_llama(len(tok)).eval()
    for p in model.parameters():  # make attention matter: larger random weights than the init
        p.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    return tok, model, examples


def test_packed_batch_gives_the_same_loss_as_the_padded_batch(tok_model_examples):
    tok, model, examples = tok_model_examples
    padded = pad_batch(examples, tok.pad_token_id)
    bins = first_fit_decreasing([len(e) for e in examples], capacity=80)
    assert len(bins) < len(examples)  # some row really holds several examples
    packed = pack_batch([[examples[i] for i in b] for b in bins], tok.pad_token_id)
    assert padded.n_targets == packed.n_targets == sum(e.n_labels for e in examples)
    with torch.no_grad():
        loss_padded = nll_sum(model, padded) / padded.n_targets
        loss_packed = nll_sum(model, packed) / packed.n_targets
        leaky = pack_batch([[examples[i] for i in b] for b in bins], tok.pad_token_id)
        leaky_mask = torch.ones_like(leaky.input_ids)  # one sequence per row: examples see each other
        loss_leaky = (
            nll_sum(model, type(leaky)(leaky.input_ids, leaky.targets, leaky.position_ids, leaky_mask, leaky.n_tokens))
            / leaky.n_targets
        )
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-5)
    assert abs(loss_leaky - loss_padded) > 1e-3  # the comparison can tell a leak apart


def test_packing_isolation_check(tok_model_examples):
    tok, model, _ = tok_model_examples
    check_packing_isolation(model, len(tok))
    assert not model.training  # the mode is restored

    class Leaky(torch.nn.Module):
        """Ignores packing: always attends over the whole row."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), position_ids=position_ids)

    with pytest.raises(RuntimeError, match="Leaky lets packed examples attend to each other"):
        check_packing_isolation(Leaky(model), len(tok))
