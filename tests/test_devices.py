"""One device decision (`compute.device`), the device guard, and what a GPU run gets from this machine."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import refusal_in_process

from stages.models import compute
from stages.models.compute import check, pick_device, resolve_device
from stages.runtime.device_guard import STAGES, DeviceGuardError, guard, maybe_guard
from stages.settings.models import ComputeConfig

ROOT = Path(__file__).resolve().parents[1]


# ---- the device decision ---------------------------------------------------------------------------
def test_auto_is_the_cpu_without_a_gpu_and_each_ranks_own_gpu_with_them(monkeypatch):
    assert pick_device("auto", gpus=0) == torch.device("cpu")
    assert pick_device("cpu", gpus=8) == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "3")  # under torchrun, rank 3 of a node
    assert pick_device("auto", gpus=8) == torch.device("cuda", 3)
    assert pick_device("cuda", gpus=8) == torch.device("cuda", 3)
    assert pick_device("cuda:1", gpus=8) == torch.device("cuda", 1)  # named: itself, whatever the rank
    assert resolve_device(ComputeConfig(device="cpu")) == torch.device("cpu")


@pytest.mark.parametrize(
    ("device", "gpus", "message"),
    [
        ("cuda", 0, "compute.device=cuda: this machine has no CUDA device"),
        ("cuda:0", 0, "compute.device=cuda:0: this machine has no CUDA device"),
        ("cuda:3", 1, r"compute.device=cuda:3: this machine has 1 CUDA device\(s\) \(cuda:0..cuda:0\)"),
    ],
)
def test_a_device_this_machine_lacks_is_refused_naming_the_key(device, gpus, message):
    with pytest.raises(ValueError, match=message):
        compute.check_device(device, gpus=gpus)


def test_a_device_name_that_is_no_device_is_refused_at_composition():
    with pytest.raises(ValueError, match="compute.device: 'gpu' is not auto, cpu, cuda or cuda:N"):
        ComputeConfig(device="gpu")
    check(ComputeConfig(device="cpu"))  # this machine's own
    check(ComputeConfig(device="auto"))


@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_the_command_line_refuses_a_missing_device_before_any_compute(tmp_path, device):
    if torch.cuda.device_count() > 3:
        pytest.skip("this machine has the devices")
    args = ["+experiment=tiny", f"artifacts_dir={tmp_path}", f"compute.device={device}"]
    if device == "cuda:3":  # in this process: the same checks; the console is checked once, for cuda
        assert refusal_in_process(*args).startswith(f"error: compute.device={device}: this machine has")
        assert not (tmp_path / "prepare").exists()
        return
    done = subprocess.run(
        [sys.executable, "-m", "flows.align", *args],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"error: compute.device={device}: this machine has" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "prepare").exists()  # refused before any stage ran


# ---- DeepSpeed's accelerator ------------------------------------------------------------------------
def test_ds_accelerator_is_set_for_cpu_runs_only_and_a_users_value_is_kept():
    from flows.launch.launch import device_of, rank_env
    from stages.settings.models import Tuning

    cpu = rank_env({"PATH": "/bin"}, 4, "cpu")
    assert cpu["DS_ACCELERATOR"] == "cpu" and cpu["OMP_NUM_THREADS"] == "4"
    assert "DS_ACCELERATOR" not in rank_env({"PATH": "/bin"}, 1, "cuda")  # DeepSpeed picks CUDA itself
    assert rank_env({"DS_ACCELERATOR": "xpu"}, 1, "cpu")["DS_ACCELERATOR"] == "xpu"
    assert device_of(("stage config", Tuning(compute=ComputeConfig(device="cuda:1")))) == "cuda:1"
    # this machine has no GPU: auto is the CPU, so its ranks get the CPU accelerator
    assert rank_env({}, 1, device_of((Tuning(),)))["DS_ACCELERATOR"] == "cpu"


def test_importing_the_flows_no_longer_forces_the_cpu_accelerator():
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = subprocess.run(
        [sys.executable, "-c", "import flows, os; print(os.environ.get('DS_ACCELERATOR'))"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "None"


# ---- the device guard -------------------------------------------------------------------------------
FAKE_STAGE = """
    import torch


    def run(x):
        placed = torch.ones(2, device=x.device)  # fine: on the device of what it feeds
        stray = torch.zeros(2)  # line 6: on the host, whatever device x is on
        return x[:2] + placed + stray
"""


def _fake_stage(folder: Path):
    import importlib.util

    path = folder / "fake_stage.py"
    path.write_text(textwrap.dedent(FAKE_STAGE).lstrip())
    spec = importlib.util.spec_from_file_location(f"fake_stage_{folder.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_guard_names_a_device_less_factory_call_inside_a_stage(tmp_path):
    stage = _fake_stage(tmp_path)
    with pytest.raises(DeviceGuardError) as err:
        with guard("fake_stage", roots=(tmp_path,)):
            stage.run(torch.arange(4.0, device="cpu"))
    message = str(err.value)
    assert f"{tmp_path / 'fake_stage.py'}:6: factory without device: torch.zeros" in message
    assert "found 1 device mistake" in message  # the placed one is fine, the library's own calls are not ours


def test_the_guard_names_ops_that_mix_devices():
    a, b = torch.zeros(2, device="cpu"), torch.zeros(2, device="meta")
    with pytest.raises(DeviceGuardError, match=r"mixed devices: .*add on cpu, meta"):
        with guard("mixed"):
            try:
                a + b
            except (RuntimeError, NotImplementedError):
                pass  # torch may refuse it too; the guard has recorded it either way
    with guard("a 0-dim host scalar is fine"):
        b * torch.tensor(2.0, device="cpu")


def test_the_flows_guard_stages_only_when_asked(monkeypatch):
    from stages.runtime.device_guard import DeviceGuard

    monkeypatch.delenv("ALIGNFLOW_DEVICE_GUARD", raising=False)
    with maybe_guard("off") as off:
        assert off is None
    monkeypatch.setenv("ALIGNFLOW_DEVICE_GUARD", "1")
    with maybe_guard("on") as on:
        assert isinstance(on, DeviceGuard) and on.roots == (str(STAGES),)


def test_the_test_suite_runs_every_stage_under_the_guard():
    """The environment every flow of the suite inherits (conftest) turns the guard on: code under stages/
    that makes a tensor without `device=` fails the stage it runs in."""
    from stages.runtime import device_guard

    unguarded = compile("torch.zeros(2)", str(STAGES / "a_stage.py"), "exec")
    with pytest.raises(DeviceGuardError, match="a_stage.py"):
        with device_guard.maybe_guard("a stage"):
            exec(unguarded, {"torch": torch})


# ---- rollouts -----------------------------------------------------------------------------------------
def _tiny_folder(tmp_path) -> Path:
    """A tiny Llama with GPT-2's tokenizer and our chat template (its role markers in the vocabulary)."""
    from conftest import build_tiny_model

    from stages.data.tokens import ensure_chat_template
    from stages.models.modeling import load_causal_lm, load_tokenizer

    folder = build_tiny_model(tmp_path / "raw", "llama")
    tokenizer = load_tokenizer(folder)
    ensure_chat_template(tokenizer)
    model = load_causal_lm(folder, device="cpu")
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    return tmp_path / "policy"


def _tiny_policy(tmp_path):
    from stages.models.modeling import load_causal_lm, load_tokenizer

    folder = _tiny_folder(tmp_path)
    return load_tokenizer(folder), load_causal_lm(folder, device="cpu")


def test_length_sorted_batches_give_each_prompt_the_response_one_call_gives(tmp_path):
    """Greedy decoding: sampling in length-sorted batches of 2 and putting the rows back in order
    gives every prompt the same response as one generate call over all of them."""
    from stages.models.modeling import decode_responses
    from stages.rl.rollout import HfRollout

    tokenizer, policy = _tiny_policy(tmp_path)
    prompts = ["a b c d e f g h", "hello", "one two three", "x", "the garden is lovely today"]
    kw = {"max_new_tokens": 6, "temperature": 1e-6}
    whole = HfRollout(policy).sample(tokenizer, prompts, **kw)
    batched = HfRollout(policy, batch_size=2).sample(tokenizer, prompts, **kw)
    assert decode_responses(tokenizer, batched) == decode_responses(tokenizer, whole)
    assert batched.query.shape == whole.query.shape  # left-padded to the longest prompt again
    assert torch.equal(batched.query_mask.sum(1), whole.query_mask.sum(1))
    assert torch.equal(batched.finished, whole.finished)


def test_a_static_cache_samples_what_the_dynamic_cache_samples(tmp_path):
    from stages.models.modeling import sample

    tokenizer, policy = _tiny_policy(tmp_path)
    prompts = ["hello there", "one two three four"]
    kw = {"max_new_tokens": 5, "temperature": 1e-6}
    dynamic = sample(policy, tokenizer, prompts, **kw)
    static = sample(policy, tokenizer, prompts, static_cache=True, **kw)
    assert torch.equal(static.response, dynamic.response)


# ---- mixed precision and memory in our loops ----------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_gradients_and_samples_with_the_cache(tmp_path):
    from stages.models.modeling import lm_loss, load_tokenizer, sample
    from stages.models.tuning import load
    from stages.settings.models import PeftConfig, Tuning

    folder = _tiny_folder(tmp_path)
    tokenizer = load_tokenizer(folder)
    grads, rollouts = [], []
    for on in (False, True):
        tuning = Tuning(peft=PeftConfig(method="lora", r=4), compute=ComputeConfig(gradient_checkpointing=on))
        torch.manual_seed(0)
        model = load(folder, tuning, "causal_lm")
        assert model.base_model.model.is_gradient_checkpointing is on
        model.train()
        lm_loss(model, tokenizer, ["hello there friend", "one two"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        torch.manual_seed(1)
        rollouts.append(sample(model, tokenizer, ["hello"], max_new_tokens=3))  # the cache on while sampling
    assert grads[0].keys() == grads[1].keys() and grads[0]
    # checkpointing turns the KV cache off while training only: sampling gives the same tokens either way
    assert torch.equal(rollouts[0].response, rollouts[1].response)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_trainer_flags_carry_device_precision_and_checkpointing():
    flags = compute.trainer_flags(ComputeConfig(device="cpu", precision="bf16", gradient_checkpointing=True))
    assert flags["use_cpu"] and flags["bf16"] and not flags["fp16"]
    assert flags["gradient_checkpointing"] and flags["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert not compute.trainer_flags(ComputeConfig())["gradient_checkpointing"]


def test_fp16s_scaler_is_a_pass_through_in_other_precisions():
    scaler = compute.grad_scaler(ComputeConfig(device="cpu", precision="bf16"))
    loss = torch.tensor(3.0, device="cpu")
    assert not scaler.is_enabled() and scaler.scale(loss) is loss


def test_the_gpu_check_says_in_one_line_that_this_machine_has_no_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: `make gpu-check` runs the whole check here")
    python = f"GPU_PYTHON={sys.executable}"  # the image's python3 stands in: this one has torch
    done = subprocess.run(
        ["make", "-s", "gpu-check", python], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines() == [
        "gpu-check: no CUDA device on this machine; nothing checked (run it where a GPU is lent)"
    ]


def test_torch_threads_match_the_cores_of_this_process():
    """conftest sizes torch's pools to the cores this process may use; inside an xdist worker that is the
    one core it is pinned to (two threads spinning on one core once cost the suite 20 minutes)."""
    import torch

    cores = len(os.sched_getaffinity(0))
    assert torch.get_num_threads() == cores
    assert torch.get_num_interop_threads() == cores
    if os.environ.get("PYTEST_XDIST_WORKER"):
        assert cores == 1
