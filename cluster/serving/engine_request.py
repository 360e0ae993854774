"""What the ingress hands a model-server replica: one request, already converted and validated.

gRPC and HTTP requests both become an ``EngineRequest`` in ``cluster/serving/conversion.py``.
Chat messages travel as messages and are rendered through the model's chat template by the
replica (which holds the tokenizer). The router reads ``routing_tokens()`` to find the replica
whose prefix cache most likely holds the prompt's beginning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.sampling_params import SamplingParams


@dataclass
class EngineRequest:
    request_id: str
    prompt: str | None = None  # text
    prompt_token_ids: list[int] | None = None  # or token ids
    messages: list[dict] | None = None  # or chat messages ({"role", "content"}), templated by the replica
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens_is_default: bool = False  # max_tokens is the server's default: cut to the context, never refused

    def routing_tokens(self) -> list[int] | str:
        """The prompt as the router hashes it: token ids when given, else text (chat: role-tagged turns)."""
        if self.prompt_token_ids is not None:
            return self.prompt_token_ids
        if self.messages is not None:
            return "".join(f"<{m.get('role')}>{m.get('content')}\n" for m in self.messages)
        return self.prompt or ""

    def engine_prompt(self):
        """The text or token-id prompt in the form ``AsyncLLMEngine.generate`` takes (not for chat)."""
        if self.prompt_token_ids is not None:
            return {"prompt_token_ids": self.prompt_token_ids}
        return self.prompt
