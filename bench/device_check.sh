#!/usr/bin/env bash
# The GPU checks of the open issues, as the one command a session with a lent GPU machine runs
# through the device tool (first, here: bash bench/device_wheels.sh):
#     run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=600)
# There: installs the wheels from .whl that the image lacks into /tmp/site (the image's own torch
# stays), installs this checkout editable without dependencies (the stage folders map into the
# micromerge namespace only through an install), then runs bench/gpu_all.sh [STEP ...] within
# GPU_BUDGET_S seconds (default 500: a machine's 15 minutes include its start, about two minutes,
# and the transfers; the tool stops a command at 600 s). Everything comes back as one file,
# $OUT/gpu.tar.gz, rewritten after every step (the tool returns at most 8 files), with
# $OUT/steps.txt beside it; the steps' lines also end the command's output.
# Rehearsal on a machine without a GPU: OUT=DIR PYTHON=PY bash bench/device_check.sh (the GPU tests
# skip, the benches stop at their first CUDA call, the install and the packing run as there).
set -u
cd "$(dirname "$0")/.."
out=${OUT:?OUT: the folder whose files come back (the device tool sets it)}
py=${PYTHON:-python3}
ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl: run bench/device_wheels.sh here, carry .whl"; exit 2; }
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
"$py" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# a package the image lacks and .whl does not carry fails here in seconds, not in every step
"$py" -c "import micromerge.cli, micromerge.finetune.streaming, open_clip, open_clip_train.main, datasets, webdataset" || exit
"$py" -m pip list 2>/dev/null | grep -i -E "^(torch|torchvision|open.clip.torch|datasets|accelerate|safetensors|huggingface.hub|transformers|pyarrow|timm|webdataset) " >"$out/packages.txt"
PACK="$out/gpu.tar.gz" GPU_BUDGET_S=${GPU_BUDGET_S:-500} PYTHON=$py bash bench/gpu_all.sh /tmp/gpu-out "$@"
cp /tmp/gpu-out/steps.txt "$out/" 2>/dev/null
exit 0
