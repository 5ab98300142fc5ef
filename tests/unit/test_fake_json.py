"""The fake backend's constrained output: deterministic JSON that validates against the schema,
split into tokens that add up to it, and a clear refusal of what it cannot follow."""

from __future__ import annotations

import json

import jsonschema
import pytest

from stoker.protocol.errors import BadRequest
from stoker.workers.backend import GenerationRequest
from stoker.workers.fake_backend import FakeSequence
from stoker.workers.fake_json import document, pieces
from stoker.supervisor.config import ModelConfig

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 3, "maxLength": 12},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "minItems": 3},
        "address": {"$ref": "#/$defs/address"},
        "score": {"type": "number", "exclusiveMinimum": 0},
        "active": {"type": ["boolean", "null"]},
        "kind": {"const": "person"},
        "contact": {"anyOf": [{"type": "string", "format": "email"}, {"type": "null"}]},
    },
    "required": ["name", "age", "tags"],
    "$defs": {"address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
}


@pytest.mark.parametrize("state", [0, 1, 2, 99, 2**63])
def test_documents_validate_and_their_pieces_add_up(state):
    text = document({"type": "json_schema", "schema": SCHEMA}, state)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert "".join(pieces(text)) == text and len(pieces(text)) > 10
    assert isinstance(json.loads(document({"type": "json_object"}, state)), dict)


def test_the_same_state_gives_the_same_document_and_others_vary():
    fmt = {"type": "json_schema", "schema": SCHEMA}
    assert document(fmt, 7) == document(fmt, 7)
    assert len({document(fmt, s) for s in range(20)}) > 5


@pytest.mark.parametrize("schema, words", [
    ({"type": "string", "pattern": "^a+$"}, "'pattern'"),
    ({"allOf": [{"type": "string"}]}, "'allOf'"),
    ({"type": "frob"}, "unknown type 'frob'"),
    ({"$ref": "https://example.com/s.json"}, "local $refs only"),
    ({"$ref": "#/$defs/missing"}, "points at nothing"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "no value in its bounds"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "cannot make a value that fits"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "cannot make a value that fits"),
    ({"oneOf": [{"type": "integer"}, {"type": "integer", "minimum": -5}]}, "exactly one 'oneOf' branch"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False,
      "required": ["a", "z"]}, "needs 'z'"),
])
def test_what_it_cannot_follow_is_refused_with_the_reason(schema, words):
    with pytest.raises(BadRequest, match=words.replace("$", r"\$").replace("(", r"\(")):
        document({"type": "json_schema", "schema": schema}, 0)


@pytest.mark.parametrize("schema", [
    {"type": "object", "minProperties": 2},
    {"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 1},
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"]},
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["b"],
     "maxProperties": 1},
    {"oneOf": [{"type": "integer"}, {"type": "number"}]},
    {"type": "object", "properties": {"p": {"oneOf": [{"$ref": "#/$defs/q"}, {"type": "null"}]}},
     "$defs": {"q": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}},
])
def test_object_counts_required_extras_and_one_of_fit(schema):
    for state in range(5):
        jsonschema.validate(json.loads(document({"type": "json_schema", "schema": schema}, state)), schema)


def _seq(**sampling) -> FakeSequence:
    model = ModelConfig(name="f", backend="fake", end_every=0)
    resume = sampling.pop("resume", "")
    return FakeSequence(model, GenerationRequest("extract", None, sampling.pop("max_tokens", 200), sampling,
                                                 resume=resume))


def _run(seq: FakeSequence) -> str:
    text = ""
    while not seq.done:
        text += "".join(c.text for c in seq.advance())
    return text


def test_a_sequence_streams_the_document_ends_with_stop_and_resumes_after_any_prefix():
    fmt = {"type": "json_schema", "schema": SCHEMA}
    seq = _seq(response_format=fmt)
    whole = _run(seq)
    assert seq.reason == "stop"
    jsonschema.validate(json.loads(whole), SCHEMA)
    for cut in (1, 5, len(whole) // 2, len(whole) - 1):
        rest = _seq(response_format=fmt, resume=whole[:cut])
        assert whole[:cut] + _run(rest) == whole
    short = _seq(response_format=fmt, max_tokens=4)
    assert whole.startswith(_run(short)) and short.reason == "length"


def test_a_grammar_and_a_foreign_resume_are_refused():
    with pytest.raises(BadRequest, match="cannot follow a GBNF grammar"):
        _seq(grammar='root ::= "a"')
    with pytest.raises(BadRequest, match="cannot be continued"):
        _seq(response_format={"type": "json_object"}, resume="not json")
