"""The one resumable training loop of our own trainers (the reward model, DPO's own losses and PPO),
over the `Engine` (one process, DDP or DeepSpeed ZeRO).

`TrainingLoop` owns what every such loop needs and once wrote for itself: the position (step, pass,
batch within the pass), each pass's batch order drawn from the loop's own generator (a resumed pass
repeats its order and skips what was done), each rank's torch RNG, checkpoints every
`checkpoint_every` steps (one file in one process, DeepSpeed's under ZeRO: `Engine.save`), the
finiteness check before a step, the progress bar and the logging cadence. A stage gives it batches
and a loss (`passes`, `step`); PPO, whose step is a whole update, uses its position and checkpoints
(`save`, `resume`, `advance`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from stages.runtime import checkpoints
from stages.runtime import process_group as dist
from stages.runtime.process_group import Engine
from stages.runtime.progress import progress
from stages.runtime.tracking import log_metrics


class TrainingLoop:
    """`steps` optimiser steps (or updates) of `engine` for `stage`, resumable from `checkpoint_dir`.

    `sched`: a learning-rate scheduler stepped with the optimiser, or None. `seed`: the generator of
    the passes' batch orders. `hint`: appended to the non-finite-loss message. `unit`: the progress
    bar's unit."""

    def __init__(
        self,
        stage: str,
        engine: Engine,
        *,
        steps: int,
        seed: int,
        checkpoint_dir: Path | None,
        checkpoint_every: int,
        sched=None,
        log_every: int = 10,
        hint: str = "",
        unit: str = "step",
    ) -> None:
        self.stage, self.engine, self.sched, self.steps = stage, engine, sched, steps
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every, self.log_every, self.hint, self.unit = checkpoint_every, log_every, hint, unit
        self.gen = torch.Generator().manual_seed(seed)
        self.at: dict[str, Any] = {"step": 0, "pass": 0, "in_pass": 0, "loss": math.nan}
        self.pass_rng = self.gen.get_state()
        self.resumed_from = 0
        self.extra: dict[str, Any] = {}  # the stage's own counters, saved and restored with the position
        self.bar = None

    @property
    def step_index(self) -> int:
        return self.at["step"]

    @property
    def done(self) -> bool:
        return self.at["step"] >= self.steps

    # ---- position and checkpoints -------------------------------------------------------------
    def resume(self) -> dict[str, Any] | None:
        """The last complete checkpoint, restored (module, optimizer, scheduler, position, the pass's order,
        this rank's RNG and `extra`); returns `extra`, or None where there was no checkpoint."""
        blob = self.engine.load(self.checkpoint_dir)
        if blob is None:
            return None
        if self.sched is not None:
            self.sched.load_state_dict(blob["sched"])
        self.at, self.resumed_from = blob["at"], blob["at"]["step"]
        self.gen.set_state(blob["pass_rng"])  # the interrupted pass's batches, in the same order
        torch.set_rng_state(blob["rngs"][dist.rank()])
        self.extra = blob["extra"]
        return self.extra

    def save(self) -> None:
        """Collective: a checkpoint of where training stands, with the stage's own `extra` state."""
        client = {
            "at": dict(self.at),
            "pass_rng": self.pass_rng,
            "rngs": dist.gather([torch.get_rng_state()]),  # each rank's own sampling stream
            "sched": self.sched.state_dict() if self.sched is not None else None,
            "extra": self.extra,
        }
        self.engine.save(self.checkpoint_dir, self.at["step"], client)

    def due(self) -> bool:
        """Whether a checkpoint is due now: after every `checkpoint_every`-th step, where there is a folder."""
        every = self.checkpoint_every
        return self.checkpoint_dir is not None and bool(every) and self.at["step"] % every == 0

    def advance(self, loss: float) -> None:
        """One step (or update) done, with its loss: the position, the bar and the logging cadence."""
        self.at["step"] += 1
        self.at["in_pass"] += 1
        self.at["loss"] = loss
        if self.bar is not None:
            self.bar.update(1)
            if self.at["step"] % self.log_every == 0:
                self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    # ---- the loop of the reward model and DPO's own losses ------------------------------------
    def passes(self, order: Callable[[torch.Generator], list]) -> Iterator[Iterator]:
        """Each pass over the data from where training stands: an iterator of its batches still to train,
        `order(generator)` drawing the pass's batches. Ends when `steps` are done."""
        self.bar = progress(self.steps, f"{self.stage}: training", unit=self.unit)
        self.bar.update(self.at["step"])
        try:
            while not self.done:
                self.pass_rng = self.gen.get_state()
                batches = order(self.gen)
                yield self._remaining(batches, self.at["in_pass"])  # a resumed pass skips what was done
                self.at["pass"] += 1
                self.at["in_pass"] = 0
        finally:
            self.bar.close()

    def _remaining(self, batches: list, skip: int) -> Iterator:
        for batch in batches[skip:]:
            if self.done:
                return
            yield batch

    def step(self, loss: torch.Tensor, *, reported: float | None = None, weight: float = 1.0) -> float:
        """Backward and step on `loss` (times `weight`: a rank without a share of the batch steps with 0),
        after the finiteness check; then the scheduler, the position, logging and a checkpoint when due.
        `reported`: the loss to log (the global batch's, where the caller reduced it). Returns it."""
        value = loss.item() if reported is None else reported
        checkpoints.check_finite(self.stage, loss.item(), self.at["step"], self.hint)
        self.engine.backward(loss * weight if weight != 1.0 else loss)
        self.engine.step()
        if self.sched is not None:
            self.sched.step()
        self.advance(value)
        if self.at["step"] % self.log_every == 0:
            lr = self.engine.opt.param_groups[0]["lr"]
            log_metrics({f"{_prefix(self.stage)}/train/loss": value, f"{_prefix(self.stage)}/train/lr": lr},
                        step=self.at["step"])  # fmt: skip
        if self.due():
            self.save()
        return value


def _prefix(stage: str) -> str:
    return {"reward_model": "rm"}.get(stage, stage)
