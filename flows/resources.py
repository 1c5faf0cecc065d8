"""How many torch threads a run takes when runs share a machine.

Each torch process starts as many intra-op (OpenMP) threads as there are cores. Two such processes
on 2 cores slowed each other 5x (a bare training loop) to 40x (a whole flow) here: oversubscribed
threads spin on each other's cores. A sweep's parallel jobs therefore divide the cores this process
may use (`os.sched_getaffinity`) by the number of jobs that run at once, which the Hydra launcher
says: `hydra.launcher.n_jobs` (joblib), `hydra.launcher.array_parallelism` (submitit, capped at
the cores). `threads=<n>` in the config overrides it. `make bench` measures the effect
(`bench/parallel_jobs.py`).
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def concurrent_jobs() -> int:
    """Jobs of this Hydra sweep that run at the same time (1 outside a sweep, or with the basic launcher)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return 1
    launcher = HydraConfig.get().launcher
    for key in ("n_jobs", "array_parallelism"):
        n = launcher.get(key)
        if n is not None:
            return usable_cores() if n < 0 else min(int(n), usable_cores())
    return 1  # the basic launcher runs jobs one after another


def threads_per_job(requested: int | None, jobs: int) -> int:
    """`requested`, else the usable cores divided between `jobs`, at least 1."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads: must be at least 1 (or null for automatic), got {requested}")
        return requested
    return max(1, usable_cores() // max(1, jobs))


def cap_threads(n: int) -> None:
    """This process and the processes it starts (torchrun children, the labeler's helpers) use `n` threads."""
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)
