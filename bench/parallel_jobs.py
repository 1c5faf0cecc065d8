"""Two jobs at once on this machine: threads capped per job (`flows/launch/resources.py`) against uncapped,
and against the same two jobs one after another. Writes `artifacts/bench/parallel_jobs.json`.

1. A bare training loop (a two-layer Llama, 60 steps of AdamW), each job a child process.
2. The flow: a 2-job sweep (`pipeline.stop_after=reward_model`, two SFT learning rates, so each job
   computes its own SFT, comparisons and reward model after a shared prepare) with Hydra's basic
   launcher (sequential), with joblib (parallel, capped: one thread per job on 2 cores), and with
   joblib and `threads=<all cores>` (parallel, uncapped).

    python -m bench.parallel_jobs
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write_results

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60
SWEEP = [
    "data.n_demonstrations=800",
    "data.n_comparison_prompts=200",
    "data.n_heldout_comparison_prompts=40",
    "model.pretrain_documents=600",
    "stage.sft.epochs=1",
    "stage.reward_model.epochs=2",
    "pipeline.stop_after=reward_model",
    "stage.sft.learning_rate=0.002,0.004",
]


def child(threads: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 2000, (16, 64))
    t0 = time.perf_counter()
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(json.dumps({"seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}))


def loops(threads: int, parallel: bool) -> dict:
    argv = [sys.executable, "-m", "bench.parallel_jobs", "--child", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    if parallel:
        procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
        outs = [p.communicate()[0] for p in procs]
    else:
        outs = [subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env).stdout for _ in range(2)]
    jobs = [json.loads(o) for o in outs]
    return {"wall_s": time.perf_counter() - t0, "job_s": [j["seconds"] for j in jobs], "threads": threads}


def sweep(extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as art:
        argv = [sys.executable, "-m", "flows.align", "-m", f"artifacts_dir={art}", *SWEEP, *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"sweep {extra} failed:\n{proc.stderr[-3000:]}")
        summaries = [json.loads(p.read_text()) for p in Path(art, "multirun").glob("*/*/summary.json")]
    return {
        "wall_s": wall,
        "threads": [s["threads"] for s in summaries],
        "stage_s": [{k: round(v["seconds"], 1) for k, v in s["stages"].items()} for s in summaries],
    }


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    per_job = max(1, cores // 2)
    results = {"cores": cores, "loop_steps": STEPS}
    results["loop_sequential"] = loops(cores, parallel=False)
    results["loop_parallel_uncapped"] = loops(cores, parallel=True)
    results["loop_parallel_capped"] = loops(per_job, parallel=True)
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    results["flow_sequential"] = sweep([])
    results["flow_parallel_uncapped"] = sweep([*joblib, f"threads={cores}"])
    results["flow_parallel_capped"] = sweep(joblib)
    for kind in ("loop", "flow"):
        seq = results[f"{kind}_sequential"]["wall_s"]
        results[f"{kind}_ratios"] = {
            "capped_parallel_over_sequential": results[f"{kind}_parallel_capped"]["wall_s"] / seq,
            "uncapped_parallel_over_sequential": results[f"{kind}_parallel_uncapped"]["wall_s"] / seq,
            "uncapped_over_capped": results[f"{kind}_parallel_uncapped"]["wall_s"]
            / results[f"{kind}_parallel_capped"]["wall_s"],
        }
    write_results(ROOT / "artifacts" / "bench" / "parallel_jobs.json", results, echo=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(int(sys.argv[2]))
    else:
        main()
