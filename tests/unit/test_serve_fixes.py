"""The gRPC proxy fixes in ``cluster/serving/serve_fixes.py``, on Serve's own status types."""

from __future__ import annotations

import grpc
from ray.exceptions import RayTaskError
from ray.serve._private.grpc_util import get_grpc_response_status
from ray.serve._private.proxy_request_response import ResponseStatus
from ray.serve.exceptions import BackPressureError, gRPCStatusError

from cluster.errors import InvalidRequestError, QueueFullError
from cluster.serving import serve_fixes


class _Context:
    def __init__(self):
        self.trailers = [("request_id", "r-1")]

    def trailing_metadata(self):
        return self.trailers

    def set_trailing_metadata(self, trailers):
        self.trailers = list(trailers)


def _from_replica(err: BaseException, code: grpc.StatusCode) -> BaseException:
    """How a deployment's exception reaches the proxy: in a gRPCStatusError (its set code), in a RayTaskError."""
    wrapped = gRPCStatusError(original_exception=err, code=code, details=str(err))
    return RayTaskError("Ingress.GenerateStream", "traceback", wrapped).as_instanceof_cause()


def test_a_refusal_from_the_replica_keeps_its_retry_hint_through_the_proxy():
    status_of = serve_fixes._with_trailers(get_grpc_response_status)
    status = status_of(_from_replica(QueueFullError("full", retry_after_s=2.5), grpc.StatusCode.RESOURCE_EXHAUSTED),
                       None, "r-1")
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED and status.is_error
    context = _Context()
    serve_fixes._send_trailers(context, status)
    assert context.trailers == [("request_id", "r-1"), ("retry-after-ms", "2500")]


def test_serve_back_pressure_gets_a_hint_and_other_errors_get_no_trailers():
    status_of = serve_fixes._with_trailers(get_grpc_response_status)
    context = _Context()
    serve_fixes._send_trailers(context, status_of(BackPressureError(num_queued_requests=3, max_queued_requests=2),
                                                  None, "r-1"))
    assert ("retry-after-ms", "1000") in context.trailers

    for err, code in [(InvalidRequestError("top_k", "is too big"), grpc.StatusCode.INVALID_ARGUMENT),
                      (RuntimeError("boom"), grpc.StatusCode.INTERNAL)]:
        context = _Context()
        status = status_of(_from_replica(err, code), None, "r-1")
        assert status.code == code
        serve_fixes._send_trailers(context, status)
        assert context.trailers == [("request_id", "r-1")]
    context = _Context()
    serve_fixes._send_trailers(context, ResponseStatus(code=grpc.StatusCode.OK))
    assert context.trailers == [("request_id", "r-1")]


class _Response:
    def __init__(self):
        self.was_cancelled = False

    def cancel(self):
        self.was_cancelled = True

    def cancelled(self):
        return self.was_cancelled


class _Handle:
    def remote(self, *args, **kwargs):
        return _Response()


def test_a_replica_call_of_an_ended_grpc_call_is_cancelled_whenever_it_is_made():
    """The RPC's done-callback cancels the calls made so far, and one made after it (the proxy was
    still admitting the request when the client went away) is cancelled as it is made."""
    responses, state = [], {"finished": False, "abandoned": False}
    handle = serve_fixes._RecordingHandle(_Handle(), responses, state)
    before = handle.remote()
    serve_fixes._cancel_unfinished(responses, state, None)
    after = handle.remote()
    assert before.was_cancelled and after.was_cancelled


def test_a_finished_grpc_call_cancels_nothing():
    responses, state = [], {"finished": False, "abandoned": False}
    handle = serve_fixes._RecordingHandle(_Handle(), responses, state)
    response = handle.remote()
    state["finished"] = True
    serve_fixes._cancel_unfinished(responses, state, None)
    assert not response.was_cancelled
