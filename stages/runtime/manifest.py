"""Typed manifests passed between stages, content digests, and atomic artifact folders."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    """What a stage hands downstream: where its artifact is and what it measured.

    `digest` is the sha256 of the artifact's files (content address); `key` is the cache key the
    flow derived from config, parents and code version; `parents` maps input name -> digest.
    """

    stage: str
    path: str
    digest: str
    key: str = ""
    parents: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    run_id: str = ""

    def file(self, name: str) -> Path:
        return Path(self.path) / self.files.get(name, name)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        return cls(**json.loads((Path(folder) / MANIFEST).read_text()))


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def folder_digest(folder: str | Path) -> str:
    """sha256 over relative paths and file contents, manifest excluded."""
    h = hashlib.sha256()
    root = Path(folder)
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            h.update(str(p.relative_to(root)).encode())
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


@contextmanager
def staging_folder(parent: str | Path) -> Iterator[Path]:
    """Yield a fresh `.tmp-*` folder under `parent`; it is removed if the block raises.

    Pair with `publish`: a crash leaves at most a `.tmp-*` folder, never a half artifact under a
    final name. Its writer holds an OS lock on `<folder>.lock` while it writes, so the folder a
    killed writer left (SIGKILL runs no cleanup) is told from one being written, and removed by
    the next staging under the same parent.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clear_abandoned(parent)
    tmp = parent / f".tmp-{secrets.token_hex(6)}"
    lock = FileLock(f"{tmp}.lock")
    lock.acquire()  # before the folder exists: no one can take it for abandoned
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.release()
        Path(f"{tmp}.lock").unlink(missing_ok=True)


def lock_is_held(path: str | Path) -> bool:
    """Whether a live process holds the OS lock on `path` (the OS drops it when its holder dies);
    also used by the flows for their run locks."""
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def clear_abandoned(parent: Path) -> list[Path]:
    """Remove the staging folders under `parent` whose writer is gone (its lock is free)."""
    removed = []
    for tmp in parent.glob(".tmp-*"):
        if tmp.is_dir() and not lock_is_held(f"{tmp}.lock"):
            shutil.rmtree(tmp, ignore_errors=True)
            Path(f"{tmp}.lock").unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def publish(tmp: Path, final: Path) -> None:
    """Atomically rename a finished folder; if `final` exists it holds the same content, keep it."""
    if final.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON: {e.msg}") from None
    return rows
