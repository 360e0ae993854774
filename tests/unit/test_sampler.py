"""Sampler: exact distributions on a tiny vocab, seeded reproducibility, penalties, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from cluster.sampling.sampler import (
    Sampler,
    SamplingRequest,
    apply_penalties,
    compute_probs,
    make_generator,
)
from cluster.sampling_params import SamplingParams

EOS = 4
# Probabilities in a shuffled order so that "the most likely" is never just "the lowest id".
BASE_PROBS = torch.tensor([0.15, 0.4, 0.05, 0.3, 0.1])


def _request(seed: int = 0, prompt=(), output=(), stop_ids=frozenset({EOS}), **params) -> SamplingRequest:
    return SamplingRequest(
        params=SamplingParams(**params),
        generator=make_generator(seed),
        prompt_token_ids=list(prompt),
        output_token_ids=list(output),
        stop_token_ids_for_min_tokens=frozenset(stop_ids),
    )


def _expected(keep: list[int]) -> torch.Tensor:
    """BASE_PROBS restricted to token ids ``keep``, renormalised."""
    probs = torch.zeros_like(BASE_PROBS)
    probs[keep] = BASE_PROBS[keep]
    return probs / probs.sum()


def test_greedy_is_argmax_and_fast_path_matches_mixed_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    greedy = [_request(temperature=0.0) for _ in range(3)]
    tokens = [t for t, _ in Sampler()(logits, greedy)]
    assert tokens == logits.argmax(dim=-1).tolist()
    # A sampled row in the batch forces the slow path; greedy rows must still be argmax.
    mixed = [greedy[0], _request(seed=1, temperature=1.0), greedy[2]]
    mixed_tokens = [t for t, _ in Sampler()(logits, mixed)]
    assert mixed_tokens[0] == tokens[0] and mixed_tokens[2] == tokens[2]


def test_greedy_rows_are_one_hot():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    probs = compute_probs(logits, [_request(temperature=0.0), _request(temperature=0.0, top_k=1)])
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))


def _draw(target_position: int, others: list[dict], steps: list[torch.Tensor]) -> list[int]:
    """Sample 20 tokens for the seeded target request, batched with ``others`` at a given row."""
    target = _request(seed=1234, temperature=0.8, top_p=0.9, top_k=40)
    batch = [_request(**kw) for kw in others]
    batch.insert(target_position, target)
    noise = torch.Generator().manual_seed(99)
    tokens = []
    for step_logits in steps:
        logits = torch.randn(len(batch), step_logits.numel(), generator=noise) * 3
        logits[target_position] = step_logits
        token, _ = Sampler()(logits, batch)[target_position]
        target.output_token_ids.append(token)
        tokens.append(token)
    return tokens


def test_seeded_sampling_is_independent_of_batch_composition():
    steps = list(torch.randn(20, 100, generator=torch.Generator().manual_seed(5)) * 2)
    others = [
        dict(seed=7, temperature=1.3),
        dict(temperature=0.0),
        dict(seed=8, temperature=0.5, top_p=0.5, presence_penalty=1.0),
        dict(seed=9, min_p=0.2, repetition_penalty=1.3, min_tokens=5),
    ]
    alone = _draw(0, [], steps)
    assert _draw(0, others, steps) == alone
    assert _draw(3, others, steps) == alone
    assert _draw(4, others[::-1], steps) == alone
    assert len(set(alone)) > 1  # really sampled, not collapsed to greedy


@pytest.mark.parametrize(
    "params, keep",
    [
        (dict(), [0, 1, 2, 3, 4]),
        (dict(top_k=2), [1, 3]),
        (dict(top_p=0.8), [0, 1, 3]),  # exclusive cumulative mass 0, .4, .7 < .8; then .85
        (dict(top_p=0.3), [1]),  # the top token alone already reaches top_p
        (dict(min_p=0.5), [1, 3]),  # p >= 0.5 * 0.4
        (dict(top_k=3, top_p=0.7), [1, 3]),  # top-3 renormalised: .47, .35, .18 -> cum .47, .82
        (dict(top_k=4, min_p=0.3), [0, 1, 3]),  # 0.1 < 0.3 * 0.4
        (dict(top_p=0.95, min_p=0.3), [0, 1, 3]),
    ],
)
def test_truncation_matches_hand_computed_distribution(params, keep):
    probs = compute_probs(BASE_PROBS.log().unsqueeze(0), [_request(**params)])
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs[0], _expected(keep))


def test_compute_probs_is_vectorised_over_rows_with_different_params():
    rows = [
        (dict(top_k=2), [1, 3]),
        (dict(top_p=0.8), [0, 1, 3]),
        (dict(min_p=0.5), [1, 3]),
        (dict(), [0, 1, 2, 3, 4]),
    ]
    logits = BASE_PROBS.log().repeat(len(rows), 1)
    probs = compute_probs(logits, [_request(**p) for p, _ in rows])
    torch.testing.assert_close(probs, torch.stack([_expected(k) for _, k in rows]))


def test_temperature_scales_logits():
    logits = BASE_PROBS.log().unsqueeze(0)
    for temperature in (0.5, 2.0):
        expected = BASE_PROBS ** (1 / temperature)
        probs = compute_probs(logits, [_request(temperature=temperature)])
        torch.testing.assert_close(probs[0], expected / expected.sum())


@pytest.mark.parametrize("params, keep", [(dict(), [0, 1, 2, 3, 4]), (dict(top_k=3, min_p=0.3), [0, 1, 3])])
def test_sampling_frequencies_match_distribution(params, keep):
    num_draws = 4000
    request = _request(seed=3, **params)
    logits = BASE_PROBS.log().unsqueeze(0)
    sampler = Sampler()
    counts = torch.zeros(5)
    for _ in range(num_draws):
        counts[sampler(logits, [request])[0][0]] += 1
    expected = _expected(keep) * num_draws
    assert counts[expected == 0].sum() == 0  # truncated tokens are never drawn
    kept = expected > 0
    chi_square = (((counts - expected)[kept] ** 2) / expected[kept]).sum().item()
    # 99.9th percentile of chi-square with <= 4 degrees of freedom is 18.5.
    assert chi_square < 18.5


def test_repetition_penalty_over_prompt_and_output():
    logits = torch.tensor([[2.0, -1.0, 3.0, -2.0, 1.0]])
    request = _request(prompt=[0, 1], output=[1, 3], repetition_penalty=2.0)
    out = apply_penalties(logits.clone(), [request])
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 3.0, -4.0, 1.0]]))


def test_presence_and_frequency_penalties_over_output_only():
    logits = torch.tensor([[2.0, -1.0, 3.0, -2.0, 1.0]])
    # Token 0 appears only in the prompt: presence/frequency must ignore it.
    request = _request(prompt=[0, 0], output=[2, 2, 2, 4], presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits.clone(), [request])
    expected = torch.tensor([[2.0, -1.0, 3.0 - 0.5 - 0.75, -2.0, 1.0 - 0.5 - 0.25]])
    torch.testing.assert_close(out, expected)


def test_penalties_are_per_row_and_skipped_when_unused():
    logits = torch.tensor([[2.0, 1.0], [2.0, 1.0]])
    plain = [_request(output=[0]), _request(output=[0])]
    assert apply_penalties(logits, plain) is logits
    assert torch.equal(logits, torch.tensor([[2.0, 1.0], [2.0, 1.0]]))
    mixed = [_request(output=[0], frequency_penalty=1.0), _request(output=[0])]
    torch.testing.assert_close(apply_penalties(logits.clone(), mixed), torch.tensor([[1.0, 1.0], [2.0, 1.0]]))


def test_penalties_feed_compute_probs_and_greedy():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    request = _request(temperature=0.0, output=[0], presence_penalty=2.0)
    assert Sampler()(logits, [request])[0][0] == 1
    assert torch.equal(logits, torch.tensor([[3.0, 2.0, 0.0]]))  # caller's logits untouched


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 1.0, 0.0, 5.0, 5.0]])  # stop id 3 and EOS 4 most likely
    masked = _request(output=[1], min_tokens=2, stop_ids={3, EOS})
    probs = compute_probs(logits, [masked])
    assert probs[0, 3] == 0 and probs[0, EOS] == 0
    torch.testing.assert_close(probs[0, :3], torch.softmax(logits[0, :3], dim=-1))
    assert Sampler()(logits, [_request(temperature=0.0, min_tokens=2, stop_ids={3, EOS})])[0][0] == 1
    reached = _request(output=[1, 1], min_tokens=2, stop_ids={3, EOS})
    torch.testing.assert_close(compute_probs(logits, [reached]), torch.softmax(logits, dim=-1))


def test_logprobs_come_from_raw_logits():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    requests = [
        _request(seed=1, temperature=0.7, repetition_penalty=1.5, output=[3], logprobs=3),
        _request(temperature=0.0, logprobs=0),
    ]
    results = Sampler()(logits, requests)
    raw = torch.log_softmax(logits.float(), dim=-1)
    for row, (token, logprobs) in enumerate(results):
        assert logprobs.token_id == token
        assert math.isclose(logprobs.logprob, raw[row, token].item(), rel_tol=1e-5)
    top_values, top_ids = raw[0].topk(3)
    assert list(results[0][1].top) == top_ids.tolist()
    assert list(results[0][1].top.values()) == pytest.approx(top_values.tolist())
    assert results[1][1].top == {}


def test_no_logprobs_unless_asked():
    results = Sampler()(torch.randn(2, 10), [_request(seed=1), _request(temperature=0.0)])
    assert [lp for _, lp in results] == [None, None]


def test_bfloat16_logits_sample():
    logits = BASE_PROBS.log().unsqueeze(0).to(torch.bfloat16)
    token, _ = Sampler()(logits, [_request(seed=0, top_k=1)])[0]
    assert token == 1
