"""`make compare`: every branch and estimator from the same SFT artifact, one table.

PPO (rlhf, GAE with a value model; and with asynchronous rollouts, k = 1) and the critic-free
estimators in the same loop (grpo, rloo, dr_grpo, reinforce_pp, reinforce_pp_baseline: no value model;
GRPO with DAPO's or GSPO's keys); DPO
(best of a small beta set) and the other preference losses at that beta (KTO on each ranking split
into thumbs) or their papers' defaults (SimPO, ORPO: reference-free); RLAIF and d-RLAIF; best-of-n.
Then the verifiable task (`pipeline=rlvr` on `data=embedded_arithmetic`): held-out exact-match
accuracy of SFT and GRPO, and of GRPO with DAPO's and with GSPO's keys. Then the tool task
(`pipeline=rlvr_tools` on `data=embedded_calculator`): GRPO whose rollouts call a calculator against
GRPO without it, from the same SFT.

The best DPO beta is chosen by the gold score on the evaluation prompts (a small sweep, reported as
such, not a held-out selection).

Each branch runs as its own `python -m flows.align pipeline=<branch>` process on one artifacts folder.
A first process runs the shared prepare, sft, comparisons and reward_model (timed apart, cached when they exist),
so every branch finds them cached. For each
it records the gold score (± 95% CI), the gain and win rate over SFT, the KL to SFT per token, the
process's wall time and peak RSS (sampled every 0.1 s, the Prefect server excluded). Writes
`artifacts/compare/compare.json`, logs it to MLflow, prints one table.

    alignflow compare [--dpo-betas 0.3,1.0] [overrides for every branch, e.g. data.n_ppo_prompts=512]
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

import flows
from flows.launch import prefect_server

# DPO with the paper's listwise Plackett-Luce loss (2.5x faster than trl's pairs here, and the best
# in `bench.dpo_variants`), at tighter leashes than the paper's 0.1, which drifted to 3.4 nats/token of KL
DPO_LOSS = "plackett_luce"
DPO_BETAS = (0.3, 1.0)


# rows run with pipeline=rlhf and these overrides (the branch names grpo and rloo have their own yaml)
ESTIMATORS = {
    "dr_grpo": ["stage.ppo.advantage=dr_grpo", "stage.ppo.samples_per_prompt=4", "stage.ppo.kl_penalty=loss"],
    "reinforce_pp": ["stage.ppo.advantage=reinforce_pp", "stage.ppo.samples_per_prompt=1"],
    "reinforce_pp_baseline": ["stage.ppo.advantage=reinforce_pp_baseline", "stage.ppo.samples_per_prompt=4"],
}
# DAPO's and GSPO's changes to GRPO on the verifiable task (pipeline=rlvr runs GRPO): their keys, as in
# conf/pipeline/dapo.yaml and gspo.yaml (no overlong shaping there: the task's answers are short)
ON_RLVR = {
    "dapo": ["stage.ppo.clip_high=0.28", "stage.ppo.beta=0.0", "stage.ppo.dynamic_sampling=true"],
    "gspo": ["stage.ppo.ratio_level=sequence", "stage.ppo.clip=0.0003", "stage.ppo.clip_high=0.0004"],
}
NO_TOOL = ["stage.ppo.tools=[]"]  # the tool task's GRPO, its rollouts single-turn
PREFERENCE_LOSSES = ("kto", "simpo", "orpo")  # kto at DPO's best beta; simpo and orpo reference-free
# the stages (by name in the flow) a row computes itself (the rest are the shared, cached ones)
OWN_STAGES = {"ppo", "dpo", "judge", "best_of_n", "best_of_n_sft"}


def run_branch(overrides: list[str]) -> dict:
    """One flow process: its summary, wall time and peak RSS."""
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.align", *overrides], cwd=flows.ROOT, stdout=out, stderr=subprocess.STDOUT
        )
        peak = 0
        handle = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, handle.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read()
    if proc.wait() != 0 or "summary: " not in text:
        raise SystemExit(f"flows.align {' '.join(overrides)} failed:\n{text[-3000:]}")
    summary = json.loads(Path(text.rsplit("summary: ", 1)[1].strip()).read_text())
    ran = sum(s["seconds"] for s in summary["stages"].values() if s["status"] == "ran")
    # a row's own stages, timed when they ran (or, cached from an earlier run, as that run's manifest recorded)
    own = [own_cost(s) for name, s in summary["stages"].items() if name in OWN_STAGES]
    return {
        "summary": summary,
        "wall_s": wall,
        "ran_stage_s": ran,
        "peak_rss_mb": peak / 2**20,
        "own_stage_s": sum(s["seconds"] for s in own),  # PPO's, DPO's, best-of-n's: the branch's own work
        "own_stage_peak_rss_mb": max((s["peak_rss_mb"] or 0.0 for s in own), default=0.0),
        "own_stage_cached": any(s["cached"] for s in own),
    }


def times(x: float | None) -> str:
    return "unmeasured" if x is None else f"{x:.2f}x"


def own_cost(stage: dict) -> dict:
    """Seconds and peak RSS of one stage: measured by this process, or recorded in the cached manifest."""
    if stage["status"] == "ran":
        return {"seconds": stage["seconds"], "peak_rss_mb": stage["peak_rss_mb"], "cached": False}
    m, kind = stage["metrics"], stage["stage"]
    return {"seconds": m[f"{kind}/seconds"], "peak_rss_mb": m.get(f"{kind}/peak_rss_mb"), "cached": True}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None where either was not measured (a manifest from before the metric existed)."""
    return a / b if a is not None and b else None


def row(name: str, result: dict) -> dict:
    e = result["summary"]["eval"]
    ppo_metrics = result["summary"]["stages"].get("ppo", {}).get("metrics", {})
    return {
        "branch": name,
        "gold": e["gold_policy"]["mean"],
        "gold_ci95": e["gold_policy"]["ci95"],
        "gain": e["gold_policy"]["mean"] - e["gold_sft"]["mean"],
        "win_rate": e["win_rate"],
        "kl_to_sft": e["kl_to_sft"],
        "wall_s": result["wall_s"],
        "ran_stage_s": result["ran_stage_s"],
        "peak_rss_mb": result["peak_rss_mb"],
        "own_stage_s": result["own_stage_s"],
        "own_stage_peak_rss_mb": result["own_stage_peak_rss_mb"],
        "own_stage_cached": result["own_stage_cached"],
        "value_model": ppo_metrics.get("ppo/value_model"),
        # the PPO stage's weights and optimizer state (what dropping the value model saves, apart
        # from the process's runtime baseline that dominates RSS at the embedded model's size)
        "model_state_mb": ppo_metrics.get("ppo/model_state_mb"),
        "updates_per_s": ppo_metrics.get("ppo/updates_per_s"),
        "stages": {k: v["status"] for k, v in result["summary"]["stages"].items()},
        "judge": e["judge"],
    }


def table(rows: list[dict], sft: dict) -> str:
    lines = [
        f"{'branch':<24}{'gold ± 95% CI':>18}{'gain':>8}{'win rate':>10}{'KL/token':>10}"
        f"{'wall s':>9}{'peak RSS MB':>13}{'stage s':>9}{'stage MB':>10}",
        "-" * 111,
        f"{'sft':<24}{sft['mean']:>10.3f} ± {sft['ci95']:.3f}",
    ]
    for r in rows:
        mark = "*" if r["own_stage_cached"] else " "
        lines.append(
            f"{r['branch']:<24}{r['gold']:>10.3f} ± {r['gold_ci95']:.3f}{r['gain']:>8.3f}{r['win_rate']:>10.1%}"
            f"{r['kl_to_sft']:>10.3f}{r['wall_s']:>9.0f}{r['peak_rss_mb']:>13.0f}{r['own_stage_s']:>9.1f}"
            f"{r['own_stage_peak_rss_mb']:>10.0f}{mark}"
        )
    if any(r["own_stage_cached"] for r in rows):
        lines.append("* its own stage was cached: the time and RSS its manifest recorded when it ran")
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other arguments: Hydra overrides.")
    parser.add_argument("--dpo-betas", default=",".join(map(str, DPO_BETAS)), help="the DPO betas to pick the best of")
    args, extra = parser.parse_known_args(argv)
    betas = [float(b) for b in args.dpo_betas.split(",")]
    artifacts = next((a.split("=", 1)[1] for a in extra if a.startswith("artifacts_dir=")), "artifacts")
    prefect_server.prestart()()  # one server records every branch's process (each would boot its own)
    t0 = time.perf_counter()
    # prepare, sft, comparisons and the reward model first: every row's process then starts from the same
    # cached upstream, so each own stage pays the same start-up (imports) and is timed alike
    shared = run_branch(["pipeline=rlhf", "pipeline.stop_after=reward_model", *extra])
    results = {"rlhf": run_branch(["pipeline=rlhf", *extra])}
    # PPO with asynchronous rollouts (k = 1): the rollout worker samples the next batch during each update
    results["ppo_async_k1"] = run_branch(["pipeline=rlhf", "stage.ppo.async_rollouts=1", *extra])
    dpo = {
        beta: run_branch(["pipeline=dpo", f"stage.dpo.loss_type={DPO_LOSS}", f"stage.dpo.beta={beta}", *extra])
        for beta in betas
    }
    best = max(dpo, key=lambda b: dpo[b]["summary"]["eval"]["gold_policy"]["mean"])
    results[f"dpo (beta={best})"] = dpo[best]
    for loss in PREFERENCE_LOSSES:
        beta = [f"stage.dpo.beta={best}"] if loss == "kto" else []
        results[loss] = run_branch(["pipeline=dpo", f"stage.dpo.loss_type={loss}", *beta, *extra])
    results["rlaif"] = run_branch(["pipeline=rlaif", *extra])
    results["rlaif_direct"] = run_branch(["pipeline=rlaif_direct", *extra])
    results["grpo"] = run_branch(["pipeline=grpo", *extra])
    results["rloo"] = run_branch(["pipeline=rloo", *extra])
    results["dapo"] = run_branch(["pipeline=dapo", *extra])
    results["gspo"] = run_branch(["pipeline=gspo", *extra])
    for name, overrides in ESTIMATORS.items():
        results[name] = run_branch(["pipeline=rlhf", *overrides, *extra])
    results["best_of_n"] = run_branch(["pipeline=best_of_n", *extra])
    rows = [row(name, r) for name, r in results.items()]
    sft = results["rlhf"]["summary"]["eval"]["gold_sft"]
    by = {r["branch"].split(" ")[0]: r for r in rows}
    ppo, dpo_row = by["rlhf"], by["dpo"]
    verifiable = verifiable_task(run_branch(["pipeline=rlvr", *extra]))
    variants = {name: verifiable_task(run_branch(["pipeline=rlvr", *keys, *extra])) for name, keys in ON_RLVR.items()}
    # the tool task: GRPO whose rollouts call the calculator, and the same GRPO from the same SFT without it
    tools = tool_task(
        run_branch(["pipeline=rlvr_tools", *extra]), run_branch(["pipeline=rlvr_tools", *NO_TOOL, *extra])
    )

    def within(a: dict, b: dict) -> dict:
        ci = math.sqrt(a["gold_ci95"] ** 2 + b["gold_ci95"] ** 2)
        return {"gain_minus": a["gain"] - b["gain"], "difference_ci95": ci, "at_least": a["gain"] >= b["gain"] - ci}

    critic_free = {
        name: {
            **within(by[name], ppo),
            "stage_time_ratio": ratio(by[name]["own_stage_s"], ppo["own_stage_s"]),
            "stage_peak_rss_ratio": ratio(by[name]["own_stage_peak_rss_mb"], ppo["own_stage_peak_rss_mb"]),
            "model_state_ratio": ratio(by[name]["model_state_mb"], ppo["model_state_mb"]),
        }
        for name in ("grpo", "rloo", "dapo", "gspo", *ESTIMATORS)
    }
    for t in critic_free.values():
        time_ok = t["stage_time_ratio"] is not None and t["stage_time_ratio"] <= 0.7
        rss_ok = t["stage_peak_rss_ratio"] is not None and t["stage_peak_rss_ratio"] <= 0.8
        t["met"] = t["at_least"] and time_ok and rss_ok
    lagged = by["ppo_async_k1"]
    async_vs_ppo = {
        **within(lagged, ppo),
        "updates_per_s_ratio": ratio(lagged["updates_per_s"], ppo["updates_per_s"]),
        "staleness_max": results["ppo_async_k1"]["summary"]["stages"]["ppo"]["metrics"].get("ppo/async/staleness_max"),
    }
    async_vs_ppo["within_ci"] = abs(async_vs_ppo["gain_minus"]) <= async_vs_ppo["difference_ci95"]
    kto = within(by["kto"], dpo_row)
    kto["within_ci"] = abs(kto["gain_minus"]) <= kto["difference_ci95"]
    gap_ci = math.sqrt(ppo["gold_ci95"] ** 2 + dpo_row["gold_ci95"] ** 2)
    report = {
        "rows": rows,
        "sft_gold": sft,
        "dpo_betas": {str(b): row(f"dpo (beta={b})", r) for b, r in dpo.items()},
        "dpo_best_beta": best,
        "dpo_loss_type": DPO_LOSS,
        "verifiable": verifiable,
        "verifiable_variants": variants,
        "tool_task": tools,
        "targets": {
            "dpo_gain_minus_ppo_gain": dpo_row["gain"] - ppo["gain"],
            "dpo_gain_within_ci_of_ppo": abs(dpo_row["gain"] - ppo["gain"]) <= gap_ci,
            "difference_ci95": gap_ci,
            "critic_free_vs_ppo": critic_free,
            "kto_vs_dpo": kto,
            "async_k1_vs_ppo": async_vs_ppo,
            "verifiable_grpo_vs_sft": verifiable["target"],
            "tool_vs_no_tool": tools["target"],
            "best_of_n_gain_over_ppo_gain": by["best_of_n"]["gain"] / ppo["gain"] if ppo["gain"] else None,
            "rlaif_gain_over_rlhf_gain": by["rlaif"]["gain"] / ppo["gain"] if ppo["gain"] else None,
            "rlaif_direct_gain_over_rlhf_gain": by["rlaif_direct"]["gain"] / ppo["gain"] if ppo["gain"] else None,
            "judge_stage_metrics": results["rlaif"]["summary"]["stages"]["judge"]["metrics"],
            "ai_comparisons_position_consistency": results["rlaif"]["summary"]["stages"]["comparisons"]["metrics"].get(
                "comparisons/labeler/position_consistency"
            ),
        },
        "shared_stages": {k: v["status"] for k, v in shared["summary"]["stages"].items()},
        "shared_wall_s": shared["wall_s"],
        "total_wall_s": time.perf_counter() - t0,
        "branches_wall_s": time.perf_counter() - t0 - shared["wall_s"],
        "overrides": extra,
    }
    out = Path(artifacts, "compare", "compare.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    lines = [verifiable_line(verifiable), *(verifiable_line(v, name.upper()) for name, v in variants.items())]
    text = "\n".join([table(rows, sft), "", *lines, tool_line(tools)])
    (out.parent / "compare.txt").write_text(text + "\n")
    _log_to_mlflow(artifacts, out)
    print(text)
    t = report["targets"]
    for name, c in t["critic_free_vs_ppo"].items():
        print(
            f"{name}: gain - PPO's {c['gain_minus']:+.3f} (CI of the difference ±{c['difference_ci95']:.3f}), "
            f"stage time {times(c['stage_time_ratio'])}, stage peak RSS {times(c['stage_peak_rss_ratio'])}, "
            f"model state {times(c['model_state_ratio'])} PPO's: "
            f"target (>= PPO's gain within the CI, <= 0.7x time, <= 0.8x RSS) {'met' if c['met'] else 'missed'}"
        )
    a = t["async_k1_vs_ppo"]
    print(
        f"ppo_async_k1: {times(a['updates_per_s_ratio'])} PPO's updates/s (target >= 1.30x), gain - PPO's "
        f"{a['gain_minus']:+.3f} (CI ±{a['difference_ci95']:.3f}): {'within' if a['within_ci'] else 'outside'} the CI"
    )
    k = t["kto_vs_dpo"]
    print(
        f"kto: gain - DPO's {k['gain_minus']:+.3f} (CI ±{k['difference_ci95']:.3f}): "
        f"{'within' if k['within_ci'] else 'outside'} the CI"
    )
    print(
        f"\nDPO gain - PPO gain {t['dpo_gain_minus_ppo_gain']:+.3f} (95% CI of the difference ±{gap_ci:.3f}); "
        f"RLAIF / RLHF gain {t['rlaif_gain_over_rlhf_gain']:.2f}; d-RLAIF / RLHF gain "
        f"{t['rlaif_direct_gain_over_rlhf_gain']:.2f}\ntotal {report['total_wall_s']:.0f} s: shared prepare/sft/"
        f"comparisons/reward_model {report['shared_wall_s']:.0f} s, the branches {report['branches_wall_s']:.0f} s"
        f"\nwrote {out.resolve()}"
    )
    return report


def verifiable_task(result: dict) -> dict:
    """SFT's and GRPO's held-out exact-match accuracy on the arithmetic task, and the target's check."""
    a = result["summary"]["eval"]["accuracy"]
    sft, pol = a["sft"]["accuracy"], a["policy"]["accuracy"]
    return {
        "accuracy": a,
        "wall_s": result["wall_s"],
        "ppo_stage_s": result["own_stage_s"],
        "target": {
            "ratio": pol / sft if sft else None,
            "points": 100 * (pol - sft),
            "met": bool(sft and pol >= 2 * sft and pol - sft >= 0.2),
            "difference_ci95": a["difference_ci95"],
        },
    }


def verifiable_line(v: dict, method: str = "GRPO") -> str:
    a, t = v["accuracy"], v["target"]
    (sl, sh), (pl, ph) = a["sft"]["ci95"], a["policy"]["ci95"]
    dl, dh = a["difference_ci95"]
    ratio = f"{t['ratio']:.2f}x" if t["ratio"] is not None else "n/a"
    return (
        f"verifiable task (pipeline=rlvr, data=embedded_arithmetic, {a['sft']['n']} held-out prompts): exact match "
        f"SFT {a['sft']['accuracy']:.3f} [{sl:.3f}, {sh:.3f}], "
        f"{method} {a['policy']['accuracy']:.3f} [{pl:.3f}, {ph:.3f}]; "
        f"{ratio}, {t['points']:+.1f} points (95% CI of the difference "
        f"[{100 * dl:+.1f}, {100 * dh:+.1f}]): "
        f"target (>= 2x and >= +20 points) {'met' if t['met'] else 'missed'}"
    )


def tool_task(with_tool: dict, without_tool: dict) -> dict:
    """GRPO with the calculator against GRPO without it, both from the same SFT, on held-out prompts:
    exact match, the difference with its 95% CI (two proportions, normal approximation), and each
    model's accuracy with and without the tool and share of answers that used it."""
    a, b = with_tool["summary"]["eval"]["accuracy"]["policy"], without_tool["summary"]["eval"]["accuracy"]["policy"]
    p, q = a["accuracy"], b["accuracy"]
    half = 1.96 * math.sqrt(p * (1 - p) / a["n"] + q * (1 - q) / b["n"])
    return {
        "with_tool": a,
        "without_tool": b,
        "evaluation": with_tool["summary"]["eval"]["tools"],  # SFT's and the policy's, with and without
        "ppo_metrics": {k: v for k, v in with_tool["summary"]["stages"]["ppo"]["metrics"].items() if "/tools/" in k},
        "ppo_stage_s": {"with_tool": with_tool["own_stage_s"], "without_tool": without_tool["own_stage_s"]},
        "target": {"points": 100 * (p - q), "difference_ci95": [p - q - half, p - q + half], "met": p - q >= 0.2},
    }


def tool_line(t: dict) -> str:
    a, b, d = t["with_tool"], t["without_tool"], t["target"]
    share = t["evaluation"]["policy"]["share_using_tool"] if t["evaluation"] else float("nan")
    sft = t["evaluation"]["sft"]["with_tool"]["accuracy"] if t["evaluation"] else float("nan")
    return (
        f"tool task (pipeline=rlvr_tools, data=embedded_calculator, {a['n']} held-out prompts): exact match "
        f"GRPO with the calculator {a['accuracy']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] "
        f"(answers using it {share:.0%}; SFT with it {sft:.3f}), GRPO without it {b['accuracy']:.3f} "
        f"[{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}]; {d['points']:+.1f} points (95% CI of the difference "
        f"[{100 * d['difference_ci95'][0]:+.1f}, {100 * d['difference_ci95'][1]:+.1f}]): "
        f"target (>= +20 points) {'met' if d['met'] else 'missed'}"
    )


def _log_to_mlflow(artifacts: str, path: Path) -> None:
    import mlflow

    from flows.config import Config
    from flows.runner import set_up_tracking

    set_up_tracking(Config(artifacts_dir=artifacts))
    with mlflow.start_run(run_name="compare"):
        mlflow.log_artifact(str(path))
        mlflow.log_artifact(str(path.parent / "compare.txt"))


if __name__ == "__main__":
    main(sys.argv[1:])
