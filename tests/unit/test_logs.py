"""The log file: rotated at 10 MB, 5 rotated files kept, all private (README, "Logs")."""

import os
import stat

from loguru import logger

from stoker.supervisor.logs import setup


def test_the_log_rotates_at_10_mb_keeps_5_files_and_all_are_private(tmp_path):
    path = setup("INFO", tmp_path / "state", {}, stderr=False)
    try:
        line = "x" * 1000
        for _ in range(7):  # seven rotations' worth: 7 x 10.5 MB
            for _ in range(10_500):
                logger.info(line)
        logger.complete()
    finally:
        logger.remove()
    logs = sorted(p for p in path.parent.iterdir() if p.name.startswith("stoker") and p.name.endswith(".log"))
    rotated = [p for p in logs if p != path]
    assert path in logs and path.stat().st_size < 10 * 1000**2
    assert len(rotated) == 5, [p.name for p in logs]  # older ones are deleted
    assert all(9.9 * 1000**2 <= p.stat().st_size <= 10 * 1000**2 for p in rotated), [p.stat().st_size for p in rotated]
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in logs), [oct(os.stat(p).st_mode) for p in logs]
