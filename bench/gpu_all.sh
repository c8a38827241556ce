#!/usr/bin/env bash
# Every GPU check and GPU figure the issues ask for, in one run on a CUDA machine:
# the GPU tests (tests/test_gpu.py), then the fine-tuning, sweep and merge benches on CUDA.
# Usage: bench/gpu_all.sh OUT_DIR [STEP ...]   (the project importable by $PYTHON, HF_HUB_OFFLINE=1);
# STEPs: pytest_gpu finetune_cuda sweep_cuda sweep_cuda_closed_set merge_cuda methods_merge_cuda
# data_aware_cuda streaming_cuda (default: all, in that order).
# Each step writes its own file, so a step that fails or runs out of time loses only itself.
set -u
out=${1:?usage: bench/gpu_all.sh OUT_DIR [STEP ...]}
shift
wanted=${*:-pytest_gpu finetune_cuda sweep_cuda sweep_cuda_closed_set merge_cuda methods_merge_cuda data_aware_cuda streaming_cuda}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1
"$py" -c "import torch, open_clip; print(torch.__version__, open_clip.__version__, torch.cuda.get_device_name())" >>"$out/gpu.txt" 2>&1
step() {
    local name=$1
    shift
    [[ " $wanted " == *" $name "* ]] || return 0
    local start=$SECONDS
    "$@" >"$out/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$out/steps.txt"
}
step pytest_gpu "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
step finetune_cuda "$py" bench/finetune_bench.py --against plain-loop --model ViT-B-32 --device cuda --batch-size 256 --steps 200
# issue 12: the μ-Bench protocol at full size (17,315 rows, ten caption keys), then closed-set as before
step sweep_cuda "$py" bench/sweep_bench.py --model ViT-B-16 --device cuda --images 2000 --rows 17315 \
    --stored-px 224 --batch-size 512 --skip-naive --bootstrap 1000 --protocol ubench
step sweep_cuda_closed_set "$py" bench/sweep_bench.py --model ViT-B-16 --device cuda --images 2000 --rows 17315 \
    --stored-px 224 --batch-size 512 --skip-naive --bootstrap 1000 --protocol closed-set
step merge_cuda "$py" bench/merge_bench.py --device cuda --repeats 3
# issue 13: every merge method at ViT-B/16 size on CUDA
step methods_merge_cuda "$py" bench/methods_merge_bench.py --device cuda
# issue 14: Fishers, Grams and learned coefficients at ViT-B/16 size on μ-Bench-sized data
step data_aware_cuda "$py" bench/data_aware_bench.py --model ViT-B-16 --device cuda --steps 1000
# issue 16: the streaming trainer against open_clip_train on the same webdataset shards
step streaming_cuda "$py" bench/finetune_bench.py --against open_clip_train --model ViT-B-32 --device cuda --batch-size 256 \
    --steps 200 --precision bf16 --workers 8
