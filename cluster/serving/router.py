"""Prefix-affinity request routing for the model-server deployment (a Ray Serve ``RequestRouter``).

Each model-server replica keeps a prefix cache: a prompt whose beginning it has already seen is
prefilled only from the first uncached block. Serve's default router (power of two choices) ignores
that and spreads one conversation's turns over every replica. This router sends a request to the
replica most likely to hold the longest prefix of its prompt, unless that replica is clearly busier
than another or its KV cache is nearly full.

The policy, in :class:`PrefixAffinityPolicy` (pure Python, no Ray needed to test it):

* The prompt's token ids (``EngineRequest.routing_tokens()``; the ingress tokenizes text and chat
  prompts) are named by the replicas' own prefix-cache block hashes
  (``cluster/contracts/block_hash.py``, ``block_size`` tokens a block, chained so equal hashes mean
  equal prefixes); the trailing partial block is ignored, as the cache ignores it. A request
  without token ids is routed by load.
* Per replica the router remembers an LRU-bounded set of block hashes it routed there: the blocks
  that replica's cache was sent (it may have evicted some since), built from this router's own
  decisions.
* A replica's match is the number of leading blocks found in its set. The candidate with the longest
  match wins (ties: least loaded, then random), unless its KV usage is above ``max_kv_usage``, its
  load exceeds the least-loaded candidate's by more than ``imbalance_threshold``, or it is busier
  than the least-loaded candidate while its match covers less than ``min_match_fraction`` of the
  prompt (a shared system prompt alone must not pin every new conversation to one replica; each
  replica caches it once); then, and when no candidate matches at all, the least-loaded candidate
  (ties random) is chosen. Candidates over the KV cap are avoided as fallbacks too while any other
  candidate is under it.
* The chosen replica records the request's block hashes.

:class:`PrefixAffinityRouter` adapts this to Serve: it turns each ``RunningReplica`` into
``(replica_id, load, kv_usage)`` and returns ranks for Serve's own probing, retry and backoff.
Use it on a deployment with::

    @serve.deployment(request_router_config=RequestRouterConfig(
        request_router_class="cluster.serving.router:PrefixAffinityRouter",
        request_router_kwargs={"block_size": 16, "imbalance_threshold": 8},
        request_routing_stats_period_s=1.0))
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Mapping, Sequence

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from cluster.contracts.block_hash import block_hashes

logger = logging.getLogger("ray.serve")

RoutingTokens = Sequence[int]  # a prompt's token ids
Candidate = tuple[Hashable, float, float]  # (replica_id, load, kv_usage)


@dataclass(frozen=True)
class PrefixAffinityConfig:
    """The router's knobs; ``request_router_kwargs`` may set any of them."""

    block_size: int = 16  # tokens per KV block: the replicas' cache.block_size (the app sets it)
    max_entries_per_replica: int = 10_000  # LRU bound on the block hashes remembered per replica
    imbalance_threshold: float = 8  # leave the best-prefix replica if its load exceeds the least-loaded one's by more
    max_kv_usage: float = 0.95  # leave the best-prefix replica if its reported KV-cache usage is above this
    min_match_fraction: float = 0.3  # below this share of the prompt matched, a busier best-prefix replica yields

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_entries_per_replica < 1:
            raise ValueError(f"max_entries_per_replica must be >= 1, got {self.max_entries_per_replica}")
        if self.imbalance_threshold < 0:
            raise ValueError(f"imbalance_threshold must be >= 0, got {self.imbalance_threshold}")
        if not 0 <= self.min_match_fraction <= 1:
            raise ValueError(f"min_match_fraction must be in [0, 1], got {self.min_match_fraction}")


@dataclass(frozen=True)
class Decision:
    """Outcome of one routing decision."""

    replica_id: Hashable  # where the request goes
    matched_blocks: int  # longest prefix match among the candidates, in blocks
    reason: str  # "prefix" | "no_match" | "kv_cache" | "imbalance" | "short_match"
    hashes: tuple[int, ...]  # the request's block hashes, for record_hashes()


class PrefixAffinityPolicy:
    """Longest-prefix-match routing with a load and KV-usage escape hatch (see the module docstring).

    Not thread-safe; Serve calls a router from one event loop.
    """

    def __init__(self, config: PrefixAffinityConfig | None = None, rng: random.Random | None = None):
        self.config = config or PrefixAffinityConfig()
        self._rng = rng or random.Random()
        self._seen: dict[Hashable, OrderedDict[int, None]] = {}  # replica -> block hashes, oldest first

    def hashes(self, routing_tokens: RoutingTokens | None) -> list[int]:
        return block_hashes(routing_tokens, self.config.block_size) if routing_tokens else []

    def match_length(self, replica_id: Hashable, hashes: Sequence[int]) -> int:
        """Leading blocks of ``hashes`` this replica is believed to hold."""
        seen = self._seen.get(replica_id)
        if not seen:
            return 0
        n = 0
        for h in hashes:
            if h not in seen:
                break
            n += 1
        return n

    def decide(self, candidates: Sequence[Candidate], routing_tokens: RoutingTokens | None) -> Decision:
        """Pick one of ``candidates`` (``(replica_id, load, kv_usage)``) for a prompt; records nothing."""
        if not candidates:
            raise ValueError("no candidate replicas")
        cfg = self.config
        hashes = tuple(self.hashes(routing_tokens))
        least = self._least_loaded(candidates)

        best_len, tied = 0, []
        if hashes:
            for cand in candidates:
                n = self.match_length(cand[0], hashes)
                if n > best_len:
                    best_len, tied = n, [cand]
                elif n == best_len and n > 0:
                    tied.append(cand)
        if best_len == 0:
            return Decision(least[0], 0, "no_match", hashes)

        best = self._least_loaded(tied)
        if best[2] > cfg.max_kv_usage:
            return Decision(least[0], best_len, "kv_cache", hashes)
        if best[1] - least[1] > cfg.imbalance_threshold:
            return Decision(least[0], best_len, "imbalance", hashes)
        if best[1] > least[1] and best_len * cfg.block_size < cfg.min_match_fraction * len(routing_tokens):
            return Decision(least[0], best_len, "short_match", hashes)
        return Decision(best[0], best_len, "prefix", hashes)

    def choose(self, candidates: Sequence[Candidate], routing_tokens: RoutingTokens | None) -> Hashable:
        """The replica id ``decide`` picks."""
        return self.decide(candidates, routing_tokens).replica_id

    def record(self, replica_id: Hashable, routing_tokens: RoutingTokens | None) -> None:
        """Remember that ``replica_id`` now holds this prompt's prefix."""
        self.record_hashes(replica_id, self.hashes(routing_tokens))

    def record_hashes(self, replica_id: Hashable, hashes: Sequence[int]) -> None:
        if not hashes:
            return
        seen = self._seen.setdefault(replica_id, OrderedDict())
        # Deepest block first, so a prefix's root is the most recent entry and is evicted last:
        # evicting a root would orphan every longer entry behind it.
        for h in reversed(hashes):
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.config.max_entries_per_replica:
            seen.popitem(last=False)

    def forget(self, replica_id: Hashable) -> None:
        """Drop everything remembered for a replica that left."""
        self._seen.pop(replica_id, None)

    def retain(self, replica_ids: Iterable[Hashable]) -> None:
        """Forget every replica not in ``replica_ids``."""
        keep = set(replica_ids)
        for rid in [r for r in self._seen if r not in keep]:
            del self._seen[rid]

    def known_replicas(self) -> set[Hashable]:
        return set(self._seen)

    def num_entries(self, replica_id: Hashable) -> int:
        return len(self._seen.get(replica_id, ()))

    def _least_loaded(self, candidates: Sequence[Candidate]) -> Candidate:
        """Lowest load among those under the KV cap (all of them if none is), ties random."""
        pool = [c for c in candidates if c[2] <= self.config.max_kv_usage] or list(candidates)
        low = min(c[1] for c in pool)
        return self._rng.choice([c for c in pool if c[1] == low])


def reported_load(stats: Mapping[str, Any] | None) -> int:
    """``num_running + num_waiting`` from a replica's ``record_routing_stats()``; 0 if absent."""
    if not stats:
        return 0
    return int(stats.get("num_running") or 0) + int(stats.get("num_waiting") or 0)


def reported_kv_usage(stats: Mapping[str, Any] | None) -> float:
    """``kv_cache_usage`` from a replica's ``record_routing_stats()``; 0.0 if absent."""
    return float((stats or {}).get("kv_cache_usage") or 0.0)


def replica_load(stats: Mapping[str, Any] | None, tracked_queue_len: int | None) -> int:
    """A replica's load in requests: the larger of what it last reported (running + waiting, up to
    ``request_routing_stats_period_s`` old) and Serve's own count of its ongoing requests (bumped on
    every send, lowered on every completion, corrected by probes; None when unknown or stale).

    Both count the same requests, so they are not added: the larger is the better lower bound.
    """
    return max(reported_load(stats), tracked_queue_len or 0)


class ReplicaBoard:
    """What the routers of this process last heard from each replica, per deployment.

    Serve pushes every change of a replica's ``record_routing_stats()`` (and of the replica set) to
    the routers of the handles in this process; they post it here. The ingress answers health checks
    from it at once, without a call that could queue behind user traffic or wait for a replica
    that is being replaced. A deployment no router here has seen yet is unknown (None).
    """

    _deployments: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = {}

    @classmethod
    def post(cls, app_name: str, deployment: str, replicas: Iterable[RunningReplica]) -> None:
        cls._deployments[(app_name, deployment)] = {r.replica_id.unique_id: dict(r.routing_stats or {})
                                                    for r in replicas}

    @classmethod
    def drop(cls, app_name: str, deployment: str, replica_unique_id: str) -> None:
        cls._deployments.get((app_name, deployment), {}).pop(replica_unique_id, None)

    @classmethod
    def num_serving(cls, app_name: str, deployment: str) -> int | None:
        """Replicas whose last report says ``serving``; None while no replica of the deployment has
        reported to a router of this process (unknown, not "none")."""
        reports = [stats["serving"] for stats in cls._deployments.get((app_name, deployment), {}).values()
                   if "serving" in stats]
        return sum(1 for serving in reports if serving) if reports else None


def routing_tokens_of(pending_request: PendingRequest | None) -> RoutingTokens | None:
    """The prompt's token ids of a handle call whose first argument is an ``EngineRequest``
    (duck-typed); None for any other call or a request not tokenized, which is routed by load."""
    if pending_request is None or not pending_request.args:
        return None
    get = getattr(pending_request.args[0], "routing_tokens", None)
    if not callable(get):
        return None
    try:
        return get()
    except Exception:  # a malformed request must not stall routing; the replica will reject it
        logger.exception("prefix router: routing_tokens() failed; routing by load")
        return None


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve adapter for :class:`PrefixAffinityPolicy`.

    ``choose_replicas`` returns ranks ``[[policy's pick], [up to two others, at random]]``: Serve
    probes the pick (via its queue-length cache) and, if it is full or does not answer, falls back to
    the better of the two others, then backs off and asks again, as with the default router.

    No ``FIFOMixin``: without it Serve hands the chosen replica to the very request it was chosen
    for, which is what affinity needs (FIFO would give it to the oldest waiting request instead).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._policy = PrefixAffinityPolicy()
        self._rng = random.Random()

    def initialize_state(self, **kwargs: Any) -> None:
        """Receives ``RequestRouterConfig.request_router_kwargs``: fields of PrefixAffinityConfig."""
        self._policy = PrefixAffinityPolicy(PrefixAffinityConfig(**kwargs))

    @property
    def policy(self) -> PrefixAffinityPolicy:
        return self._policy

    def _candidate(self, replica: RunningReplica) -> Candidate:
        stats = replica.routing_stats
        tracked = self.replica_queue_len_cache.get(replica.replica_id)
        return replica.replica_id, replica_load(stats, tracked), reported_kv_usage(stats)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Serve skips its retry backoff unless the router sets this (the locality and
            # multiplex mixins do once they consider every replica; we always do).
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        decision = self._policy.decide([self._candidate(r) for r in candidate_replicas],
                                       routing_tokens_of(pending_request))
        chosen = next(r for r in candidate_replicas if r.replica_id == decision.replica_id)
        # Recorded now, not on acceptance, so a burst of requests sharing a prefix follows the first.
        self._policy.record_hashes(chosen.replica_id, decision.hashes)
        if logger.isEnabledFor(logging.DEBUG):
            request_id = pending_request.metadata.request_id if pending_request else None
            logger.debug("prefix router: %s -> %s (%s, %d blocks matched)", request_id,
                         chosen.replica_id, decision.reason, decision.matched_blocks)
        others = [r for r in candidate_replicas if r is not chosen]
        spill = self._rng.sample(others, min(2, len(others)))
        return [[chosen], spill] if spill else [[chosen]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """A replica accepted the request (may differ from our pick after a spill-over): it now holds
        the prefix. Serve calls this only when replicas may reject, its default outside Ray Client."""
        super().on_request_routed(pending_request, replica_id, result)
        self._policy.record(replica_id, routing_tokens_of(pending_request))

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._policy.retain(r.replica_id for r in replicas)
        deployment = self._deployment_id
        ReplicaBoard.post(deployment.app_name, deployment.name, replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._policy.forget(replica_id)
        ReplicaBoard.drop(self._deployment_id.app_name, self._deployment_id.name, replica_id.unique_id)


__all__ = [
    "Decision",
    "PrefixAffinityConfig",
    "PrefixAffinityPolicy",
    "PrefixAffinityRouter",
    "ReplicaBoard",
    "replica_load",
    "reported_kv_usage",
    "reported_load",
    "routing_tokens_of",
]
