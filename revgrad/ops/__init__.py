"""Ops with two implementations: Triton kernels (``revgrad.kernels``) and their PyTorch twins.

``dispatch`` decides which runs; ``fingerprint`` (random projections of an activation) and ``fused``
(the couplings' elementwise math, the fingerprint folded in) are the ops. No autograd here beyond
what the twins get from PyTorch.
"""
