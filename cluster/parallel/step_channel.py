"""Rank 0 hands each step to the other ranks with one gloo broadcast.

The driver talks to rank 0 only (one Ray call per step); rank 0 broadcasts the pickled
step over a CPU (gloo) group of the tensor-parallel ranks. The buffer has a fixed size so a
typical step costs one collective: a length header and the payload travel together, and
only a step larger than the buffer needs a second broadcast for its remainder.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.distributed as dist

_HEADER = 8  # bytes of the little-endian payload length
DEFAULT_CAPACITY = 64 * 1024


class StepChannel:
    """Broadcast of picklable objects from group rank 0 to every rank of ``group``."""

    def __init__(self, group, src_rank: int = 0, capacity: int = DEFAULT_CAPACITY):
        self.group = group
        self.src = dist.get_global_rank(group, src_rank) if group is not None else src_rank
        self.capacity = capacity
        self._buffer = torch.empty(capacity, dtype=torch.uint8)

    def send(self, obj: Any) -> None:
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        size = len(payload)
        head = self._buffer.numpy()
        head[:_HEADER] = memoryview(size.to_bytes(_HEADER, "little"))
        first = min(size, self.capacity - _HEADER)
        head[_HEADER:_HEADER + first] = memoryview(payload)[:first]
        dist.broadcast(self._buffer, src=self.src, group=self.group)
        if size > first:
            rest = torch.frombuffer(bytearray(payload[first:]), dtype=torch.uint8)
            dist.broadcast(rest, src=self.src, group=self.group)

    def recv(self) -> Any:
        dist.broadcast(self._buffer, src=self.src, group=self.group)
        head = self._buffer.numpy()
        size = int.from_bytes(head[:_HEADER].tobytes(), "little")
        first = min(size, self.capacity - _HEADER)
        payload = head[_HEADER:_HEADER + first].tobytes()
        if size > first:
            rest = torch.empty(size - first, dtype=torch.uint8)
            dist.broadcast(rest, src=self.src, group=self.group)
            payload += rest.numpy().tobytes()
        return pickle.loads(payload)
