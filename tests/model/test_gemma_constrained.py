"""The real Gemma under a JSON schema or a GBNF grammar, one request at a time (Llama's own
sampler chain) and four at once (the batch engine, which checks the grammar for the sampled token
first): valid JSON every time, a bad constraint refused with llama's reason, and a worker
killed mid-document resumed inside the grammar."""

from __future__ import annotations

import json
import os
import signal

import jsonschema
import pytest

from stoker.protocol.errors import BadRequest

from .test_gemma import gemma

pytestmark = pytest.mark.model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 40},
        "role": {"enum": ["engineer", "teacher", "doctor", "other"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "role", "skills"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "schema": SCHEMA}
PEOPLE = [
    "Maria Lopez is a 34-year-old teacher from Madrid who speaks Spanish and English.",
    "Dr. Ken Watanabe, 51, works as a doctor in Osaka and loves surgery and research.",
    "Priya, aged 28, is a software engineer in Bangalore skilled in Python and Rust.",
    "Tom Becker is 45 and lives in Berlin; he repairs bicycles and bakes bread.",
]


def prompt(text: str) -> str:
    return f"Extract the person as JSON (name, age, city, role, skills).\nText: {text}\nJSON:"


@pytest.mark.parametrize("parallel", [1, 4])
def test_schema_constrained_text_parses_and_validates(start_supervisor, parallel):
    sup = start_supervisor(models=gemma(1024) + f"parallel = {parallel}\n", default_model="gemma")
    with sup.client(timeout=120) as c:
        streams = [c.generate(prompt(p), response_format=FORMAT, max_tokens=160, temperature=0) for p in PEOPLE]
        done = [s.complete() for s in streams]
        for comp in done:
            assert comp.reason == "stop", comp
            jsonschema.validate(json.loads(comp.text), SCHEMA)
        grammar = c.complete("Is the sky blue? Answer:", grammar='root ::= " yes" | " no"', temperature=0)
        assert grammar.text in (" yes", " no") and grammar.reason == "stop"
        anything = c.complete('Give a JSON object with keys "city" and "country" for Paris:',
                              response_format={"type": "json_object"}, max_tokens=200, temperature=0)
        assert anything.reason == "stop", anything
        assert isinstance(json.loads(anything.text), dict)


def test_a_bad_grammar_is_refused_with_llamas_reason_and_the_worker_serves_on(start_supervisor):
    sup = start_supervisor(models=gemma(1024) + "parallel = 2\n", default_model="gemma")
    with sup.client(timeout=120) as c:
        assert c.complete("Hi", max_tokens=2).reason == "length"
        [worker] = sup.workers("gemma")
        with pytest.raises(BadRequest, match="Undefined rule identifier 'nothing'"):
            c.complete("x", grammar="root ::= nothing")
        with pytest.raises(BadRequest, match="schema cannot be turned into a grammar"):
            c.complete("x", response_format={"type": "json_schema", "schema": {"$ref": "https://example.com/x"}})
        assert c.complete("Hi", max_tokens=2).reason == "length"
        [same] = sup.workers("gemma")
        assert same["pid"] == worker["pid"]


@pytest.mark.parametrize("parallel", [1, 4])
def test_a_worker_killed_mid_document_resumes_inside_the_schema(start_supervisor, parallel):
    sup = start_supervisor(models=gemma(1024) + f"parallel = {parallel}\n", default_model="gemma")
    with sup.client(timeout=120) as c:
        stream = c.generate(prompt(PEOPLE[2]), response_format=FORMAT, max_tokens=160, temperature=0)
        events = iter(stream)
        got = [next(events) for _ in range(8)]
        [worker] = sup.workers("gemma")
        os.kill(worker["pid"], signal.SIGKILL)
        got += list(events)
        assert stream.end is not None and stream.end.reason == "stop", stream.end
        text = "".join(got)  # a stream iterates as its text
        jsonschema.validate(json.loads(text), SCHEMA)


NAMES = ["Ana", "Bo", "Chen Li", "Dmitri", "Eva Novak", "Farah", "Gus", "Hana Sato", "Ivan", "Jo Park"]
CITIES = ["Lisbon", "Oslo", "Lima", "Cairo", "Seoul"]
JOBS = [("teaches maths", "teacher"), ("treats patients", "doctor"), ("builds bridges", "engineer"),
        ("paints houses", "other"), ("writes compilers", "engineer")]


def fifty() -> list[str]:
    return [f"{NAMES[i % 10]} is {20 + i} years old, lives in {CITIES[i % 5]} and {JOBS[(i // 5) % 5][0]}; "
            f"good at {['chess', 'cooking', 'running', 'singing', 'math'][i % 5]}." for i in range(50)]


def valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


@pytest.mark.timeout(400)  # 100 requests on 2 cores: 85 to 110 s
def test_fifty_extractions_with_the_schema_all_validate_and_without_it_mostly_do_not(start_supervisor):
    sup = start_supervisor(models=gemma(1024) + "parallel = 4\n", default_model="gemma")
    with sup.client(timeout=300) as c:
        def run(max_tokens: int, **constraint) -> list:
            streams = [c.generate(prompt(p), max_tokens=max_tokens, temperature=0, **constraint) for p in fifty()]
            return [s.complete() for s in streams]

        constrained = run(160, response_format=FORMAT)
        free = run(100)  # room for the whole record (the constrained ones took 40 to 60 tokens)
    ok = sum(valid(comp.text) for comp in constrained)
    ok_free = sum(valid(comp.text.strip().strip("`").removeprefix("json").strip()) for comp in free)
    print(f"\n50 extractions on Gemma 3 270M: {ok} validate with the schema, {ok_free} without it")
    assert ok == 50, [comp.text for comp in constrained if not valid(comp.text)][:3]
    assert ok_free < 25
