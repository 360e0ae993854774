"""Pinning a failed step on the requests that caused it.

A step runs many requests' tokens in one forward pass, so an exception raised inside it (a bad
shape, a kernel that refuses an input, a sampler fault) does not say whose it is. When the
executor can run a step again (the in-process executor: its workers mirror no half-applied
collective), the step's sequences are re-run in halves, recursively, until each failing one is
alone. Re-running is safe: a sequence's K/V for the same tokens at the same slots is simply
written again, and nothing is sampled or committed for a step that raised.

The result is the successful sequences' samples plus the requests the fault is pinned on. A fault
that every sequence of a batch hits on its own is the engine's, not theirs (``EngineDeadError``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from cluster.contracts.runner_output import RunnerOutput
from cluster.contracts.scheduler_output import ScheduledSequence, SchedulerOutput
from cluster.errors import EngineDeadError

logger = logging.getLogger(__name__)


@dataclass
class IsolatedStep:
    """A failed step, re-run: what the healthy sequences produced, and whom the fault is pinned on."""

    output: RunnerOutput = field(default_factory=RunnerOutput)
    failed: dict[str, BaseException] = field(default_factory=dict)  # request_id -> the error it hit alone
    num_reruns: int = 0  # forward passes spent isolating


def isolate(execute, step: SchedulerOutput, error: BaseException) -> IsolatedStep:
    """Re-run ``step.sequences`` through ``execute`` in halves; raise EngineDeadError if the fault
    is not any request's (every sequence of a batch of several fails alone)."""
    if not step.sequences:  # no request's tokens ran: bookkeeping failed, nobody to pin it on
        raise EngineDeadError(f"a step with no sequences failed: {error!r}") from error
    result = IsolatedStep()
    _bisect(execute, step.sequences, error, result)
    if len(step.sequences) > 1 and len(result.failed) == len(step.sequences):
        raise EngineDeadError(f"every one of the step's {len(step.sequences)} requests fails alone "
                              f"({error!r}): the engine is broken, not a request") from error
    logger.warning("a step of %d sequences failed (%r); %d re-runs pinned it on %s", len(step.sequences),
                   error, result.num_reruns, sorted(result.failed))
    return result


def _bisect(execute, sequences: list[ScheduledSequence], error: BaseException, result: IsolatedStep) -> None:
    if len(sequences) == 1:
        result.failed[sequences[0].request_id] = error
        return
    half = len(sequences) // 2
    for part in (sequences[:half], sequences[half:]):
        result.num_reruns += 1
        try:
            output = execute(SchedulerOutput(sequences=part))
        except Exception as part_error:  # noqa: BLE001 - narrowed down further
            _bisect(execute, part, part_error, result)
            continue
        result.output.sampled_token_ids.update(output.sampled_token_ids)
        result.output.logprobs.update(output.logprobs)
