"""Content digests of the files a stage reads, for its cache key.

A stage is keyed on the files it actually reads (inside upstream artifacts, or named in the config:
`data.demonstrations.path`, `data.comparisons.path`, a local `model.name_or_path`, a rankings file),
not on a whole upstream folder and not on a path string: new data in the same file reruns exactly
what reads it. Stat-then-hash: a file whose path, size, mtime and inode are unchanged is not read
again (`.prefect/fingerprints.json`), so a cached run of unchanged data stays fast.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from stages.runtime.manifest import MANIFEST


class Fingerprints:
    def __init__(self, cache_file: Path) -> None:
        self.cache_file = Path(cache_file)
        try:
            self.cache: dict[str, str] = json.loads(self.cache_file.read_text())
        except (OSError, ValueError):
            self.cache = {}
        self.dirty = False

    def digest(self, path: str | Path) -> str:
        """sha256 of a file, or of a folder's relative paths and file digests (its manifest excluded)."""
        path = Path(path).resolve()
        if not path.is_dir():
            return self._file(path)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
        listing = [[str(p.relative_to(path)), self._file(p)] for p in files]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    def named_pictures(self, path: Path, column: str) -> dict[str, Path]:
        """The picture files a JSON or JSONL dataset's rows name in `column` (paths beside the data file,
        as LLaMA-Factory lays them out, or absolute), by the name the rows give; the file is parsed
        again only when its stat changes, as for digests. Rows that do not parse are the data worker's
        to report (preflight); here they name nothing."""
        path = Path(path).resolve()
        key = f"pictures:{column}|{_stat_key(path)}"
        if key not in self.cache:
            self.cache[key] = json.dumps(_picture_refs(path, column))
            self.dirty = True
        found = {
            ref: Path(ref) if Path(ref).is_absolute() else path.parent / ref for ref in json.loads(self.cache[key])
        }
        return {ref: p for ref, p in found.items() if p.is_file()}

    def _file(self, path: Path) -> str:
        key = _stat_key(path)
        if key not in self.cache:
            h = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self.cache[key] = h.hexdigest()
            self.dirty = True
        return self.cache[key]

    def save(self) -> None:
        """Written to a temporary file and renamed; concurrent runs at worst re-hash a file."""
        if not self.dirty:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.cache))
        os.replace(tmp, self.cache_file)
        self.dirty = False


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _picture_refs(path: Path, column: str) -> list[str]:
    """The picture paths (not inline data URIs) the rows of a JSON or JSONL dataset name in `column`."""
    import gzip
    import zlib

    if not path.name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
        return []
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, EOFError, ValueError, zlib.error):  # unreadable or truncated: preflight names it
        return []
    try:
        records = json.loads(text)
    except ValueError:
        records = []
        for line in text.splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return [
        ref for rec in (records if isinstance(records, list) else [records]) if isinstance(rec, dict)
        for ref in (rec.get(column) if isinstance(rec.get(column), list) else [])
        if isinstance(ref, str) and not ref.startswith("data:")
    ]  # fmt: skip
