"""The offline entry point: ``LLM(...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
import logging

from cluster.config import DEFAULT_MODEL, EngineConfig
from cluster.engine.input_processor import PromptType
from cluster.engine.llm_engine import LLMEngine
from cluster.errors import EngineDeadError, InvalidRequestError
from cluster.outputs import RequestOutput, RequestOutputKind
from cluster.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLM:
    """Batch generation on one engine; keyword arguments are EngineConfig fields."""

    def __init__(self, model: str = DEFAULT_MODEL, **kwargs):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | list[PromptType],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; one RequestOutput per prompt, in order.

        Every prompt is validated before any is queued, so a bad one changes nothing.
        """
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        states = [self.engine.prepare_request(f"llm-{next(self._ids)}", p, sp, RequestOutputKind.FINAL_ONLY)
                  for p, sp in zip(prompts, params)]
        for state in states:
            self.engine.add_prepared(state)
        return self._run([s.request_id for s in states], use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation (or a list of them) and generate."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        processor = self.engine.input_processor
        prompts = [{"prompt_token_ids": processor.chat_token_ids(c)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        """Step until every request has finished. A request the engine ended on a fault comes back
        with finish_reason "error" (and ``error``); a fault no request could be blamed for rebuilds
        the engine, so this LLM keeps working, and raises EngineDeadError."""
        pending = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        progress = _progress(len(request_ids), use_tqdm)
        try:
            while pending:
                for out in self._step():
                    if out.finished and out.request_id in pending:
                        finished[out.request_id] = out
                        pending.discard(out.request_id)
                        progress.update(1) if progress else None
        finally:
            if progress:
                progress.close()
        return [finished[rid] for rid in request_ids]

    def _step(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        except Exception as err:
            logger.error("engine fault; restarting the engine", exc_info=err)
            self.engine.restart()
            raise EngineDeadError(f"the engine failed and was restarted; this batch was lost: {err!r}") from err


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise InvalidRequestError("prompts", "must be a prompt or a non-empty list of prompts")
    return prompts


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise InvalidRequestError("sampling_params", f"got {len(params)} for {n} prompts")
    return list(params)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generating", unit="req")
