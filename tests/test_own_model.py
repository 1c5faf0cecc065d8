"""Bring your own model and data: the rlhf pipeline on small Llama- and GPT-2-architecture models
with GPT-2's real tokenizer, loaded by path, on real rows from ../shared/data. The prompts come
from the data, and with no gold rule the evaluation reports an evaluation reward model's figures."""

import gzip
import json
from pathlib import Path

import pytest
from conftest import SHARED, build_tiny_model, need_shared

from stages.preference.validity import validity
from stages.settings.recipe import EvaluateConfig
from tests.test_flow import align

ROOT = Path(__file__).resolve().parents[1]


def _run(artifacts: Path, *overrides: str):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "flows.align", f"artifacts_dir={artifacts}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)


SMALL = [
    "stage.sft.epochs=1",
    "stage.sft.batch_size=8",
    "stage.sft.max_length=64",
    "stage.reward_model.epochs=2",
    "stage.reward_model.max_length=64",
    "stage.ppo.updates=2",
    "stage.ppo.rollouts_per_update=8",
    "stage.ppo.minibatch_size=4",
    "stage.ppo.max_new_tokens=12",
    "stage.evaluate.max_new_tokens=12",
    "stage.evaluate.batch_size=16",
]


def _real_rows(tmp_path: Path, source: Path, n: int) -> Path:
    need_shared(source)
    if source.suffix == ".gz":
        rows = [json.loads(line) for line in gzip.open(source, "rt")][:n]
    else:
        rows = json.loads(source.read_text())[:n]
    path = tmp_path / (source.name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json") + ".jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prompt_texts(prompt) -> str:
    return prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rlhf_on_a_model_by_path_on_real_data(arch, tmp_path):
    model = build_tiny_model(tmp_path / arch, arch, context=128)
    if arch == "llama":  # HH-RLHF pairs alone: SFT imitates the chosen replies
        pairs = _real_rows(tmp_path, SHARED / "data/hh-rlhf/harmless-base_test.jsonl.gz", 50)
        data = ["data=hh_rlhf_pairs", f"data.comparisons.path={pairs}", "data.comparisons.format=auto"]
    else:  # Alpaca demonstrations and ShareGPT preference pairs
        demos = _real_rows(tmp_path, SHARED / "data/llamafactory-demo/alpaca_en_demo.json", 40)
        pairs = _real_rows(tmp_path, SHARED / "data/llamafactory-demo/dpo_en_demo.json", 50)
        data = ["data=files", f"data.demonstrations.path={demos}", f"data.comparisons.path={pairs}"]
    if arch == "llama":  # a first run with the defaults: never stopped by dropped rows, only by a named gate
        first = _run(tmp_path / "artifacts", f"model.name_or_path={model}", *data, *SMALL)
        assert "rows cut to the token limits: " in first.stdout and "LengthError" not in first.stderr, first.stderr
    # on to the end (the cached stages reused): the figures below exist, whatever the gates would say
    summary = align(tmp_path / "artifacts", f"model.name_or_path={model}", *data, *SMALL, "pipeline.min_rm_accuracy=0")
    if arch == "llama":  # the first run stopped exactly when its reward model's accuracy CI is under the gate
        rm = summary["stages"]["reward_model"]
        assert rm["status"] == "cached"
        n = int(rm["metrics"]["rm/eval/pairs"])
        gate = validity("reward model", rm["metrics"]["rm/eval/accuracy"] * n, n, bound=0.55, key="")
        if gate["valid"]:
            assert first.returncode == 0, first.stderr[-3000:]
        else:
            assert first.returncode == 1 and "VERDICT: stopped" in first.stdout, first.stderr[-3000:]
            assert "does not clear pipeline.min_rm_accuracy=0.55" in first.stdout

    assert set(summary["stages"]) == {
        "prepare", "sft", "comparisons", "reward_model", "ppo", "eval_reward_model", "evaluate",
    }  # fmt: skip
    e = summary["eval"]
    assert e["gold_sft"] is None and e["gold_policy"] is None and e["labeler_ceiling"] is None  # no gold rule
    assert e["win"]["by"] == "evaluation reward model" and 0 <= e["win"]["rate"] <= 1 and e["win"]["ci95"] >= 0
    assert e["win_rate"] == e["win"]["rate"]
    assert set(e["eval_rm"]) == {"sft", "policy"} and "proxy" in e["proxy_rm"]["note"]
    assert 0 <= e["rm_accuracy"] <= 1 and isinstance(e["kl_to_sft"], float)  # k1 estimate: can dip below 0
    assert {"length", "eos_rate", "repetition", "empty_share", "top_response_share"} <= set(e["policy"])
    verdict = e["verdict"]
    assert (verdict["status"] == "ok") == (not verdict["reasons"])  # a verdict other than ok says why
    if e["kl_to_sft"] > EvaluateConfig().max_kl_per_token:
        assert verdict["status"] == "flagged"
    judge = e["win"]["judge"]  # the evaluation reward model's own held-out accuracy, with its CI
    assert judge["pairs"] > 0 and judge["ci95"][0] <= judge["accuracy"] <= judge["ci95"][1]
    assert (e["verdict"]["status"] == "inconclusive") == (not judge["valid"] and e["verdict"]["status"] != "flagged")

    # the prompts came from the user's data, never the synthetic generator, and the run says so
    assert summary["data"]["gold"] is None
    assert all(str(pairs) in where for where in summary["data"]["prompt_source"].values())
    assert e["prompts"]["source"] == f"{pairs}: held-out split"
    data_text = pairs.read_text()
    generations = Path(summary["stages"]["evaluate"]["artifact"], "generations.jsonl").read_text().splitlines()
    for row in map(json.loads, generations):
        last = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
        assert json.dumps(last)[1:-1][:40] in data_text
    # GPT-2's tokenizer has no chat template: the default one, its markers added as tokens
    assert "added tokens ['<|user|>', '<|assistant|>']" in summary["data"]["chat_template"]
    assert {"sft/data/truncated", "sft/data/dropped"} <= set(summary["stages"]["sft"]["metrics"])
    assert all(s["peak_rss_mb"] is None or s["peak_rss_mb"] > 0 for s in summary["stages"].values())

    if arch == "llama":  # the DPO branch on the same model and data: shared stages cached, same judge
        dpo = align(tmp_path / "artifacts", f"model.name_or_path={model}", *data, *SMALL, "pipeline=dpo")
        ran = {name for name, s in dpo["stages"].items() if s["status"] == "ran"}
        assert ran == {"dpo", "evaluate"}
        assert dpo["eval"]["win"]["by"] == "evaluation reward model" and dpo["eval"]["proxy_rm"] is None
        assert 0 <= dpo["eval"]["rm_accuracy"] <= 1  # DPO's implicit reward on the held-out pairs
