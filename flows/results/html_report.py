"""`report.html`: one self-contained page per flow run, next to its `summary.json`, logged to MLflow.

It shows the evaluation line and verdict, the stage table, every stage's training curves (from each
stage's MLflow run, so a cached stage shows the curves of the run that computed it), reward, KL and
beta over PPO updates, the reward model's held-out accuracy by K, the score distributions of SFT and
the policy (gold, else the evaluation reward model, else the proxy reward model), and sample
generations side by side. Plotly draws the figures; its JavaScript is inlined once, so the file
opens anywhere without a network.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from flows.results import report
from flows.results.registry import describe

MAX_CURVES = 6  # per stage: the first metrics with more than one step
PPO_CURVES = ("ppo/objective/scores", "ppo/objective/kl", "ppo/objective/beta", "ppo/objective/rlhf_reward")
SCORES = (("gold", "gold score"), ("eval_rm", "evaluation reward model"), ("proxy_rm", "proxy reward model"))
SAMPLES = 8


def histories(run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Metric key -> [(step, value)] of one MLflow run (empty without a run or tracking)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not run_id:
        return {}
    client = MlflowClient()
    try:
        keys = list(client.get_run(run_id).data.metrics)
    except MlflowException:
        return {}
    out = {}
    for key in sorted(keys, key=_curve_order):
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        if len({p[0] for p in points}) > 1:  # a curve: more than one step
            out[key] = points
    return out


def _curve_order(key: str) -> tuple[int, str]:
    """Losses first, then accuracies and rewards, then the rest."""
    for rank, word in enumerate(("loss", "accuracy", "reward", "score", "kl")):
        if word in key:
            return rank, key
    return 9, key


def _curves(title: str, series: dict[str, list[tuple[int, float]]], x_title: str) -> go.Figure:
    cols = min(3, len(series))
    rows = -(-len(series) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[k.split("/", 1)[-1] for k in series])
    for i, (key, points) in enumerate(series.items()):
        row, col = i // cols + 1, i % cols + 1
        trace = go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], name=key, mode="lines+markers")
        fig.add_trace(trace, row, col)
        fig.update_xaxes(title_text=x_title, row=row, col=col)
    fig.update_layout(title=title, showlegend=False, height=300 * rows + 40, margin=dict(t=80, b=40))
    return fig


def stage_figures(summary: dict[str, Any]) -> list[go.Figure]:
    figs = []
    for name, s in summary["stages"].items():
        series = histories(s.get("run_id", ""))
        if s["stage"] == "ppo":
            ppo = {k: series[k] for k in PPO_CURVES if k in series}
            if ppo:
                figs.append(_curves(f"{name}: reward, KL and beta over PPO updates", ppo, "update"))
            series = {k: v for k, v in series.items() if k not in ppo}
        shown = dict(list(series.items())[:MAX_CURVES])
        if shown:
            figs.append(_curves(f"{name}: training curves", shown, "step"))
    return figs


def rm_by_k(summary: dict[str, Any]) -> go.Figure | None:
    bars = {
        k.rsplit("_", 1)[1]: v
        for s in summary["stages"].values()
        if s["stage"] == "reward_model"
        for k, v in s["metrics"].items()
        if k.startswith("rm/eval/accuracy_")
    }
    if not bars:
        return None
    fig = go.Figure(go.Bar(x=list(bars), y=list(bars.values()), text=[f"{v:.3f}" for v in bars.values()]))
    fig.update_layout(title="reward model: held-out pairwise accuracy by K", yaxis_range=[0, 1], height=320)
    return fig


def overoptimisation(summary: dict[str, Any]) -> go.Figure | None:
    """PPO's watch (`stage.ppo.watch_every`): the proxy reward model and the independent judge on
    held-out prompts against KL to the reference (Gao et al. 2022), the published point marked."""
    ppo = next((s for s in summary["stages"].values() if s["stage"] == "ppo"), None)
    path = Path(ppo["artifact"], "watch.json") if ppo else None
    if path is None or not path.exists():
        return None
    watch = json.loads(path.read_text())
    points = watch["points"]
    kl = [p["kl_per_token"] for p in points]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    labels = [f"update {int(p['update'])}" for p in points]
    for key, name, right in (("proxy", "proxy reward model", False), ("judge", "independent judge", True)):
        trace = go.Scatter(x=kl, y=[p[key] for p in points], name=name, text=labels, mode="lines+markers")
        fig.add_trace(trace, secondary_y=right)
    best = next((p for p in points if int(p["update"]) == watch["published_update"]), None)
    if best is not None:
        fig.add_trace(
            go.Scatter(x=[best["kl_per_token"]], y=[best["judge"]], mode="markers", marker_size=14, name="published"),
            secondary_y=True,
        )
    note = (watch.get("overoptimised") or {}).get("note", "no point where the proxy rose while the judge fell")
    fig.update_layout(title=f"PPO over-optimisation: proxy and judge against KL<br><sup>{note}</sup>", height=380)
    fig.update_xaxes(title_text="KL to the reference per token")
    return fig


def generations(summary: dict[str, Any]) -> list[dict[str, Any]]:
    ev = summary["stages"].get("evaluate")
    path = Path(ev["artifact"], "generations.jsonl") if ev else None
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score_distribution(rows: list[dict[str, Any]]) -> go.Figure | None:
    for prefix, label in SCORES:
        if rows and f"{prefix}_sft" in rows[0]:
            fig = go.Figure()
            for side in ("sft", "policy"):
                fig.add_trace(go.Histogram(x=[r[f"{prefix}_{side}"] for r in rows], name=side, opacity=0.6))
            fig.update_layout(
                title=f"{label}: SFT against the aligned policy on the evaluation prompts",
                barmode="overlay",
                xaxis_title=label,
                height=340,
            )
            return fig
    return None


def samples_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>No generations.</p>"
    head = "<tr><th>prompt</th><th>SFT</th><th>aligned policy</th></tr>"
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r[k]))}</td>" for k in ("prompt", "sft", "policy")) + "</tr>"
        for r in rows[:SAMPLES]
    )
    return f"<table class='samples'>{head}{body}</table>"


def write(summary: dict[str, Any], path: Path) -> Path:
    """Write the page (to a temporary name, then renamed) and return its path."""
    rows = generations(summary)
    figs = stage_figures(summary)
    figs += [f for f in (overoptimisation(summary), rm_by_k(summary), score_distribution(rows)) if f is not None]
    parts = [f.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig{i}") for i, f in enumerate(figs)]
    eval_line = report.eval_line(summary["eval"]) if "eval" in summary else "no evaluation (pipeline.stop_after)"
    verdict = summary["verdict"]
    registry = summary.get("registry")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>alignflow: {html.escape(summary["pipeline"])} run</title>
<script type="text/javascript">{get_plotlyjs()}</script>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} pre{{background:#f4f4f4;padding:1em}}
table.samples{{border-collapse:collapse}} table.samples td,table.samples th{{border:1px solid #ccc;padding:.4em;
vertical-align:top;max-width:360px}}</style></head><body>
<h1>alignflow: {html.escape(summary["pipeline"])}</h1>
<p>MLflow run <code>{html.escape(summary["mlflow_run_id"])}</code></p>
<h2>Evaluation</h2><pre>{html.escape(eval_line)}</pre>
<p>verdict: <b>{html.escape(verdict["status"])}</b> {html.escape("; ".join(verdict["reasons"]))}</p>
{f"<p>{html.escape(describe(registry))}</p>" if registry else ""}
<h2>Stages</h2><pre>{html.escape(report.table(summary["stages"]))}</pre>
<h2>Curves and scores</h2>
{"".join(parts)}
<h2>Sample generations</h2>
{samples_table(rows)}
</body></html>
"""
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
