"""`make frontier`: the reward-vs-KL frontier of PPO and DPO (the DPO paper's Figure 2).

Two Hydra sweeps on one artifacts folder, `pipeline=rlhf stage.ppo.beta=...` and `pipeline=dpo
stage.dpo.beta=...`, with parallel joblib jobs (each capped to its share of the cores); prepare, SFT,
comparisons and the reward model are computed once and shared. Then one plot of every run: KL to
SFT per token against the gold score (or the win rate without a gold rule), coloured by branch.
Writes `artifacts/frontier/<time>/frontier.png`, `frontier.json` and `frontier.html` (the points
and each run's report).

    python -m flows.studies.frontier [--ppo-betas 0.005,0.02,0.1] [--dpo-betas 0.1,0.3,1.0] [--jobs 2] [overrides]
"""

from __future__ import annotations

import argparse
import html
import json
import subprocess
import sys
import time
from pathlib import Path

import flows
from flows.launch import prefect_server
from flows.studies.sweep import collect, plot_frontier

BRANCHES = {"rlhf": "stage.ppo.beta", "dpo": "stage.dpo.beta"}


def sweep(branch: str, betas: str, jobs: int, folder: Path, overrides: list[str]) -> None:
    argv = [
        sys.executable,
        "-m",
        "flows.align",
        "-m",
        f"pipeline={branch}",
        f"{BRANCHES[branch]}={betas}",
        f"hydra.sweep.dir={folder}",
        *overrides,
    ]
    if jobs > 1:
        argv += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
    print("$", " ".join(argv[1:]), flush=True)
    if subprocess.run(argv, cwd=flows.ROOT).returncode != 0:
        raise SystemExit(f"the {branch} sweep failed (its output is above)")


def page(points: list[dict], png: Path) -> str:
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    fig = go.Figure()
    for branch in sorted({p["pipeline"] for p in points}):
        mine = sorted((p for p in points if p["pipeline"] == branch), key=lambda p: p["kl_to_sft"])
        fig.add_trace(
            go.Scatter(
                x=[p["kl_to_sft"] for p in mine],
                y=[p["reward"] for p in mine],
                error_y=dict(array=[p["reward_ci95"] or 0 for p in mine]),
                text=[f"beta={p['beta']}" for p in mine],
                mode="lines+markers+text",
                textposition="top center",
                name=branch,
            )
        )
    fig.update_layout(
        title="reward vs KL frontier", xaxis_title="KL to SFT per token", yaxis_title=points[0]["reward_name"]
    )
    rows = "".join(
        f"<tr><td>{p['pipeline']}</td><td>{p['beta']}</td><td>{p['kl_to_sft']:.3f}</td><td>{p['reward']:.3f}</td>"
        f"<td><a href='{html.escape(Path(p['report']).as_uri())}'>report</a></td></tr>"
        for p in points
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>alignflow frontier</title>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body style='font-family:sans-serif'>"
        f"<h1>Reward vs KL frontier</h1>{fig.to_html(full_html=False, include_plotlyjs=False, div_id='frontier')}"
        f"<p><img src='{png.name}' alt='frontier (PNG)'></p>"
        f"<table border=1><tr><th>branch</th><th>beta</th><th>KL/token</th><th>reward</th><th></th></tr>{rows}</table>"
        "</body></html>"
    )


def main(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ppo-betas", default="0.005,0.02,0.1")
    parser.add_argument("--dpo-betas", default="0.1,0.3,1.0")
    parser.add_argument("--jobs", type=int, default=2)
    args, overrides = parser.parse_known_args(argv)
    artifacts = next((o.split("=", 1)[1] for o in overrides if o.startswith("artifacts_dir=")), "artifacts")
    folder = Path(artifacts, "frontier", time.strftime("%Y%m%d-%H%M%S")).resolve()
    prefect_server.prestart()()  # one server for both sweeps (each would boot its own)
    for branch, betas in (("rlhf", args.ppo_betas), ("dpo", args.dpo_betas)):
        sweep(branch, betas, args.jobs, folder / branch, overrides)
    from flows.config import Config
    from flows.runner import set_up_tracking

    set_up_tracking(Config(artifacts_dir=artifacts))
    points = collect(folder / "rlhf", folder / "dpo")
    png = plot_frontier(points, folder / "frontier.png")
    (folder / "frontier.json").write_text(json.dumps(points, indent=2))
    (folder / "frontier.html").write_text(page(points, png), encoding="utf-8")
    for p in points:
        print(
            f"{p['pipeline']:<6} beta {p['beta']:<6} KL/token {p['kl_to_sft']:.3f}  "
            f"{p['reward_name']} {p['reward']:.3f}"
        )
    print(f"\nfrontier: {png}\nreport: {folder / 'frontier.html'}")
    return folder


if __name__ == "__main__":
    main(sys.argv[1:])
