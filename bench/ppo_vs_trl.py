"""alignflow's PPO side by side with trl 1.12.0's experimental PPOTrainer (the last trl with PPO).

Same SFT policy, reward model (which also initialises the value model), prompts, episodes, batch,
PPO epochs, learning rate, clip ranges and KL coefficient; each trainer runs in its own process
(trl in the benchmark-only env `.bench-venvs/trl112`, made by `make bench`), timed around training
only. Both policies are then scored by our evaluate stage (gold score with 95% CI, win rate).
Writes artifacts/bench/ppo_vs_trl.json. `python -m bench.ppo_vs_trl`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import flows  # noqa: F401  (telemetry off)
from bench.common import run_child, write_results
from stages import evaluate

OUT = Path("artifacts/bench/ppo_vs_trl.json")
TRL_PYTHON = Path(".bench-venvs/trl112/bin/python")
OURS = """
import json, resource, sys, time
from pathlib import Path
import flows
from stages import ppo
from stages.settings.models import PeftConfig
from stages.settings.models import Tuning
s = json.loads(sys.argv[1])
cfg = ppo.PpoConfig(updates=s["episodes"] // s["batch"], rollouts_per_update=s["batch"], minibatch_size=s["minibatch"],
                    ppo_epochs=s["ppo_epochs"], learning_rate=s["lr"], beta=s["beta"], ema_decay=None,
                    max_new_tokens=s["max_new_tokens"], checkpoint_every=0, seed=s["seed"])
t = time.perf_counter()
ppo.run(cfg, Tuning(PeftConfig("full")), policy=Path(s["policy"]), reward_model=Path(s["reward_model"]),
        normalization=Path(s["normalization"]), prompts=Path(s["prompts"]), out_dir=Path(s["out"]))
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t,
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def upstream() -> dict:
    """SFT policy, reward model (last-token pooled) and prompts of the embedded default, from the flow."""
    proc = subprocess.run(
        # trl's PPOTrainer reads the reward at the last token, so the RM is trained that way here
        [sys.executable, "-m", "flows.align", "pipeline.stop_after=reward_model", "stage.reward_model.pooling=last"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(Path(proc.stdout.rsplit("summary: ", 1)[1].strip()).read_text())["stages"]


def child(python: Path | str, code: list[str], spec: dict) -> dict:
    return run_child([str(python), *code, json.dumps(spec)], f"{python} {code[0]}")


def main() -> None:
    stages = upstream()
    sft, rm, prep = (Path(stages[s]["artifact"]) for s in ("sft", "reward_model", "prepare"))
    with tempfile.TemporaryDirectory() as tmp:
        spec = {
            "policy": str(sft / "policy"),
            "reward_model": str(rm / "model"),
            "normalization": str(rm / "normalization.json"),
            "prompts": str(prep / "ppo_prompts.jsonl"),
            "episodes": 2560,
            "batch": 64,
            "minibatch": 16,
            "ppo_epochs": 4,
            "lr": 1e-4,
            "beta": 0.02,
            "max_new_tokens": 16,
            "seed": 0,
        }
        results: dict = {"settings": {k: v for k, v in spec.items() if not isinstance(v, str)}}
        runs = {
            "alignflow": (sys.executable, ["-c", OURS]),
            "trl_1.12.0": (TRL_PYTHON, [str(Path(__file__).with_name("trl_ppo_child.py"))]),
        }
        for name, (python, code) in runs.items():
            out = Path(tmp, name)
            results[name] = child(python, code, {**spec, "out": str(out)})
            ev = evaluate.run(
                evaluate.EvaluateConfig(),
                sft_policy=sft / "policy",
                policy=out / "policy",
                reward_model=rm / "model",
                normalization=rm / "normalization.json",
                heldout_comparisons=Path(stages["comparisons"]["artifact"], "heldout_comparisons.jsonl"),
                prompts=prep / "eval_prompts.jsonl",
                target_len=6,
                out_dir=Path(tmp, name + "-eval"),
            )
            e = json.loads(ev.file("eval").read_text())
            results[name].update(
                gold_policy=e["gold_policy"], gold_sft=e["gold_sft"], win_rate=e["win_rate"], kl_to_sft=e["kl_to_sft"]
            )
            print(name, json.dumps(results[name]), flush=True)
    a, t = results["alignflow"], results["trl_1.12.0"]
    results["time_ratio_alignflow_over_trl"] = a["seconds"] / t["seconds"]
    results["peak_rss_ratio_alignflow_over_trl"] = a["peak_rss_mb"] / t["peak_rss_mb"]
    gain = lambda r: r["gold_policy"]["mean"] - r["gold_sft"]["mean"]  # noqa: E731
    results["gain_difference"] = gain(a) - gain(t)
    results["gains_within_each_others_ci95"] = abs(results["gain_difference"]) <= (
        a["gold_policy"]["ci95"] + t["gold_policy"]["ci95"]
    )
    write_results(OUT, results, echo=True)


if __name__ == "__main__":
    main()
