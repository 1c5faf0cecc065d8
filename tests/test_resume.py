"""SFT, the reward model and DPO, killed by a real SIGKILL mid-stage, resume from their last complete
checkpoint; a NaN loss stops them with the key to change, before anything is published."""

import sys
from pathlib import Path

import pytest
from conftest import finish, kill_after_checkpoint

from stages.runtime import checkpoints

SFT = """
import json, sys
from pathlib import Path
import flows  # telemetry off
from stages import sft
from stages.settings.models import PeftConfig
from stages.settings.models import Tuning
p, out, ck = (Path(a) for a in sys.argv[1:4])
cfg = sft.SftConfig(epochs=2, batch_size=16, checkpoint_every=8)
m = sft.run(cfg, Tuning(PeftConfig()), base=p / "base", demonstrations=p / "demonstrations.jsonl", out_dir=out,
            checkpoint_dir=ck)
print("MANIFEST " + json.dumps(m.metrics))
"""

RM = """
import json, sys
from pathlib import Path
import flows  # telemetry off
from stages import reward_model
p, cmp, out, ck = (Path(a) for a in sys.argv[1:5])
cfg = reward_model.RewardModelConfig(epochs=8, batch_prompts=8, checkpoint_every=10, learning_rate=1e-4)
m = reward_model.run(cfg, policy=p / "base", comparisons=cmp / "comparisons.jsonl",
                     heldout=cmp / "heldout_comparisons.jsonl", out_dir=out, checkpoint_dir=ck)
print("MANIFEST " + json.dumps(m.metrics))
"""

DPO = """
import json, sys
from pathlib import Path
import flows  # telemetry off
from stages import dpo
from stages.settings.models import PeftConfig
from stages.settings.models import Tuning
p, cmp, out, ck, loss = sys.argv[1:6]
p, cmp = Path(p), Path(cmp)
cfg = dpo.DpoConfig(epochs=2, batch_size=16, checkpoint_every=8, loss_type=loss, kl_prompts=8)
m = dpo.run(cfg, Tuning(PeftConfig()), policy=p / "base", reference=p / "base", comparisons=cmp / "comparisons.jsonl",
            heldout=cmp / "heldout_comparisons.jsonl", out_dir=Path(out), checkpoint_dir=Path(ck))
print("MANIFEST " + json.dumps(m.metrics))
"""


def same_weights(resumed: Path, uninterrupted: Path) -> None:
    """The run that was killed and resumed ends with the weights of a run never interrupted."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(resumed / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def comparisons_dir(tiny_comparisons):
    return tiny_comparisons.path


@pytest.mark.slow
def test_killed_sft_resumes_from_its_last_complete_checkpoint(tiny_prepare, tmp_path):
    ck = tmp_path / "ck"
    args = [sys.executable, "-c", SFT, tiny_prepare.path]
    kill_after_checkpoint([*args, str(tmp_path / "out1"), str(ck)], lambda: checkpoints.last_trainer_checkpoint(ck))
    assert not (tmp_path / "out1" / "policy").exists()
    saved = checkpoints.trainer_step(checkpoints.last_trainer_checkpoint(ck))
    metrics = finish([*args, str(tmp_path / "out2"), str(ck)])
    assert saved >= 8 and metrics["sft/resumed_from"] == saved  # the second attempt starts after it
    assert metrics["sft/steps"] > saved
    finish([*args, str(tmp_path / "out3"), str(tmp_path / "ck3")])
    same_weights(tmp_path / "out2" / "policy", tmp_path / "out3" / "policy")


@pytest.mark.slow
def test_killed_reward_model_resumes_from_its_last_checkpoint(tiny_prepare, comparisons_dir, tmp_path):
    ck = tmp_path / "ck"
    args = [sys.executable, "-c", RM, tiny_prepare.path, comparisons_dir]
    kill_after_checkpoint([*args, str(tmp_path / "out1"), str(ck)], lambda: (ck / checkpoints.STATE).exists())
    assert not (tmp_path / "out1" / "model").exists()
    saved = checkpoints.load(ck)["at"]["step"]
    metrics = finish([*args, str(tmp_path / "out2"), str(ck)])
    assert saved >= 10 and metrics["rm/resumed_from"] == saved
    assert metrics["rm/steps"] > saved  # all the epochs' steps, the first `saved` from the checkpoint
    finish([*args, str(tmp_path / "out3"), str(tmp_path / "ck3")])
    same_weights(tmp_path / "out2" / "model", tmp_path / "out3" / "model")


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sigmoid", "plackett_luce"])  # trl's trainer, and our listwise loop
def test_killed_dpo_resumes_from_its_last_checkpoint(tiny_prepare, comparisons_dir, tmp_path, loss):
    ck = tmp_path / "ck"
    args = [sys.executable, "-c", DPO, tiny_prepare.path, comparisons_dir]
    if loss == "sigmoid":
        ready = lambda: checkpoints.last_trainer_checkpoint(ck)  # noqa: E731
    else:
        ready = lambda: (ck / checkpoints.STATE).exists()  # noqa: E731
    kill_after_checkpoint([*args, str(tmp_path / "out1"), str(ck), loss], ready)
    assert not (tmp_path / "out1" / "policy").exists()
    if loss == "sigmoid":
        saved = checkpoints.trainer_step(checkpoints.last_trainer_checkpoint(ck))
    else:
        saved = checkpoints.load(ck)["at"]["step"]
    metrics = finish([*args, str(tmp_path / "out2"), str(ck), loss])
    assert saved >= 8 and metrics["dpo/resumed_from"] == saved
    assert metrics["dpo/steps"] > saved
    finish([*args, str(tmp_path / "out3"), str(tmp_path / "ck3"), loss])
    same_weights(tmp_path / "out2" / "policy", tmp_path / "out3" / "policy")


def test_a_half_written_trainer_checkpoint_is_skipped(tmp_path):
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / "checkpoint-8" / "trainer_state.json").write_text('{"global_step": 8}')
    (tmp_path / "checkpoint-16").mkdir()
    (tmp_path / "checkpoint-16" / "trainer_state.json").write_text('{"global_st')  # killed while saving
    assert checkpoints.last_trainer_checkpoint(tmp_path) == str(tmp_path / "checkpoint-8")
    assert checkpoints.last_trainer_checkpoint(tmp_path / "none") is None


def test_a_nan_loss_stops_sft_naming_the_key(tiny_prepare, tmp_path):
    from stages import sft
    from stages.settings.models import PeftConfig, Tuning

    with pytest.raises(FloatingPointError, match=r"sft: non-finite loss at step \d+; lower stage.sft.learning_rate"):
        sft.run(
            sft.SftConfig(epochs=1, learning_rate=float("inf")),
            Tuning(PeftConfig(method="full")),
            base=tiny_prepare.file("base"),
            demonstrations=tiny_prepare.file("demonstrations"),
            out_dir=tmp_path,
        )
    assert not (tmp_path / "policy").exists()


def test_a_nan_loss_stops_the_reward_model_naming_the_key(tiny_prepare, comparisons_dir, tmp_path):
    from stages import reward_model

    with pytest.raises(FloatingPointError, match="lower stage.reward_model.learning_rate"):
        reward_model.run(
            reward_model.RewardModelConfig(learning_rate=1e30),  # finite (an inf is refused as a config), it diverges
            policy=tiny_prepare.file("base"),
            comparisons=Path(comparisons_dir, "comparisons.jsonl"),
            heldout=Path(comparisons_dir, "heldout_comparisons.jsonl"),
            out_dir=tmp_path,
        )
    assert not (tmp_path / "model").exists()
