"""The lent GPU machine's software, checked on every `make test`: the GPU check's CPU path runs in the
image's view of this environment (a `sys.meta_path` finder refuses every package that neither the image
nor `make gpu-wheels` provides: MLflow, Prefect, Hydra, DeepSpeed, bitsandbytes, vLLM, FastAPI, ...), and
every linear, matmul and attention of every stage computes in bf16 under `compute.precision=bf16`."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from bench import gpu_image
from stages.settings.recipe import CRITIC_FREE, OWN_LOSSES


def as_image(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "ALIGNFLOW_PROGRESS": "0"}
    return subprocess.run(
        [sys.executable, "-S", "-m", "bench.gpu_image", "as-image", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def image_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "report.json"
    proc = as_image("bench.gpu_check", "--device", "cpu", "--quick", "--skip-timings", "--out", str(out))
    report = json.loads(out.read_text()) if out.exists() else {}
    return proc, report


def test_the_gpu_checks_cpu_path_runs_with_only_what_the_gpu_image_has(image_check):
    proc, report = image_check
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    branches = report["branches"]
    assert branches["ok"] and not branches["failed"], branches["failed"]
    ran = set(branches["ran"])
    want = {"prepare", "sft", "comparisons", "reward_model", "ppo", "evaluate", "ppo_shared_base", "rlvr"}
    want |= {"ppo_dapo", "ppo_gspo"}
    want |= {f"ppo_{e}" for e in CRITIC_FREE} | {f"dpo_{loss}" for loss in OWN_LOSSES} | {"dpo_sigmoid"}
    want |= {"best_of_n", "judge", "comparisons_ai", "reward_model_ai", "ppo_rlaif", "ppo_rlaif_direct"}
    want |= {"serve_engine", "qlora_torchao_int8"}
    assert want <= ran, want - ran
    skipped = branches["skipped"]
    assert "deepspeed not installed" in skipped["zero3_lora"]  # absent on the image: skipped with the reason
    assert "bitsandbytes not installed" in skipped["qlora_bitsandbytes_nf4"]
    imported = [line for line in proc.stderr.splitlines() if line.startswith("image view: imported absent")]
    assert imported == ["image view: imported absent: nothing"], imported


def test_every_linear_matmul_and_attention_of_every_stage_computes_in_bf16(image_check):
    _, report = image_check
    branches = report["branches"]
    assert branches["off_dtype"] == {}, branches["off_dtype"]
    assert branches["off_device"] == [], branches["off_device"]
    for stage in branches["ran"]:  # the watch saw each stage's products, and they were bf16
        assert branches["dtypes"][stage].get("torch.bfloat16", 0) > 0, (stage, branches["dtypes"][stage])


def test_the_image_view_refuses_what_the_image_lacks():
    """The view can fail a run: the flow itself needs Hydra, which the GPU image does not have."""
    proc = as_image("flows.align", "--help", timeout=120)
    assert proc.returncode != 0
    assert "ModuleNotFoundError: No module named 'hydra'" in proc.stderr or "No module named 'omegaconf'" in proc.stderr


def test_what_travels_fits_one_device_call_and_names_the_image():
    assert set(gpu_image.ABSENT) & set(gpu_image.CARRIED) == set()
    assert {"mlflow", "prefect", "hydra", "deepspeed", "bitsandbytes", "vllm"} <= set(gpu_image.ABSENT)
    allowed = gpu_image.top_level_modules(gpu_image.allowed_distributions())
    assert {"torch", "transformers", "peft", "trl", "datasets", "vaderSentiment"} <= allowed
    assert not allowed & set(gpu_image.ABSENT)
