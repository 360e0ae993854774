"""A fix for Ray Serve's gRPC proxy, installed in the proxy process.

When a gRPC client cancels a server-streaming call while the proxy's response generator is
suspended at a ``yield`` (the proxy is writing the previous message), grpcio drops the generator
instead of cancelling it inside an ``await``, so Serve never cancels the replica call and the
request runs to completion with nobody listening: 18-20 of 100 streams cancelled right after their
first message, and 20 of 129 here with Ray 2.60 (the gap of ray-project/ray#52533 and the unmerged
#42665). The fix: each proxied call registers a done-callback on its gRPC context; when the RPC
ends before the proxy finished its replica call, that call is cancelled, and Serve propagates the
cancellation to the ingress and the model server, whose engine aborts the request.

The Serve proxy imports ``grpc_servicer_functions`` in its own process, so
``cluster/serving/grpc_services.py`` installs this when imported there.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)
_FLAG = "_llm_cluster_cancels_abandoned_calls"


class _RecordingHandle:
    """A deployment handle that remembers the responses of its ``remote`` calls."""

    def __init__(self, handle, responses: list):
        self._handle = handle
        self._responses = responses

    def remote(self, *args, **kwargs):
        response = self._handle.remote(*args, **kwargs)
        self._responses.append(response)
        return response

    def __getattr__(self, name):
        return getattr(self._handle, name)


def _cancel_unfinished(responses: list, state: dict, _context) -> None:
    if state["finished"]:
        return
    for response in responses:
        try:
            if not response.cancelled():
                response.cancel()
        except Exception:  # noqa: BLE001 - a callback must not raise into grpcio
            logger.debug("cancelling an abandoned gRPC call's replica request failed", exc_info=True)


def install() -> bool:
    """Wrap ``gRPCProxy.send_request_to_replica`` (idempotent). Returns False, and logs, where this
    Serve version lacks what the fix relies on."""
    try:
        from ray.serve._private.proxy import gRPCProxy
    except ImportError:
        logger.warning("Serve has no gRPCProxy: abandoned gRPC streams are not cancelled by llm-cluster")
        return False
    original = gRPCProxy.send_request_to_replica
    if getattr(original, _FLAG, False):
        return True

    @functools.wraps(original)
    async def send_request_to_replica(self, request_id, internal_request_id, handle, proxy_request,
                                      *args, **kwargs):
        context = getattr(proxy_request, "context", None)
        if context is None or not hasattr(context, "add_done_callback"):
            async for item in original(self, request_id, internal_request_id, handle, proxy_request, *args, **kwargs):
                yield item
            return
        responses: list = []
        state = {"finished": False}
        context.add_done_callback(functools.partial(_cancel_unfinished, responses, state))
        async for item in original(self, request_id, internal_request_id, _RecordingHandle(handle, responses),
                                   proxy_request, *args, **kwargs):
            yield item
        state["finished"] = True

    setattr(send_request_to_replica, _FLAG, True)
    gRPCProxy.send_request_to_replica = send_request_to_replica
    return True
