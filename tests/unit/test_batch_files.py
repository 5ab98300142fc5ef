"""`stoker batch` input parsing and the resumable output file."""

import json
import os

from stoker.supervisor.batch import Output, parse_items, read_output


def test_valid_items_and_a_numbered_reason_for_each_bad_line():
    lines = [
        json.dumps({"id": 1, "prompt": "a", "max_tokens": 3}),
        "",
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"prompt": "no id"}),
        json.dumps({"id": True, "prompt": "bool id"}),
        json.dumps({"id": "x", "prompt": "p", "messages": []}),
        json.dumps({"id": "y"}),
        json.dumps({"id": 1, "prompt": "again"}),
        json.dumps({"id": "chat", "messages": [{"role": "user", "content": "hi"}], "model": "m"}),
    ]
    items, problems = parse_items(lines)
    assert [(i.line, i.id) for i in items] == [(1, 1), (10, "chat")]
    assert items[0].request == {"prompt": "a", "max_tokens": 3}
    assert [p.split(":")[0] for p in problems] == ["line 3", "line 4", "line 5", "line 6", "line 7", "line 8", "line 9"]
    assert "already on line 1" in problems[-1]


def test_output_lines_are_whole_and_the_last_id_wins(tmp_path):
    path = str(tmp_path / "out.jsonl")
    out = Output(path)
    out.write({"id": 1, "error": {"code": "overloaded", "message": "m"}})
    out.write({"id": "a", "text": "t\nwith newline", "usage": {}, "timings": {}})
    out.write({"id": 1, "text": "ok", "usage": {}, "timings": {}})
    out.close()
    done, notes = read_output(path)
    assert done == {1: True, "a": True} and notes == []
    assert len(open(path).read().splitlines()) == 3


def test_a_torn_last_line_is_cut_off_and_garbage_lines_are_ignored(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": 1, "text": "x"}\nnot json\n{"id": 2, "error": {"code": "internal"}}\n{"id": 3, "te')
    done, notes = read_output(str(path))
    assert done == {1: True, 2: False}
    assert any("incomplete last line" in n for n in notes) and any("line 2" in n for n in notes)
    assert path.read_text().endswith("}\n")  # the next append starts on a fresh line
    assert read_output(str(tmp_path / "missing.jsonl")) == ({}, [])


def test_output_is_appended_not_replaced(tmp_path):
    path = str(tmp_path / "out.jsonl")
    for n in range(2):
        out = Output(path)
        out.write({"id": n, "text": "", "usage": {}, "timings": {}})
        out.close()
    assert read_output(path)[0] == {0: True, 1: True}
    assert os.stat(path).st_mode & 0o022 == 0  # not writable by others


def test_constrained_results_carry_the_value_or_say_why_not():
    from stoker.supervisor.batch import Item, item_request, result_record

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fmt = {"type": "json_schema", "schema": schema}
    item = Item(1, "x", {"prompt": "p"})
    ok = result_record(item, {"response_format": fmt}, '{"n": 3}', "stop", {}, {})
    assert ok["json"] == {"n": 3} and "error" not in ok
    wrong = result_record(item, {"response_format": fmt}, '{"n": "three"}', "stop", {}, {})
    assert wrong["error"]["code"] == "invalid_output" and "does not fit the schema" in wrong["error"]["message"]
    cut = result_record(item, {"response_format": {"type": "json_object"}}, '{"n": ', "length", {}, {})
    assert "not JSON" in cut["error"]["message"] and "cut short" in cut["error"]["message"]
    assert "json" not in result_record(item, {}, "free text", "stop", {}, {})
    # defaults fill what an item leaves out; its own grammar drops the default schema
    defaults = {"model": "m", "max_tokens": 9, "response_format": fmt}
    assert item_request(Item(1, "y", {"prompt": "p", "max_tokens": 2}), defaults) == {
        "model": "m", "max_tokens": 2, "response_format": fmt, "prompt": "p"}
    assert "response_format" not in item_request(Item(1, "z", {"prompt": "p", "grammar": "g"}), defaults)
