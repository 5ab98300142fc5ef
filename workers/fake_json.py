"""Constrained output for the fake backend: a deterministic JSON value that fits a request's
`response_format`, as the text the fake model streams. The same (seed, prompt, format) always
gives the same document, so a resumed request continues the very text it began.

It covers what tests and demos ask of a schema (objects, arrays, enums, consts, strings with a
few formats, numbers within bounds, booleans, nulls, anyOf/oneOf, local $refs); a schema that
needs more (a pattern, allOf, not, conditionals) is refused with a clear error rather than
answered with text that would not validate. Every document is checked against its schema before
a token of it is sent: one that does not fit (bounds no value meets, a oneOf whose branches
overlap) is refused the same way.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

from stoker.protocol.errors import BadRequest
from stoker.protocol.messages import Key

_UNSUPPORTED = ("pattern", "allOf", "not", "if", "then", "else", "patternProperties", "dependentRequired",
                "dependentSchemas", "contains", "uniqueItems", "multipleOf", "prefixItems", "propertyNames")
_WORDS = ("coal", "steam", "boiler", "valve", "engine", "signal", "whistle", "rail", "brass", "smoke")
_FORMATS = {"date": "2026-01-02", "date-time": "2026-01-02T03:04:05Z", "time": "03:04:05Z",
            "email": "stoker@example.com", "uri": "https://example.com/stoker", "uuid":
            "12345678-1234-5678-1234-567812345678", "ipv4": "192.0.2.1", "hostname": "example.com"}
_PROBE = "__stoker_probe"
_MAX_TRIES = 64  # oneOf branches tried for one document at most
_PIECE = re.compile(r'\s+|[{}\[\]:,]|"[^"\\]{0,6}|[^"\\{}\[\]:,\s]{1,6}|\\.|.', re.S)


def document(fmt: Mapping[str, Any], state: int) -> str:
    """The JSON text for `response_format` `fmt`; `state` (the seed and prompt's hash) picks
    among the values that fit."""
    if fmt[Key.TYPE] == "json_object":
        return json.dumps({"answer": _word(state), "score": state % 10})
    schema = fmt[Key.SCHEMA]
    value = _Instance(schema, state).value(schema, 0)
    problem = _misfit(value, schema, schema)
    if problem is not None:
        raise BadRequest(f"the fake backend cannot make a value that fits this schema ({problem}); "
                         "use a llama model, or a simpler schema")
    return json.dumps(value)


def _misfit(value: Any, schema: Any, root: Mapping[str, Any]) -> str | None:
    """Why `value` does not fit `schema`, a part of `root`; None if it fits."""
    from jsonschema import validators
    from jsonschema.exceptions import SchemaError

    try:
        if schema is not root:
            # A part is checked as a $ref from a document that holds root's definitions, so its
            # '#/$defs/...' and '#/definitions/...' references resolve (others count as a misfit).
            keep = {k: root[k] for k in ("$schema", "definitions") if k in root}
            schema = {**keep, "$defs": {**root.get("$defs", {}), _PROBE: schema}, "$ref": f"#/$defs/{_PROBE}"}
        cls = validators.validator_for(schema, default=validators.Draft202012Validator)
        error = next(iter(cls(schema).iter_errors(value)), None)
    except Exception as exc:  # noqa: BLE001 - jsonschema raises many kinds for schemas it cannot use
        if isinstance(exc, SchemaError):
            return exc.message
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None if error is None else error.message


def pieces(text: str) -> list[str]:
    """`text` as the fake model's tokens: JSON punctuation, and runs of up to 6 characters."""
    return _PIECE.findall(text)


def _word(state: int) -> str:
    return _WORDS[state % len(_WORDS)]


class _Instance:
    def __init__(self, root: Mapping[str, Any], state: int) -> None:
        self.root = root
        self.state = state
        self.tries = 0  # oneOf branches tried, in all

    def _next(self) -> int:
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        return self.state >> 33

    def value(self, schema: Any, depth: int) -> Any:
        if depth > 32:
            raise BadRequest("'response_format' schema nests deeper than 32 levels (the fake backend's limit)")
        if schema is True or schema == {}:
            return _word(self._next())
        if not isinstance(schema, Mapping):
            raise BadRequest(f"'response_format' schema has {schema!r} where a schema (a map) belongs")
        for key in _UNSUPPORTED:
            if key in schema:
                raise BadRequest(f"the fake backend cannot follow the schema keyword {key!r}; "
                                 "use a llama model, or a simpler schema")
        if "$ref" in schema:
            return self.value(self._ref(schema["$ref"]), depth + 1)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return schema["enum"][self._next() % len(schema["enum"])]
        if "anyOf" in schema:
            return self.value(schema["anyOf"][0], depth + 1)
        if "oneOf" in schema:
            return self._one_of(schema["oneOf"], depth)
        kind = schema.get("type", "object" if "properties" in schema else "string")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        make = getattr(self, f"_{kind}", None)
        if make is None:
            raise BadRequest(f"'response_format' schema has an unknown type {kind!r}")
        return make(schema, depth)

    def _ref(self, ref: str) -> Any:
        node: Any = self.root
        if not ref.startswith("#/"):
            raise BadRequest(f"the fake backend follows local $refs only ('#/$defs/...'), not {ref!r}")
        for part in ref[2:].split("/"):
            if not isinstance(node, Mapping) or part not in node:
                raise BadRequest(f"'response_format' schema's $ref {ref!r} points at nothing")
            node = node[part]
        return node

    def _one_of(self, branches: list[Any], depth: int) -> Any:
        """A value of the first branch that fits no other branch (oneOf wants exactly one)."""
        self.tries += len(branches)
        if self.tries > _MAX_TRIES:  # nested oneOfs multiply: a bound, not minutes of a worker's time
            raise BadRequest("'response_format' schema's oneOfs are too many for the fake backend; "
                             "use a llama model, or a simpler schema")
        for i, branch in enumerate(branches):
            try:
                value = self.value(branch, depth + 1)
            except BadRequest:
                continue
            if all((_misfit(value, other, self.root) is None) == (j == i) for j, other in enumerate(branches)):
                return value
        raise BadRequest("the fake backend cannot make a value that fits exactly one 'oneOf' branch; "
                         "use a llama model, or a simpler schema")

    def _object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        props = schema.get("properties", {})
        value = {name: self.value(sub, depth + 1) for name, sub in props.items()}
        extra = schema.get("additionalProperties", True)
        # Required names the properties do not list, then made-up ones up to minProperties, take
        # additionalProperties' schema (refused below if that is false).
        names = [n for n in schema.get("required", []) if n not in value]
        names += [f"extra{i}" for i in range(int(schema.get("minProperties", 0)) - len(value) - len(names))]
        if names and extra is False:
            raise BadRequest(f"'response_format' schema's object needs {names[0]!r}, which its properties "
                             "do not list and additionalProperties forbids")
        for name in names:
            value[name] = self.value({} if extra is True else extra, depth + 1)
        high = schema.get("maxProperties")
        if high is not None:
            required = set(schema.get("required", []))
            for name in [n for n in value if n not in required][: max(0, len(value) - int(high))]:
                del value[name]
        return value

    def _array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        low, high = int(schema.get("minItems", 0)), schema.get("maxItems")
        n = max(low, min(2, int(high) if high is not None else 2))
        return [self.value(schema.get("items", {}), depth + 1) for _ in range(n)]

    def _string(self, schema: Mapping[str, Any], depth: int) -> str:
        if schema.get("format") in _FORMATS:
            return _FORMATS[schema["format"]]
        text = _word(self._next())
        low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
        text = (text * (low // len(text) + 1))[:max(low, len(text))]
        return text[: int(high)] if high is not None else text

    @staticmethod
    def _bounds(schema: Mapping[str, Any]) -> tuple[float | None, bool, float | None, bool]:
        """(low, low excluded, high, high excluded); None where unbounded."""
        low, high = schema.get("minimum"), schema.get("maximum")
        low_out, high_out = low is None and "exclusiveMinimum" in schema, high is None and "exclusiveMaximum" in schema
        return (schema.get("exclusiveMinimum") if low_out else low, low_out,
                schema.get("exclusiveMaximum") if high_out else high, high_out)

    def _integer(self, schema: Mapping[str, Any], depth: int) -> int:
        low, low_out, high, high_out = self._bounds(schema)
        first = -1 if low is None else (math.floor(low) + 1 if low_out else math.ceil(low))
        last = first + 100 if high is None else (math.ceil(high) - 1 if high_out else math.floor(high))
        if low is None and high is not None:
            first = last - 100
        if last < first:
            raise BadRequest("'response_format' schema has an integer with no value in its bounds")
        return first + self._next() % (last - first + 1)

    def _number(self, schema: Mapping[str, Any], depth: int) -> float:
        low, low_out, high, high_out = self._bounds(schema)
        step = self._next() % 100 + 0.5
        if low is not None and high is not None:
            if high < low or (high == low and (low_out or high_out)):
                raise BadRequest("'response_format' schema has a number with no value in its bounds")
            return (low + high) / 2
        if low is not None:
            return low + step
        return high - step if high is not None else step

    def _boolean(self, schema: Mapping[str, Any], depth: int) -> bool:
        return bool(self._next() & 1)

    def _null(self, schema: Mapping[str, Any], depth: int) -> None:
        return None
