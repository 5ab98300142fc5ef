"""Where the supervisor's log goes: stderr for people (or the journal) and a rotating file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping

from loguru import logger

LOG_FILE = "stoker.log"
ROTATE_AT = "10 MB"
KEEP_FILES = 5
_FILE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level:<7} {message}"


def under_systemd(environ: Mapping[str, str]) -> bool:
    """stderr goes to the journal, which adds its own timestamps and does not want colours."""
    return bool(environ.get("JOURNAL_STREAM") or environ.get("INVOCATION_ID"))


def setup(level: str, state_dir: Path, environ: Mapping[str, str], stderr: bool = True) -> Path:
    """Log at `level` to stderr (unless not wanted) and to state_dir/stoker.log, rotated at
    10 MB with the last 5 files kept. Returns the file's path."""
    logger.remove()
    if stderr:
        if under_systemd(environ):
            logger.add(sys.stderr, level=level, format="{level:<7} {message}", colorize=False)
        else:
            logger.add(sys.stderr, level=level, format=_FILE_FORMAT)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOG_FILE
    logger.add(path, level=level, format=_FILE_FORMAT, rotation=ROTATE_AT, retention=KEEP_FILES,
               encoding="utf-8")
    return path
