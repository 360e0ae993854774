"""What the frontend hands the engine core for one request: token ids and sampling, nothing else."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.sampling_params import SamplingParams


@dataclass
class CoreRequest:
    request_id: str
    prompt_token_ids: list[int]  # already tokenized and validated by the frontend
    sampling_params: SamplingParams
    arrival_time_s: float  # monotonic, when the frontend received it
