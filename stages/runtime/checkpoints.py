"""Training checkpoints that outlive a crashed attempt (the flow gives a checkpointed stage a
`checkpoint_dir` keyed on its cache key, `flows/runner.py`): one file, written to a temporary name
and renamed, so a half-written checkpoint is never picked up; removed once the stage is published.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from stages.runtime.errors import NonFiniteStop

STATE = "state.pt"


def save(folder: Path, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{STATE}.tmp"
    import torch  # here: the flow clears spent checkpoints without loading torch

    torch.save(state, tmp)
    os.replace(tmp, folder / STATE)


def load(folder: Path | None) -> dict[str, Any] | None:
    """The last complete checkpoint, or None (tensors and plain values only: `weights_only`)."""
    if folder is None or not (Path(folder) / STATE).exists():
        return None
    import torch

    return torch.load(Path(folder) / STATE, weights_only=True)


def spent(folder: Path | None) -> None:
    """The stage finished and its artifact is published: its checkpoints are no longer needed."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


# trl / transformers trainers (SFT, DPO): their own checkpoint folders, `checkpoint-<step>/`
def trainer_saving(folder: Path | None, every: int) -> dict[str, Any]:
    """TrainingArguments that checkpoint into `folder` every `every` steps, keeping two: the newest
    may be half-written when the run is killed, the one before it is complete."""
    if folder is None or not every:
        return {}
    return {"output_dir": str(folder), "save_strategy": "steps", "save_steps": every, "save_total_limit": 2}


def last_trainer_checkpoint(folder: Path | None) -> str | None:
    """The newest complete `checkpoint-<step>`: the trainer writes `trainer_state.json` last."""
    if folder is None or not Path(folder).is_dir():
        return None
    complete = []
    for sub in Path(folder).glob("checkpoint-*"):
        try:
            json.loads((sub / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue  # killed while saving
        complete.append((trainer_step(str(sub)), str(sub)))
    return max(complete)[1] if complete else None


def trainer_step(checkpoint: str | None) -> int:
    return 0 if checkpoint is None else int(Path(checkpoint).name.split("-")[-1])


def check_finite(stage: str, loss: float, step: int, hint: str = "") -> None:
    """A NaN or infinite loss stops the stage (nothing is published), naming the key to change."""
    if not math.isfinite(loss):
        raise NonFiniteStop(f"{stage}: non-finite loss at step {step}; lower stage.{stage}.learning_rate{hint}")
