"""The engine: memory-saving backprop through a chain of blocks with checked reconstruction.

``sequential`` (``ReversibleSequential``, ``reversible()``: the way in), ``backprop`` (the autograd
Function, the backward loop, deferred checks), ``protocol`` (what a block is; errors that name it),
``replay`` (a block's evaluation in backward as its forward saw it: random numbers, modes, buffers,
parameters), ``checks`` (comparing fingerprints, tolerances), ``sensitivity`` (gradient-aware
tolerances), ``anchors``, ``halves``, ``graph_budget``, ``report``.
"""
