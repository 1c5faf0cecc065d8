"""What a command imports decides how fast it starts: composing and checking a config, probing the cache
and printing a cached run's table import neither torch nor transformers, and no optional backend loads
unless the config uses it. Checked through `sys.modules` in a fresh process, so it cannot regress
silently."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

# never needed to compose, refuse, probe the cache or print a cached run's table
HEAVY = {
    "torch", "transformers", "peft", "trl", "datasets", "accelerate", "deepspeed", "bitsandbytes", "torchao",
    "optimum", "vllm", "matplotlib", "psycopg", "asyncpg", "galore_torch", "badam", "liger_kernel",
}  # fmt: skip
# what a refused config does not need either: it stops before tracking, orchestration or the report
TRACKING = {"mlflow", "prefect", "plotly", "fastapi", "uvicorn"}

# runs the command line in-process and reports the top-level modules it imported, whatever the exit
PROBE = """
import atexit, json, sys
atexit.register(lambda: print("MODULES " + json.dumps(sorted({m.split(".")[0] for m in sys.modules})), flush=True))
sys.argv = ["alignflow", *sys.argv[1:]]
from flows.cli import main
main()
"""


def imported(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = next(line for line in done.stdout.splitlines() if line.startswith("MODULES "))
    return done, set(json.loads(line.removeprefix("MODULES ")))


def test_importing_the_flow_imports_no_torch():
    code = "import sys, flows.align, flows.config; print(sorted({m.split('.')[0] for m in sys.modules}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not HEAVY & set(eval(done.stdout)), done.stdout


def test_a_refused_config_imports_nothing_heavy(tmp_path):
    done, modules = imported("align", f"artifacts_dir={tmp_path}", "+experiment=tiny", "stage.ppo.beta=-1")
    assert done.returncode == 1 and "error: stage.ppo.beta: must be >= 0" in done.stderr, done.stderr
    assert not (HEAVY | TRACKING) & modules, sorted((HEAVY | TRACKING) & modules)


@pytest.mark.slow
def test_a_cached_rerun_imports_no_torch_nor_any_optional_backend(shared_tiny_run):
    art, first = shared_tiny_run
    done, modules = imported("align", "+experiment=tiny", f"artifacts_dir={art}")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(open(done.stdout.rsplit("summary: ", 1)[1].split()[0]).read())
    assert {s["status"] for s in summary["stages"].values()} == {"cached"}
    assert set(summary["stages"]) == set(first["stages"])
    assert not HEAVY & modules, sorted(HEAVY & modules)
