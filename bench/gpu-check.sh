#!/usr/bin/env bash
# The GPU check's one command: `make gpu-check`, or on the lent GPU machine `bash bench/gpu-check.sh`.
# Needs no .venv: the image's `python3` (GPU_PYTHON overrides it) and the packages `make gpu-wheels`
# packed into .gpu/site.tar.xz, unpacked once into .gpu/site-packages and put first on the path. (The
# folder must be named site-packages: dill pickles a module by value unless its path says so, and
# datasets then fails to fingerprint any table.)
# `make gpu-rehearsal` runs this same script in a copy of the image's environment, with `--device cpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${GPU_PYTHON:-python3}"
SITE=.gpu/site-packages
# the carried packages are built for the image's Python 3.12; another interpreter (GPU_PYTHON=.venv/bin/python
# on a machine that has everything) runs with what it has
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    echo "gpu-check: $PYTHON is not Python 3.12: the carried packages are not used" >&2
elif [ ! -f .gpu/site.tar.xz ]; then
    echo "gpu-check: no .gpu/site.tar.xz (make gpu-wheels): running with what $PYTHON has" >&2
else
    if [ ! -f "$SITE/.unpacked" ] || [ .gpu/site.tar.xz -nt "$SITE/.unpacked" ]; then
        rm -rf "$SITE"
        "$PYTHON" -m tarfile --filter data -e .gpu/site.tar.xz .gpu/
        touch "$SITE/.unpacked"
    fi
    export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" -m bench.gpu_check "$@"
