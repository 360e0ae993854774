"""Constrained decoding requests: the public ``StructuredOutputs`` (one constraint per request).

Exactly one of ``json`` (a JSON schema), ``json_object`` (any JSON object), ``regex``, ``choice``
(one of a list of strings) or ``grammar`` (an EBNF grammar, GBNF style) is set. This module only
checks the shape of what a client sent (torch- and xgrammar-free, so every door can import it);
whether a schema, regex or grammar compiles is checked by the engine's input processor, which
owns the tokenizer (``cluster.sampling.grammar``), and is refused there naming the same field.
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass, field

from cluster.errors import InvalidRequestError

MAX_CONSTRAINT_CHARS = 64 * 1024  # a schema, regex or grammar: compiled per distinct value
MAX_SCHEMA_DEPTH = 32  # nested objects / arrays in a JSON schema (compile time grows fast with depth)
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024
KINDS = ("json", "json_object", "regex", "choice", "grammar")
FIELD = "structured_outputs"


@dataclass(frozen=True)
class StructuredOutputs:
    """The output must match exactly one of these; see the module docstring."""

    json: str | dict | bool | None = None  # a JSON schema: a dict, or its JSON text
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None  # EBNF (GBNF): root ::= ...
    # The request field the constraint came from, named by errors (e.g. "response_format"); by
    # default "structured_outputs.<kind>".
    origin: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        set_kinds = [k for k in KINDS if (getattr(self, k) is not None and k != "json_object")
                     or (k == "json_object" and self.json_object is not False)]
        if len(set_kinds) != 1:
            raise InvalidRequestError(self.origin or FIELD, f"set exactly one of {', '.join(KINDS)}; got "
                                             f"{', '.join(set_kinds) if set_kinds else 'none'}")
        kind = set_kinds[0]
        name = self.field_name(kind)
        if kind == "json":
            object.__setattr__(self, "json", _schema_text(name, self.json))
        elif kind == "json_object":
            if self.json_object is not True:
                raise InvalidRequestError(name, f"must be true, got {self.json_object!r}")
        elif kind == "choice":
            object.__setattr__(self, "choice", _choices(name, self.choice))
        else:
            _text(name, getattr(self, kind))

    def field_name(self, kind: str | None = None) -> str:
        """The field errors about this constraint name."""
        return self.origin or f"{FIELD}.{kind or self.kind}"

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if (k == "json_object" and self.json_object)
                    or (k != "json_object" and getattr(self, k) is not None))

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): what a compiled grammar is cached under."""
        kind = self.kind
        value = {"json_object": "", "choice": _json.dumps(list(self.choice or ()))}.get(kind)
        return kind, getattr(self, kind) if value is None else value

    @classmethod
    def build(cls, value) -> "StructuredOutputs | None":
        """From what a caller gives: None, a StructuredOutputs or a dict of its fields."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise InvalidRequestError(FIELD, f"must be an object with one of {', '.join(KINDS)}, "
                                             f"got {type(value).__name__}")
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise InvalidRequestError(f"{FIELD}.{unknown[0]}", f"unknown option; known: {', '.join(KINDS)}")
        return cls(**value)


def _text(name: str, value) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(name, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidRequestError(name, "must not be empty")
    if len(value) > MAX_CONSTRAINT_CHARS:
        raise InvalidRequestError(name, f"must be at most {MAX_CONSTRAINT_CHARS} characters, got {len(value)}")
    _check_encodable(name, value)
    return value


def _check_encodable(name: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequestError(name, f"must be valid UTF-8 text ({err.reason} at {err.start})") from None


def _schema_text(name: str, schema) -> str:
    """A schema given as a dict or JSON text -> compact JSON text of an object (or of ``true``, any
    JSON value). Key order is kept: the output's properties follow the schema's order."""
    if isinstance(schema, str):
        _text(name, schema)
        try:
            schema = _json.loads(schema)
        except ValueError as err:
            raise InvalidRequestError(name, f"must be a JSON schema; not valid JSON: {err}") from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequestError(name, f"must be a JSON schema (an object), got {type(schema).__name__}")
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise InvalidRequestError(name, f"must nest at most {MAX_SCHEMA_DEPTH} objects / arrays deep")
    try:
        text = _json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as err:
        raise InvalidRequestError(name, f"must be a JSON schema of plain JSON values: {err}") from None
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise InvalidRequestError(name, f"must be at most {MAX_CONSTRAINT_CHARS} characters, got {len(text)}")
    _check_encodable(name, text)
    return text


def _depth(value, limit: int = MAX_SCHEMA_DEPTH + 1) -> int:
    """Nesting depth of dicts and lists, counted without recursion and no further than ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth < limit:
                stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _choices(name: str, value) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise InvalidRequestError(name, f"must be a list of strings, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_CHOICES:
        raise InvalidRequestError(name, f"must hold 1 to {MAX_CHOICES} strings, got {len(value)}")
    for item in value:
        if not isinstance(item, str) or not item:
            raise InvalidRequestError(name, f"must hold non-empty strings, got {item!r:.80}")
        if len(item) > MAX_CHOICE_CHARS:
            raise InvalidRequestError(name, f"each must be at most {MAX_CHOICE_CHARS} characters")
        _check_encodable(name, item)
    return tuple(value)
