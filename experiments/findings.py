"""Findings generated from the results CSVs (being rebuilt)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_findings"]


def write_findings(results: str | Path) -> Path:
    from vi.files import atomic_write

    path = Path(results) / "FINDINGS.md"
    atomic_write(path, "# Findings\n\n(not generated yet)\n")
    return path
