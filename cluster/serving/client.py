"""A small gRPC client over the generated stubs: ``llm-cluster generate --server HOST:PORT``.
It sends ``LLM_CLUSTER_API_KEY`` from the environment, when set, as a Bearer token."""

from __future__ import annotations

import os
import sys

import grpc

from cluster.v1 import generation_pb2 as pb
from cluster.v1 import generation_pb2_grpc as pb_grpc


def stream_generate(args) -> int:
    sampling = pb.SamplingParameters(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                     top_k=args.top_k, stop=args.stop)
    if args.seed is not None:
        sampling.seed = args.seed
    if args.chat:
        request = pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=args.prompt)]),
                                     sampling=sampling)
    else:
        request = pb.GenerateRequest(prompt=args.prompt, sampling=sampling)
    metadata = [("application", args.application)]
    api_key = os.environ.get("LLM_CLUSTER_API_KEY")
    if api_key:
        metadata.append(("authorization", f"Bearer {api_key}"))
    with grpc.insecure_channel(args.server) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        try:
            for message in stub.GenerateStream(request, metadata=metadata):
                sys.stdout.write(message.text)
                sys.stdout.flush()
                if message.finish_reason:
                    usage = message.usage
                    reason = pb.FinishReason.Name(message.finish_reason).removeprefix("FINISH_REASON_").lower()
                    sys.stderr.write(f"\n[{reason}; {usage.prompt_tokens} prompt + {usage.completion_tokens} "
                                     f"completion tokens, {usage.cached_prompt_tokens} cached]\n")
        except grpc.RpcError as err:
            sys.stderr.write(f"\nerror: {err.code().name}: {err.details()}\n")
            return 1
    return 0
