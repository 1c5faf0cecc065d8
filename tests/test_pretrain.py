"""Continued pretraining (`stage.pretrain` on `data.pretrain`) before SFT: packing by hand, then the
flow on LLaMA-Factory's real C4 sample with GPT-2's real tokenizer and a model saved with
`save_pretrained`: SFT starts from the pretrained model, a rerun is cached, and new text in the same
file reruns pretrain and SFT."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED, build_tiny_model, need_shared

from stages.pretrain import pack

ROOT = Path(__file__).resolve().parents[1]


def test_documents_are_joined_with_eos_and_cut_into_full_blocks():
    assert pack([[1, 2, 3], [4], [5, 6]], eos=0, block=3) == [[1, 2, 3], [0, 4, 0], [5, 6, 0]]
    assert pack([[1, 2, 3], [4, 5]], eos=9, block=4) == [[1, 2, 3, 9]]  # the tail [4, 5, 9] is dropped
    assert pack([[1]], eos=9, block=4) == []


def _align(art: Path, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "flows.align", f"artifacts_dir={art}", *overrides]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(Path(done.stdout.rsplit("summary: ", 1)[1].strip()).read_text())


@pytest.mark.slow
def test_pretrain_on_c4_feeds_sft_is_cached_and_reruns_on_new_text(tmp_path):
    c4 = need_shared(SHARED / "data/llamafactory-demo/c4_demo.jsonl")
    text = tmp_path / "c4.jsonl"
    text.write_text("".join(c4.read_text().splitlines(keepends=True)[:60]))
    demos = tmp_path / "alpaca.json"
    demos.write_text(json.dumps(json.loads((SHARED / "data/llamafactory-demo/alpaca_en_demo.json").read_text())[:40]))
    model = build_tiny_model(tmp_path / "llama", "llama", context=64)
    args = [
        f"model.name_or_path={model}", "data=files", f"data.demonstrations.path={demos}", "data.comparisons=null",
        "+data/pretrain=c4_demo", f"data.pretrain.path={text}", "stage.pretrain.batch_size=4",
        "stage.sft.epochs=1", "stage.sft.batch_size=8", "pipeline.stop_after=sft",
    ]  # fmt: skip
    art = tmp_path / "art"
    first = _align(art, *args)
    pre, sft = first["stages"]["pretrain"], first["stages"]["sft"]
    assert pre["status"] == sft["status"] == "ran"
    m = pre["metrics"]
    assert m["pretrain/documents"] == 60 and m["pretrain/blocks"] * 64 == m["pretrain/tokens"] > 10_000
    assert m["pretrain/loss_last"] < m["pretrain/loss_first"]  # it learned from the text
    from flows.fingerprint import Fingerprints

    digest = Fingerprints(tmp_path / "fingerprints.json").digest
    assert sft["parents"]["base"] == digest(Path(pre["artifact"], "policy"))  # SFT read the pretrained model
    assert pre["parents"]["base"] == digest(Path(first["stages"]["prepare"]["artifact"], "base"))
    assert list(first["stages"]) == ["prepare", "pretrain", "sft"]

    again = _align(art, *args)
    assert {k: s["status"] for k, s in again["stages"].items()} == dict.fromkeys(
        ["prepare", "pretrain", "sft"], "cached"
    )

    with text.open("a") as f:  # new text in the same file: a document long enough to fill new blocks
        f.write(c4.read_text().splitlines(keepends=True)[60])
    third = _align(art, *args)
    statuses = {k: s["status"] for k, s in third["stages"].items()}
    # (text that only changed the dropped tail would give the same model, and SFT would stay cached)
    assert statuses == {"prepare": "cached", "pretrain": "ran", "sft": "ran"}
    assert third["stages"]["pretrain"]["metrics"]["pretrain/documents"] == 61
