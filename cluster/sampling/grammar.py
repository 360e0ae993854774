"""Structured outputs through xgrammar: compiled grammars, per-request matchers, token bitmasks.

``GrammarCompiler`` turns a request's ``StructuredOutputs`` into an xgrammar ``CompiledGrammar``
for one tokenizer, cached by (kind, canonical text), and names the field when it does not compile.
``Grammar`` is one request's matcher: it fills the bitmask of the tokens allowed next, accepts the
tokens the sampler picks, and rolls back drafts checked ahead of verification.

The engine's input processor compiles once to refuse a bad constraint at the door; the driver
worker compiles again (a cache hit after the first request) and samples under the masks.
"""

from __future__ import annotations

import json
import re
import threading

import torch

from cluster.errors import InvalidRequestError, QueueFullError
from cluster.structured_outputs import StructuredOutputs

MAX_ROLLBACK_TOKENS = 64  # drafts checked ahead of verification (speculative num_tokens <= 32)
CACHE_ENTRIES = 512  # compiled grammars kept per compiler (distinct constraints)
# The door's budget for compiling one new constraint. Compile time grows with a constraint's
# expanded size (a 400-deep schema took 9.3 s, a regex [^x]{0,65536} 1.9 s, measured): a
# constraint not compiled within it is refused, and so is any later request carrying it.
COMPILE_BUDGET_S = 5.0
_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # xgrammar's "[time] file.cc:line: " before its message


def _xgr():
    import xgrammar

    return xgrammar


class GrammarCompiler:
    """Compiles constraints for one tokenizer; thread-safe, with an LRU of compiled grammars."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int] | frozenset[int]):
        xgr = _xgr()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._cache: dict[tuple[str, str], object] = {}
        self._refused: dict[tuple[str, str], str] = {}  # constraints past the compile budget
        self._lock = threading.Lock()
        self._door = threading.Lock()

    def compile(self, so: StructuredOutputs):
        key = so.key
        with self._lock:
            compiled = self._cache.pop(key, None)
            if compiled is None:
                compiled = self._compile(*key, so.field_name())
            self._remember(key, compiled)
            return compiled

    def _remember(self, key, compiled) -> None:
        self._cache[key] = compiled  # most recently used last
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.pop(next(iter(self._cache)))

    def check(self, so: StructuredOutputs, budget_s: float = COMPILE_BUDGET_S) -> None:
        """Compile within ``budget_s`` or raise InvalidRequestError naming the field (the door's check).

        The compile runs on a thread of its own (xgrammar releases the GIL): past the budget the
        caller is answered at once while the compile runs on to its end (one compile at a time, so
        at most one core; meanwhile other new constraints wait up to the budget, then get
        QueueFullError); the constraint is refused for good, so resending it costs nothing.
        """
        key = so.key
        with self._lock:
            if key in self._cache:
                self._remember(key, self._cache.pop(key))
                return
            refused = self._refused.get(key)
        if refused is not None:
            raise InvalidRequestError(so.field_name(), refused)
        # One compile at a time: a runaway one holds back only other new constraints, for a while.
        if not self._door.acquire(timeout=budget_s):
            raise QueueFullError("the grammar compiler is busy with a constraint past its budget",
                                 retry_after_s=budget_s)
        done = threading.Event()
        result: dict = {}

        def run():
            try:
                result["compiled"] = self._compile(*key, so.field_name())
            except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
                result["error"] = err
            finally:
                done.set()
                self._door.release()

        threading.Thread(target=run, name="grammar-compile", daemon=True).start()
        if not done.wait(budget_s):
            message = f"is too complex: not compiled within {budget_s:g} s"
            with self._lock:
                self._refused[key] = message
            raise InvalidRequestError(so.field_name(), message)
        if "error" in result:
            raise result["error"]
        with self._lock:
            self._remember(key, result["compiled"])

    def _compile(self, kind: str, text: str, field_name: str):
        c = self._compiler
        try:
            if kind == "json":
                return c.compile_json_schema(text, any_whitespace=False)
            if kind == "json_object":
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return c.compile_regex(text)
            if kind == "choice":
                alternatives = " | ".join(_ebnf_string(choice) for choice in json.loads(text))
                return c.compile_grammar(f"root ::= {alternatives}")
            return c.compile_grammar(text)
        except (RuntimeError, ValueError, TypeError) as err:  # xgrammar raises these for bad input
            what = {"json": "a JSON schema it can follow", "json_object": "a JSON object",
                    "regex": "a regular expression it can compile", "choice": "a list of choices",
                    "grammar": "an EBNF grammar it can compile"}[kind]
            message = _XGR_PREFIX.sub("", " ".join(str(err).split()))[:300]
            raise InvalidRequestError(field_name, f"must be {what}: {message}") from None

    def matcher(self, so: StructuredOutputs) -> "Grammar":
        return Grammar(self.compile(so), self.vocab_size)


def _ebnf_string(text: str) -> str:
    """A GBNF string literal matching ``text`` exactly."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


class Grammar:
    """One request's position in its grammar."""

    def __init__(self, compiled, vocab_size: int):
        self._matcher = _xgr().GrammarMatcher(compiled, max_rollback_tokens=MAX_ROLLBACK_TOKENS)
        self.vocab_size = vocab_size

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing more may follow."""
        return self._matcher.is_terminated()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        return self._matcher.accept_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self._matcher.rollback(num_tokens)


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return _xgr().allocate_token_bitmask(rows, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set the logits of disallowed tokens to -inf in ``rows`` (in place; float32 [B, V])."""
    if rows:
        _xgr().apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                           indices=rows)
