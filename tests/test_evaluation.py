"""Evaluation a user can trust: judges shown valid before their verdict counts, degenerate outputs
named, over-optimisation watched, the length-controlled win rate, scoring within the context."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.preference.validity import length_controlled, validity, wilson

ROOT = Path(__file__).resolve().parents[1]
TINY = ["+experiment=tiny"]


# ---- the statistics, by hand --------------------------------------------------------------------------
def test_wilson_interval_by_hand():
    lo, hi = wilson(50, 100)  # p = 0.5, n = 100, z = 1.96: centre 0.5, half-width 1.96*sqrt(.25/100+.96/40000)/1.0384
    half = 1.96 * math.sqrt(0.25 / 100 + 1.96**2 / (4 * 100**2)) / (1 + 1.96**2 / 100)
    assert lo == pytest.approx(0.5 - half) and hi == pytest.approx(0.5 + half)
    assert wilson(0, 0) == (0.0, 1.0)


def test_a_judge_at_chance_is_not_evidence_and_a_good_one_is():
    # the HH-RLHF run's evaluation reward model: 0.511 on 231 held-out pairs
    bad = validity("evaluation reward model", 118, 231, bound=0.55, key="evaluate.min_judge_accuracy")
    assert not bad["valid"] and bad["ci95"][0] < 0.5 < bad["ci95"][1]
    assert "0.511 (95% CI 0.447-0.575, 231 pairs) does not clear evaluate.min_judge_accuracy=0.55" in bad["reason"]
    good = validity("gold", 0.85 * 1200, 1200, bound=0.55, key="k")
    assert good["valid"] and good["ci95"][0] > 0.82
    assert not validity("none", 0, 0, bound=0.55, key="k")["valid"]


def test_length_controlled_win_rate_removes_a_judges_length_preference():
    """A judge that picks the longer answer: the raw rate follows length, the controlled one is near half."""
    import random

    rng = random.Random(0)
    pol = [rng.gauss(20, 5) for _ in range(400)]
    sft = [rng.gauss(10, 5) for _ in range(400)]
    wins = [float(p > s) for p, s in zip(pol, sft)]
    assert sum(wins) / len(wins) > 0.9
    assert abs(length_controlled(wins, pol, sft) - 0.5) < 0.1
    same = [rng.gauss(10, 5) for _ in range(400)]  # equal lengths: the controlled rate is the raw one
    fair = [float(rng.random() < 0.7) for _ in range(400)]
    assert length_controlled(fair, same, sft) == pytest.approx(sum(fair) / 400, abs=0.03)


def test_degenerate_shares_and_reasons_by_hand():
    from stages.runtime.diagnostics import degenerate, degenerate_reasons

    prompts = ["describe the garden", "write about the sea", "tell me a story", "say hi"]
    figures = degenerate(prompts, ["", "", "tell me", "ok"])  # two empty, one repeats its prompt's start
    assert figures == {"empty_share": 0.5, "prompt_copy_share": 0.25, "top_response_share": 0.25}
    reasons = degenerate_reasons({**figures, "length": 2.0}, {"length": 8.0}, {"max_empty_share": 0.05,
                                 "min_length_ratio": 0.5}, "evaluate")  # fmt: skip
    assert reasons == [
        "50% of responses are empty; bound 5% (evaluate.max_empty_share)",
        "mean response length fell to 0.25x SFT's (2.0 vs 8.0 tokens); bound 0.5x (evaluate.min_length_ratio)",
    ]


# ---- models made for the tests ------------------------------------------------------------------------
def _flat_reward_model(base: Path, out: Path) -> tuple[Path, Path]:
    """A reward model that cannot tell any two responses apart: its head is zero (every pair ties)."""
    from stages.models.modeling import load_scalar_model, load_tokenizer

    model = load_scalar_model(base)
    with torch.no_grad():
        model.score.weight.zero_()
    model.save_pretrained(out / "model")
    load_tokenizer(base).save_pretrained(out / "model")
    (out / "normalization.json").write_text(json.dumps({"bias": 0.0, "pooling": "last"}))
    return out / "model", out / "normalization.json"


def _silent_policy(base: Path, prompts: list[str], out: Path) -> Path:
    """A policy that answers every prompt with EOS at once: the base fine-tuned on empty answers."""
    from stages.data.tokens import render
    from stages.models.modeling import lm_loss, load_causal_lm, load_tokenizer

    tokenizer, model = load_tokenizer(base), load_causal_lm(base, device="cpu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    texts = [render(tokenizer, p) for p in prompts]
    for step in range(60):
        opt.zero_grad()
        lm_loss(model, tokenizer, texts[(step * 16) % len(texts) :][:16]).backward()
        opt.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _prompts(prep) -> list[str]:
    from stages.runtime.manifest import read_jsonl

    return [r["prompt"] for r in read_jsonl(prep.file("comparison_prompts"))]


# ---- acceptance --------------------------------------------------------------------------------------
def test_a_judge_at_chance_makes_the_verdict_inconclusive_and_the_registry_does_not_promote(
    tiny_prepare, tiny_comparisons, tmp_path
):
    from flows.config import RegistryConfig
    from flows.results.registry import decide
    from stages import evaluate

    base = tiny_prepare.file("base")
    rm, norm = _flat_reward_model(base, tmp_path / "rm")
    manifest = evaluate.run(
        evaluate.EvaluateConfig(max_new_tokens=8, max_empty_share=1.0),  # the judge alone decides here
        sft_policy=base,
        policy=base,
        prompts=tiny_prepare.file("eval_prompts"),
        target_len=6,
        gold=None,  # your own data: no gold rule, so the evaluation reward model judges
        eval_reward_model=rm,
        eval_normalization=norm,
        heldout_comparisons=tiny_comparisons.file("heldout_comparisons"),
        out_dir=tmp_path / "eval",
    )
    ev = json.loads(manifest.file("eval").read_text())
    judge = ev["win"]["judge"]
    assert ev["win"]["by"] == "evaluation reward model"
    assert judge["accuracy"] == 0.5 and judge["pairs"] > 0 and judge["ci95"][0] < 0.5 < judge["ci95"][1]
    assert ev["verdict"]["status"] == "inconclusive", ev["verdict"]
    assert (
        "the win rate is not evidence: evaluation reward model: held-out accuracy 0.500" in ev["verdict"]["reasons"][-1]
    )
    assert manifest.metrics["eval/inconclusive"] == 1.0 and manifest.metrics["eval/judge_accuracy"] == 0.5
    promoted, why = decide(ev["win_rate"], ev["kl_to_sft"], None, RegistryConfig(metric="win_rate"), ev["verdict"])
    assert not promoted and why.startswith("the run's verdict is inconclusive")


def test_a_mostly_empty_policy_is_named_and_ppo_stops_early_when_asked(tiny_prepare, tmp_path):
    from stages import evaluate, ppo
    from stages.settings.models import PeftConfig, Tuning

    base = tiny_prepare.file("base")
    silent = _silent_policy(base, _prompts(tiny_prepare), tmp_path / "silent")
    manifest = evaluate.run(
        evaluate.EvaluateConfig(max_new_tokens=8),
        sft_policy=base,
        policy=silent,
        prompts=tiny_prepare.file("eval_prompts"),
        target_len=6,
        out_dir=tmp_path / "eval",
    )
    ev = json.loads(manifest.file("eval").read_text())
    assert ev["policy"]["empty_share"] > 0.5 > ev["sft"]["empty_share"]
    assert ev["verdict"]["status"] == "flagged"
    assert any(
        r.endswith("of responses are empty; bound 5% (evaluate.max_empty_share)") for r in ev["verdict"]["reasons"]
    )
    rm, norm = _flat_reward_model(base, tmp_path / "rm")
    cfg = ppo.PpoConfig(updates=4, rollouts_per_update=16, minibatch_size=8, max_new_tokens=8, stop_on_degenerate=True)
    out = ppo.run(
        cfg, Tuning(peft=PeftConfig(method="full")), policy=silent, prompts=tiny_prepare.file("ppo_prompts"),
        reward_model=rm, normalization=norm, out_dir=tmp_path / "ppo",
    )  # fmt: skip
    assert out.metrics["ppo/stopped_early"] == 1.0 and out.metrics["ppo/history_length"] == 1.0
    verdict = json.loads(out.file("verdict").read_text())
    assert verdict["status"] == "flagged"
    assert verdict["reasons"][-1].startswith("stopped early after update 1 of 4: ")
    assert "of responses are empty; bound 50% (stage.ppo.max_empty_share)" in verdict["reasons"][-1]


def test_dpo_implicit_reward_keeps_rows_within_a_learned_position_context(tmp_path):
    """GPT-2 has learned position embeddings: a row past its context has no position to embed."""
    from conftest import build_tiny_model

    from stages.data.tokens import Budget, ensure_chat_template
    from stages.evaluate import _dpo_accuracy
    from stages.models.modeling import load_causal_lm, load_tokenizer

    folder = build_tiny_model(tmp_path / "gpt2", "gpt2", context=64)
    tokenizer = load_tokenizer(folder)
    ensure_chat_template(tokenizer)
    model = load_causal_lm(folder, device="cpu")
    model.resize_token_embeddings(len(tokenizer))
    long = " ".join(["the garden is lovely and the sea is calm"] * 12)  # ~120 tokens: past 64 positions
    held = [{"prompt": long, "responses": ["a fine answer", "bad"], "ranks": [0, 1], "finished": [True, True]}] * 3
    accuracy = _dpo_accuracy(model, model, tokenizer, held, Budget(48, 64))
    assert accuracy == 0.5  # the same model as its reference: every margin is zero, a tie
    with pytest.raises(IndexError):  # uncut, the same rows index past GPT-2's position table
        _dpo_accuracy(model, model, tokenizer, held, Budget(10_000, 10_000))


# ---- through the flow --------------------------------------------------------------------------------
def _flow(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flows.align", f"artifacts_dir={tmp_path}", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_to_rm(tmp_path_factory):
    """The tiny recipe up to its reward model (0.583 held-out accuracy on 96 pairs: near chance), whose
    artifacts the tests below reuse from the cache."""
    art = tmp_path_factory.mktemp("tiny")
    done = _flow(art, *TINY, "pipeline.stop_after=reward_model")
    assert done.returncode == 0, done.stderr[-3000:]
    return art


@pytest.mark.slow
def test_a_reward_model_at_chance_stops_the_pipeline_before_ppo(tiny_to_rm):
    done = _flow(tiny_to_rm, *TINY, "pipeline.min_rm_accuracy=0.55")  # the default gate (tiny turns it off)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "VERDICT: stopped" in done.stdout
    assert "reward model: held-out accuracy 0.583 (95% CI 0.483-0.677, 96 pairs) does not clear " in done.stdout
    assert "pipeline.min_rm_accuracy=0.55" in done.stdout and "set pipeline.min_rm_accuracy=0 to go on" in done.stdout
    assert not (tiny_to_rm / "ppo").exists()  # PPO spent nothing
    summary = json.loads(Path(done.stdout.split("summary: ")[-1].strip()).read_text())
    assert summary["verdict"]["status"] == "stopped" and "registry" not in summary


@pytest.mark.slow
def test_judge_peak_publishes_the_judges_best_checkpoint_and_the_report_shows_the_curves(tiny_to_rm):
    import mlflow

    args = ["stage.ppo.updates=4", "stage.ppo.watch_every=1", "stage.ppo.select=judge_peak", "pipeline.stop_after=ppo"]
    done = _flow(tiny_to_rm, *TINY, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(Path(done.stdout.split("summary: ")[-1].strip()).read_text())
    stage = summary["stages"]["ppo"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tiny_to_rm}/mlflow.db")
    curve = sorted((m.step, m.value) for m in client.get_metric_history(stage["run_id"], "ppo/watch/judge"))
    assert [s for s, _ in curve] == [0, 1, 2, 3, 4]  # the SFT policy's point, then every update
    best = max(curve, key=lambda p: p[1])[0]
    assert stage["metrics"]["ppo/published_update"] == best == stage["metrics"]["ppo/watch/best_update"]
    watch = json.loads(Path(stage["artifact"], "watch.json").read_text())
    assert watch["published_update"] == best and len(watch["points"]) == 5
    assert [p["kl_per_token"] for p in watch["points"]][0] == 0.0  # the SFT policy against itself
    page = Path(summary["report_path"]).read_text()
    assert "PPO over-optimisation: proxy and judge against KL" in page
    assert (Path(stage["artifact"]) / "policy_last").exists()  # the last iterate beside the published one
