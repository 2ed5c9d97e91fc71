"""Blocks and layers: the couplings (fused backward), Glow's invertible layers, and adapters that make
other libraries' modules blocks (FrEIA)."""
