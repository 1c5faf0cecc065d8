"""PPO variants on the embedded default, through the real flow: a beta sweep, PPO-ptx on/off, EMA on/off.

Each variant is one `python -m flows.align` run into the same artifacts folder, so prepare, SFT,
comparisons and the reward model are computed once and cached; only `ppo` and `evaluate` rerun.
Writes artifacts/bench/ppo_variants.json. `python -m bench.ppo_variants`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.common import write_results

ARTIFACTS = Path("artifacts")
OUT = ARTIFACTS / "bench" / "ppo_variants.json"
VARIANTS = {
    "beta=0.005": ["stage.ppo.beta=0.005"],
    "beta=0.02 (default)": [],
    "beta=0.1": ["stage.ppo.beta=0.1"],
    "beta=0.5": ["stage.ppo.beta=0.5"],
    "ptx on": ["+experiment=ptx"],
    "ema off": ["+experiment=no_ema"],
}


def main() -> None:
    results = {}
    for name, overrides in VARIANTS.items():
        proc = subprocess.run(
            [sys.executable, "-m", "flows.align", f"artifacts_dir={ARTIFACTS}", *overrides],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"{name}: the flow failed:\n{proc.stderr[-3000:]}")
        summary = json.loads(Path(proc.stdout.rsplit("summary: ", 1)[1].strip()).read_text())
        e = summary["eval"]
        results[name] = {
            "overrides": overrides,
            "kl_to_sft_per_token": e["kl_to_sft"],
            "gold_policy": e["gold_policy"],
            "gold_sft": e["gold_sft"],
            "win_rate": e["win_rate"],
            "ppo_seconds": summary["stages"]["ppo"]["seconds"],
            "statuses": {k: v["status"] for k, v in summary["stages"].items()},
        }
        print(name, json.dumps(results[name]), flush=True)
    write_results(OUT, results)


if __name__ == "__main__":
    main()
