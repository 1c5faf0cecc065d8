#!/usr/bin/env bash
# The GPU check's one command: `make gpu-check`, or on the lent GPU machine `bash bench/gpu-check.sh`.
# Needs no .venv: the image's `python3` (GPU_PYTHON overrides it) and the packages `make gpu-wheels`
# packed into .gpu/site.tar.xz, unpacked once into .gpu/site and put first on the path.
# `make gpu-rehearsal` runs this same script in a copy of the image's environment, with `--device cpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${GPU_PYTHON:-python3}"
if [ ! -f .gpu/site.tar.xz ]; then
    echo "error: .gpu/site.tar.xz is missing: run \`make gpu-wheels\` on the machine that has .venv, then carry .gpu/" >&2
    exit 2
fi
if [ ! -f .gpu/site/.unpacked ] || [ .gpu/site.tar.xz -nt .gpu/site/.unpacked ]; then
    rm -rf .gpu/site
    "$PYTHON" -m tarfile -e .gpu/site.tar.xz .gpu/
    touch .gpu/site/.unpacked
fi
export PYTHONPATH="$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m bench.gpu_check "$@"
