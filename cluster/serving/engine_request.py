"""What the ingress hands a model-server replica: one request, already converted and validated.

gRPC and HTTP requests both become an ``EngineRequest`` in ``cluster/serving/conversion.py``.
The ingress tokenizes text and chat prompts (``cluster/serving/prompt_tokenizer.py``) before the
request is routed, so ``prompt_token_ids`` travel with it: the router names their blocks with the
replicas' own prefix-cache hashes, and the replica does not tokenize again. Callers of the
model-server handle may still send text or messages; the replica then tokenizes, and the router
routes such a request by load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.sampling_params import SamplingParams


@dataclass
class EngineRequest:
    request_id: str
    prompt: str | None = None  # text
    prompt_token_ids: list[int] | None = None  # or token ids (set by the ingress for text and chat too)
    messages: list[dict] | None = None  # or chat messages ({"role", "content"}), templated by the tokenizer
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens_is_default: bool = False  # max_tokens is the server's default: cut to the context, never refused

    def routing_tokens(self) -> list[int] | None:
        """The prompt's token ids, which the router hashes; None before tokenization."""
        return self.prompt_token_ids

    def engine_prompt(self):
        """The text or token-id prompt in the form ``AsyncLLMEngine.generate`` takes (not for
        untokenized chat messages)."""
        if self.prompt_token_ids is not None:
            return {"prompt_token_ids": self.prompt_token_ids}
        return self.prompt
