#!/usr/bin/env bash
# One device call on the H200 that checks and times what the open issues need, step by step,
# each under its own time limit, results packed into $OUT after every step (so a call cut short
# still returns what it measured).
#
#   bash benchmarks/device/gpu_call.sh STEP [STEP ...]
#
# Steps: env | plugin | sampler | layers | engine | engine-final | engine-lxxl | engine-quick | pytest |
#        pytest-train | pytest-a | pytest-b | pytest-ort | tiles | tiles-lxxl | llamagen | ort-part N |
#        ort-install | ort (install, then the full bench) | ort-quick | ort-fuse | ort-cli | ort-int8 | ort-int8-bench | anatomy | engine-lxxl-quick |
#        persistent-test | persistent (issue 27: the persistent step's GPU tests, then its benchmark) |
#        serving-test | serve-B | serve-B-min | serve-XL | serve-both | serve-both-short | serve-lean (issue 25: the scheduler's GPU tests; serve_bench.py) |
#        int8 | int8-bq | int8-tests (issue 29: benchmarks/int8_gpu_call.py, all parts / bench+quality / tests) |
#        int8-sweep | int8-gputests | int8-e2e | int8-e2e-short (bf16 and int8 only) | int8-mm64 | int8-quick-tests (issue 29: the GEMM sweep; the gpu tests of the quantised
#        path; int8_bench with the tiles of this call's sweep, else .carry/int8_gemv_sweep.json; int8_bench at 64 images only; the quantised GPU tests of test_quant.py that compile least) | int8-sweep-short | int8-sweep-few (2 rows only) |
#        int8-ncu (Nsight Compute: lasad-XL's few-row GEMMs, bf16 and int8) |
#        int8-mm-tests | int8-mm-sweep | int8-mm64-pol (quant_mm's swapped and split tiles: GPU tests, 128-row sweep, step at 64 images with the sweep's tiles) |
#        persistent-short | persistent-all (every preset)
# The serving steps need the server's wheels in .whl (fastapi, starlette, uvicorn, h11, httpx, httpcore,
# anyio, sniffio, idna, certifi, prometheus_client, pydantic, pydantic_core, annotated_types,
# typing_inspection, typing_extensions: pip download ... --python-version 3.12, the device README).
# Carried (git-ignored): .whl/ (fla-core wheel), .carry/llamagen (LlamaGen's gpt.py, generate.py,
# drop_path.py at ce98ec4, for `llamagen`), .carry/ptx (PTX compiled on the CPU machine, for
# `plugin`: benchmarks/plugin_launch_check.py --prepare build/plugin-launch), .carry/ort.partN
# (onnxruntime-gpu pruned to sm_90 in parts: benchmarks/device/pack_ort_gpu.py; `ort-partN` copies one to
# /tmp on a warm machine, `ort` joins and installs them, then runs benchmarks/ort_gpu_bench.py).
set -u -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
W=/tmp/w
mkdir -p "$W" "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || log "wheel install failed"
fi
# the checkout importable as installed (pytest too): tools/ and plugins/ under their installed names
mkdir -p /tmp/site && ln -sfn "$PWD/tools" /tmp/site/lasad_tools && ln -sfn "$PWD/plugins" /tmp/site/lasad_plugins
export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site:/tmp/ortsite:$PWD TRITON_CACHE_DIR=/tmp/tcache LASAD_COMMIT=$(cat .carry/commit.txt 2>/dev/null)
pack() { (cd "$W" && tar czf "$OUT/results.tgz" --ignore-failed-read ./* 2>/dev/null); }
step() {  # step NAME SECONDS CMD...: run, log its end and rc, pack
  local name=$1 secs=$2; shift 2
  log "start $name"
  timeout "$secs" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  log "end $name rc=$rc"; tail -25 "$W/$name.log"
  pack
}
for s in "$@"; do
  case $s in
    env) step env 60 bash -c 'nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; python3 -c "import fla; print(\"fla\", fla.__version__)"' ;;
    plugin) step plugin 90 python3 benchmarks/plugin_launch_check.py --carried build/plugin-launch --out "$W/plugin" ;;
    sampler) step sampler 150 python3 benchmarks/sampler_bench.py --out "$W/sampler" ;;
    layers) step layers 240 python3 benchmarks/decode_layer_bench.py --out "$W/layers" ;;
    engine) step engine 420 python3 benchmarks/engine_bench.py --out "$W/engine" --presets lasad-B,lasad-L,lasad-XL,lasad-XXL --batches 1,8,64,256 ;;
    engine-final) step engine 230 python3 benchmarks/engine_bench.py --out "$W/engine" --presets lasad-B,lasad-XL --batches 1,8,64,256 ;;
    engine-lxxl) step engine-lxxl 200 python3 benchmarks/engine_bench.py --out "$W/engine-lxxl" --presets lasad-L,lasad-XXL --batches 1,8,64,256 ;;
    engine-quick) step engine 240 python3 benchmarks/engine_bench.py --out "$W/engine" --presets lasad-B,lasad-XL --batches 1,64 --quick ;;
    anatomy) step anatomy 150 python3 benchmarks/step_anatomy.py --out "$W/anatomy" --presets lasad-B,lasad-L,lasad-XL,lasad-XXL ;;
    pytest) step pytest 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests -rs --deselect tests/test_gpt_train.py ;;
    # the same GPU tests in three parts that each fit one call (fla's compiles are slow)
    pytest-a) step pytest-a 420 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_linear.py -rs --durations=8 ;;
    pytest-b) step pytest-b 420 python3 -m pytest -q -p no:cacheprovider -m gpu tests -rs --durations=8 --ignore tests/test_gpu.py --ignore tests/test_linear.py --ignore tests/test_ort_gpu.py --ignore tests/test_gpt_train.py ;;
    pytest-ort) step pytest-ort 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_ort_gpu.py tests/test_export.py -rs --durations=8 ;;
    ort-quick) step ort-quick 240 python3 benchmarks/ort_gpu_bench.py --out "$W/ort-quick" --forms custom --dtypes fp16,fp32 --budget 200 ;;
    ort-fuse) step ort-fuse 480 python3 benchmarks/ort_gpu_bench.py --out "$W/ort-fuse" --forms custom --dtypes fp16,fp32 --unfused --anatomy --budget 400 ;;
    engine-lxxl-quick) step engine-lxxl 150 python3 benchmarks/engine_bench.py --out "$W/engine-lxxl" --presets lasad-L,lasad-XXL --batches 1,8,64 --quick ;;
    pytest-train) step pytest-train 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpt_train.py -rs ;;
    persistent-test) step persistent-test 110 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_persistent.py -rs --durations=8 ;;
    persistent) step persistent 200 python3 benchmarks/persistent_bench.py --out "$W/persistent" --budget 150 ;;
    serving-test) step serving-test 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_serving.py -rs --durations=6 ;;
    serve-B) step serve-B 470 python3 benchmarks/serve_bench.py --out "$W/serve-B" --presets lasad-B --slots 64 --budget 430 ;;
    serve-B-min) step serve-B 280 python3 benchmarks/serve_bench.py --out "$W/serve-B" --presets lasad-B --slots 64 --policies continuous,lock --rates 0.5,0.8,1.25 --baseline-rates 0.05 --duration 4 --lone 8 --budget 230 ;;
    serve-B-tiny) step serve-B 170 python3 benchmarks/serve_bench.py --out "$W/serve-B" --presets lasad-B --slots 64 --policies continuous --rates 0.5,1.25 --duration 3 --lone 5 --budget 130 ;;
    serving-test-quick) step serving-test 110 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_serving.py -rs -x -k "philox or torch_backends or reproducible" ;;
    serve-both) step serve-both 470 python3 benchmarks/serve_bench.py --out "$W/serve-both" --presets lasad-B,lasad-XL --slots 64 --policies continuous,lock --rates 0.5,0.8,1.25 --baseline-rates 0.05 --duration 4 --lone 8 --budget 430 ;;
    serve-both-short) step serve-both 360 python3 benchmarks/serve_bench.py --out "$W/serve-both" --presets lasad-B,lasad-XL --slots 64 --policies continuous,lock --rates 0.8,1.25 --baseline-rates 0.05 --duration 4 --lone 6 --budget 300 ;;
    serve-diag) step serve-B 250 python3 benchmarks/serve_bench.py --out "$W/serve-B" --presets lasad-B --slots 64 --policies continuous --rates 0.5,1.25 --duration 6 --lone 5 --profile 4 --budget 220 ;;
    serve-final-B) step serve-final-B 125 python3 benchmarks/serve_bench.py --out "$W/serve-final-B" --presets lasad-B --slots 64 --policies continuous,lock --rates 0.8,1.25 --baseline-rates 0.05 --duration 4 --lone 5 --profile 2 --budget 110 ;;
    serve-final-XL) step serve-final-XL 125 python3 benchmarks/serve_bench.py --out "$W/serve-final-XL" --presets lasad-XL --slots 64 --policies continuous,lock --rates 0.8,1.25 --baseline-rates 0.05 --duration 4 --lone 5 --budget 110 ;;
    serve-lean) step serve-both 290 python3 benchmarks/serve_bench.py --out "$W/serve-both" --presets lasad-B,lasad-XL --slots 64 --policies continuous,lock --rates 0.8,1.25 --baseline-rates 0.05 --duration 3 --lone 5 --budget 230 ;;
    serve-XL) step serve-XL 330 python3 benchmarks/serve_bench.py --out "$W/serve-XL" --presets lasad-XL --slots 64 --policies continuous,lock --baseline-rates 0.25 --rates 0.5,0.8,1.25 --duration 5 --budget 290 ;;
    int8) step int8 600 python3 benchmarks/int8_gpu_call.py --out "$W/int8" ;;
    int8-bq) step int8 420 python3 benchmarks/int8_gpu_call.py --out "$W/int8" --parts bench,quality ;;
    int8-tests) step int8-tests 200 python3 benchmarks/int8_gpu_call.py --out "$W/int8-tests" --parts tests ;;
    int8-sweep) step int8-sweep 360 python3 benchmarks/int8_gemv_sweep.py --out "$W/int8-sweep" --presets lasad-XL,lasad-XXL,lasad-B --rows 2,128 --budget 320 ;;
    int8-sweep-few) step int8-sweep 200 python3 benchmarks/int8_gemv_sweep.py --out "$W/int8-sweep" --presets lasad-XL,lasad-XXL,lasad-B --rows 2 --budget 170 ;;
    int8-sweep-short) step int8-sweep 230 python3 benchmarks/int8_gemv_sweep.py --out "$W/int8-sweep" --presets lasad-XL,lasad-XXL,lasad-B --rows 2,128 --budget 190 ;;
    # 64 images only: quant_mm's step against bf16 in one short call
    int8-mm64) step int8-mm64 200 python3 benchmarks/int8_bench.py --out "$W/int8-mm64" --presets lasad-B,lasad-XL --batches 64 --variants bf16,int8 --repeats 3 ;;
    # quant_mm's swapped product and split K (64 images): its GPU tests, the 128-row sweep, the step with its tiles
    int8-mm-tests) step int8-mm-tests 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_quant.py -rs --durations=5 -k "quant_mm_tiles or lasad_shapes" ;;
    int8-mm-sweep) step int8-sweep-mm 300 python3 benchmarks/int8_gemv_sweep.py --out "$W/int8-sweep-mm" --presets lasad-XL,lasad-B,lasad-XXL --rows 128 --budget 265 ;;
    int8-mm64-pol) pol="$W/int8-sweep-mm/int8_gemv_sweep.json"
         step int8-mm64 260 python3 benchmarks/int8_bench.py --out "$W/int8-mm64" --presets lasad-B,lasad-XL,lasad-XXL --batches 64 --variants bf16,int8 --repeats 3 --quant-policy "$pol" ;;
    # Nsight Compute on lasad-XL's few-row GEMMs, bf16 beside int8 (benchmarks/int8_ncu_probe.py): counters, stalls
    int8-ncu) mkdir -p "$W/ncu"; step int8-ncu 200 bash -c 'for op in o qfv w13; do for f in bf16 int8; do
         ncu --clock-control none --kernel-name "regex:^(fused_linear_kernel|gemv_kernel)" --launch-skip 2 --launch-count 1 \
           --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats \
           --section MemoryWorkloadAnalysis --csv --page details --log-file "'"$W"'/ncu/xl-$op-$f.csv" \
           python3 benchmarks/int8_ncu_probe.py --preset lasad-XL --op $op --fmt $f --rows 2; done; done' ;;
    int8-quick-tests) step int8-quick-tests 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_quant.py -rs --durations=5 -k "lasad_shapes or byte_permute or graphed" ;;
    int8-gputests) step int8-gputests 220 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_quant.py tests/test_linear.py -rs --durations=5 ;;
    # int8_bench with the tiles of this machine's sweeps (few rows: int8-sweep*, many: int8-mm-sweep), else .carry's
    int8-e2e|int8-e2e-short) pols=(); for f in "$W/int8-sweep/int8_gemv_sweep.json" "$W/int8-sweep-mm/int8_gemv_sweep.json"; do
           [ -f "$f" ] && pols+=(--quant-policy "$f"); done
         [ ${#pols[@]} -eq 0 ] && [ -f .carry/int8_gemv_sweep.json ] && pols=(--quant-policy .carry/int8_gemv_sweep.json)
         if [ "$s" = int8-e2e ]; then v=bf16,int8,int8_i2f,fp8; else v=bf16,int8; fi
         step "$s" 330 python3 benchmarks/int8_bench.py --out "$W/$s" --presets lasad-B,lasad-XL,lasad-XXL --batches 1,64 --variants "$v" --repeats 3 ${pols[@]+"${pols[@]}"} ;;
    persistent-all) step persistent 290 python3 benchmarks/persistent_bench.py --out "$W/persistent" --presets lasad-B,lasad-L,lasad-XL,lasad-XXL --budget 200 ;;
    persistent-short) step persistent 150 python3 benchmarks/persistent_bench.py --out "$W/persistent" --budget 110 ;;
    tiles) step tiles 240 python3 benchmarks/linear_tile_sweep.py --out "$W/tiles" ;;
    tiles-lxxl) step tiles-lxxl 260 python3 benchmarks/linear_tile_sweep.py --out "$W/tiles-lxxl" --presets lasad-L,lasad-XXL --budget 230 ;;
    llamagen) step llamagen 190 python3 benchmarks/llamagen_bench.py --llamagen .carry/llamagen --out "$W/llamagen" ;;
    ort-part*) n=${s#ort-part}; cp .carry/ort.part"$n" /tmp/ && log "ort part $n copied" ;;
    ort|ort-install) step ort-install 120 bash -c 'cat /tmp/ort.part* > /tmp/ort.tar.xz && mkdir -p /tmp/ortsite && tar xJf /tmp/ort.tar.xz -C /tmp/ortsite && python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"'
         [ "$s" = ort ] && step ort 400 python3 benchmarks/ort_gpu_bench.py --out "$W/ort" --dtypes fp16,fp32 --anatomy --budget 330 ;;
    # issue 29: the quantised export on onnxruntime-gpu (after ort-install): its GPU tests, then the bench
    ort-int8) step ort-int8-tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_ort_gpu.py -rs ;;
    ort-int8-bench) step ort-int8 170 python3 benchmarks/ort_gpu_bench.py --out "$W/ort-int8" --presets lasad-B,lasad-XL --images 1,64 \
           --forms portable --dtypes fp16 --weights float,int8 --budget 120 ;;
    ort-cli) ORT_INCLUDE=/tmp/ortsite/ort-include step ort-cli 150 bash benchmarks/device/ort_cli_check.sh "$W/ort-cli" ;;
    *) log "unknown step $s" ;;
  esac
done
pack
ls -la "$OUT"
log "end"
