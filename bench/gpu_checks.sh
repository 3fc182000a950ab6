#!/usr/bin/env bash
# The GPU half of bench/RESULTS.md in one command, sized for a short lease on one H100/H200:
# the gpu-marked tests, then MFU of a 124M dense model and of the `medium` MoE (135M active) at seq 1024 in
# bf16 + torch.compile, each again with torchao fp8, fp16 + GradScaler, MLA vs MHA vs GQA batched decode,
# and `nanoseek train --hardware auto`.
#
#   bash bench/gpu_checks.sh fetch          # on a machine with PyPI: wheels of what a bare GPU image may
#                                           # lack (tyro and its two dependencies, torchao) into .whl/
#   bash bench/gpu_checks.sh run OUT_DIR [STEP ...]   # on the GPU machine, from the repository root
#
# Steps (all by default): tests dense_bf16 dense_fp8 dense_fp16 moe_bf16 moe_fp8 decode hardware_auto. Their
# timeouts add up to ~13 minutes; where one command may run 10 at most, run them in two halves:
#   run OUT tests dense_bf16 dense_fp8 dense_fp16     (<= 380 s)
#   run OUT moe_bf16 moe_fp8 decode hardware_auto     (<= 390 s)
#
# Every step runs under its own timeout and the script goes on after a failure; each writes its JSON (where
# the bench script has one) and all of them their output to OUT_DIR/log.txt, with the exit status per step
# in OUT_DIR/status.txt. Python 3.12 wheels: change PY_VERSION for another interpreter.
set -uo pipefail

PY_VERSION=${PY_VERSION:-3.12}
WHEELS=(tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 torchao==0.17.0)
DENSE_124M=(--preset tiny-gqa --set dim=768 n_layers=12 n_heads=12 n_kv_heads=12 inter_dim=2048
            max_seq_len=1024 tie_embeddings=True --vocab 50304)
MOE=(--preset medium)
GPU_TRAIN=(--device cuda --batch 16 --seq 1024 --steps 20 --warmup 5)

fetch() {
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    ls -la .whl
}

step() {  # step NAME TIMEOUT_S COMMAND...: run if selected, log, record the exit status, never stop the script
    local name=$1 limit=$2
    shift 2
    if [[ ${#SELECTED[@]} -gt 0 && ! " ${SELECTED[*]} " =~ " $name " ]]; then return; fi
    echo "=== $name: $*" | tee -a "$OUT/log.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/log.txt"
    echo "$name ${PIPESTATUS[0]}" | tee -a "$OUT/status.txt"
}

run() {
    OUT=${1:?usage: bash bench/gpu_checks.sh run OUT_DIR [STEP ...]}
    shift
    SELECTED=("$@")
    mkdir -p "$OUT"
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/log.txt"
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/log.txt"

    step tests 120 python3 -m pytest -q -m gpu tests
    step dense_bf16 100 python3 bench/bench_train.py "${DENSE_124M[@]}" "${GPU_TRAIN[@]}" --precision bf16 \
        --compile --json "$OUT/dense_bf16.json"
    step dense_fp8 100 python3 bench/bench_train.py "${DENSE_124M[@]}" "${GPU_TRAIN[@]}" --precision bf16 \
        --fp8 --compile --json "$OUT/dense_fp8.json"
    step dense_fp16 60 python3 bench/bench_train.py "${DENSE_124M[@]}" "${GPU_TRAIN[@]}" --precision fp16 \
        --json "$OUT/dense_fp16.json"
    step moe_bf16 120 python3 bench/bench_train.py "${MOE[@]}" "${GPU_TRAIN[@]}" --precision bf16 --compile \
        --json "$OUT/moe_bf16.json"
    step moe_fp8 120 python3 bench/bench_train.py "${MOE[@]}" "${GPU_TRAIN[@]}" --precision bf16 --fp8 \
        --compile --json "$OUT/moe_fp8.json"
    step decode 90 python3 bench/bench_decode.py --device cuda --dtype bfloat16 --dim 1024 --n-layers 12 \
        --n-heads 16 --kv-lora-rank 256 --batch-sizes 1 64 --prompt-len 512 --new-tokens 256 --no-uncached \
        --models mha gqa mla
    rm -rf /tmp/gpu_checks_run
    step hardware_auto 60 python3 -m nanoseek train --hardware auto --max-steps 50 --out /tmp/gpu_checks_run
    cat "$OUT/status.txt" 2>/dev/null
}

case "${1:-}" in
    fetch) fetch ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash bench/gpu_checks.sh fetch | run OUT_DIR" >&2; exit 2 ;;
esac
