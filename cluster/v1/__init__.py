"""Generated gRPC stubs of protos/cluster/v1 (``make protos``; do not edit the *_pb2* files)."""
