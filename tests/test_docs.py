"""The documentation: the site builds with `mkdocs build --strict` (a broken link or anchor fails it), and
every repository path the pages and the README name in backticks exists (a file that moved fails)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATH = re.compile(r"`((?:stages|flows|bench|conf|tests|docs)/[\w./-]+?)(?::\w+)?`")


def _build(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [
        sys.executable,
        "-m",
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        str(root / "site"),
    ]  # not --quiet: it hides the warnings --strict counts
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _copy(tmp_path: Path) -> Path:
    for name in ("docs", "mkdocs.yml", "README.md"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    return tmp_path


def test_the_site_builds_strict(tmp_path):
    done = _build(_copy(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "config-keys" / "index.html").exists()
    home = (tmp_path / "site" / "index.html").read_text()
    assert "A tour of one run" in home and "gold policy" in home  # the README's tour, included


def test_a_broken_link_fails_the_build(tmp_path):
    root = _copy(tmp_path)
    page = root / "docs" / "operations.md"
    page.write_text(page.read_text() + "\nSee [the old page](moved-away.md).\n")
    done = _build(root)
    assert done.returncode != 0 and "moved-away.md" in done.stderr


def test_every_repository_path_the_docs_name_exists():
    named = {
        (page.name, path.rstrip("."))
        for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
        for path in PATH.findall(page.read_text())
        if "*" not in path and "<" not in path
    }
    missing = sorted(f"{page}: {path}" for page, path in named if not (ROOT / path).exists())
    assert missing == [], "\n".join(missing)
