"""API keys: who may call the gateway, and by what name the fair queue counts each caller."""

from __future__ import annotations

import hashlib
import re
import secrets
from pathlib import Path
from typing import Iterable


class KeyError_(ValueError):
    """The keys cannot be read (a missing file, an empty key)."""


class Keys:
    """The keys callers send as `Authorization: Bearer KEY`. Each configured entry is "KEY" or
    "NAME:KEY"; a key without a name is named by a short hash of it (never the key itself: names
    appear in logs and on the status page). With no keys at all, every caller is let in, unnamed."""

    def __init__(self, entries: Iterable[str] = (), file: str = "") -> None:
        lines = list(entries)
        if file:
            try:
                text = Path(file).read_text(encoding="utf-8")
            except OSError as exc:
                raise KeyError_(f"cannot read api_keys_file {file}: {exc.strerror}") from None
            # A comment is a line that starts with #, or what follows " #": a key may hold a #.
            lines += [ln.split(" #", 1)[0] for ln in text.splitlines() if not ln.lstrip().startswith("#")]
        self._keys: list[tuple[bytes, str]] = []
        for raw in lines:
            entry = raw.strip()
            if not entry:
                continue
            name, sep, key = entry.partition(":")
            if not sep or not re.fullmatch(r"[A-Za-z0-9_.@-]+", name):  # a key that holds a ':' is all key
                name, key = "", entry
            if not key:
                raise KeyError_(f"an API key entry has no key: {name!r}")
            name = name or "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]
            self._keys.append((key.encode(), name))

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def caller(self, authorization: str | None) -> str | None:
        """The caller's name; "" when no keys are configured; None when it is not let in."""
        if not self._keys:
            return ""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        given = token.strip().encode()
        found = None
        for key, name in self._keys:  # every key compared, in constant time: no timing tells which matched
            if secrets.compare_digest(key, given):
                found = name
        return found
