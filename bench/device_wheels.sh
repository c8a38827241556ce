#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels the lent GPU machine's image lacks, at the versions this
# checkout's .venv runs, for that machine's Python 3.12 on x86-64: run here, where pip reaches PyPI,
# before bench/device_check.sh runs there (the device tool's `carry` takes .whl along).
# The image (/work/.library/device/KINDS.md) has torch, accelerate, safetensors, huggingface_hub,
# transformers, pyarrow, pandas, timm and the test tools; it lacks open_clip and datasets and their
# small dependencies, and its setuptools may predate the PEP 639 licence field pyproject.toml uses
# (setuptools >= 77); the image's torch 2.11 asks for setuptools < 82, hence 81.0.0, not .venv's.
# Usage: bench/device_wheels.sh   (after `make test` or `make demo` has made .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
packages="open_clip_torch ftfy wcwidth datasets dill multiprocess webdataset braceexpand"
pins=$(.venv/bin/python - $packages <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]), "setuptools==81.0.0")
PY
)
rm -rf .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins
ls .whl
du -sh .whl
