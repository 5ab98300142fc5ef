"""Wakeup: a background thread that finishes after the loop closed writes nowhere."""

import os

from stoker.supervisor.wakeup import Wakeup


def test_a_wake_after_close_does_not_write_to_a_reused_descriptor(tmp_path):
    w = Wakeup()
    [bg_w_number] = [w._bg_w]
    w.close()
    path = tmp_path / "other"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    while fd < bg_w_number:  # take the freed numbers, as any file opened later could
        fd = os.open(path, os.O_WRONLY)
    w.wake()
    assert path.read_bytes() == b""
    w.close()  # twice is harmless
