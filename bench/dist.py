"""`make bench-dist`: the training stages on 2 CPU processes (torchrun, gloo) against 1, side by side.

1. Loss: SFT and the reward model on the embedded default (peft=full) under single, ddp, zero2 and
   zero3 at the same global batch, each on the same inputs (the other stages shared and cached).
   The final loss is SFT's last logged loss (trl's mean over 10 steps) and the RM's mean over its
   last 10% of steps; "noise" is the largest change of the single-process figure under seeds 1
   and 2. Per-step time is the training
   loop's (SFT: trl's train_runtime; RM: rm/train/seconds) over its steps; the stage's wall time
   adds the group's start (processes, imports, DeepSpeed's setup).
2. Memory: a ~110M Llama trained a few steps per mode (`bench/dist_memory_child.py`): per-rank bytes
   of parameters and optimizer state (ZeRO's fp32 master partition counted as optimizer state),
   peak anonymous RSS.
3. PPO: the whole RLHF pipeline with PPO in 1 process and in 2 (ddp), equal episodes (40 updates of
   64 rollouts), the evaluation's gold gain over SFT with its 95% CI.

Writes artifacts/bench/dist.json and prints the README's tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import write_results
from bench.peft_methods import build_model
from flows.studies.compare import run_branch

OUT = Path("artifacts/bench")
MODES = ("ddp", "zero2", "zero3")


def flow(artifacts: Path, *overrides: str) -> dict:
    result = run_branch([f"artifacts_dir={artifacts}", "peft=full", *overrides])
    return {"summary": result["summary"], "wall_s": result["wall_s"]}


def sft_row(run: dict) -> dict:
    s = run["summary"]["stages"]["sft"]
    m = s["metrics"]
    return {
        "loss_last": m["sft/train/loss_last"],
        "steps": m["sft/steps"],
        "step_s": m["sft/train/runtime"] / m["sft/steps"],
        "stage_s": m["sft/seconds"],  # when it ran (a cached row's own seconds are the lookup's)
        "status": s["status"],
    }


def rm_row(run: dict) -> dict:
    s = run["summary"]["stages"]["reward_model"]
    m = s["metrics"]
    return {
        "loss_last": m["rm/train/loss_tail"],  # the mean over the last 10% of steps: one batch's loss is noise
        "loss_last_step": m["rm/train/loss_last"],
        "eval_accuracy": m["rm/eval/accuracy"],
        "steps": m["rm/steps"],
        "step_s": m["rm/train/seconds"] / m["rm/steps"],
        "stage_s": m["reward_model/seconds"],
        "status": s["status"],
    }


def losses(artifacts: Path) -> dict:
    base = flow(artifacts, "pipeline.stop_after=reward_model")
    out = {"single": {"sft": sft_row(base), "reward_model": rm_row(base)}}
    out["seeds"] = {  # the single-process figures under other seeds: what "within noise" means
        seed: {
            "sft": sft_row(flow(artifacts, "pipeline.stop_after=sft", f"stage.sft.seed={seed}")),
            "reward_model": rm_row(
                flow(artifacts, "pipeline.stop_after=reward_model", f"stage.reward_model.seed={seed}")
            ),
        }
        for seed in (1, 2)
    }
    for mode in MODES:
        sft = flow(artifacts, "pipeline.stop_after=sft", f"distributed={mode}", "distributed.stages=[sft]")
        rm = flow(
            artifacts, "pipeline.stop_after=reward_model", f"distributed={mode}", "distributed.stages=[reward_model]"
        )
        out[mode] = {"sft": sft_row(sft), "reward_model": rm_row(rm)}
        print(mode, json.dumps(out[mode]), flush=True)
    for stage in ("sft", "reward_model"):
        single = out["single"][stage]["loss_last"]
        noise = max(abs(run[stage]["loss_last"] - single) for run in out["seeds"].values())
        for mode in MODES:
            diff = abs(out[mode][stage]["loss_last"] - single)
            out[mode][stage] |= {"loss_diff": diff, "noise": noise, "within_noise": diff <= noise}
    return out


def memory(model: Path) -> dict:
    out = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for mode in ("ddp", "zero2", "zero3", "zero3_bf16"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "bench.dist_memory_child"]
        proc = subprocess.run([*cmd, "--model", str(model), "--mode", mode], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"memory {mode} failed:\n{proc.stdout[-3000:]}")
        r = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
        rank0 = r["ranks"][0]
        out[mode] = {
            "params_mb": rank0["parameters"] / 2**20,
            "optimizer_mb": rank0["optimizer"] / 2**20,
            "params_plus_optimizer_mb": (rank0["parameters"] + rank0["optimizer"]) / 2**20,
            "peak_anon_mb": max(x["peak_anon_mb"] for x in r["ranks"]),
            "step_s": rank0["step_s"],
            "losses": r["losses"],
            "model_params": r["params"],
        }
        print(mode, json.dumps(out[mode]), flush=True)
    ddp = out["ddp"]["params_plus_optimizer_mb"]
    for mode in out:
        out[mode]["vs_ddp"] = out[mode]["params_plus_optimizer_mb"] / ddp
    return out


def ppo(artifacts: Path) -> dict:
    out = {}
    for name, extra in (("1 process", []), ("2 processes (ddp)", ["distributed=ddp", "distributed.stages=[ppo]"])):
        run = flow(artifacts, *extra)
        e, s = run["summary"]["eval"], run["summary"]["stages"]["ppo"]
        gain = e["gold_policy"]["mean"] - e["gold_sft"]["mean"]
        ci = (e["gold_policy"]["ci95"] ** 2 + e["gold_sft"]["ci95"] ** 2) ** 0.5
        out[name] = {
            "gold_sft": e["gold_sft"],
            "gold_policy": e["gold_policy"],
            "gold_gain": gain,
            "gold_gain_ci95": ci,
            "win_rate": e["win_rate"],
            "kl_to_sft_per_token": e["kl_to_sft"],
            "ppo_stage_s": s["metrics"]["ppo/seconds"],
            "ppo_status": s["status"],
        }
        print(name, json.dumps(out[name]), flush=True)
    one, two = out["1 process"], out["2 processes (ddp)"]
    out["gain_difference"] = two["gold_gain"] - one["gold_gain"]
    out["within_ci"] = abs(out["gain_difference"]) <= (one["gold_gain_ci95"] ** 2 + two["gold_gain_ci95"] ** 2) ** 0.5
    return out


def tables(r: dict) -> str:
    lines = ["| stage | mode | final loss | vs single | seed noise | RM held-out acc | per-step s | stage s |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for stage in ("sft", "reward_model"):
        for mode in ("single", *MODES):
            x = r["losses"][mode][stage]
            diff = "–" if mode == "single" else f"{x['loss_diff']:.4f}"
            noise = f"{r['losses'][MODES[0]][stage]['noise']:.4f}"
            acc = f"{x['eval_accuracy']:.4f}" if "eval_accuracy" in x else "–"
            cells = [
                stage,
                mode,
                f"{x['loss_last']:.4f}",
                diff,
                noise,
                acc,
                f"{x['step_s']:.3f}",
                f"{x['stage_s']:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| mode (110M Llama, 2 ranks) | params MB/rank | optimizer MB/rank | sum vs ddp | peak anon RSS MB | step s |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for mode, x in r["memory"].items():
        cells = [mode, f"{x['params_mb']:.0f}", f"{x['optimizer_mb']:.0f}", f"{x['vs_ddp']:.3f}x"]
        lines.append("| " + " | ".join([*cells, f"{x['peak_anon_mb']:.0f}", f"{x['step_s']:.2f}"]) + " |")
    lines += [
        "",
        "| PPO | gold gain over SFT | 95% CI | win rate | KL/token | PPO stage s |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("1 process", "2 processes (ddp)"):
        x = r["ppo"][name]
        lines.append(
            f"| {name} | {x['gold_gain']:+.3f} | ±{x['gold_gain_ci95']:.3f} | {x['win_rate']:.3f} | "
            f"{x['kl_to_sft_per_token']:.3f} | {x['ppo_stage_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", type=Path, default=OUT / "dist-artifacts")
    ap.add_argument("--parts", default="losses,memory,ppo", help="what to measure; '' prints the tables only")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    out = OUT / "dist.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    if "losses" in parts:
        results["losses"] = losses(args.artifacts)
    if "memory" in parts:
        results["memory"] = memory(build_model(OUT / "llama-768x10", 768, 10))
    if "ppo" in parts:
        results["ppo"] = ppo(args.artifacts)
    write_results(out, results)
    if {"losses", "memory", "ppo"} <= set(results):
        print(tables(results))


if __name__ == "__main__":
    main()
