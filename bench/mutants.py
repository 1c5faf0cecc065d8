"""`make mutants`: do the tests catch a broken copy of the code? For three pieces of logic (the cache key,
PPO's per-token KL penalty, the data worker's error line), a scratch copy of the tree gets one deliberate
bug, and the tests named for it run there: each mutant must make at least one of them fail, and the
same tests must pass on the unbroken copy. artifacts/bench/mutants.json lists which tests failed.

    python -m bench.mutants
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import flows
from bench.common import write_results

MUTANTS = [
    {
        "logic": "the cache key",
        "bug": "the stage's code version left out of the key (an edited stage would not retrain)",
        "file": "flows/runner.py",
        "old": '                "code": code_version(self.stage),\n',
        "new": "",
        "tests": ["tests/test_cache_keys.py"],
    },
    {
        "logic": "the per-token KL penalty",
        "bug": "its sign flipped (PPO rewarded for moving away from SFT)",
        "file": "stages/rl/ppo_math.py",
        "old": "rewards = -beta * kl * mask",
        "new": "rewards = beta * kl * mask",
        "tests": ["tests/test_ppo_math.py"],
    },
    {
        "logic": "the data worker's error line",
        "bug": "the line number one off in `file:line: field: problem`",
        "file": "stages/data/reader.py",
        "old": 'problems.append(f"{path}:{line}: {e.field_name}: {e.problem}")',
        "new": 'problems.append(f"{path}:{line + 1}: {e.field_name}: {e.problem}")',
        "tests": ["tests/test_data.py"],
    },
]


def scratch_tree(root: Path) -> Path:
    """The tracked files of this checkout in a new folder, with `../shared` reachable beside it."""
    base = Path(tempfile.mkdtemp(prefix="alignflow-mutants-"))
    tree = base / "tree"
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, tree / name)
    if (root.parent / "shared").exists():
        (base / "shared").symlink_to(root.parent / "shared")
    return tree


def failed_tests(tree: Path, tests: list[str]) -> tuple[int, list[str]]:
    """(tests run, the node ids that failed) of `tests` run in `tree` with this interpreter."""
    report = tree / "report.xml"
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *tests],
        cwd=tree, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    cases = ET.parse(report).getroot().iter("testcase")
    run, failed = 0, []
    for case in cases:
        run += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return run, failed


def imports_from(tree: Path) -> str:
    probe = "import flows, stages; print(flows.__file__)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                          capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout.strip()


def check(mutant: dict, root: Path) -> dict:
    tree = scratch_tree(root)
    try:
        assert imports_from(tree).startswith(str(tree)), "the scratch copy must import its own code"
        ran, control = failed_tests(tree, mutant["tests"])
        path = tree / mutant["file"]
        source = path.read_text()
        if source.count(mutant["old"]) != 1:
            raise SystemExit(f"{mutant['file']}: the line to break is not there once: {mutant['old']!r}")
        path.write_text(source.replace(mutant["old"], mutant["new"]))
        _, failed = failed_tests(tree, mutant["tests"])
    finally:
        shutil.rmtree(tree.parent, ignore_errors=True)
    caught = bool(failed) and not control
    print(f"{mutant['logic']}: {len(failed)} of {ran} tests fail on the mutant, {len(control)} on the original"
          f" -> {'caught' if caught else 'NOT CAUGHT'}", flush=True)  # fmt: skip
    for name in failed:
        print(f"  {name}")
    return {**mutant, "tests_run": ran, "failed_on_original": control, "failed_on_mutant": failed, "caught": caught}


def main() -> dict:
    results = {"mutants": [check(m, flows.ROOT) for m in MUTANTS]}
    results["all_caught"] = all(m["caught"] for m in results["mutants"])
    write_results(Path("artifacts/bench/mutants.json"), results)
    if not results["all_caught"]:
        raise SystemExit("a mutant survived: the tests named for it do not check that logic")
    return results


if __name__ == "__main__":
    main()
