"""Validate and tokenize what a caller submits, before anything in the engine changes."""

from __future__ import annotations

import logging

from cluster.errors import InvalidRequestError
from cluster.request_limits import CHAT_ROLES, check_model_limits, check_text
from cluster.sampling_params import SamplingParams

PromptType = str | dict | list
logger = logging.getLogger(__name__)


class InputProcessor:
    """Turns a prompt (text, ``{"prompt_token_ids": [...]}`` or chat messages) into checked token ids."""

    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, max_cache_tokens: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # ids must be in [0, vocab_size)
        self.max_model_len = max_model_len  # prompt + output tokens at most
        self.max_cache_tokens = max_cache_tokens  # what the whole KV cache holds
        self._grammar_compiler = None  # structured outputs: built on the first constrained request

    def process(self, prompt: PromptType, params: SamplingParams) -> tuple[str | None, list[int]]:
        """Return (prompt text or None, prompt token ids); raise InvalidRequestError naming the field."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params", f"must be a SamplingParams, got {type(params).__name__}")
        params.validate()  # fields may have been changed after construction
        check_model_limits(params, self.vocab_size, self.max_model_len)
        if params.structured_outputs is not None:  # refused here, naming the field, if it does not compile
            self._grammars().check(params.structured_outputs)
        text, token_ids = self._tokenize(prompt)
        self._check_length(token_ids)
        return text, token_ids

    def warm_grammars(self) -> None:
        """Build the structured-output compiler now (a server does it at start-up); a missing or
        broken xgrammar is left for the first constrained request to report."""
        try:
            self._grammars()
        except Exception as err:  # noqa: BLE001 - logged; requests report it with their field
            logger.warning("structured outputs unavailable until a request needs them: %s", err)

    def _grammars(self):
        if self._grammar_compiler is None:
            from cluster.sampling.grammar import GrammarCompiler

            eos = getattr(self.tokenizer, "eos_token_id", None)
            self._grammar_compiler = GrammarCompiler(self.tokenizer, self.vocab_size, [] if eos is None else [eos])
        return self._grammar_compiler

    def prompt_token_ids(self, prompt: PromptType | None = None, messages: list[dict] | None = None) -> list[int]:
        """A prompt's or a chat's token ids, checked against the context length (no sampling checks)."""
        ids = self.chat_token_ids(messages) if messages is not None else self._tokenize(prompt)[1]
        self._check_length(ids)
        return ids

    def apply_chat_template(self, messages: list[dict]) -> str:
        """Render chat messages with the tokenizer's template, ready for the assistant's turn."""
        _check_messages(messages)
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("messages", "this model's tokenizer has no chat template")
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as err:  # templates refuse e.g. turns that do not alternate: the caller's input
            raise InvalidRequestError("messages", f"the model's chat template refused them: {err}") from err

    def chat_token_ids(self, messages: list[dict]) -> list[int]:
        """The templated conversation as token ids (the template carries the special tokens: no second BOS)."""
        return self.tokenizer.encode(self.apply_chat_template(messages), add_special_tokens=False)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            check_text("prompt", prompt)
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return None, self._check_ids(prompt["prompt_token_ids"])
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self._tokenize(prompt["prompt"])
        raise InvalidRequestError(
            "prompt", f"must be a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}"
        )

    def _check_ids(self, ids) -> list[int]:
        if not isinstance(ids, (list, tuple)) or not ids:
            raise InvalidRequestError("prompt_token_ids", "must be a non-empty list of token ids")
        self._check_length(ids)  # before looking at every id of a list that may be huge
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise InvalidRequestError(
                    "prompt_token_ids", f"token id {i!r} is outside the vocabulary [0, {self.vocab_size})"
                )
        return list(ids)

    def _check_length(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise InvalidRequestError("prompt", "tokenizes to no tokens")
        limit = min(self.max_model_len, self.max_cache_tokens)
        if len(token_ids) > limit:  # a prompt that fills the context exactly still yields one token
            what = "context length" if limit == self.max_model_len else "KV cache capacity"
            raise InvalidRequestError(
                "prompt",
                f"is {len(token_ids)} tokens; the model's {what} allows at most {limit} prompt tokens",
            )


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"messages[{i}]", "must be a dict with string 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise InvalidRequestError(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, "
                                                             f"got {m['role'][:40]!r}")
        check_text(f"messages[{i}].content", m["content"], allow_empty=True)
