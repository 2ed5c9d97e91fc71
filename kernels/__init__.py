"""Triton kernels for revgrad, installed as ``revgrad.kernels``.

This package imports only torch and triton, never the rest of revgrad: every kernel here has a
pure-PyTorch twin in ``revgrad/`` that is the CPU path and the test reference.
"""
