"""Tensor-parallel building blocks; model files only compose these."""
