"""Registers our gRPC services with the server that Serve's gRPC proxy builds.

The generated ``add_*Servicer_to_server`` functions decode requests with ``FromString``, and a
request that does not decode (bad wire format, bad UTF-8 in a string field) then raises inside
grpcio, which answers UNKNOWN. These registrations build the same handlers from the service
descriptors, with a decoder that hands undecodable bytes to the method as an
``UndecodableMessage``; the method refuses it as INVALID_ARGUMENT, like any other bad input.
List these functions in ``grpc_servicer_functions`` (``cluster.serving.app.GRPC_SERVICER_FUNCTIONS``).
"""

from __future__ import annotations

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2

from cluster.serving import serve_fixes
from cluster.serving.conversion import safe_deserializer
from cluster.v1 import generation_pb2

serve_fixes.install()  # this module is imported in Serve's proxy process: fix its stream cancellation there


def add_generation_service(servicer, server) -> None:
    """``cluster.v1.GenerationService``."""
    _add_service(servicer, server, generation_pb2.DESCRIPTOR.services_by_name["GenerationService"])


def add_health_service(servicer, server) -> None:
    """The standard ``grpc.health.v1.Health``."""
    _add_service(servicer, server, health_pb2.DESCRIPTOR.services_by_name["Health"])


def _add_service(servicer, server, service) -> None:
    handlers = {method.name: _handler(servicer, method) for method in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _handler(servicer, method) -> grpc.RpcMethodHandler:
    if method.client_streaming:
        raise ValueError(f"{method.full_name}: client-streaming methods are not served")
    request = message_factory.GetMessageClass(method.input_type)
    response = message_factory.GetMessageClass(method.output_type)
    make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
    return make(getattr(servicer, method.name), request_deserializer=safe_deserializer(request),
                response_serializer=response.SerializeToString)
