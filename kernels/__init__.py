"""Triton kernels with PyTorch references; dispatch picks Triton on CUDA and the reference elsewhere."""
