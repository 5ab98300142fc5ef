"""`stoker batch` against a real supervisor: concurrent jobs, SIGKILL and resume, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from stoker.workers.fake_backend import complete as fake_complete
from tests.conftest import wait_for

MODEL = '[models.f]\nbackend = "fake"\ntokens_per_second = 1000\nend_every = 0\n'
CLI = [sys.executable, "-m", "stoker.supervisor"]


def write_input(path: Path, n: int, prefix: str) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"{prefix}-{i}", "prompt": f"{prefix} prompt {i}", "max_tokens": 10}) + "\n")


def batch(sup, inp: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(CLI + ["batch", str(inp), "-o", str(out), "-m", "f", "--concurrency", "4",
                                   "--config", str(sup.config_path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def lines(path: Path) -> list[dict]:
    """The complete lines so far (one being appended while we read is not complete yet)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(x) for x in text[: text.rfind("\n") + 1].splitlines()]


def test_two_batches_at_once_one_killed_and_rerun_while_an_interactive_run_answers(start_supervisor, short_dir):
    sup = start_supervisor(MODEL)
    with sup.client() as c:
        c.load("f")
    in_a, in_b = short_dir / "a.jsonl", short_dir / "b.jsonl"
    out_a, out_b = short_dir / "out-a.jsonl", short_dir / "out-b.jsonl"
    write_input(in_a, 300, "a")
    write_input(in_b, 300, "b")
    job_a, job_b = batch(sup, in_a, out_a), batch(sup, in_b, out_b)

    # While both run, an interactive `stoker run` answers promptly.
    wait_for(lambda: len(lines(out_a)) >= 20 and len(lines(out_b)) >= 20, 60, "both batches to be under way")
    t0 = time.monotonic()
    run = subprocess.run(CLI + ["run", "hello there", "-m", "f", "-n", "5", "-v", "--config", str(sup.config_path)],
                         capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "".join(fake_complete("hello there", 0, 5, 0)[0]).strip()
    queued_ms = float(run.stderr.split("'queued_ms': ")[1].split(",")[0])
    assert queued_ms < 500, run.stderr  # behind at most a turn of each batch, not hundreds of items
    assert job_a.poll() is None or job_b.poll() is None, "the batches should still be running"

    # Kill job a with SIGKILL halfway, then run it again.
    wait_for(lambda: len(lines(out_a)) >= 150, 60, "job a to be halfway")
    job_a.send_signal(signal.SIGKILL)
    job_a.wait(10)
    at_kill = len(lines(out_a))
    assert at_kill < 300, "job a finished before it could be killed"
    rerun = batch(sup, in_a, out_a)
    assert rerun.wait(120) == 0, rerun.communicate()
    assert job_b.wait(120) == 0, job_b.communicate()

    for out, prefix in ((out_a, "a"), (out_b, "b")):
        got = lines(out)
        assert len(got) == 300 and len({r["id"] for r in got}) == 300
        for r in got:
            i = int(r["id"].split("-")[1])
            assert r["text"] == "".join(fake_complete(f"{prefix} prompt {i}", 0, 10, 0)[0])
            assert r["usage"]["completion_tokens"] == 10
    _, err = rerun.communicate()
    assert f"{at_kill} already in" in err, err
    print(f"interactive run: {took:.2f} s wall, queued {queued_ms:.0f} ms; job a killed at {at_kill}/300")


def test_bad_lines_are_reported_failures_exit_3_and_stdin_works(start_supervisor, short_dir):
    sup = start_supervisor(MODEL)
    out = short_dir / "out.jsonl"
    source = "\n".join([
        json.dumps({"id": 1, "prompt": "fine", "max_tokens": 3}),
        "{oops",
        json.dumps({"id": 2, "prompt": "bad key", "max_tokens": 0}),
        json.dumps({"id": 3, "prompt": "unknown model", "model": "nope"}),
        json.dumps({"id": 4, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ]) + "\n"
    proc = subprocess.run(CLI + ["batch", "-", "-o", str(out), "-m", "f", "--config", str(sup.config_path)],
                          input=source, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "line 2: not valid JSON" in proc.stderr
    assert proc.stdout == ""  # no progress bar when stdout is not a terminal
    got = {r["id"]: r for r in lines(out)}
    assert set(got) == {1, 2, 3, 4}
    assert got[2]["error"]["code"] == "bad_request" and got[3]["error"]["code"] == "unknown_model"
    assert "text" in got[1] and "text" in got[4]
    # Rerun: everything is in OUTPUT already; the failures still count.
    again = subprocess.run(CLI + ["batch", "-", "-o", str(out), "-m", "f", "--config", str(sup.config_path)],
                           input=source, capture_output=True, text=True, timeout=60)
    assert again.returncode == 3 and len(lines(out)) == 4
    # --retry-failed runs the failed ones again (fixing the input fixes them).
    fixed = source.replace('"max_tokens": 0', '"max_tokens": 1').replace('"model": "nope"', '"model": "f"')
    retry = subprocess.run(CLI + ["batch", "-", "-o", str(out), "-m", "f", "--retry-failed",
                                  "--config", str(sup.config_path)], input=fixed, capture_output=True, text=True,
                           timeout=60)
    assert retry.returncode == 0, retry.stderr
    assert len(lines(out)) == 6  # two more lines; the last line of an id wins


def test_a_supervisor_that_goes_away_stops_the_batch_and_the_rerun_finishes_it(start_supervisor, short_dir):
    sup = start_supervisor(MODEL.replace("1000", "200"))
    inp, out = short_dir / "in.jsonl", short_dir / "out.jsonl"
    write_input(inp, 200, "x")
    job = batch(sup, inp, out, "--timeout", "2", "--no-start")
    wait_for(lambda: len(lines(out)) >= 10, 60, "the batch to be under way")
    sup.proc.send_signal(signal.SIGKILL)
    sup.proc.wait(10)
    code = job.wait(60)
    _, err = job.communicate()
    assert code in (2, 4), err  # unreachable or timeout, not "items failed"
    assert "run the same command again" in err
    partial = lines(out)
    assert all("text" in r for r in partial)  # nothing in flight was written as an error
    sup2 = start_supervisor(MODEL)
    assert sup2.endpoint == sup.endpoint
    rerun = batch(sup2, inp, out)
    assert rerun.wait(120) == 0, rerun.communicate()
    got = lines(out)
    assert len(got) == 200 and len({r["id"] for r in got}) == 200


def test_a_graceful_stop_during_a_batch_writes_no_failures_and_the_rerun_finishes(start_supervisor, short_dir):
    sup = start_supervisor(MODEL.replace("1000", "100"), drain_timeout=1)
    inp, out = short_dir / "in.jsonl", short_dir / "out.jsonl"
    write_input(inp, 60, "s")
    job = batch(sup, inp, out)
    wait_for(lambda: len(lines(out)) >= 5, 60, "the batch to be under way")
    assert subprocess.run(CLI + ["stop", "--config", str(sup.config_path)], capture_output=True,
                          timeout=60).returncode == 0
    code = job.wait(60)
    _, err = job.communicate()
    assert code == 2, err
    assert all("text" in r for r in lines(out)), "shutting_down must not be written as a failure"
    sup2 = start_supervisor(MODEL)
    rerun = batch(sup2, inp, out)
    assert rerun.wait(120) == 0, rerun.communicate()
    assert len({r["id"] for r in lines(out)}) == 60 == len(lines(out))


def test_odd_inputs_and_outputs(start_supervisor, short_dir):
    sup = start_supervisor(MODEL)
    cfg = str(sup.config_path)
    inp = short_dir / "in.jsonl"
    # a lone surrogate (valid JSON, not UTF-8) in an id and in a prompt: errors, not a crash
    inp.write_text('{"id": "a\\ud800", "prompt": "x", "max_tokens": 2}\n'
                   '{"id": "b", "prompt": "y\\udfff", "max_tokens": 2}\n'
                   '{"id": "c", "prompt": "fine", "max_tokens": 2}\n')
    out = short_dir / "out.jsonl"
    done = subprocess.run(CLI + ["batch", str(inp), "-o", str(out), "-m", "f", "--config", cfg],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
    got = {r["id"]: r for r in lines(out)}
    assert set(got) == {"a\ud800", "b", "c"} and "text" in got["c"]
    assert got["b"]["error"]["code"] == "bad_request"
    # an OUTPUT in a folder that does not exist
    missing = subprocess.run(CLI + ["batch", str(inp), "-o", str(short_dir / "nope" / "o.jsonl"), "-m", "f",
                                    "--config", cfg], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "cannot write" in missing.stderr and "Traceback" not in missing.stderr
    # no valid line at all
    bad = short_dir / "bad.jsonl"
    bad.write_text("nope\n")
    none = subprocess.run(CLI + ["batch", str(bad), "-o", str(short_dir / "o2.jsonl"), "--config", cfg],
                          capture_output=True, text=True, timeout=60)
    assert none.returncode == 1 and "no valid items" in none.stderr
    # two batches on one OUTPUT: the second refuses
    big = short_dir / "big.jsonl"
    write_input(big, 200, "z")
    shared = short_dir / "shared.jsonl"
    first = batch(sup, big, shared)
    wait_for(lambda: len(lines(shared)) >= 1, 60, "the first batch to write")
    second = subprocess.run(CLI + ["batch", str(big), "-o", str(shared), "-m", "f", "--config", cfg],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and "another stoker batch" in second.stderr
    assert first.wait(120) == 0


def test_a_full_disk_stops_the_batch_with_whole_lines_and_one_clear_line_and_a_rerun_completes(
        start_supervisor, short_dir):
    """A file-size limit (RLIMIT_FSIZE) stands in for a full disk: the write that crosses it
    comes up short, the next one fails (EFBIG), as ENOSPC would."""
    import resource

    sup = start_supervisor(MODEL)
    inp, out = short_dir / "in.jsonl", short_dir / "out.jsonl"
    write_input(inp, 60, "d")
    limit = 5000

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = CLI + ["batch", str(inp), "-o", str(out), "-m", "f", "--config", str(sup.config_path)]
    full = subprocess.run(args, preexec_fn=small_files, capture_output=True, text=True, timeout=120)
    assert full.returncode == 5, full.stderr
    assert "Traceback" not in full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("stoker: stopped: cannot write") and str(out) in last, full.stderr
    data = out.read_bytes()
    assert data.endswith(b"\n") and 0 < len(data) <= limit  # whole lines only, nothing torn
    written = [json.loads(x) for x in data.splitlines()]
    assert len({x["id"] for x in written}) == len(written) < 60
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    done = lines(out)
    assert len(done) == 60 and len({x["id"] for x in done}) == 60


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer", "minimum": 1}},
          "required": ["name", "n"]}


def test_schema_and_sampling_flags_apply_to_items_that_set_none_and_bad_output_is_marked(start_supervisor,
                                                                                         short_dir):
    import jsonschema

    sup = start_supervisor(MODEL)
    schema = short_dir / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    inp = short_dir / "in.jsonl"
    items = [
        {"id": "plain", "prompt": "record 1"},
        {"id": "own-format", "prompt": "record 2", "response_format": {"type": "json_object"}},
        {"id": "cut", "prompt": "record 3", "max_tokens": 3},  # the schema's document cut short
        {"id": "grammar", "prompt": "record 4", "grammar": 'root ::= "x"'},  # the fake refuses grammars
        {"id": "scored", "prompt": "record 5", "logprobs": 2},
    ]
    inp.write_text("".join(json.dumps(i) + "\n" for i in items))
    out = short_dir / "out.jsonl"
    done = subprocess.run(CLI + ["batch", str(inp), "-o", str(out), "-m", "f", "--config", str(sup.config_path),
                                 "--schema", str(schema), "--max-tokens", "300"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr  # two items failed
    got = {r["id"]: r for r in lines(out)}
    scored = got["scored"]
    assert len(scored["logprobs"]) == scored["usage"]["completion_tokens"] and "logprobs" not in got["plain"]
    assert "".join(e["token"] for e in scored["logprobs"]) == scored["text"]
    jsonschema.validate(got["plain"]["json"], SCHEMA)
    assert got["plain"]["json"] == json.loads(got["plain"]["text"]) and "error" not in got["plain"]
    assert set(got["own-format"]["json"]) == {"answer", "score"}  # its own response_format won
    assert got["cut"]["error"]["code"] == "invalid_output" and "cut short by max_tokens" in got["cut"]["error"]["message"]
    assert got["cut"]["usage"]["completion_tokens"] == 3 and got["cut"]["text"]
    # its own grammar won over the default schema (not both sent): the fake says it cannot follow it
    assert "cannot follow a GBNF grammar" in got["grammar"]["error"]["message"]

    # Sampling flags: for items without their own, never over theirs.
    free = short_dir / "free.jsonl"
    free.write_text(json.dumps({"id": "a", "prompt": "alpha"}) + "\n"
                    + json.dumps({"id": "b", "prompt": "beta", "max_tokens": 4, "seed": 1}) + "\n")
    words = fake_complete("alpha", 7, 12, 0)[0]
    out2 = short_dir / "out2.jsonl"
    ran = subprocess.run(CLI + ["batch", str(free), "-o", str(out2), "-m", "f", "--config", str(sup.config_path),
                                "--max-tokens", "12", "--seed", "7", "--temperature", "0", "--stop", words[5]],
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    got = {r["id"]: r for r in lines(out2)}
    whole = "".join(words)
    assert got["a"]["text"] == whole[: whole.index(words[5])]  # seed 7, cut at the stop string
    assert got["b"]["text"] == "".join(fake_complete("beta", 1, 4, 0)[0])  # its own max_tokens and seed
    assert "json" not in got["a"]


def test_a_bad_schema_file_stops_the_batch_before_anything_runs(start_supervisor, short_dir):
    sup = start_supervisor(MODEL)
    inp = short_dir / "in.jsonl"
    write_input(inp, 2, "s")
    for text, words in (("{nope", "is not JSON"), ("[1]", "must hold a JSON schema"),
                        ('{"type": 5}', "is not a valid JSON schema")):
        schema = short_dir / "schema.json"
        schema.write_text(text)
        out = short_dir / "out.jsonl"
        done = subprocess.run(CLI + ["batch", str(inp), "-o", str(out), "-m", "f", "--config", str(sup.config_path),
                                     "--schema", str(schema)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and words in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not out.exists()
