"""Triton implementations of the ops in :mod:`grpo_kernels`; each module imports ``triton`` at import time."""
