"""`make methods`: the whole embedded-default RLHF pipeline (what `make align` runs) once per
fine-tuning method or optimizer, one after another in one artifacts folder (prepare is shared), and
whether PPO still beats SFT: the gold score of the policy against SFT's and the simulated labeler's win
rate, with their 95% intervals. Writes artifacts/bench/methods.json and prints a Markdown table.

    python -m bench.methods [--only peft=dora,optim=badam] [--extra +experiment=tiny]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [
    "peft=lora",  # the default
    "peft=dora",
    "peft=pissa",
    "peft=loraplus",
    "peft=freeze",
    "peft=houlsby",
    "peft=qlora",
    "optim=galore",
    "optim=badam",
]


def run(variant: str, artifacts: Path, extra: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.align", f"artifacts_dir={artifacts}", *variant.split(), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    row: dict = {"variant": variant, "seconds": round(time.perf_counter() - t0, 1), "returncode": proc.returncode}
    if proc.returncode != 0 or "summary: " not in proc.stdout:
        row["error"] = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return row
    summary = json.loads(Path(proc.stdout.rsplit("summary: ", 1)[1].strip()).read_text())
    ev = summary["eval"]
    row |= {
        "gold_sft": ev["gold_sft"],
        "gold_policy": ev["gold_policy"],
        "win_rate": ev["win"]["rate"],
        "win_ci95": ev["win"]["ci95"],
        "kl_to_sft": ev["kl_to_sft"],
        "rm_accuracy": ev["rm_accuracy"],
        "ppo_beats_sft": ev["gold_policy"]["mean"] > ev["gold_sft"]["mean"] and ev["win"]["rate"] > 0.5,
        "stages": {k: v["status"] for k, v in summary["stages"].items()},
    }
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | gold SFT | gold PPO | win rate vs SFT | KL/token | RM acc | PPO beats SFT | minutes |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| `{r['variant']}` | failed: {r['error'][0][:80]} | | | | | | |")
            continue
        g, p = r["gold_sft"], r["gold_policy"]
        lines.append(
            f"| `{r['variant']}` | {g['mean']:.3f} ± {g['ci95']:.3f} | {p['mean']:.3f} ± {p['ci95']:.3f} | "
            f"{100 * r['win_rate']:.1f}% ± {100 * r['win_ci95']:.1f} | {r['kl_to_sft']:.3f} | {r['rm_accuracy']:.3f} | "
            f"{'yes' if r['ppo_beats_sft'] else 'no'} | {r['seconds'] / 60:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma list of variants, e.g. peft=dora,optim=badam")
    ap.add_argument("--extra", default="", help="overrides every run takes, space-separated")
    ap.add_argument("--artifacts", default=str(ROOT / "artifacts" / "methods"))
    args = ap.parse_args()
    variants = [v for v in VARIANTS if not args.only or v in args.only.split(",")]
    rows = []
    for v in variants:
        rows.append(run(v, Path(args.artifacts), args.extra.split()))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    out = ROOT / "artifacts" / "bench" / "methods.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
