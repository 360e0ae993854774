"""The serving cluster: a Ray Serve application over the engine (gRPC, OpenAI-style HTTP)."""
