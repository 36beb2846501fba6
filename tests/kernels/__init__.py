"""Kernel matrix (issue 8): see matrix.py. A package, so its conftest is kernels.conftest."""
