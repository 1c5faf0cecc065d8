"""What a flow run prints and leaves behind: a table per stage and `summary.json`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

KEY_METRICS = {
    "prepare": ["prepare/params", "prepare/pretrain/loss_last"],
    "sft": ["sft/train/loss_first", "sft/train/loss_last"],
    "comparisons": ["comparisons/comparisons/prompts"],
    "reward_model": ["rm/train/accuracy", "rm/eval/accuracy"],
    "ppo": ["ppo/objective/scores_first", "ppo/objective/scores_last", "ppo/objective/kl_last"],
    "evaluate": ["eval/gold_sft", "eval/gold_policy", "eval/win_rate"],
    "judge": ["judge/position_consistency", "judge/agreement_gold", "judge/agreement_human"],
    "dpo": ["dpo/train/rewards/margins", "dpo/eval/accuracy", "dpo/kl_to_sft"],
}


def table(stages: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'stage':<14}{'status':<8}{'seconds':>9}  key metrics", "-" * 78]
    for name, s in stages.items():
        keys = KEY_METRICS.get(s["stage"], [])  # rounds (dpo_r2) show as their stage
        shown = ", ".join(f"{k.split('/', 1)[1]}={s['metrics'][k]:.3g}" for k in keys if k in s["metrics"])
        lines.append(f"{name:<14}{s['status']:<8}{s['seconds']:>9.1f}  {shown}")
    return "\n".join(lines)


def write_summary(artifacts_dir: str, summary: dict[str, Any]) -> Path:
    """`artifacts/runs/<time>/summary.json`, plus `artifacts/summary.json` for the latest run."""
    folder = Path(artifacts_dir, "runs", time.strftime("%Y%m%d-%H%M%S"))
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=2, sort_keys=True)
    (folder / "summary.json").write_text(text)
    latest = Path(artifacts_dir, "summary.json")
    tmp = latest.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(latest)
    return (folder / "summary.json").resolve()
