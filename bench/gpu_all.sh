#!/usr/bin/env bash
# Every GPU check and GPU figure the issues ask for, in one run on a CUDA machine:
# the GPU tests (tests/test_gpu.py), then the benches on CUDA, most needed first.
# Usage: bench/gpu_all.sh OUT_DIR [STEP ...]   (the project importable by $PYTHON, HF_HUB_OFFLINE=1);
# STEPs, in the default order: pytest_gpu sweep_cuda methods_merge_cuda data_aware_cuda
# streaming_cuda finetune_cuda sweep_cuda_closed_set merge_cuda (the last three re-measure figures
# BENCHMARKS.md has from an earlier GPU session; the first five have never run on a GPU).
# Each step writes its own log, so a step that fails or runs out of time loses only itself.
# GPU_BUDGET_S (unset: no limit) bounds the whole run: each step stops (SIGINT, then SIGKILL 10 s
# later) at min(its own cap, what is left), and a step is not started with under 45 s left; a lent
# machine has 15 minutes in all, its start included (bench/device_check.sh sets the budget).
# PACK (a file name) is rewritten after every step as a .tar.gz of OUT_DIR, so a run killed from
# outside still returns every finished step in one file.
set -u
out=${1:?usage: bench/gpu_all.sh OUT_DIR [STEP ...]}
shift
wanted=${*:-pytest_gpu sweep_cuda methods_merge_cuda data_aware_cuda streaming_cuda finetune_cuda sweep_cuda_closed_set merge_cuda}
py=${PYTHON:-python3}
budget=${GPU_BUDGET_S:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1
"$py" -c "import torch, open_clip; print(torch.__version__, open_clip.__version__, torch.cuda.get_device_name())" >>"$out/gpu.txt" 2>&1
started=$SECONDS
pack() {
    [[ -n ${PACK:-} ]] || return 0
    tar -czf "$PACK.tmp" -C "$out" . && mv "$PACK.tmp" "$PACK"
}
step() {  # step NAME CAP_SECONDS COMMAND...  (the cap applies only under GPU_BUDGET_S)
    local name=$1 cap=$2
    shift 2
    [[ " $wanted " == *" $name "* ]] || return 0
    local limit=()
    if [[ -n $budget ]]; then
        local left=$((budget - (SECONDS - started)))
        if ((left < 45)); then
            echo "$name: not started, ${left} s of GPU_BUDGET_S=$budget left" | tee -a "$out/steps.txt"
            return 0
        fi
        limit=(timeout -s INT -k 10 $((cap < left ? cap : left)))
    fi
    local start=$SECONDS
    "${limit[@]}" "$@" >"$out/$name.log" 2>&1
    local code=$?
    local note=""
    ((code == 124 || code == 130 || code == 137)) && [[ -n $budget ]] && note=" (stopped at its time limit)"
    echo "$name: exit $code in $((SECONDS - start)) s$note" | tee -a "$out/steps.txt"
    pack
}
# issues 13, 14, 16: CUDA against CPU for every merge method, the data-aware statistics, fine-tuning, FSDP
step pytest_gpu 240 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
# issue 12: the μ-Bench protocol at full size (17,315 rows, ten caption keys)
step sweep_cuda 200 "$py" bench/sweep_bench.py --model ViT-B-16 --device cuda --images 2000 --rows 17315 \
    --stored-px 224 --batch-size 512 --skip-naive --bootstrap 1000 --protocol ubench
# issue 13: every merge method at ViT-B/16 size on CUDA
step methods_merge_cuda 150 "$py" bench/methods_merge_bench.py --device cuda
# issue 14: Fishers, Grams and learned coefficients at ViT-B/16 size on μ-Bench-sized data
step data_aware_cuda 200 "$py" bench/data_aware_bench.py --model ViT-B-16 --device cuda --steps 200
# issue 16: the streaming trainer against open_clip_train on the same webdataset shards
step streaming_cuda 200 "$py" bench/finetune_bench.py --against open_clip_train --model ViT-B-32 --device cuda \
    --batch-size 256 --steps 200 --precision bf16 --workers 8
step finetune_cuda 120 "$py" bench/finetune_bench.py --against plain-loop --model ViT-B-32 --device cuda \
    --batch-size 256 --steps 200
step sweep_cuda_closed_set 200 "$py" bench/sweep_bench.py --model ViT-B-16 --device cuda --images 2000 \
    --rows 17315 --stored-px 224 --batch-size 512 --skip-naive --bootstrap 1000 --protocol closed-set
step merge_cuda 120 "$py" bench/merge_bench.py --device cuda --repeats 3
pack
