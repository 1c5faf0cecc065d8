"""The whole RLHF pipeline on real data, timed: `make bench-real`.

`+experiment=hh_rlhf_small` on the 2,312 HH-RLHF pairs in ../shared/data (SFT on the chosen replies,
the reward model on the pairs, PPO on their prompts, an evaluation reward model and evaluation), run
from an empty artifacts folder in one process, as a user would. Writes per-stage seconds, tokens
per second and peak RSS, the evaluation, and the wall time against the 15-minute target to
`artifacts/bench/real_data.json`.

Then, from the same cached SFT and reward model, PPO again with `stage.ppo.missing_eos_penalty=1.0`
(the measurement behind that key's default): only ppo and evaluate rerun.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.common import write_results
from flows.studies.compare import run_branch

TOKENS = {
    "sft": "sft/tokens",
    "reward_model": "rm/tokens",
    "eval_reward_model": "rm/tokens",
    "ppo": "ppo/tokens",
    "evaluate": "eval/tokens",
}
TARGET_S = 15 * 60


def stage_rows(summary: dict) -> dict:
    rows = {}
    for name, s in summary["stages"].items():
        tokens = s["metrics"].get(TOKENS.get(name, ""))
        rows[name] = {
            "status": s["status"],
            "seconds": s["seconds"],
            "tokens": tokens,
            "tokens_per_s": tokens / s["seconds"] if tokens else None,
            "peak_rss_mb": s["peak_rss_mb"],
            "truncated": {k: v for k, v in s["metrics"].items() if k.endswith(("/truncated", "/dropped"))},
        }
    return rows


def outcome(summary: dict) -> dict:
    e = summary["eval"]
    return {
        "win": e["win"],
        "eval_rm": e["eval_rm"],
        "proxy_rm": e["proxy_rm"],
        "kl_to_sft_per_token": e["kl_to_sft"],
        "rm_accuracy": e["rm_accuracy"],
        "sft": e["sft"],
        "policy": e["policy"],
        "verdict": summary["verdict"],
    }


def main() -> None:
    art = Path("artifacts/bench/real_data_run")
    shutil.rmtree(art, ignore_errors=True)  # from nothing, as a user's first run
    # the bench times the whole recipe: its reward model's held-out accuracy (0.571 in the README's run,
    # 95% CI about 0.51-0.63) does not clear the default quality gate, where a user's run now stops
    base = [f"artifacts_dir={art}", "+experiment=hh_rlhf_small", "pipeline.min_rm_accuracy=0"]
    first = run_branch(base)
    penalty = run_branch([*base, "stage.ppo.missing_eos_penalty=1.0"])
    results = {
        "command": "python -m flows.align +experiment=hh_rlhf_small pipeline.min_rm_accuracy=0",
        "wall_s": first["wall_s"],
        "target_s": TARGET_S,
        "under_target": first["wall_s"] < TARGET_S,
        "peak_rss_mb": first["peak_rss_mb"],
        "stages": stage_rows(first["summary"]),
        "data": first["summary"]["data"],
        "eval": outcome(first["summary"]),
        "missing_eos_penalty_1.0": {
            "reran": [n for n, s in penalty["summary"]["stages"].items() if s["status"] == "ran"],
            "eval": outcome(penalty["summary"]),
        },
    }
    write_results(Path("artifacts/bench/real_data.json"), results)
    for name, r in results["stages"].items():
        rate = f"{r['tokens_per_s']:,.0f} tok/s" if r["tokens_per_s"] else "-"
        print(f"{name:<18} {r['seconds']:7.1f} s  {rate:>14}  peak {r['peak_rss_mb'] or 0:,.0f} MB")
    print(f"total {results['wall_s']:.0f} s (target {TARGET_S} s)")


if __name__ == "__main__":
    main()
