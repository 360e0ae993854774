"""The router benchmark's multi-turn chat workload, and the prefix-cache hit rate it could reach.

Conversations go through the chat API (gRPC ``GenerateStream`` with chat messages); each turn
sends the whole conversation so far (every earlier user message and the assistant's actual
replies) plus a new user message, so each prompt extends the last turn's prompt and reply.
Conversations run side by side, their turns one after another.

The ideal is what one replica with an unbounded prefix cache would serve from it: a prompt's
leading full blocks already computed when it was sent (every block of an earlier request's
prompt, and of its prompt plus reply once it had finished), never the last prompt token. It is
computed from the real token ids (the prompts through the server's ``Tokenize``, the replies
from the responses) with the replicas' own block hashes, and compared with the cached prompt
tokens each response reports.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from cluster.contracts.block_hash import block_hashes

_WORDS = ("harbor lantern copper meadow signal violin quartz timber falcon orbit canvas pepper winter "
          "garden engine river stone cloud market velvet").split()


@dataclass
class Turn:
    """One request of a conversation, as sent and answered."""

    conversation: int
    turn: int
    sent_s: float  # monotonic
    finished_s: float
    prompt_ids: list[int]
    output_ids: list[int]
    cached_tokens: int  # as the response's usage reports


@dataclass
class ChatResult:
    turns: list[Turn]
    wall_s: float

    @property
    def prompt_tokens(self) -> int:
        return sum(len(t.prompt_ids) for t in self.turns)

    @property
    def cached_tokens(self) -> int:
        return sum(t.cached_tokens for t in self.turns)

    def ideal_cached_tokens(self, block_size: int) -> int:
        return ideal_cached_tokens(self.turns, block_size)


def user_message(conversation: int, turn: int, words: int, seed: int) -> str:
    rng = random.Random(seed * 1_000_003 + conversation * 101 + turn)
    return f"Conversation {conversation}, question {turn}: " + " ".join(rng.choice(_WORDS) for _ in range(words))


def ideal_cached_tokens(turns: list[Turn], block_size: int) -> int:
    """Prompt tokens one unbounded cache would have held when each request was sent (see above)."""
    total = 0
    for turn in turns:
        known: set[int] = set()
        for other in turns:
            if other is turn:
                continue
            if other.sent_s < turn.sent_s:
                known.update(block_hashes(other.prompt_ids, block_size))
            if other.finished_s < turn.sent_s:
                known.update(block_hashes(other.prompt_ids + other.output_ids[:-1], block_size))
        cacheable = block_hashes(turn.prompt_ids, block_size)[:(len(turn.prompt_ids) - 1) // block_size]
        hit = 0
        for h in cacheable:
            if h not in known:
                break
            hit += 1
        total += hit * block_size
    return total


async def run_conversations(address: str, application: str, conversations: int, turns: int,
                            concurrency: int, words: int, max_tokens: int, seed: int) -> ChatResult:
    """``conversations`` chats of ``turns`` turns, ``concurrency`` chats at a time, greedy replies."""
    import grpc

    from cluster.v1 import generation_pb2 as pb
    from cluster.v1 import generation_pb2_grpc as pb_grpc

    metadata = (("application", application),)
    sampling = pb.SamplingParameters(max_tokens=max_tokens, temperature=0.0)
    gate = asyncio.Semaphore(concurrency)
    done: list[Turn] = []

    async def conversation(stub, c: int) -> None:
        async with gate:
            history: list[pb.ChatMessage] = []
            for t in range(turns):
                history.append(pb.ChatMessage(role="user", content=user_message(c, t, words, seed)))
                chat = pb.ChatMessages(messages=history)
                prompt = await stub.Tokenize(pb.TokenizeRequest(chat=chat), metadata=metadata)
                sent, text, ids, cached = time.monotonic(), [], [], 0
                async for message in stub.GenerateStream(pb.GenerateRequest(chat=chat, sampling=sampling),
                                                         metadata=metadata):
                    text.append(message.text)
                    ids.extend(message.token_ids)
                    if message.HasField("usage"):
                        cached = message.usage.cached_prompt_tokens
                done.append(Turn(c, t, sent, time.monotonic(), list(prompt.token_ids), ids, cached))
                history.append(pb.ChatMessage(role="assistant", content="".join(text)))

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        started = time.monotonic()
        await asyncio.gather(*(conversation(stub, c) for c in range(conversations)))
        return ChatResult(sorted(done, key=lambda t: t.sent_s), time.monotonic() - started)
