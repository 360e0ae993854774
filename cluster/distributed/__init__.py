"""The bottom floor: the tensor-parallel group and its collectives (imports nothing of ours)."""
