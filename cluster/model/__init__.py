"""Model code: tensor-parallel layers, model files that compose them, and weight loading."""
