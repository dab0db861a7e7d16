#!/usr/bin/env bash
# One device call of the demo model's GPT training (docs/demo-model.md, "How it was run"): train
# for SECONDS (a new run, or one that starts from INIT's weights: last.pt, with its optimizer
# state, is too large to come back), then draw the sampling sweep's tokens, and return
#   default.safetensors.part00N  the EMA weights in fp16 as lasad ships them (join_files)
#   sweep.npz                    tokens of benchmarks/demo_model.py's SWEEP (scored on the CPU)
#   tcache.txz                   Triton's cache (fla's kernels compiled and tuned): the next call
#                                restores it instead of spending minutes compiling
#   results.tgz                  log.jsonl, the logs
#
#   [DEMO_TCACHE=0] bash benchmarks/device/demo_call.sh SECONDS [INIT [LR]]
# Carried (git-ignored): .whl/ (fla-core), .carry/demo/{codes/, labels.npy, tcache.tgz},
# .carry/commit.txt.
set -u -o pipefail
TRAIN_SECONDS=${1:-420}
INIT=${2:-}
LR=${3:-1e-3}
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tcache
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
W=/tmp/w
mkdir -p "$W" "$OUT" /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || log "wheel install failed"
export PYTHONPATH=/tmp/site:$PWD
if [ -f .carry/demo/tcache.txz ]; then mkdir -p /tmp/tcache && tar xJf .carry/demo/tcache.txz -C /tmp/tcache && log "triton cache restored"; fi
ARGS=(--preset lasad-S --set n_layer=5 --steps 1000000 --batch-size 512 --lr "$LR" --warmup 200 --ema 0.9995
      --save-every 1000000 --log-every 50 --no-progress --time-limit "$TRAIN_SECONDS")
[ -n "$INIT" ] && ARGS+=(--init "$INIT")
log "train ${ARGS[*]}"
python3 -m lasad_train.cli gpt .carry/demo/codes /tmp/run "${ARGS[@]}" > "$W/train.log" 2>&1
log "train rc=$?"; tail -3 "$W/train.log"; tail -2 /tmp/run/log.jsonl
cp /tmp/run/log.jsonl "$W/" 2>/dev/null
mkdir -p /tmp/d && cp lasad_engine/assets/default-vq.safetensors /tmp/d/
python3 - <<'PY' >> "$W/train.log" 2>&1
import os
from lasad_engine import load_checkpoint, save_checkpoint
from lasad_train.formats import split_file
m = load_checkpoint("/tmp/run/model.safetensors")
meta = {**m.checkpoint_meta, "tokenizer": "default-vq.safetensors"}
save_checkpoint("/tmp/d/default.safetensors", m.half(), meta=meta)
print([str(p) for p in split_file("/tmp/d/default.safetensors", os.environ["OUT"])])
PY
log "deploy file split"
timeout 100 python3 benchmarks/demo_model.py sample --checkpoint /tmp/d/default.safetensors --labels .carry/demo/labels.npy \
  --out "$OUT/sweep.npz" > "$W/sample.log" 2>&1
log "sweep rc=$?"; cat "$W/sample.log" | tail -12
# Triton's cache, xz-compressed (gzip: 18 MB, over the 16 MB a returned file may have)
[ "${DEMO_TCACHE:-1}" = 1 ] && (cd /tmp/tcache && tar cJf "$OUT/tcache.txz" .) && log "tcache $(du -h "$OUT/tcache.txz" | cut -f1)"
(cd "$W" && tar czf "$OUT/results.tgz" ./*)
ls -la "$OUT"
log end
