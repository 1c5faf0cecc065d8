"""The lent GPU machine's software, in one place: what its image has, and what `make gpu-wheels` carries.

    python -m bench.gpu_image image      # pip requirements of the image (the rehearsal installs them)
    python -m bench.gpu_image carried    # pip requirements of the carried packages, at this .venv's versions
    python -m bench.gpu_image blocked    # importable names this .venv has that the GPU machine will not
    python -m bench.gpu_image size       # what a device call carries, refused over 64 MiB
    python -S -m bench.gpu_image as-image bench.gpu_check --device cpu ...   # in the image's view

`make gpu-rehearsal` builds the image's environment on this machine (Python 3.12, the image's pins) and
runs the GPU check's exact command in it, on the CPU; `tests/test_gpu_image.py` runs the check's CPU path
in `.venv` with every `blocked` package refused at import. Both read this module.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY_LIMIT_MIB = 64  # what one device call carries: the working tree and the carried paths together
CARRY = (".gpu/site.tar.xz", ".gpu/gpt2")  # the device call's `carry`

PYTHON = "3.12"  # the image has 3.12.3; pyenv's 3.12 stands in for it here

# The image's own packages (pip names, pinned as the image has them); pip adds their dependencies.
IMAGE = {
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "accelerate": "1.15.0",
    "numpy": "2.5.2",
    "safetensors": "0.8.0",
    "tokenizers": "0.23.2",
    "sentencepiece": "0.2.2",
    "peft": "0.21.2",
}

# What travels with the repository (64 MiB in all, as one xz archive of the installed files): trl and
# datasets (SFT, trl's pairwise DPO losses) with the dependencies the image lacks, the embedded task's
# gold rule (vaderSentiment), torchao and optimum-quanto (QLoRA's int8 bases). Versions: this .venv's.
CARRIED = (
    "trl", "datasets", "dill", "multiprocess", "xxhash", "pyarrow", "pandas", "python-dateutil", "pytz", "tzdata",
    "six", "vaderSentiment", "requests", "urllib3", "charset-normalizer", "torchao", "optimum-quanto",
)  # fmt: skip

# Top-level modules this project may import that neither the image nor the carried wheels provide.
ABSENT = (
    "mlflow", "prefect", "hydra", "omegaconf", "deepspeed", "bitsandbytes", "vllm", "flash_attn", "liger_kernel",
    "galore_torch", "badam", "fastapi", "uvicorn", "plotly", "matplotlib", "psycopg", "asyncpg", "optuna",
    "submitit", "joblib", "unsloth",
)  # fmt: skip


# ---- the image's view of this .venv: what `tests/test_gpu_image.py` runs the GPU check's CPU path in ----
def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def allowed_distributions() -> set[str]:
    """The image's packages and the carried ones, with everything they require (markers for extras
    dropped), as installed in this environment: the distributions the GPU machine will have."""
    todo, seen = [*IMAGE, *CARRIED], set()
    while todo:
        name = _name(todo.pop())
        if name in seen:
            continue
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [r for r in requires if "extra ==" not in r]
    return seen


def top_level_modules(distributions: set[str]) -> set[str]:
    """The importable top-level names those distributions install."""
    names = set()
    for dist in metadata.distributions():
        if _name(dist.metadata["Name"]) not in distributions:
            continue
        top = dist.read_text("top_level.txt")
        names |= set(top.split()) if top else {Path(str(f)).parts[0].removesuffix(".py") for f in dist.files or []}
    return {n for n in names if not n.endswith((".dist-info", ".data")) and n not in ("..", "__pycache__")}


class ImageView:
    """A `sys.meta_path` finder that serves this environment's site-packages as the GPU image would: a
    package outside the image (and the carried wheels) is absent, for imports, `find_spec` and
    `importlib.metadata` alike. Run under `python -S` (site-packages off `sys.path`); `refused` lists
    what was asked for and not there."""

    def __init__(self, site: list[str], modules: set[str], distributions: set[str]) -> None:
        self.site, self.modules, self.distributions = site, modules, distributions
        self.refused: set[str] = set()

    def find_spec(self, name, path=None, target=None):
        if path is not None:  # a submodule: its package's own path finds it
            return None
        if name.split(".")[0] not in self.modules:
            if any(Path(p, name).exists() or Path(p, f"{name}.py").exists() for p in self.site):
                self.refused.add(name)
            return None
        from importlib.machinery import PathFinder

        return PathFinder.find_spec(name, self.site)

    def find_distributions(self, context=None):
        from importlib.metadata import MetadataPathFinder

        name = context.name if context is not None else None
        found = MetadataPathFinder.find_distributions(metadata.DistributionFinder.Context(name=name, path=self.site))
        return (d for d in found if _name(d.metadata["Name"]) in self.distributions)


def run_as_image(module: str, args: list[str]) -> int:
    """`python -S -m bench.gpu_image as-image <module> [args]`: `module` run as `__main__` with only
    what the GPU machine will have importable; prints what it asked for that the image lacks."""
    import atexit
    import runpy
    import site as site_module

    venv = Path(sys.executable).parent.parent  # under -S, site's own answer is the base interpreter's
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = (
        [str(venv / "lib" / version / "site-packages")]
        if (venv / "pyvenv.cfg").exists()
        else site_module.getsitepackages()
    )
    distributions = allowed_distributions_at(site)
    view = ImageView(site, top_level_modules_at(site, distributions), distributions)
    sys.meta_path.insert(0, view)
    atexit.register(report_view, view)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


def report_view(view: ImageView) -> None:
    """At exit: what was asked for and refused, and (never, if the view holds) an absent module imported."""
    imported = sorted(name for name in sys.modules if name.split(".")[0] in ABSENT)
    print(f"image view: refused {sorted(view.refused) or 'nothing'}", file=sys.stderr)
    print(f"image view: imported absent: {', '.join(imported) or 'nothing'}", file=sys.stderr)


def allowed_distributions_at(site: list[str]) -> set[str]:
    sys.path[:0] = site  # metadata reads the real site-packages while the view is computed
    try:
        return allowed_distributions()
    finally:
        del sys.path[: len(site)]


def top_level_modules_at(site: list[str], distributions: set[str]) -> set[str]:
    sys.path[:0] = site
    try:
        return top_level_modules(distributions)
    finally:
        del sys.path[: len(site)]


def image_requirements() -> list[str]:
    return [f"{name}=={version}" for name, version in IMAGE.items()]


def carried_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in CARRIED]


def carry_size() -> list[str]:
    """The bytes one device call carries (tracked files and CARRY), refused over the limit."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = [ROOT / f for f in tracked.decode().split("\0") if f]
    for path in CARRY:
        files += [p for p in (ROOT / path).rglob("*")] if (ROOT / path).is_dir() else [ROOT / path]
    mib = sum(f.stat().st_size for f in files if f.is_file()) / 2**20
    if mib > CARRY_LIMIT_MIB:
        raise SystemExit(f"error: a device call would carry {mib:.1f} MiB, over {CARRY_LIMIT_MIB} MiB: carry less")
    return [f"carried to the GPU machine: {mib:.1f} MiB of {CARRY_LIMIT_MIB} ({', '.join(CARRY)} and the repository)"]


def main(argv: list[str]) -> int:
    what = argv[0] if argv else ""
    if what == "as-image":
        return run_as_image(argv[1], argv[2:])
    lines = {
        "image": image_requirements,
        "carried": carried_requirements,
        "blocked": lambda: list(ABSENT),
        "size": carry_size,
    }
    if what not in lines:
        print(f"error: usage: python -m bench.gpu_image {{{' | '.join(lines)}}}", file=sys.stderr)
        return 2
    print("\n".join(lines[what]()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
