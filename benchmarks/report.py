"""How a benchmark hands over its result: printed, and appended to ``--out`` if given."""

from __future__ import annotations

from pathlib import Path


def publish(text: str, out: Path | None) -> None:
    """Print ``text`` (markdown) and append it, after a blank line, to ``out``."""
    print(text)
    if out:
        with open(out, "a") as f:
            f.write("\n" + text)
