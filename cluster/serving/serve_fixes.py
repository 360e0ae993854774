"""Two fixes for Ray Serve's gRPC proxy, installed in the proxy process.

When a gRPC client cancels a server-streaming call while the proxy's response generator is
suspended at a ``yield`` (the proxy is writing the previous message), grpcio drops the generator
instead of cancelling it inside an ``await``, so Serve never cancels the replica call and the
request runs to completion with nobody listening: 18-20 of 100 streams cancelled right after their
first message, and 20 of 129 here with Ray 2.60 (the gap of ray-project/ray#52533 and the unmerged
#42665). The fix: each proxied call registers a done-callback on its gRPC context; when the RPC
ends before the proxy finished its replica call, that call is cancelled (or, not made yet, is
cancelled as it is made), and the cancellation reaches the ingress, which cancels its call to the
model server, whose engine aborts the request.

Second: on an error, the proxy sends the deployment's status code and details but drops the
trailing metadata the deployment set (``ResponseStatus`` carries none on the gRPC path), so a
``RESOURCE_EXHAUSTED`` refusal reached the client without its ``retry-after-ms`` hint. The fix: the
proxy's error-status function also computes our trailers from the exception (the retry hint for
our ``QueueFullError`` and for Serve's own back-pressure), and the proxied call sets them on the
client's context before the status goes out.

The Serve proxy imports ``grpc_servicer_functions`` in its own process, so
``cluster/serving/grpc_services.py`` installs this when imported there.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

logger = logging.getLogger(__name__)
_FLAG = "_llm_cluster_cancels_abandoned_calls"


class _RecordingHandle:
    """A deployment handle that remembers the responses of its ``remote`` calls, and cancels a call
    made after the gRPC call it serves has already ended."""

    def __init__(self, handle, responses: list, state: dict):
        self._handle = handle
        self._responses = responses
        self._state = state

    def remote(self, *args, **kwargs):
        response = self._handle.remote(*args, **kwargs)
        self._responses.append(response)
        if self._state["abandoned"]:
            _cancel(response)
        return response

    def __getattr__(self, name):
        return getattr(self._handle, name)


def _cancel(response) -> None:
    try:
        if not response.cancelled():
            response.cancel()
    except Exception:  # noqa: BLE001 - a callback must not raise into grpcio
        logger.debug("cancelling an abandoned gRPC call's replica request failed", exc_info=True)


def _cancel_unfinished(responses: list, state: dict, _context) -> None:
    if state["finished"]:
        return
    state["abandoned"] = True  # a replica call the proxy has yet to make is cancelled as it is made
    for response in responses:
        _cancel(response)


def _with_trailers(original_status):
    """Serve's error-to-status function, also carrying our trailers for the error (in the status's
    ``headers``, which the gRPC path otherwise ignores)."""

    @functools.wraps(original_status)
    def get_grpc_response_status(exc, *args, **kwargs):
        status = original_status(exc, *args, **kwargs)
        try:
            from cluster.serving import conversion

            trailers = conversion.grpc_trailers(exc) if status.is_error else []
            if trailers and status.code == conversion.grpc_status(exc)[0]:
                status = dataclasses.replace(status, headers=list(trailers))
        except Exception:  # noqa: BLE001 - never turn an error status into a proxy crash
            logger.debug("computing trailers for a gRPC error failed", exc_info=True)
        return status

    setattr(get_grpc_response_status, _FLAG, True)
    return get_grpc_response_status


def _send_trailers(context, status) -> None:
    headers = getattr(status, "headers", None)
    if not getattr(status, "is_error", False) or not headers:
        return
    try:
        existing = list(context.trailing_metadata() or []) if hasattr(context, "trailing_metadata") else []
        context.set_trailing_metadata(existing + [(str(k), str(v)) for k, v in headers])
    except Exception:  # noqa: BLE001
        logger.debug("setting trailers on a gRPC error failed", exc_info=True)


def install() -> bool:
    """Wrap ``gRPCProxy.send_request_to_replica`` and the proxy's error-status function
    (idempotent). Returns False, and logs, where this Serve version lacks what the fixes rely on."""
    try:
        from ray.serve._private import proxy as proxy_module
        from ray.serve._private.proxy import gRPCProxy
    except ImportError:
        logger.warning("Serve has no gRPCProxy: abandoned gRPC streams are not cancelled by llm-cluster")
        return False
    original = gRPCProxy.send_request_to_replica
    if getattr(original, _FLAG, False):
        return True
    if hasattr(proxy_module, "get_grpc_response_status"):
        proxy_module.get_grpc_response_status = _with_trailers(proxy_module.get_grpc_response_status)
    else:
        logger.warning("Serve's proxy has no get_grpc_response_status: gRPC errors go out without retry hints")

    @functools.wraps(original)
    async def send_request_to_replica(self, request_id, internal_request_id, handle, proxy_request,
                                      *args, **kwargs):
        context = getattr(proxy_request, "context", None)
        if context is None or not hasattr(context, "add_done_callback"):
            async for item in original(self, request_id, internal_request_id, handle, proxy_request, *args, **kwargs):
                yield item
            return
        responses: list = []
        state = {"finished": False, "abandoned": False}
        context.add_done_callback(functools.partial(_cancel_unfinished, responses, state))
        async for item in original(self, request_id, internal_request_id, _RecordingHandle(handle, responses, state),
                                   proxy_request, *args, **kwargs):
            _send_trailers(context, item)
            yield item
        state["finished"] = True

    setattr(send_request_to_replica, _FLAG, True)
    gRPCProxy.send_request_to_replica = send_request_to_replica
    return True
