"""Triton kernels of flashcon (installed as ``flashcon.triton_kernels``)."""
