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


def flow_variants(variants: dict[str, list[str]], out: Path, stage: str, artifacts: Path = Path("artifacts")) -> None:
    """Runs `python -m flows.align` once per variant into one artifacts folder (shared stages are
    computed once and cached), records each evaluation and `stage`'s seconds, writes `out`."""
    from flows.studies.compare import run_branch

    results = {}
    for name, overrides in variants.items():
        summary = run_branch([f"artifacts_dir={artifacts}", *overrides])["summary"]
        e = summary["eval"]
        results[name] = {
            "overrides": overrides,
            "kl_to_sft_per_token": e["kl_to_sft"],
            "gold_policy": e["gold_policy"],
            "gold_sft": e["gold_sft"],
            "win_rate": e["win_rate"],
            f"{stage}_seconds": summary["stages"][stage]["seconds"],
            "statuses": {k: v["status"] for k, v in summary["stages"].items()},
        }
        print(name, json.dumps(results[name]), flush=True)
    write_results(out, results)
