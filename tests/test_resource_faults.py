"""Out of disk, out of memory, a NaN loss: each stops the stage with what to change, and nothing is
published (no artifact folder, no staging folder left behind)."""

import errno
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_flow import TINY

from flows.config import Config
from flows.launch.resources import ResourceError
from flows.runner import StageCall, execute
from stages.settings.models import PeftConfig, Tuning
from stages.settings.recipe import PpoConfig, SftConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tracked(tmp_path):
    from flows.runner import set_up_tracking

    set_up_tracking(Config(artifacts_dir=str(tmp_path)))
    return tmp_path


def _call(stage: str, configs: tuple, artifacts: Path) -> StageCall:
    return StageCall(stage, configs, {}, {}, {}, str(artifacts))


def _nothing_published(artifacts: Path, stage: str) -> None:
    folder = artifacts / stage
    assert not [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.exists() else True
    assert not list(artifacts.rglob(".tmp-*"))


def test_a_full_disk_while_the_stage_writes_its_artifact(tracked, monkeypatch):
    from stages import sft

    def writes_then_fills_the_disk(*args, out_dir, **kwargs):
        (out_dir / "policy").mkdir()
        (out_dir / "policy" / "model.safetensors").write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sft, "run", writes_then_fills_the_disk)
    with pytest.raises(ResourceError, match=r"sft: no space left on the device of .*set artifacts_dir="):
        execute(_call("sft", (SftConfig(), Tuning(PeftConfig())), tracked), None)
    _nothing_published(tracked, "sft")


def test_a_full_disk_during_publish(tracked, monkeypatch):
    from flows import runner
    from stages import sft
    from stages.runtime.manifest import Manifest, folder_digest

    def trains(*args, out_dir, **kwargs):
        (out_dir / "policy").mkdir()
        (out_dir / "policy" / "model.safetensors").write_bytes(b"a model")
        return Manifest("sft", str(out_dir), folder_digest(out_dir), files={"policy": "policy"})

    def full(tmp, final):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sft, "run", trains)
    monkeypatch.setattr(runner, "publish", full)
    with pytest.raises(ResourceError, match="nothing was published"):
        execute(_call("sft", (SftConfig(), Tuning(PeftConfig())), tracked), None)
    _nothing_published(tracked, "sft")


def test_out_of_memory_names_the_keys_to_lower(tracked, monkeypatch):
    from stages import ppo

    def too_big(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(ppo, "run", too_big)
    with pytest.raises(ResourceError) as e:
        execute(_call("ppo", (PpoConfig(), Tuning(PeftConfig("full"))), tracked), None)
    assert str(e.value).startswith("ppo: out of memory; lower stage.ppo.rollouts_per_update, stage.ppo.minibatch_size")
    _nothing_published(tracked, "ppo")


def test_other_errors_pass_through_unchanged(tracked, monkeypatch):
    from stages import sft

    def broken(*args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(sft, "run", broken)
    with pytest.raises(RuntimeError, match="^something else$"):
        execute(_call("sft", (SftConfig(), Tuning(PeftConfig())), tracked), None)


@pytest.mark.slow
def test_the_cli_stops_on_a_nan_loss_with_the_key_to_change(tmp_path):
    proc = subprocess.run(
        [
            sys.executable, "-m", "flows.align", f"artifacts_dir={tmp_path}", *TINY,
            "stage.reward_model.learning_rate=1e30", "pipeline.stop_after=reward_model",  # inf: refused by the config
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    expected = r"error: reward_model: non-finite loss at step \d+; lower stage.reward_model.learning_rate"
    assert re.match(expected, last), last
    _nothing_published(tmp_path, "reward_model")
