"""Triton implementations of the ops in :mod:`kernels`; each module imports ``triton`` at import time."""
