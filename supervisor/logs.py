"""Where the supervisor's log goes: stderr for people (or the journal) and a rotating file."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping

from loguru import logger

LOG_FILE = "stoker.log"
ROTATE_AT = "10 MB"
KEEP_FILES = 5
_FILE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level:<7} {message}"


# Control characters (C0, DEL, C1), line and paragraph separators, and bidirectional overrides:
# text from a file name, a client or a worker's output that holds them could forge log lines,
# move a terminal's cursor or reorder what a person reads.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_KEEP_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: "re.Match[str]") -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, keep_lines: bool = False) -> str:
    """`text` with its control characters escaped (\\x1b, \\n, ...), so it shows as what it
    is: data. With `keep_lines`, newlines and tabs stay (a log file's own lines)."""
    pattern = _KEEP_LINES if keep_lines else _CONTROLS
    text = pattern.sub(_escape, text)
    # Bytes that were not UTF-8 (surrogate escapes) show as escapes too, never as an error.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _escape_message(record: Any) -> None:
    """Every log line is one line of data, whatever a file name or a client put in it."""
    record["message"] = printable(record["message"])


def under_systemd(environ: Mapping[str, str]) -> bool:
    """stderr goes to the journal, which adds its own timestamps and does not want colours."""
    return bool(environ.get("JOURNAL_STREAM") or environ.get("INVOCATION_ID"))


def setup(level: str, state_dir: Path, environ: Mapping[str, str], stderr: bool = True) -> Path:
    """Log at `level` to stderr (unless not wanted) and to state_dir/stoker.log, rotated at
    10 MB with the last 5 files kept. Returns the file's path."""
    logger.remove()
    logger.configure(patcher=_escape_message)
    if stderr:
        if under_systemd(environ):
            logger.add(sys.stderr, level=level, format="{level:<7} {message}", colorize=False)
        else:
            logger.add(sys.stderr, level=level, format=_FILE_FORMAT)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / LOG_FILE
    # The log names clients, models and prompts' outcomes: for this user only, rotated files too.
    for old in state_dir.glob(f"{Path(LOG_FILE).stem}*.log"):
        os.chmod(old, 0o600)
    logger.add(path, level=level, format=_FILE_FORMAT, rotation=ROTATE_AT, retention=KEEP_FILES,
               encoding="utf-8", opener=_private)
    return path


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)
