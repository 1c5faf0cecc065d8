"""What every benchmark shares: child processes that report one `RESULT {json}` line, and the JSON
file each writes under artifacts/bench/."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def run_child(argv: list[str], label: str) -> dict:
    """Runs `argv` and returns the JSON of its `RESULT ` line; stops the bench if it failed."""
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def write_results(out: Path, results: dict, *, echo: bool = False) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    if echo:
        print(json.dumps(results, indent=2))
    print(f"wrote {out.resolve()}")
