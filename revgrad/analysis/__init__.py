"""The exploding-inverses paper's tools beside the engine: stability diagnostics and the
finite-difference regularizer."""
