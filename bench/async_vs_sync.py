"""Asynchronous rollouts against the synchronous loop on the embedded default, through the real flow.

Each variant is one `python -m flows.align` run into one artifacts folder: prepare, SFT, comparisons and
the reward model are computed once and cached; `ppo` and `evaluate` are removed before each variant, so
every variant's PPO runs in this benchmark. For each it records:
- the PPO stage's updates per second (`ppo/updates_per_s`: the updates over the time they took, any
  wait for the rollout worker's start-up included), the same without the first update's wait (the rate
  a long run settles at) and the stage's seconds;
- the gold gain (the policy's gold score less SFT's, on the same evaluation prompts) and the CI of the
  policy's gold score;
- the worker's figures: staleness, the trainer's total wait for batches, the truncated share.
Then, for each variant against its synchronous one: the speed-up, and whether its gold gain lies within
the synchronous run's 95% CI. On the embedded default sampling is about a tenth of an update on this
CPU, so a generation-heavy setting (one PPO epoch, generation in batches of 4) is measured beside it.
Writes artifacts/bench/async_rollouts.json. `make bench-async`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from bench.common import write_results

OUT = Path("artifacts") / "bench" / "async_rollouts.json"
ARTIFACTS = Path("artifacts") / "bench-async"
# name: (overrides, the synchronous variant it is compared with)
HEAVY = ["stage.ppo.ppo_epochs=1", "stage.ppo.generation_batch_size=4"]
VARIANTS = {
    "synchronous (k=0)": ([], None),
    # the worker takes one of the trainer's threads: the synchronous loop on one thread separates what
    # the thread count does from what the overlap does
    "synchronous (k=0), threads=1": (["threads=1"], "synchronous (k=0)"),
    "async k=1": (["stage.ppo.async_rollouts=1"], "synchronous (k=0)"),
    "async k=2": (["stage.ppo.async_rollouts=2"], "synchronous (k=0)"),
    # generation-heavy: one PPO epoch and generate in batches of 4, so that sampling is about two thirds of
    # a synchronous update (as on GPUs, where OpenRLHF measures over 80%); here it is about a tenth
    "generation-heavy, synchronous": (HEAVY, None),
    "generation-heavy, async k=1": ([*HEAVY, "stage.ppo.async_rollouts=1"], "generation-heavy, synchronous"),
}
ASYNC_KEYS = ("staleness_max", "staleness_mean", "wait_s_total", "first_wait_s", "is_truncated_mean")


def row(summary: dict, overrides: list[str]) -> dict:
    ppo, e = summary["stages"]["ppo"], summary["eval"]
    m = ppo["metrics"]
    updates = m["ppo/updates"]
    return {
        "overrides": overrides,
        "updates_per_s": m["ppo/updates_per_s"],
        # without the first update's wait for the worker's start-up: the rate a long run settles at
        "steady_updates_per_s": updates / (updates / m["ppo/updates_per_s"] - m.get("ppo/async/first_wait_s", 0.0)),
        "ppo_seconds": ppo["seconds"],
        "gold_sft": e["gold_sft"]["mean"],
        "gold_policy": e["gold_policy"]["mean"],
        "gold_policy_ci95": e["gold_policy"]["ci95"],
        "gold_gain": e["gold_policy"]["mean"] - e["gold_sft"]["mean"],
        "kl_to_sft_per_token": e["kl_to_sft"],
        **{k: m[f"ppo/async/{k}"] for k in ASYNC_KEYS if f"ppo/async/{k}" in m},
    }


def compare(results: dict) -> dict:
    out = {}
    for name, (_, baseline) in VARIANTS.items():
        if baseline is None:
            continue
        r, base = results[name], results[baseline]
        out[name] = {
            "against": baseline,
            "speedup_updates_per_s": r["updates_per_s"] / base["updates_per_s"],
            "speedup_steady_updates_per_s": r["steady_updates_per_s"] / base["steady_updates_per_s"],
            "gold_gain_minus_sync": r["gold_gain"] - base["gold_gain"],
            "within_sync_ci95": abs(r["gold_gain"] - base["gold_gain"]) <= base["gold_policy_ci95"],
        }
    return out


def main(argv: list[str]) -> None:
    from flows.studies.compare import run_branch

    extra = argv  # e.g. seed=1: every variant at that seed
    results = {}
    for name, (overrides, _) in VARIANTS.items():
        for stage in ("ppo", "evaluate"):  # each variant's PPO runs now (the thread count is not in the cache key)
            shutil.rmtree(ARTIFACTS / stage, ignore_errors=True)
        summary = run_branch([f"artifacts_dir={ARTIFACTS}", *extra, *overrides])["summary"]
        results[name] = row(summary, [*extra, *overrides])
        print(name, results[name], flush=True)
    write_results(OUT, {"variants": results, "against_synchronous": compare(results)}, echo=True)


if __name__ == "__main__":
    main(sys.argv[1:])
