"""Constrained output through a real supervisor and fake workers (one request at a time, and four
at once): the text parses and validates, a bad constraint is a bad_request that costs the worker
nothing, and a worker killed mid-document resumes into the same valid document."""

from __future__ import annotations

import json
import os
import signal

import jsonschema
import pytest

from stoker.protocol.client import Client
from stoker.protocol.errors import BadRequest

from .helpers import raw_socket, recv, send, text_of
from .test_parallel import PAR, msgs, read_all

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "horror"]}},
        "rating": {"type": "number"},
        "director": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
    },
    "required": ["title", "year", "genres", "director"],
}
FORMAT = {"type": "json_schema", "schema": SCHEMA}
ONE = PAR.replace("[models.par]", "[models.one]").replace("parallel = 4", "parallel = 1")


@pytest.mark.parametrize("model", ["one", "par"])
def test_schema_requests_stream_valid_json_one_or_four_at_once(start_supervisor, model):
    sup = start_supervisor(models=PAR + ONE, default_model=model)
    with Client(sup.endpoint, timeout=30) as c:
        streams = [c.generate(f"movie {i}", response_format=FORMAT, max_tokens=500) for i in range(4)]
        streams.append(c.generate("any object", response_format={"type": "json_object"}, max_tokens=500))
        done = [s.complete() for s in streams]
    for comp in done[:4]:
        assert comp.reason == "stop", comp
        jsonschema.validate(json.loads(comp.text), SCHEMA)
    assert isinstance(json.loads(done[4].text), dict)
    assert len({comp.text for comp in done[:4]}) > 1  # each prompt its own document


def test_bad_constraints_are_bad_requests_and_the_worker_serves_on(start_supervisor):
    sup = start_supervisor(models=PAR, default_model="par")
    with Client(sup.endpoint, timeout=30) as c:
        assert c.complete("warm", max_tokens=2).reason == "length"
        [worker] = sup.workers("par")
        with pytest.raises(BadRequest, match="cannot follow a GBNF grammar"):
            c.complete("g", grammar='root ::= "a"')
        with pytest.raises(BadRequest, match="'pattern'"):
            c.complete("p", response_format={"type": "json_schema", "schema": {"type": "string", "pattern": "a+"}})
        with pytest.raises(BadRequest, match="not both"):
            c.complete("b", grammar='root ::= "a"', response_format={"type": "json_object"})
        with pytest.raises(BadRequest, match="'response_format' must be"):
            c.complete("t", response_format={"type": "text"})
        ok = c.complete("after", response_format=FORMAT, max_tokens=500)
        jsonschema.validate(json.loads(ok.text), SCHEMA)
        [same] = sup.workers("par")
        assert same["pid"] == worker["pid"]  # the same worker: none of it cost a restart


def test_a_worker_killed_mid_document_resumes_into_the_same_valid_document(start_supervisor):
    sup = start_supervisor(models=PAR, default_model="par")
    with Client(sup.endpoint, timeout=30) as c:
        whole = c.complete("film 9", response_format=FORMAT, max_tokens=500).text
    sock = raw_socket(sup.endpoint)
    ids = ["k1", "k2", "k3"]
    for rid in ids:
        prompt = "film 9" if rid == "k1" else f"film {rid}"
        send(sock, op="generate", id=rid, prompt=prompt, response_format=FORMAT, max_tokens=500)
    seen: dict = {rid: [] for rid in ids}
    while min(sum(r.get("n", 0) for r in seen[rid] if r["ev"] == "token") for rid in ids) < 5:
        msg = recv(sock)
        seen[msg["id"]].append(msg)
    [w] = sup.workers("par")
    os.kill(w["pid"], signal.SIGKILL)
    got = read_all({sock: ids})
    for rid in ids:
        replies = seen[rid] + msgs(got[rid])
        assert replies[-1]["ev"] == "end" and replies[-1]["reason"] == "stop", replies[-1]
        text = text_of(replies)  # seq contiguous: nothing repeated or missing
        jsonschema.validate(json.loads(text), SCHEMA)
        if rid == "k1":
            assert text == whole
    sock.close()
