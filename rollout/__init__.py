"""Rollout engines behind one interface: a PyTorch engine and a vLLM engine."""
