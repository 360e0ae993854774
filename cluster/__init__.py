"""llm-cluster: LLM serving on Ray with a paged-KV, continuous-batching engine."""

from cluster.errors import EngineDeadError, InvalidConfigError, InvalidRequestError, ModelLoadError, QueueFullError
from cluster.llm import LLM
from cluster.outputs import CompletionOutput, RequestOutput
from cluster.sampling_params import SamplingParams

__all__ = [
    "LLM", "SamplingParams", "RequestOutput", "CompletionOutput",
    "InvalidRequestError", "InvalidConfigError", "ModelLoadError", "EngineDeadError", "QueueFullError",
]
