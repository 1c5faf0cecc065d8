"""The device guard: what keeps the GPU path honest on a machine without a GPU.

A stage that runs on an accelerator fails when our own code makes a tensor on the host and feeds it
to a model on the GPU, or mixes tensors of two devices in one op. On a CPU machine both mistakes are
invisible: every device is the CPU. While `guard()` is active (a `TorchFunctionMode`, so every torch
function passes through it) it records, with file and line:

- every tensor factory call made from `roots` (our `stages/` by default) without an explicit
  `device=`: on a GPU that tensor would sit on the host, whatever model it feeds;
- every op whose tensor arguments sit on different devices (0-dim CPU tensors excepted: torch
  treats them as scalars), wherever it was made.

The flows install it around every stage when `ALIGNFLOW_DEVICE_GUARD=1` (the test suite sets it), and
fail the stage with what it found (`DeviceGuardError`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

ENV = "ALIGNFLOW_DEVICE_GUARD"
STAGES = Path(__file__).resolve().parents[1]  # stages/
FACTORIES = frozenset(
    {
        torch.tensor,
        torch.as_tensor,
        torch.scalar_tensor,
        torch.zeros,
        torch.ones,
        torch.full,
        torch.empty,
        torch.arange,
        torch.range,
        torch.eye,
        torch.linspace,
        torch.logspace,
        torch.rand,
        torch.randn,
        torch.randint,
        torch.randperm,
        torch.triu_indices,
        torch.tril_indices,
    }
)
_TORCH = str(Path(torch.__file__).resolve().parent)
_SELF = str(Path(__file__).resolve())


@dataclass(frozen=True)
class Finding:
    kind: str  # "factory without device" | "mixed devices"
    what: str  # the function, and for mixed devices the devices
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.where}: {self.kind}: {self.what}"


class DeviceGuardError(RuntimeError):
    """A stage broke device discipline; the message lists each place once."""


class DeviceGuard(TorchFunctionMode):
    def __init__(self, roots: tuple[Path, ...] = (STAGES,)) -> None:
        super().__init__()
        self.roots = tuple(str(Path(r).resolve()) for r in roots)
        self.findings: dict[tuple[str, str, str], Finding] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            if kwargs.get("device") is None:
                where = self._caller(ours_only=True)
                if where is not None:
                    self._add("factory without device", f"torch.{func.__name__}", where)
        else:
            devices = _devices(args, kwargs)
            if len(devices) > 1:
                name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
                where = self._caller(ours_only=False) or "?"
                self._add("mixed devices", f"{name} on {', '.join(sorted(devices))}", where)
        return func(*args, **kwargs)

    def _add(self, kind: str, what: str, where: str) -> None:
        self.findings.setdefault((kind, what, where), Finding(kind, what, where))

    def _caller(self, *, ours_only: bool) -> str | None:
        """file:line of the nearest frame outside torch and this guard: ours (under `roots`), or with
        `ours_only` False the nearest frame of any library if none of ours is on the stack."""
        frame = sys._getframe(2)
        first = None
        while frame is not None:
            name = frame.f_code.co_filename
            if not name.startswith(_TORCH) and name != _SELF:
                if name.startswith(self.roots):
                    return f"{name}:{frame.f_lineno}"
                if ours_only:
                    return None  # a library made it (a tokenizer, transformers): its own business
                first = first or f"{name}:{frame.f_lineno}"
            frame = frame.f_back
        return first

    def report(self) -> str:
        return "\n".join(f"  {f}" for f in self.findings.values())


def _devices(args, kwargs) -> set[str]:
    seen: set[str] = set()
    for value in (*args, *kwargs.values()):
        items = value if isinstance(value, (list, tuple)) else (value,)
        for t in items:
            if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.device.type == "cpu"):
                seen.add(str(t.device))
    return seen


@contextlib.contextmanager
def guard(what: str = "stage", roots: tuple[Path, ...] = (STAGES,)):
    """Record device mistakes while inside; raise `DeviceGuardError` listing them on leaving."""
    mode = DeviceGuard(roots)
    with mode:
        yield mode
    if mode.findings:
        raise DeviceGuardError(
            f"{what}: the device guard found {len(mode.findings)} device mistake(s):\n{mode.report()}"
        )


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def maybe_guard(what: str):
    """`guard(what)` when `ALIGNFLOW_DEVICE_GUARD` is set, else nothing."""
    return guard(what) if enabled() else contextlib.nullcontext()
