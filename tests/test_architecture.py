"""The layout shows the architecture, and the import-linter contracts in pyproject.toml keep it so."""

import ast
import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300)


def test_the_top_of_stages_holds_the_stage_modules_and_nothing_else():
    from flows.config import OPTIONAL_STAGES, PIPELINES

    stages = {stage for order in PIPELINES.values() for stage in order} | set(OPTIONAL_STAGES)
    assert {p.stem for p in (ROOT / "stages").glob("*.py")} == stages | {"__init__"}
    flow = {"__init__", "align", "cli", "pipeline", "branches", "steps", "runner", "config", "preflight", "fingerprint"}
    assert {p.stem for p in (ROOT / "flows").glob("*.py")} == flow


def test_every_subpackage_says_what_it_holds_and_who_may_import_it():
    packages = [p for top in ("stages", "flows") for p in (ROOT / top).iterdir() if (p / "__init__.py").exists()]
    assert len(packages) >= 9
    for package in packages:
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc and "imported by" in doc.lower(), f"{package}/__init__.py: its docstring says who may import it"
        for module in package.glob("*.py"):
            assert module.name == "__init__.py" or module.stem in doc, f"{package}: docstring omits {module.stem}"


def test_the_contracts_hold():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout and "6 kept" in done.stdout


@pytest.fixture
def scratch(tmp_path):
    """A copy of the packages and the contracts, to break on purpose."""
    for name in ("stages", "flows", "bench"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def add_import(module: Path, line: str) -> None:
    text = module.read_text()
    head, rest = text.split("\nfrom ", 1)
    module.write_text(f"{head}\n{line}\nfrom {rest}")


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("stages/sft.py", "from flows import config", "stages never import flows"),
        ("stages/evaluate.py", "from stages import ppo", "A stage module never imports another"),
        ("stages/runtime/manifest.py", "from stages import sft", "the machinery never imports a stage"),
        ("stages/runtime/progress.py", "from stages.runtime import tracking", "No import cycle"),
        ("flows/results/report.py", "from flows import pipeline", "flows: commands over the flow"),
        ("stages/runtime/tracking.py", "import mlflow", "stages need only what the GPU image has"),
    ],
    ids=["stage-to-flow", "stage-to-stage", "machinery-to-stage", "cycle", "flow-upwards", "stage-to-mlflow"],
)
def test_a_broken_rule_fails_the_linter_naming_its_contract(scratch, module, line, contract):
    add_import(scratch / module, line)
    done = lint(scratch)
    assert done.returncode == 1, done.stdout[-2000:]
    assert contract in broken_contracts(done.stdout), done.stdout[-3000:]


def broken_contracts(report: str) -> str:
    """The names of the contracts the linter's summary calls BROKEN, joined (names wrap across lines)."""
    summary = " ".join(report.split("Analyzed", 1)[1].split("Contracts:", 1)[0].split())
    return " | ".join(name for name, verdict in re.findall(r"(.*?) (KEPT|BROKEN)", summary) if verdict == "BROKEN")


def test_no_two_modules_or_classes_share_a_name():
    """One name, one thing: a module name or a class name is used once across stages/, flows/ and bench/
    (the serving decoder is `Decoder`, the training engine `Engine`; policies are not data sources)."""
    modules = collections.Counter()
    classes = collections.Counter()
    for path in [p for top in ("stages", "flows", "bench") for p in (ROOT / top).rglob("*.py")]:
        if path.name != "__init__.py":
            modules[path.stem] += 1
        classes.update(n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef))
    assert [m for m, n in modules.items() if n > 1] == []
    assert [c for c, n in classes.items() if n > 1] == []
