#!/usr/bin/env bash
# This workplace's device call for the serving work (not for users: the README sends users to
# `python benchmarks/serve_bench.py --out DIR`). Installs the carried wheels (.whl: fastapi,
# uvicorn, httpx, prometheus-client, pydantic), then runs the named steps, each under its own time
# limit, packing $OUT after every step.
#
#   bash benchmarks/device/serve_call.sh STEP [STEP ...]
#   steps: env | gputest | serve-B | serve-XL | serve-quick | persistent | int8
set -u -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
W=/tmp/w
mkdir -p "$W" "$OUT" /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || log "wheel install failed"
ln -sfn "$PWD/tools" /tmp/site/lasad_tools && ln -sfn "$PWD/plugins" /tmp/site/lasad_plugins
export PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=/tmp/tcache LASAD_COMMIT=$(cat .carry/commit.txt 2>/dev/null)
pack() { (cd "$W" && tar czf "$OUT/results.tgz" --ignore-failed-read ./* 2>/dev/null); }
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  log "start $name"
  timeout "$secs" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  log "end $name rc=$rc"; tail -30 "$W/$name.log"
  pack
}
for s in "$@"; do
  case $s in
    env) step env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; python3 -c "import torch, triton, fastapi, uvicorn, httpx, prometheus_client; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), fastapi.__version__, uvicorn.__version__)"' ;;
    gputest) step gputest 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_serving.py tests/test_select.py tests/test_fused.py tests/test_gpu.py -rs --durations=6 ;;
    gputest-quick) step gputest 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_serving.py -rs --durations=6 ;;
    gputest-persistent) step gputest-persistent 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_persistent.py -rs --durations=6 ;;
    serve-B) step serve-B 470 python3 benchmarks/serve_bench.py --out "$W/serve-B" --presets lasad-B --slots 64 --budget 430 ;;
    serve-B-short) step serve-B 340 python3 benchmarks/serve_bench.py --out "$W/serve-B" --presets lasad-B --slots 64 --baseline-rates 0.05,0.5 --duration 5 --budget 300 ;;
    serve-XL) step serve-XL 330 python3 benchmarks/serve_bench.py --out "$W/serve-XL" --presets lasad-XL --slots 64 --policies continuous,lock --baseline-rates 0.25 --rates 0.5,0.8,1.25 --duration 5 --budget 290 ;;
    serve-B-min) step serve-B 280 python3 benchmarks/serve_bench.py --out "$W/serve-B" --presets lasad-B --slots 64 --policies continuous,lock --rates 0.5,0.8,1.25 --baseline-rates 0.05 --duration 4 --lone 8 --budget 230 ;;
    serve-quick) step serve-quick 300 python3 benchmarks/serve_bench.py --out "$W/serve-quick" --presets lasad-B --slots 64 --policies continuous --rates 0.5,1.25 --duration 4 --budget 250 ;;
    persistent) step persistent 200 python3 benchmarks/persistent_bench.py --out "$W/persistent" --budget 150 ;;
    int8) step int8 280 python3 benchmarks/int8_bench.py --out "$W/int8" ;;
    *) log "unknown step $s" ;;
  esac
done
pack
ls -la "$OUT"
log "end"
