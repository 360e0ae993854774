"""Batched sampling: logits [B, V] -> one token (and optional logprobs) per request.

Every step is vectorised across the batch with per-row parameter tensors. Only
the random noise is drawn per row, from that request's own generator, so a seeded
request yields the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch

from cluster.contracts.runner_output import TokenLogprobs
from cluster.sampling_params import SamplingParams


@dataclass
class SamplingRequest:
    """What the sampler needs to know about one row of the logits."""

    params: SamplingParams  # the request's sampling parameters
    generator: torch.Generator  # per-request CPU generator; the only source of randomness for the row
    prompt_token_ids: list[int]  # prompt tokens, for the repetition penalty
    output_token_ids: list[int]  # tokens generated so far, for all penalties and min_tokens
    # EOS + params.stop_token_ids: masked to -inf while len(output_token_ids) < params.min_tokens
    stop_token_ids_for_min_tokens: frozenset[int]
    grammar: object | None = None  # structured outputs: the request's Grammar (cluster.sampling.grammar)

    @property
    def uses_penalties(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    @property
    def masks_stop_tokens(self) -> bool:
        """True while min_tokens still forbids EOS / stop tokens."""
        return (
            len(self.output_token_ids) < self.params.min_tokens
            and bool(self.stop_token_ids_for_min_tokens)
        )


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (one per request)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def _row_param(requests: list[SamplingRequest], name: str, device, dtype=torch.float32):
    """Column tensor [B, 1] of one SamplingParams field across the batch."""
    values = [getattr(r.params, name) for r in requests]
    return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)


def _flat_row_token_index(token_lists: list[list[int]], vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs for every token in every list; ids outside the vocab are dropped."""
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(token_lists)), lengths)
    ids = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    keep = ids < vocab_size
    return rows[keep], ids[keep]


def _token_counts(token_lists: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """counts[b, t] = occurrences of token t in token_lists[b], as float32 [B, V]."""
    rows, ids = _flat_row_token_index(token_lists, vocab_size)
    counts = torch.zeros(len(token_lists) * vocab_size, dtype=torch.float32, device=device)
    flat = (rows * vocab_size + ids).to(device)
    counts.index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float32, device=device))
    return counts.view(len(token_lists), vocab_size)


def apply_penalties(logits: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
    """Apply repetition, presence and frequency penalties (vLLM semantics), in place.

    Repetition counts tokens in prompt + output: a positive logit is divided by the
    penalty, a non-positive one multiplied. Presence and frequency count output
    tokens only: ``logit -= presence * (count > 0) + frequency * count``.
    Returns ``logits``; a no-op when no request uses a penalty.
    """
    if not any(r.uses_penalties for r in requests):
        return logits
    vocab_size, device = logits.shape[1], logits.device
    output_counts = _token_counts([r.output_token_ids for r in requests], vocab_size, device)
    prompt_counts = _token_counts([r.prompt_token_ids for r in requests], vocab_size, device)
    seen = (output_counts + prompt_counts) > 0
    rep = _row_param(requests, "repetition_penalty", device)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits.copy_(torch.where(seen, penalised, logits))
    presence = _row_param(requests, "presence_penalty", device)
    frequency = _row_param(requests, "frequency_penalty", device)
    logits -= presence * (output_counts > 0) + frequency * output_counts
    return logits


def _mask_stop_tokens(logits: torch.Tensor, requests: list[SamplingRequest]) -> None:
    """min_tokens: forbid EOS and stop tokens for rows that have not produced enough yet."""
    token_lists = [
        sorted(r.stop_token_ids_for_min_tokens) if r.masks_stop_tokens else [] for r in requests
    ]
    rows, ids = _flat_row_token_index(token_lists, logits.shape[1])
    if rows.numel():
        logits[rows.to(logits.device), ids.to(logits.device)] = float("-inf")


def _top_k_top_p_probs(logits: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
    """Softmax of ``logits`` with top-k then top-p applied (unnormalised after masking).

    One descending sort serves both: top-k drops sorted positions >= k, then top-p
    keeps each token whose exclusive cumulative mass (of the top-k renormalised
    distribution) is still < top_p, which is the smallest set reaching top_p and
    always includes the most likely token.
    """
    vocab_size, device = logits.shape[1], logits.device
    # A stable sort makes tie-breaking at the top-k boundary deterministic (lowest id wins).
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True, stable=True)
    top_k = _row_param(requests, "top_k", device, dtype=torch.long)
    top_k = torch.where(top_k < 1, vocab_size, top_k)
    positions = torch.arange(vocab_size, device=device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(positions >= top_k, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    top_p = _row_param(requests, "top_p", device)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(sorted_probs).scatter_(1, sorted_ids, sorted_probs)


def _apply_min_p(probs: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
    min_p = _row_param(requests, "min_p", probs.device)
    p_max = probs.max(dim=-1, keepdim=True).values
    return probs.masked_fill(probs < min_p * p_max, 0.0)


def _greedy_rows(requests: list[SamplingRequest], device) -> torch.Tensor:
    return torch.tensor([r.params.is_greedy for r in requests], dtype=torch.bool, device=device)


def compute_probs(logits: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
    """The distribution each row samples from, float32 [B, V], rows summing to 1.

    Order: min_tokens masking, penalties, temperature, top-k, top-p, min-p,
    renormalisation. Greedy rows (temperature 0) get a one-hot at the argmax of
    the masked, penalised logits. ``logits`` is not modified.
    """
    logits = logits.to(torch.float32, copy=True)
    _mask_stop_tokens(logits, requests)
    apply_penalties(logits, requests)
    greedy = _greedy_rows(requests, logits.device).unsqueeze(1)
    temperature = _row_param(requests, "temperature", logits.device)
    # Greedy rows are replaced by a one-hot below; dividing them by 1 avoids inf/nan.
    logits /= torch.where(greedy, 1.0, temperature)
    if any(r.params.top_k != -1 or r.params.top_p < 1.0 for r in requests):
        probs = _top_k_top_p_probs(logits, requests)
    else:
        probs = torch.softmax(logits, dim=-1)
    if any(r.params.min_p > 0.0 for r in requests):
        probs = _apply_min_p(probs, requests)
    probs /= probs.sum(dim=-1, keepdim=True)
    one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy, one_hot, probs)


def _sample_rows(probs: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
    """One token per row by an exponential race, each row's noise from its own generator.

    argmax(p / q) with q ~ Exp(1) picks token i with probability p_i, and needs
    exactly one draw of V numbers per sampled token per request.
    """
    noise = torch.ones(probs.shape, dtype=torch.float32)
    for row, request in enumerate(requests):
        # Greedy rows are one-hot already; skipping them leaves their generator untouched.
        if not request.params.is_greedy:
            noise[row].exponential_(generator=request.generator)
    # A zero draw would make 0 / 0 = nan for a masked token and win the argmax.
    noise.clamp_(min=torch.finfo(torch.float32).tiny)
    return (probs / noise.to(probs.device)).argmax(dim=-1)


def _logprobs(
    raw_logits: torch.Tensor, token_ids: torch.Tensor, requests: list[SamplingRequest]
) -> list[TokenLogprobs | None]:
    """Logprobs from the model's raw distribution (before penalties and temperature)."""
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    result: list[TokenLogprobs | None] = [None] * len(requests)
    if not rows:
        return result
    row_index = torch.tensor(rows, device=raw_logits.device)
    logprobs = torch.log_softmax(raw_logits[row_index].float(), dim=-1)
    sampled_ids = token_ids[row_index]
    sampled = logprobs.gather(1, sampled_ids.unsqueeze(1)).squeeze(1).tolist()
    # One topk for the largest N asked; each row keeps its own first n.
    top_values, top_ids = logprobs.topk(max(requests[i].params.logprobs for i in rows), dim=-1)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for j, (i, token_id) in enumerate(zip(rows, sampled_ids.tolist())):
        n = requests[i].params.logprobs
        top = dict(zip(top_ids[j][:n], top_values[j][:n]))
        result[i] = TokenLogprobs(token_id=token_id, logprob=sampled[j], top=top)
    return result


def _uniform(request: SamplingRequest) -> float:
    return torch.rand(1, generator=request.generator).item()


def _verify_row(probs: torch.Tensor, draft: int, request: SamplingRequest) -> int | None:
    """Speculative verification of one draft against the target distribution ``probs`` [V].

    Returns None when the draft is accepted, else the token to emit in its place. The drafters
    propose one token with certainty (q = its one-hot), so the rule "accept with probability
    min(1, p/q), else sample from the normalised max(p - q, 0)" becomes: accept with probability
    p[draft], else sample from p without the draft. Every emitted token is then distributed as p.
    Greedy rows (p one-hot) accept exactly the argmax.
    """
    if request.params.is_greedy:
        target = int(probs.argmax())
        return None if target == draft else target
    if _uniform(request) < float(probs[draft]):
        return None
    residual = probs.clone()
    residual[draft] = 0.0
    residual /= residual.sum()
    return int(_sample_rows(residual.unsqueeze(0), [request])[0])


class Sampler:
    """Picks the next token for every row of a batch of logits.

    ``kernels``: the native CPU kernels where the runner loaded them; a plain greedy batch's argmax
    over float32 or bfloat16 CPU logits then runs there (the same indices as torch's, spread over the
    threads; bfloat16 without a float32 copy of the logits first).
    """

    def __init__(self, kernels=None):
        self._kernels = kernels if kernels is not None and hasattr(kernels, "argmax_rows") else None

    def _native_argmax(self, logits: torch.Tensor) -> bool:
        return self._kernels is not None and logits.device.type == "cpu" and logits.dim() == 2 and \
            logits.dtype in (torch.float32, torch.bfloat16) and logits.shape[1] > 0 and logits.stride(1) == 1

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        if self._native_argmax(logits):
            return self._kernels.argmax_rows(logits)
        return logits.argmax(dim=-1)

    def sample_groups(self, logits: torch.Tensor, requests: list[SamplingRequest],
                      drafts: list[list[int]]) -> list[tuple[list[int], list[TokenLogprobs] | None]]:
        """Sample for groups of rows: request ``i`` owns ``1 + len(drafts[i])`` consecutive rows of
        ``logits`` (its last token's, then each draft's). A request without drafts gets one token;
        one with drafts gets the drafts accepted in order and one more token (a correction at the
        first rejection, or a bonus after the last draft). Returns (tokens, logprobs) per request.
        """
        num_rows = sum(1 + len(d) for d in drafts)
        if logits.shape[0] != num_rows or len(requests) != len(drafts):
            raise ValueError(f"logits has {logits.shape[0]} rows; {len(requests)} requests with "
                             f"{len(drafts)} draft lists need {num_rows}")
        raw_logits = logits.float()
        results = []
        row = 0
        plain = self._is_plain_greedy(requests)
        targets = self._argmax(raw_logits).tolist() if plain else None
        for request, draft in zip(requests, drafts):
            rows = raw_logits[row: row + 1 + len(draft)]
            tokens = (_greedy_accept(targets[row: row + 1 + len(draft)], draft) if plain
                      else self._verify(rows, request, draft))
            row += 1 + len(draft)
            logprobs = _logprobs(rows[: len(tokens)], torch.tensor(tokens), [request] * len(tokens))
            results.append((tokens, None if logprobs[0] is None else logprobs))
        return results

    def _verify(self, rows: torch.Tensor, request: SamplingRequest, draft: list[int]) -> list[int]:
        """Accept drafts in order against each row's distribution; return the emitted tokens."""
        tokens: list[int] = []
        for i in range(len(draft) + 1):
            # Row i is conditioned on the drafts before it: penalties and min_tokens see them too.
            view = replace(request, output_token_ids=request.output_token_ids + tokens)
            probs = compute_probs(rows[i: i + 1], [view])[0]
            if i == len(draft):
                tokens.append(int(_sample_rows(probs.unsqueeze(0), [view])[0]))
                break
            correction = _verify_row(probs, draft[i], view)
            tokens.append(draft[i] if correction is None else correction)
            if correction is not None:
                break
        return tokens

    def __call__(
        self, logits: torch.Tensor, requests: list[SamplingRequest]
    ) -> list[tuple[int, TokenLogprobs | None]]:
        """Sample one token per row; ``requests[i]`` describes row ``i`` of ``logits`` [B, V].

        Returns ``(token_id, logprobs)`` per row; logprobs is None unless the
        request set ``params.logprobs``.
        """
        if logits.shape[0] != len(requests):
            raise ValueError(f"logits has {logits.shape[0]} rows but {len(requests)} requests were given")
        plain = self._is_plain_greedy(requests)
        # a plain greedy batch's bfloat16 logits are scanned as they are (widened span by span, the same
        # indices); logprobs widen only their own rows
        raw_logits = logits if plain and self._native_argmax(logits) else logits.float()
        if plain:
            token_ids = self._argmax(raw_logits)
        else:
            token_ids = _sample_rows(compute_probs(raw_logits, requests), requests)
        logprobs = _logprobs(raw_logits, token_ids, requests)
        return list(zip(token_ids.tolist(), logprobs))

    @staticmethod
    def _is_plain_greedy(requests: list[SamplingRequest]) -> bool:
        return all(
            r.params.is_greedy and not r.uses_penalties and not r.masks_stop_tokens for r in requests
        )


def _greedy_accept(targets: list[int], draft: list[int]) -> list[int]:
    """Greedy verification: drafts are kept while they equal the model's argmax, then the argmax."""
    tokens = []
    for target, proposed in zip(targets, draft):
        tokens.append(target)
        if target != proposed:
            return tokens
    tokens.append(targets[len(draft)])
    return tokens
