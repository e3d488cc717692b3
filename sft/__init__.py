"""Supervised fine-tuning: chat formatting, assistant-only loss masks, packing, the SFT phase."""

from sft.formatting import (
    IGNORE_INDEX,
    FormattingError,
    TokenizedExample,
    row_to_messages,
    tokenize_conversation,
    tokenize_rows,
)
from sft.packing import Batch, check_packing_isolation, first_fit_decreasing, pack_batch, pad_batch
from sft.trainer import SFTConfig, SFTTrainer, StepMetrics, batch_losses, nll_sum, warmup_cosine

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "FormattingError",
    "SFTConfig",
    "SFTTrainer",
    "StepMetrics",
    "TokenizedExample",
    "check_packing_isolation",
    "first_fit_decreasing",
    "batch_losses",
    "nll_sum",
    "pack_batch",
    "pad_batch",
    "row_to_messages",
    "tokenize_conversation",
    "tokenize_rows",
    "warmup_cosine",
]
