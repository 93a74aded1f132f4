"""Where prepared data lives: ``$SALA_CACHE`` or ``~/.cache/sala`` (one place for every floor)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: ``override``, else ``$SALA_CACHE``, else ``~/.cache/sala``; created on demand."""
    root = Path(override) if override is not None else Path(os.environ.get("SALA_CACHE") or Path.home() / ".cache" / "sala")
    root.mkdir(parents=True, exist_ok=True)
    return root
