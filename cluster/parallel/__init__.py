"""Tensor parallelism: the process group, collectives, executors and workers."""
