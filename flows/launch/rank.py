"""One rank of a launched stage (`flows/launch/launch.py` starts it under torchrun or DeepSpeed's launcher).

    python -m flows.launch.rank <folder>/spec.pkl

Joins the process group, runs the stage with `distributed=`, and on rank 0 writes the manifest
beside the spec; the other ranks' outputs go to a scratch folder that is removed. A Python error
is written to `error-rank<N>.json` (the task raises it with its message) before the rank exits 1.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path


def main(spec_path: str) -> None:
    import torch

    from flows.launch import launch
    from flows.launch.metrics import rank_sink
    from stages.runtime import device_guard, process_group, tracking

    folder = Path(spec_path).parent
    spec = pickle.loads(Path(spec_path).read_bytes())  # written by this flow's own task: trusted
    rank = process_group.rank()
    if rank != 0:
        os.environ["ALIGNFLOW_PROGRESS"] = "0"  # one bar: rank 0's
    (folder / f"rank{rank}.pid").write_text(str(os.getpid()))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = spec["distributed"]
    out_dir = Path(spec["out_dir"]) if rank == 0 else Path(tempfile.mkdtemp(prefix=f"alignflow-rank{rank}-"))
    try:
        process_group.init(cfg, launch.device_of(spec["configs"]))
        module = importlib.import_module(f"stages.{spec['stage']}")
        sink = rank_sink()
        logging = tracking.metrics_sink(sink) if sink is not None else contextlib.nullcontext()
        with device_guard.maybe_guard(f"{spec['stage']} (rank {rank})"), logging:
            manifest = module.run(*spec["configs"], **spec["kwargs"], out_dir=out_dir, distributed=cfg)
        process_group.barrier()  # every rank finished: rank 0's artifact is complete
        if rank == 0:
            (folder / "manifest.json.tmp").write_text(manifest.to_json())
            os.replace(folder / "manifest.json.tmp", folder / "manifest.json")
    except Exception as e:
        error = {"rank": rank, "type": type(e).__name__, "message": str(e)}
        (folder / f"error-rank{rank}.json").write_text(json.dumps(error))
        raise
    finally:
        if rank != 0:
            shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])
