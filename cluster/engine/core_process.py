"""The engine core's own process: the loop that runs an ``EngineCore`` and talks to its frontend.

The frontend (``CoreClient``) starts this process and listens; the process connects back with a
one-time token, builds the core (weights, KV cache) and says ``ready``. Then, forever: take every
command waiting on the socket (add, abort, stop), run one step if any request is live and send
its deltas with the core's counters. With nothing live it blocks on the socket: an idle core costs
no CPU. Each counters message carries how many aborts the core has taken in; one that leaves it
idle is answered with the counters alone, so the frontend never keeps blocks in its view that
an abort has freed. A fault the core cannot pin on requests ends the process after saying why; the frontend
then starts a new one.

Messages are tuples of small dataclasses (``CoreRequest``, ``CoreOutput``): per step only the new
tokens cross, never a request's whole output.
"""

from __future__ import annotations

import logging
import os

from cluster.config import EngineConfig
from cluster.engine.plan import EnginePlan
from cluster.engine.sequence import FinishReason

logger = logging.getLogger(__name__)

ADD, ABORT, STOP = "add", "abort", "stop"  # frontend -> core
READY, FAILED, STEP, STATS, DEAD = "ready", "failed", "step", "stats", "dead"  # core -> frontend


def run_core_process(config: EngineConfig, plan: EnginePlan, host: str, port: int, token: str,
                     connect_timeout_s: float) -> None:
    """The process's entry point (spawned by ``CoreClient``)."""
    from cluster.engine.core import EngineCore
    from cluster.parallel.message_socket import ChannelClosed, MessageSocket

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine-core: %(message)s")
    channel = MessageSocket.connect(host, port, token, connect_timeout_s)
    try:
        core = EngineCore(config, plan)
    except Exception as err:  # noqa: BLE001 - reported to the frontend, which raises it typed
        channel.send((FAILED, f"{type(err).__name__}: {err}"))
        return
    channel.send((READY, os.getpid(), core.stats()))
    try:
        _serve(core, channel)
    except ChannelClosed:
        pass  # the frontend went away
    except Exception as err:  # noqa: BLE001 - a fault no request could be blamed for
        logger.exception("engine core failed")
        try:
            channel.send((DEAD, f"{type(err).__name__}: {err}"))
        except OSError:
            pass
    finally:
        try:
            core.shutdown()
        finally:
            channel.close()


def _serve(core, channel) -> None:
    # Every counters message says how many aborts the core has taken in, so the frontend knows
    # when its view includes the blocks they freed.
    aborts = reported = 0
    while True:
        if not core.has_unfinished_requests():
            if reported != aborts:  # the aborts freed blocks, and no step will report it
                channel.send((STATS, core.stats(), aborts))
                reported = aborts
            message = channel.recv()  # idle: block until the frontend has something
        elif channel.readable(0):
            message = channel.recv()
        else:
            channel.send((STEP, core.step(), core.stats(), aborts))
            reported = aborts
            continue
        kind, *payload = message
        if kind == STOP:
            return
        if kind == ADD:
            core.add(payload[0])
        elif kind == ABORT:
            request_id, reason = payload
            core.abort(request_id, FinishReason(reason))  # counted even if it had just finished
            aborts += 1
