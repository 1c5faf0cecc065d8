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

    def _file(self, path: Path) -> str:
        st = path.stat()
        key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
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
