"""Per-rank model execution: input tensors, KV cache storage and the model runner."""
