"""Supervised fine-tuning: chat formatting, assistant-only loss masks, packing, the SFT phase."""
