"""The lent GPU machine's software, in one place: what its image has, and what `make gpu-wheels` carries.

    python -m bench.gpu_image image      # pip requirements of the image (the rehearsal installs them)
    python -m bench.gpu_image carried    # pip requirements of the carried packages, at this .venv's versions
    python -m bench.gpu_image blocked    # importable names this .venv has that the GPU machine will not
    python -m bench.gpu_image size       # what a device call carries, refused over 64 MiB

`make gpu-rehearsal` builds the image's environment on this machine (Python 3.12, the image's pins) and
runs the GPU check's exact command in it, on the CPU; `tests/test_gpu_image.py` runs the check's CPU path
in `.venv` with every `blocked` package refused at import. Both read this module.
"""

from __future__ import annotations

import importlib.metadata as metadata
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
