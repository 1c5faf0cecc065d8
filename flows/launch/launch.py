"""A training stage as a process group: the flow task starts torchrun (one node) or DeepSpeed's launcher
(the nodes of a hostfile), every rank runs the stage (`flows/launch/rank.py`), and the task waits.

- Rank 0 writes the artifact into the task's staging folder and the manifest beside it; the other
  ranks write into scratch folders of their own. The task publishes (staging, then rename) as for
  any stage, so a failed group publishes nothing.
- A rank that fails stops the group (torchrun's default: no restarts). The task raises the rank's own
  error when it left one (`error-rank<N>.json`), else names the rank and how it died (a signal).
  Checkpoints are the stage's own (DeepSpeed's format under ZeRO): the rerun resumes from the last.
- The launcher dies with the task (PR_SET_PDEATHSIG), and an interrupted task stops its group.
- Each rank gets the task's torch threads divided by the ranks per node (2 ranks on 2 cores: 1 each).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import flows
from flows.launch.metrics import RUN_ID_ENV
from stages.runtime.errors import ExpectedFailure
from stages.runtime.manifest import Manifest
from stages.settings.distributed import DistributedConfig

SPEC = "spec.pkl"
RESULT = "manifest.json"


class RankFailed(ExpectedFailure, RuntimeError):
    """A rank of a launched stage died without an error of its own (a signal, the OOM killer)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(cfg: DistributedConfig, spec: Path) -> list[str]:
    """The launcher's command line: torchrun on this node, or DeepSpeed's launcher over `hostfile`."""
    port = str(cfg.master_port or free_port())
    if cfg.launcher == "deepspeed":
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(cfg.hostfile)]
        launcher += ["--num_nodes", str(cfg.nnodes), "--num_gpus", str(cfg.nproc_per_node)]
        launcher += ["--master_addr", cfg.master_addr, "--master_port", port, "--module"]
        return [*launcher, "flows.launch.rank", str(spec)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"]
    torchrun += ["--nproc_per_node", str(cfg.nproc_per_node), "--master_addr", cfg.master_addr]
    return [*torchrun, "--master_port", port, "-m", "flows.launch.rank", str(spec)]


def accelerator_env(env, device: str):
    """DeepSpeed picks its accelerator itself (CUDA where there is one) unless the run is on the CPU:
    then `DS_ACCELERATOR=cpu` (no CUDA probe, and the CPU accelerator even on a GPU node). A value
    the user set is kept."""
    from stages.models.compute import pick_device

    if pick_device(device).type == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def device_of(configs: tuple) -> str:
    """`compute.device` of a training stage's configs (its `Tuning`); auto if it has none."""
    from stages.settings.models import Tuning

    return next((c.compute.device for c in configs if isinstance(c, Tuning)), "auto")


def rank_env(env: dict, threads_per_rank: int, device: str) -> dict:
    """The environment every rank of a group starts with: its torch threads capped, the accelerator."""
    per_rank = str(max(1, threads_per_rank))
    env |= {v: per_rank for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    return accelerator_env(env, device)


def run_group(
    cfg: DistributedConfig,
    stage: str,
    configs: tuple,
    kwargs: dict[str, Any],
    *,
    out_dir: Path,
    folder: Path,
    run_id: str | None,
    threads: int,
) -> Manifest:
    """Run `stages.<stage>.run(*configs, **kwargs, out_dir=..., distributed=cfg)` on every rank; returns
    rank 0's manifest. `folder`: the group's working folder (spec, pids, errors), emptied first."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    spec = folder / SPEC
    spec.write_bytes(
        pickle.dumps(
            {"stage": stage, "configs": configs, "kwargs": kwargs, "out_dir": str(out_dir), "distributed": cfg}
        )
    )
    env = rank_env(dict(os.environ), threads // cfg.nproc_per_node, device_of(configs))
    if run_id is not None:
        env[RUN_ID_ENV] = run_id  # rank 0 logs its metrics to the stage's run
        import mlflow

        env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    log = folder / "launcher.log"
    proc = subprocess.Popen(
        command(cfg, spec),
        env=env,
        cwd=str(flows.ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: an interrupted task stops all of it
        preexec_fn=flows.die_with_parent,
    )
    tee = threading.Thread(target=_tee, args=(proc.stdout, log), daemon=True)
    tee.start()
    try:
        code = proc.wait()
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): stop the whole group, publish nothing
        _stop(proc)
        raise
    tee.join(timeout=10)
    if code != 0:
        raise failure(stage, cfg, folder)  # the folder stays: its log and the ranks' errors
    manifest = Manifest(**json.loads((folder / RESULT).read_text()))
    shutil.rmtree(folder, ignore_errors=True)
    return manifest


def _tee(stream, log: Path) -> None:
    with open(log, "wb") as f:
        for line in iter(stream.readline, b""):
            f.write(line)
            f.flush()
            sys.stderr.buffer.write(line)
            sys.stderr.flush()


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


ERRORS = {"ValueError": ValueError, "FloatingPointError": FloatingPointError, "MemoryError": MemoryError}


def failure(stage: str, cfg: DistributedConfig, folder: Path) -> BaseException:
    """The error of a failed group: the root-cause rank's own error (torchrun names the first rank
    that failed; the others then fail on the broken group), else which rank died and how."""
    text = (folder / "launcher.log").read_text(errors="replace") if (folder / "launcher.log").exists() else ""
    rank, how = root_cause(text)
    errors = {int(p.stem.removeprefix("error-rank")): p for p in folder.glob("error-rank*.json")}
    own = errors.get(rank) if rank is not None else (errors[min(errors)] if errors else None)
    if own is not None:
        err = json.loads(own.read_text())
        return ERRORS.get(err["type"], RuntimeError)(f"{err['message']} (rank {err['rank']} of {cfg.world_size})")
    who = f"rank {rank} of {cfg.world_size}" if rank is not None else f"a rank of {cfg.world_size}"
    return RankFailed(
        f"{stage}: {who} {how}; the launcher stopped the others and nothing was published "
        f"(distributed={cfg.mode}; its log: {folder / 'launcher.log'}). A rerun resumes from its last checkpoint"
    )


def root_cause(log: str) -> tuple[int | None, str]:
    """(rank, "was killed by SIGKILL" / "exited with code 1") from torchrun's failure summary."""
    section = log.split("Root Cause", 1)[-1] if "Root Cause" in log else log
    rank = re.search(r"rank\s*:\s*(\d+)", section)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", section)
    if code is None:
        return (int(rank.group(1)) if rank else None), "failed"
    value = int(code.group(1))
    how = f"was killed by {signal.Signals(-value).name}" if value < 0 else f"exited with code {value}"
    return (int(rank.group(1)) if rank else None), how
