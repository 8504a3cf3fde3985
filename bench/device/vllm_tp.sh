#!/usr/bin/env bash
# Tensor parallelism on several GPUs (issue 20): kind nvidia-h200-x2 (or -x4 / -x8), vLLM staged as
# in bench/device/vllm_gpu.sh (the four .stage/v parts; .stage/x is not needed). Keep NCCL's NVLink
# multicast off (the image sets NCCL_NVLS_ENABLE=0; it is forced here too).
# Calls after staging, on the same warm machine:
#   STEP=tests  tests/gpu/test_vllm_tp.py: TP 2/4/8 (as many GPUs as there are) against TP 1 for tiny,
#               Llama-2-7B- and Llama-3-8B-shaped random checkpoints; symmetric, asymmetric, group-wise
#   STEP=bench  bench_vllm_gpu.py --tp $TP (default: all GPUs) for bf16, FP8 and rotquant, with the
#               per-step kernel profile of rotquant W4A4 (its NCCL share is the per-token range
#               all-gather plus vLLM's all-reduce); in the background, then STEP=collect as in vllm_gpu.sh
source "$(dirname "$0")/setup.sh"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=/tmp/stage/vllm-site${PYTHONPATH:+:$PYTHONPATH} VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 \
    PYTHONUNBUFFERED=1
W=/tmp/rq; mkdir -p $W/bench
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
case "${STEP:?STEP=tests|bench|collect}" in
tests)
    timeout 560 python -m pytest -m gpu tests/gpu/test_vllm_tp.py -q -p no:cacheprovider -s -rA 2>&1 \
        | grep -E "TP [0-9]+ vs|passed|failed|Error|skipped" | tee "$OUT/pytest_gpu_tp.log" ;;
bench)
    setsid nohup timeout "${BENCH_S:-1500}" python bench/bench_vllm_gpu.py --tp "${TP:-$GPUS}" \
        --shapes ${SHAPES:-llama2-7b llama3-8b} --variants ${VARIANTS:-bf16 fp8 w4a4 w4a8 w4a4-asym} \
        --profile w4a4 --work $W/bench --out $W/bench/vllm_gpu_tp.json > $W/bench.log 2>&1 < /dev/null &
    sleep "${WAIT_S:-500}"; tail -5 $W/bench.log ;;
collect)
    for i in $(seq "${WAIT_S:-500}"); do grep -q "^| variant" $W/bench.log 2>/dev/null && break; sleep 1; done
    cp $W/bench/vllm_gpu_tp.json $W/bench/vllm_gpu_tp.md "$OUT"/ 2>/dev/null; tail -40 $W/bench.log ;;
esac
