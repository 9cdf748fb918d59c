"""Shared output of the benchmark scripts: JSON on stdout (and --out), a table on stderr."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any


def emit(report: dict[str, Any], out: Path | None, table: str = "") -> None:
    """Print `report` as JSON (stdout stays machine-readable) and optionally save it."""
    text = json.dumps(report, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if table:
        print(table, file=sys.stderr)
    print(text)


def cpu_name() -> str:
    """The CPU model, for the report header."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
