"""`make faults`: SIGKILL the embedded pipeline (small config) at seeded points spread over every
stage, then rerun it, and check what the rerun leaves. Writes `artifacts/bench/faults.json` and
prints kills survived / kills.

A kill is a hook point (`flows/launch/faults.py`: a stage starting, a stage's folder complete but not yet
renamed, a stage published but its MLflow run not finished) or a random moment of the run. Each kill
gets a fresh artifacts folder: one uninterrupted-then-killed attempt, one rerun. The rerun survives
the kill when
- it completes;
- its evaluation equals the uninterrupted reference run's (or is within the 95% CI, for a stage
  that resumed from a checkpoint and drew other samples);
- no `.tmp-*` folder is left and every manifest's digest matches its folder;
- the MLflow database is readable, no run is RUNNING, and the killed run is KILLED or FAILED.

    python -m bench.fault_harness [--kills 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "sft", "comparisons", "reward_model", "ppo", "evaluate"]
HOOKS = [f"{kind}:{stage}" for stage in STAGES for kind in ("start", "publish", "logging")]
SMALL = ["+experiment=tiny", "stage.ppo.updates=4", "stage.ppo.checkpoint_every=1"]  # conf/experiment/tiny.yaml
FIGURES = ("gold_sft", "gold_policy", "win_rate", "kl_to_sft", "rm_accuracy")


def _argv(art: Path) -> list[str]:
    return [sys.executable, "-m", "flows.align", f"artifacts_dir={art}", *SMALL]


LAST_STAGE_START = "start:evaluate"  # the backstop of a kill at a random moment


def _env(home: Path, fault: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "ALIGNFLOW_PRESTARTED_SERVER")}
    env["PREFECT_HOME"] = str(home)  # each attempt's own Prefect database, like separate machines' runs
    if fault:
        env["ALIGNFLOW_FAULT"] = fault
    return env


def _run(art: Path, home: Path) -> tuple[dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(_argv(art), cwd=ROOT, env=_env(home), capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0 or "summary: " not in proc.stdout:
        raise RuntimeError(f"the run failed:\n{proc.stderr[-3000:]}")
    return json.loads(Path(proc.stdout.rsplit("summary: ", 1)[1].strip()).read_text()), time.perf_counter() - t0


def _kill(art: Path, home: Path, fault: str) -> str:
    """One attempt killed at `fault` (a hook point, or `after:<seconds>`); how it ended.

    `after:<seconds>` is a moment of the reference run's timeline; an attempt that runs faster than the
    reference did (a quieter machine) is killed at the start of its last stage instead, a condition,
    so the kill never depends on how loaded the machine is."""
    if fault.startswith("after:"):
        proc = subprocess.Popen(
            _argv(art), cwd=ROOT, env=_env(home, LAST_STAGE_START), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            proc.wait(timeout=float(fault.split(":", 1)[1]))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        return "killed" if proc.returncode == -signal.SIGKILL else f"exited {proc.returncode}"
    proc = subprocess.run(_argv(art), cwd=ROOT, env=_env(home, fault), capture_output=True, timeout=1200)
    return "killed" if proc.returncode == -signal.SIGKILL else f"exited {proc.returncode} (the point was not reached)"


def _same(reference: dict, rerun: dict) -> list[str]:
    """The figures that differ beyond their 95% CI (empty when the rerun reproduces the reference)."""
    bad = []
    for key in FIGURES:
        a, b = reference.get(key), rerun.get(key)
        if isinstance(a, dict):
            if abs(a["mean"] - b["mean"]) > max(a["ci95"], b["ci95"]):
                bad.append(key)
        elif a != b and (a is None or b is None or abs(a - b) > 0.1 * max(abs(a), 1e-9)):
            bad.append(key)
    return bad


def _leftovers(art: Path) -> list[str]:
    from stages.runtime.manifest import Manifest, folder_digest

    problems = [f"staging folder left: {p}" for p in art.rglob(".tmp-*")]
    for m in art.glob("*/*/manifest.json"):
        if folder_digest(m.parent) != Manifest.load(m.parent).digest:
            problems.append(f"digest does not match: {m.parent}")
    return problems


def _mlflow(art: Path) -> tuple[list[str], list[str]]:
    """(problems, statuses of the killed attempt's align runs)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{art}/mlflow.db")
    exp = client.get_experiment_by_name("alignflow")
    runs = client.search_runs([exp.experiment_id], max_results=5000, order_by=["attributes.start_time ASC"])
    problems = [f"run {r.info.run_name} {r.info.run_id[:8]} still RUNNING" for r in runs if r.info.status == "RUNNING"]
    aligns = [r for r in runs if r.data.tags.get("alignflow.kind") == "align"]
    killed = [r.info.status for r in aligns[:-1]]  # every attempt but the successful rerun
    problems += [f"the killed run is {s}" for s in killed if s not in ("KILLED", "FAILED")]
    return problems, killed


def plan(kills: int, seed: int, duration: float) -> list[str]:
    """`kills` faults: the hook points (every stage's start, publish and logging) in a seeded order,
    then kills at seeded random moments of a run that takes `duration` seconds."""
    rng = random.Random(seed)
    hooks = rng.sample(HOOKS, len(HOOKS))
    timed = [f"after:{rng.uniform(0.3, 0.95) * duration:.1f}" for _ in range(max(0, kills - len(hooks)))]
    if kills < len(hooks):  # fewer kills: still one publish and one logging point, the rest random
        chosen = [next(h for h in hooks if h.startswith("publish")), next(h for h in hooks if h.startswith("logging"))]
        chosen += [h for h in hooks if h not in chosen][: max(0, kills - 3)]
        return (chosen + [f"after:{rng.uniform(0.3, 0.95) * duration:.1f}"])[:kills]
    return hooks + timed


def harness(kills: int, seed: int, work: Path, faults: list[str] | None = None) -> dict:
    reference, duration = _run(work / "reference", work / "reference-prefect")
    faults = faults or plan(kills, seed, duration)
    results = []
    for i, fault in enumerate(faults):
        art, home = work / f"kill{i}", work / f"kill{i}-prefect"
        ended = _kill(art, home, fault)
        row = {"fault": fault, "attempt": ended, "problems": []}
        try:
            summary, seconds = _run(art, home)
            row["rerun_s"] = seconds
            row["statuses"] = {k: v["status"] for k, v in summary["stages"].items()}
            row["threads"] = sorted({v["threads"] for v in summary["stages"].values()})  # fewer: float sums differ
            differ = _same(reference["eval"], summary["eval"])
            row["problems"] += [f"{k} differs from the uninterrupted run" for k in differ]
            row["exact"] = all(summary["eval"].get(k) == reference["eval"].get(k) for k in FIGURES)
            row["problems"] += _leftovers(art)
            problems, row["killed_run_status"] = _mlflow(art)
            row["problems"] += problems
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            row["problems"].append(f"rerun: {e}")
        row["survived"] = ended == "killed" and not row["problems"]
        results.append(row)
        print(
            f"{i + 1:>2}/{len(faults)} {fault:<22} {ended:<10} {'ok' if row['survived'] else row['problems']}",
            flush=True,
        )
        shutil.rmtree(art, ignore_errors=True)
    survived = sum(r["survived"] for r in results)
    exact = sum(r.get("exact", False) for r in results)
    return {
        "kills": len(results),
        "survived": survived,
        "exact": exact,
        "seed": seed,
        "reference_s": duration,
        "reference_threads": sorted({v["threads"] for v in reference["stages"].values()}),
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from bench.common import write_results

    with tempfile.TemporaryDirectory() as work:
        report = harness(args.kills, args.seed, Path(work))
    write_results(ROOT / "artifacts" / "bench" / "faults.json", report)
    print(
        f"kills survived: {report['survived']}/{report['kills']} "
        f"({report['exact']} reproduced the uninterrupted run's figures exactly)"
    )


if __name__ == "__main__":
    main()
