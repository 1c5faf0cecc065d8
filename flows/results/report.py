"""What a flow run prints and leaves behind: a table per stage and `summary.json`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

KEY_METRICS = {
    "prepare": ["prepare/params", "prepare/pretrain/loss_last"],
    "pretrain": ["pretrain/tokens", "pretrain/loss_first", "pretrain/loss_last"],
    "sft": ["sft/train/loss_first", "sft/train/loss_last", "sft/data/truncated", "sft/data/dropped"],
    "comparisons": ["comparisons/comparisons/prompts"],
    "reward_model": ["rm/train/accuracy", "rm/eval/accuracy", "rm/data/truncated", "rm/data/dropped"],
    "ppo": [
        "ppo/objective/scores_first",
        "ppo/objective/scores_last",
        "ppo/objective/kl_last",
        "ppo/finished_last",
        "ppo/repetition_last",
    ],
    "evaluate": [
        "eval/gold_sft",
        "eval/gold_policy",
        "eval/accuracy/sft",
        "eval/accuracy/policy",
        "eval/win_rate",
        "eval/win_rate_lc",
        "eval/judge_accuracy",
        "eval/eval_rm/policy",
        "eval/policy/empty_share",
    ],
    "judge": ["judge/position_consistency", "judge/agreement_gold", "judge/agreement_human"],
    "dpo": ["dpo/train/rewards/margins", "dpo/eval/accuracy", "dpo/kl_to_sft"],
    "best_of_n": ["best_of_n/score_all", "best_of_n/score_best", "best_of_n/gold_all", "best_of_n/gold_best"],
}


def table(stages: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'stage':<18}{'status':<8}{'seconds':>9}  key metrics", "-" * 82]
    for name, s in stages.items():
        keys = KEY_METRICS.get(s["stage"], [])  # rounds (dpo_r2) show as their stage
        shown = ", ".join(f"{k.split('/', 1)[1]}={s['metrics'][k]:.3g}" for k in keys if k in s["metrics"])
        status = s.get("verdict", {}).get("status", "ok")
        flag = f"  {status.upper()}" if status != "ok" else ""
        lines.append(f"{name:<18}{s['status']:<8}{s['seconds']:>9.1f}  {shown}{flag}")
    return "\n".join(lines)


def verdict(stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run's verdict: "flagged" when any stage's is (a bound crossed), else "inconclusive" when any
    stage's is (a judge not shown valid), else "ok"; the reasons prefixed by their stage."""
    reasons = [f"{name}: {r}" for name, s in stages.items() for r in s.get("verdict", {}).get("reasons", [])]
    statuses = {s.get("verdict", {}).get("status", "ok") for s in stages.values()}
    status = next((x for x in ("flagged", "inconclusive") if x in statuses), "ok")
    return {"status": status, "reasons": reasons}


def lengths(stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Rows each stage cut to its token limits and dropped (a ranking whose responses became identical
    once cut, or any long row with data.truncation off), from the stages' `<prefix>/data/*` metrics."""
    out = {}
    for name, s in stages.items():
        m = s.get("metrics", {})
        cut = sum(int(v) for k, v in m.items() if k.endswith("/truncated") and "/data" in k)
        dropped = sum(int(v) for k, v in m.items() if k.endswith("/dropped") and "/data" in k)
        if any("/data" in k and k.endswith(("/truncated", "/dropped")) for k in m):
            out[name] = {"cut": cut, "dropped": dropped}
    return out


def lengths_line(lengths: dict[str, dict[str, int]]) -> str:
    """One line: the rows cut and dropped per stage; dropped rows said loudly."""
    cut = ", ".join(f"{k} {v['cut']}" for k, v in lengths.items() if v["cut"]) or "none"
    dropped = ", ".join(f"{k} {v['dropped']}" for k, v in lengths.items() if v["dropped"])
    line = f"rows cut to the token limits: {cut}"
    return line + (f"; ROWS DROPPED: {dropped} (data.max_dropped_fraction)" if dropped else "; rows dropped: none")


def _ci(block: dict | None) -> str:
    return f"{block['mean']:.3f} ± {block['ci95']:.3f}" if block else "n/a"


def eval_line(e: dict[str, Any]) -> str:
    """One line of the evaluation: gold scores where a gold rule exists, else the judge's win rate."""
    parts = []
    if e.get("gold_sft") is not None:
        parts.append(f"gold SFT {_ci(e['gold_sft'])}   gold policy {_ci(e['gold_policy'])}")
    if e.get("accuracy"):  # an exact-match task: accuracies with Wilson intervals
        a = e["accuracy"]
        (sl, sh), (pl, ph) = a["sft"]["ci95"], a["policy"]["ci95"]
        dl, dh = a["difference_ci95"]
        parts.append(
            f"exact match SFT {a['sft']['accuracy']:.3f} [{sl:.3f}, {sh:.3f}]   policy "
            f"{a['policy']['accuracy']:.3f} [{pl:.3f}, {ph:.3f}]   "
            f"difference {a['difference']:+.3f} [{dl:+.3f}, {dh:+.3f}]"
        )
    if e.get("win"):
        w = e["win"]
        parts.append(f"win rate {w['rate']:.1%} ± {w['ci95']:.1%} ({w['by']})")
        if w.get("lc_rate") is not None:
            parts.append(f"length-controlled {w['lc_rate']:.1%}")
        judge = w.get("judge")
        if judge and judge["accuracy"] is not None:
            lo, hi = judge["ci95"]
            ok = "" if judge["valid"] else ": NOT EVIDENCE"
            parts.append(f"judge acc {judge['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]{ok}")
    parts.append(f"KL/token {e['kl_to_sft']:.3f}")
    if e.get("policy"):
        parts.append(f"EOS {e['policy']['eos_rate']:.0%}  repetition {e['policy']['repetition']:.2f}")
    if e.get("rm_accuracy") is not None:
        ceiling = f" (ceiling {e['labeler_ceiling']:.3f})" if e.get("labeler_ceiling") is not None else ""
        parts.append(f"RM acc {e['rm_accuracy']:.3f}{ceiling}")
    return "   ".join(parts)


def run_folder(artifacts_dir: str, run_id: str) -> Path:
    """`artifacts/runs/<time>-<run id>/`: one folder per flow run, unique when runs start together."""
    folder = Path(artifacts_dir, "runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id[:8]}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_summary(folder: Path, summary: dict[str, Any]) -> Path:
    """`<run folder>/summary.json`, plus `artifacts/summary.json` for the latest run."""
    text = json.dumps(summary, indent=2, sort_keys=True)
    (folder / "summary.json").write_text(text)
    latest = folder.parent.parent / "summary.json"
    tmp = latest.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(latest)
    return (folder / "summary.json").resolve()
