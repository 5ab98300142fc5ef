"""ModelFiles: looks at model files happen off the caller's thread, with a time limit."""

from __future__ import annotations

import os
import threading
import time

from stoker.supervisor.model_files import RECHECK_S, FileFacts, ModelFiles, inspect_file


def wait(files: ModelFiles, woke: threading.Event, now: float) -> list:
    assert woke.wait(5), "the look never finished"
    woke.clear()
    return files.poll(now)


def test_a_look_runs_off_the_caller_and_its_result_is_kept():
    woke = threading.Event()
    calls = []

    def inspect(path: str) -> FileFacts:
        calls.append(path)
        return FileFacts(size=123)

    files = ModelFiles(woke.set, timeout=5, inspect=inspect)
    assert files.facts("m", "/m.gguf", 0.0) is None and files.looking("m")
    assert files.facts("m", "/m.gguf", 0.1) is None  # one look at a time
    assert wait(files, woke, 0.2) == [("m", FileFacts(size=123))]
    assert files.facts("m", "/m.gguf", 1.0) == FileFacts(size=123) and calls == ["/m.gguf"]
    # An old answer is still given, while a new look runs behind it.
    assert files.facts("m", "/m.gguf", RECHECK_S + 1) == FileFacts(size=123)
    wait(files, woke, RECHECK_S + 1.1)
    assert calls == ["/m.gguf", "/m.gguf"]


def test_a_look_that_hangs_makes_the_model_unusable_and_no_second_thread_starts():
    release = threading.Event()
    started = []

    def hang(path: str) -> FileFacts:
        started.append(path)
        release.wait(10)
        return FileFacts(size=1)

    files = ModelFiles(lambda: None, timeout=2.0, inspect=hang)
    t0 = time.monotonic()
    assert files.facts("nfs", "/mnt/hung/m.gguf", 0.0) is None
    assert time.monotonic() - t0 < 0.5  # the caller never waits
    assert files.poll(1.0) == [] and files.next_deadline() == 2.0
    [(name, facts)] = files.poll(2.0)
    assert name == "nfs" and "took longer than 2 s" in facts.unusable
    assert files.facts("nfs", "/mnt/hung/m.gguf", 3.0).unusable and not files.looking("nfs")
    assert len(started) == 1  # still stuck: no second look
    release.set()
    deadline = time.monotonic() + 5
    while files._looking and time.monotonic() < deadline:  # its late answer is taken in quietly
        files.poll(4.0)
        time.sleep(0.01)
    assert files.facts("nfs", "/mnt/hung/m.gguf", 4.0) == FileFacts(size=1)


def test_inspect_file_opens_only_regular_files(tmp_path):
    fifo = tmp_path / "p.gguf"
    os.mkfifo(fifo)
    assert "FIFO" in inspect_file(str(fifo)).unusable  # returns at once: nothing opened it
    assert "does not exist" in inspect_file(str(tmp_path / "none.gguf")).unusable
    assert "folder" in inspect_file(str(tmp_path)).unusable
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    facts = inspect_file(str(bad))
    assert facts.size == 10 and facts.gguf is None and "GGUF" in facts.problem and not facts.unusable
