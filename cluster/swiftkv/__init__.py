"""SwiftKV (arXiv 2410.03960): checkpoints, the dense reference/training model, distillation."""
