"""The one prefix hash: how a full KV block of token ids is named.

The replicas' prefix caches (``cluster/engine/block_manager.py``) register blocks under these
hashes and the request router (``cluster/serving/router.py``) routes on them, so "this replica
was sent these blocks" and "this replica's cache holds these blocks" speak of the same blocks.

A block's hash covers its tokens and, through its parent's hash, every token before it: equal
hashes mean equal prefixes. Stable across processes (``hash()`` is salted per process).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Hash one full block chained to its parent's hash (None for a prompt's first block): a 64-bit int."""
    h = hashlib.blake2b(digest_size=8)
    # A tag byte keeps "no parent" apart from any real parent value.
    h.update(b"\x00" if parent_hash is None else b"\x01" + parent_hash.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The chained hashes of every full block of ``token_ids``; a trailing partial block has none."""
    hashes: list[int] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes
