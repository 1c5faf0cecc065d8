"""How many torch threads a run takes when runs share a machine.

Each torch process starts as many intra-op (OpenMP) threads as there are cores. Two such processes
on 2 cores slowed each other 5x (a bare training loop) to 40x (a whole flow) here: oversubscribed
threads spin on each other's cores. A sweep's parallel jobs therefore divide the cores this process
may use (`os.sched_getaffinity`) by the number of jobs that run at once: the sweep's size (counted
by the sweep callback from its overrides, `ALIGNFLOW_SWEEP_JOBS`), capped by what the launcher
runs at once (`hydra.launcher.n_jobs` for joblib, `array_parallelism` for submitit on SLURM) and
by the cores; submitit's `cpus_per_task`, when set, is the job's share. `threads=<n>` in the config
overrides it. `make bench` measures the effect (`bench/parallel_jobs.py`).

Runs that know nothing of each other (two `make align` at once) divide the cores too: each run
holds an OS lock on a file of its own in a machine-wide folder (`RUNS_DIR`) for as long as it
lives, and before each stage counts the files whose lock is held. A crashed run's lock is released
by the OS, so its file no longer counts.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from filelock import FileLock

from stages.runtime.errors import ExpectedFailure
from stages.runtime.manifest import lock_is_held

RUNS_DIR = Path(tempfile.gettempdir()) / "alignflow-runs"
_registration: FileLock | None = None


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


SWEEP_JOBS_ENV = "ALIGNFLOW_SWEEP_JOBS"
SWEEP_RUN_ENV = "ALIGNFLOW_SWEEP_RUN_ID"  # set by the sweep callback: each job's run is its child


def concurrent_jobs() -> int:
    """Jobs of this Hydra sweep that run at the same time (1 outside a sweep, or with the basic launcher)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return 1
    launcher = HydraConfig.get().launcher
    target = str(launcher.get("_target_", ""))
    if "BasicLauncher" in target:
        return 1  # one job after another
    cores = usable_cores()
    if launcher.get("cpus_per_task"):
        return max(1, cores // int(launcher.cpus_per_task))
    jobs = int(os.environ.get(SWEEP_JOBS_ENV, cores))
    at_once = launcher.get("n_jobs", launcher.get("array_parallelism"))
    if at_once is not None and int(at_once) > 0:
        jobs = min(jobs, int(at_once))
    return max(1, min(jobs, cores))


def sweep_size(overrides: list[str], params: dict | None, batch: int | None) -> int:
    """Jobs a sweep starts: the product of its sweep overrides' lengths (`a=1,2 b=3,4` is 4) for the
    basic sweeper, or a sweeper's batch (Optuna's `n_jobs`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if batch:
        return int(batch)
    parsed = OverridesParser.create().parse_overrides([*overrides, *(f"{k}={v}" for k, v in (params or {}).items())])
    size = 1
    for o in parsed:
        if o.is_sweep_override():
            size *= len(list(o.sweep_string_iterator()))
    return size


def threads_per_job(requested: int | None, jobs: int) -> int:
    """`requested`, else the usable cores divided between `jobs`, at least 1."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads: must be at least 1 (or null for automatic), got {requested}")
        return requested
    return max(1, usable_cores() // max(1, jobs))


def cap_threads(n: int) -> None:
    """This process and the processes it starts (torchrun children, the labeler's helpers) use `n` threads.
    A torch imported later reads OMP_NUM_THREADS; one already imported is told (a run whose stages are
    all cached never imports torch)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def current_threads() -> int:
    """The threads this process's torch uses, or will use once imported."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    return int(os.environ.get("OMP_NUM_THREADS") or usable_cores())


def register_run() -> None:
    """Count this process among the machine's live runs until it exits."""
    global _registration
    if _registration is None:
        RUNS_DIR.mkdir(parents=True, exist_ok=True)
        _registration = FileLock(RUNS_DIR / f"{os.getpid()}.lock")
        _registration.acquire()


def run_lock() -> str | None:
    """The file this process holds its run lock on (tagged on its MLflow runs), or None."""
    return None if _registration is None else str(_registration.lock_file)


def live_runs() -> int:
    """Runs on this machine now, this one included: the run files whose lock is held."""
    live = 1 if _registration is not None else 0
    for path in RUNS_DIR.glob("*.lock") if RUNS_DIR.exists() else []:
        if _registration is not None and path == Path(_registration.lock_file):
            continue
        if lock_is_held(path):
            live += 1
        else:
            path.unlink(missing_ok=True)  # a run that has ended
    return max(1, live)


# Memory and disk: a stage that runs out of either stops with what to change (nothing is published:
# the stage's staging folder is removed on the way out)
MEMORY_KEYS = {
    "prepare": ["model.pretrain_documents", "model.hidden_size"],
    "sft": ["stage.sft.batch_size", "stage.sft.max_length"],
    "comparisons": ["stage.comparisons.batch_size", "stage.comparisons.max_new_tokens"],
    "reward_model": ["stage.reward_model.batch_prompts", "stage.reward_model.max_length"],
    "ppo": ["stage.ppo.rollouts_per_update", "stage.ppo.minibatch_size", "stage.ppo.max_new_tokens"],
    "dpo": ["stage.dpo.batch_size", "stage.dpo.max_length"],
    "evaluate": ["stage.evaluate.batch_size", "stage.evaluate.max_new_tokens"],
    "judge": ["stage.judge.batch_size"],
}


class ResourceError(ExpectedFailure, RuntimeError):
    """Out of memory or disk, with the config keys or the folder to change."""


def resource_error(stage: str, folder: Path, error: BaseException) -> BaseException:
    """`error` as a ResourceError when it is out-of-memory or no-space, else `error` itself."""
    import errno

    import torch

    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        keys = ", ".join(MEMORY_KEYS.get(stage, ["the stage's batch size"]))
        return ResourceError(f"{stage}: out of memory; lower {keys} (or peft=lora, a smaller model)")
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return ResourceError(
            f"{stage}: no space left on the device of {folder} while writing its artifact; free space there, "
            "or set artifacts_dir= to a larger disk (nothing was published)"
        )
    return error


def reset_peak_rss() -> None:
    """Linux: restart the process's peak-RSS count (VmHWM), so each stage reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
