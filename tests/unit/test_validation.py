import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.protocol.errors import BadRequest, UnsupportedVersion
from stoker.protocol.messages import Op
from stoker.protocol.validation import CancelRequest, GenerateRequest, ModelRequest, parse_request


def gen(**keys):
    return {"v": 1, "op": "generate", "id": 7, "prompt": "hi", **keys}


def test_minimal_generate():
    req = parse_request(gen())
    assert isinstance(req, GenerateRequest)
    assert (req.id, req.prompt, req.model, req.messages, dict(req.sampling)) == (7, "hi", None, None, {})


def test_generate_with_everything():
    req = parse_request(gen(model="m", max_tokens=5, temperature=0, top_p=0.9, top_k=40, min_p=0.05,
                            repeat_penalty=1.1, seed=3, stop=["\n"], keep_alive=0))
    assert req.model == "m" and req.keep_alive == 0.0
    assert req.sampling == {"max_tokens": 5, "temperature": 0, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
                            "repeat_penalty": 1.1, "seed": 3, "stop": ["\n"]}


def test_messages():
    msgs = [{"role": "user", "content": "hi"}]
    req = parse_request({"v": 1, "op": "generate", "id": "x", "messages": msgs})
    assert req.messages == tuple(msgs) and req.prompt is None


@pytest.mark.parametrize("msg, fragment", [
    ({"v": 1, "op": "generate", "id": 1}, "exactly one"),
    (gen(messages=[{"role": "u", "content": "c"}]), "exactly one"),
    ({"v": 1, "op": "generate", "id": 1, "messages": []}, "non-empty"),
    ({"v": 1, "op": "generate", "id": 1, "messages": [{"role": "u"}]}, "messages[0]"),
    ({"v": 1, "op": "generate", "id": 1, "messages": [{"role": "u", "content": 3}]}, "messages[0]"),
    (gen(prompt=5), "'prompt'"),
    (gen(max_tokens=0), "max_tokens"),
    (gen(max_tokens=2.5), "max_tokens"),
    (gen(max_tokens=True), "max_tokens"),
    (gen(temperature=-1), "temperature"),
    (gen(temperature=float("nan")), "temperature"),
    (gen(top_p=1.5), "top_p"),
    (gen(top_k=-1), "top_k"),
    (gen(min_p=-0.1), "min_p"),
    (gen(repeat_penalty=0), "repeat_penalty"),
    (gen(seed=-2), "seed"),
    (gen(seed=2**32), "seed"),
    (gen(stop="x"), "stop"),
    (gen(stop=[""]), "stop"),
    (gen(stop=["a"] * 17), "stop"),
    (gen(keep_alive=-1), "keep_alive"),
    (gen(model=""), "model"),
    (gen(model=3), "model"),
    (gen(max_token=3), "max_token"),
    ({"v": 1, "op": "fly", "id": 1}, "unknown op"),
    ({"v": 1, "op": "cancel", "id": 1}, "target"),
    ({"v": 1, "op": "load", "id": 1}, "model"),
    ({"v": 1, "op": "ping", "id": 1, "extra": 1}, "extra"),
])
def test_bad_requests_name_the_problem_and_keep_the_id(msg, fragment):
    with pytest.raises(BadRequest) as exc:
        parse_request(msg)
    assert fragment in exc.value.message
    assert exc.value.request_id == msg["id"]


@pytest.mark.parametrize("rid", [None, 1.5, True, [1], "x" * 257, 2**64])
def test_bad_ids_get_null_id(rid):
    with pytest.raises(BadRequest) as exc:
        parse_request({"v": 1, "op": "ping", "id": rid})
    assert exc.value.request_id is None


def test_missing_id():
    with pytest.raises(BadRequest, match="no 'id'"):
        parse_request({"v": 1, "op": "ping"})


@pytest.mark.parametrize("v", [0, 2, "1", 1.0])
def test_other_versions_unsupported(v):
    with pytest.raises(UnsupportedVersion):
        parse_request({"v": v, "op": "ping", "id": 1})


def test_missing_version_is_bad_request():
    with pytest.raises(BadRequest, match="'v'"):
        parse_request({"op": "ping", "id": 1})


def test_other_ops():
    assert parse_request({"v": 1, "op": "cancel", "id": 1, "target": "g"}) == CancelRequest(1, Op.CANCEL, "g")
    assert parse_request({"v": 1, "op": "unload", "id": 1, "model": "m"}) == ModelRequest(1, Op.UNLOAD, "m")
    for op in ("status", "models", "ping", "shutdown"):
        assert parse_request({"v": 1, "op": op, "id": "s"}).op is Op(op)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "op", "id", "prompt", "model", "max_tokens", "stop", "seed"]),
                       st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=5), st.floats(),
                                 st.lists(st.text(max_size=3), max_size=3))))
def test_arbitrary_maps_either_parse_or_raise_protocol_errors(msg):
    try:
        parse_request(msg)
    except (BadRequest, UnsupportedVersion):
        pass


def test_seed_minus_one_means_random():
    assert parse_request(gen(seed=-1)).sampling["seed"] == -1
    with pytest.raises(BadRequest):
        parse_request(gen(seed=-2))


# ---- constrained output --------------------------------------------------------------------------

def _generate(**keys):
    return parse_request({"v": 1, "op": "generate", "id": 1, "prompt": "p", **keys})


def test_response_format_and_grammar_are_taken_as_sampling_keys():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = _generate(response_format={"type": "json_schema", "schema": schema})
    assert req.sampling["response_format"] == {"type": "json_schema", "schema": schema}
    assert _generate(response_format={"type": "json_object"}).sampling["response_format"]["type"] == "json_object"
    assert _generate(grammar='root ::= "yes" | "no"').sampling["grammar"] == 'root ::= "yes" | "no"'


@pytest.mark.parametrize("keys, words", [
    ({"response_format": "json"}, "'response_format' must be"),
    ({"response_format": {"type": "text"}}, "'response_format' must be"),
    ({"response_format": {"type": "json_schema"}}, "'response_format' must be"),
    ({"response_format": {"type": "json_schema", "schema": "{}"}}, "'response_format' must be"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "'response_format' must be"),
    ({"grammar": ""}, "'grammar' must be a GBNF grammar"),
    ({"grammar": 7}, "'grammar' must be a GBNF grammar"),
    ({"grammar": "x" * 70000}, "'grammar' must be a GBNF grammar"),
    ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "not both"),
])
def test_bad_constraints_are_refused(keys, words):
    with pytest.raises(BadRequest, match=words):
        _generate(**keys)
