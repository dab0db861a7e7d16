#!/usr/bin/env bash
# One device call of the demo model's GPT training (docs/demo-model.md, "How it was run"): train
# for SECONDS, then draw the sampling sweep's tokens, and return
#   default.safetensors.part00N  the EMA weights in fp16 as lasad ships them (join_files)
#   sweep.npz                    tokens of benchmarks/demo_model.py's SWEEP (scored on the CPU)
#   tcache.txz                   Triton's cache (fla's kernels compiled and tuned): the next call on
#                                a fresh machine restores it instead of spending minutes compiling
#   results.tgz                  log.jsonl, the logs
#
#   [DEMO_STEPS=N DEMO_COOLDOWN=M] [DEMO_TCACHE=0] bash benchmarks/device/demo_call.sh SECONDS [INIT [LR]]
#
# The run lives in runs/demo-gpt (git-ignored, so the device machine keeps it between calls while
# the session holds that machine: the next call must come within the seconds it stays warm). A
# call that finds it there continues it (--resume: weights, AdamW state, EMA, RNG, schedule, and
# the compiled kernels in runs/demo-gpt/triton-cache); otherwise it starts the run: DEMO_STEPS
# steps in all (default: open-ended, 1000000) with the rate falling over the last DEMO_COOLDOWN
# (default 0), or, given INIT, from those weights with a fresh optimizer (what had to be done
# while the state could not be kept). The state is saved as bounded shards (--resume-format
# shards) but does not come back: for the demo model it is 153 MB in 11 files, over the 8 files
# and 64 MiB a call returns (and the 64 MiB a call takes).
# Carried (git-ignored): .whl/ (fla-core), .carry/demo/{codes/, labels.npy, tcache.txz},
# .carry/commit.txt.
#
# Mixed resolution (docs/demo-model.md, "64 and 96 px in one GPT"): the 96 px image set does not
# travel in one call beside the repository, so it comes in parts, one per call on the warm machine,
# each `bash benchmarks/device/demo_call.sh part N` copying .carry/demo/p96.partN to /tmp (the parts
# of `tar cf - emoji5-96 | xz`, split). A training call that finds them joins them, encodes the
# training split with the bundled tokenizer on the GPU into runs/demo-codes96, and trains on both
# code sets. Other settings of a new run: DEMO_MIX (--mix), DEMO_EMA (0.9995), DEMO_WARMUP (200),
# DEMO_SET (the GPT's shape on lasad-S, default "n_layer=5", the shipped one; the next capacity step of
# docs/demo-model.md: "n_layer=6 dim=448 n_head=7 ffn_dim=1216");
# the sweep: DEMO_GRIDS (grids to sample at, default the model's; none: no sweep) and DEMO_SETTINGS ("CFG,TOPK,TEMP ...",
# default benchmarks/demo_model.py's SWEEP).
set -u -o pipefail
if [ "${1:-}" = part ]; then
  cp ".carry/demo/p96.part$2" /tmp/ && echo "part $2 copied: $(ls -la /tmp/p96.part*)"
  exit 0
fi
TRAIN_SECONDS=${1:-420}
INIT=${2:-}
LR=${3:-1e-3}
RUN=runs/demo-gpt
# Triton keeps only the compiled binaries in its cache (no IR text): less to carry back
export PYTHONUNBUFFERED=1 TRITON_STORE_BINARY_ONLY=1
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
W=/tmp/w
mkdir -p "$W" "$OUT" /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || log "wheel install failed"
export PYTHONPATH=/tmp/site:$PWD
if [ ! -d "$RUN/triton-cache" ] && [ -f .carry/demo/tcache.txz ]; then
  mkdir -p "$RUN/triton-cache" && tar xJf .carry/demo/tcache.txz -C "$RUN/triton-cache" && log "triton cache restored"
fi
CODES=(.carry/demo/codes)
if ls /tmp/p96.part* >/dev/null 2>&1 && [ ! -f runs/demo-codes96/manifest.json ]; then
  cat /tmp/p96.part* | xz -d | tar xf - -C /tmp && log "96 px image set unpacked"
  python3 -m lasad_train.cli codes /tmp/emoji5-96 lasad_engine/assets/default-vq.safetensors runs/demo-codes96 \
    --label-set identity --no-progress > "$W/codes96.log" 2>&1
  log "codes96 rc=$?"; tail -2 "$W/codes96.log"
fi
[ -f runs/demo-codes96/manifest.json ] && CODES+=(runs/demo-codes96)
ARGS=(--save-every 1000000 --log-every 50 --no-progress --time-limit "$TRAIN_SECONDS")
if [ -f "$RUN/state/index.json" ] || [ -f "$RUN/last.pt" ]; then
  # a resumed run keeps its --steps (and so its cool-down) unless DEMO_STEPS changes them
  ARGS+=(--resume)
  [ -n "${DEMO_STEPS:-}" ] && ARGS+=(--steps "$DEMO_STEPS")
else
  ARGS+=(--steps "${DEMO_STEPS:-1000000}" --preset lasad-S --batch-size 512 --lr "$LR" --warmup "${DEMO_WARMUP:-200}"
         --ema "${DEMO_EMA:-0.9995}" --cooldown "${DEMO_COOLDOWN:-0}" --resume-format shards --overwrite)
  for kv in ${DEMO_SET:-n_layer=5}; do ARGS+=(--set "$kv"); done
  [ -n "${DEMO_MIX:-}" ] && ARGS+=(--mix "$DEMO_MIX")
  [ -n "$INIT" ] && ARGS+=(--init "$INIT")
fi
log "train ${ARGS[*]}"
python3 -m lasad_train.cli gpt "${CODES[@]}" "$RUN" "${ARGS[@]}" > "$W/train.log" 2>&1
log "train rc=$?"; tail -3 "$W/train.log"; tail -2 "$RUN/log.jsonl"
cp "$RUN/log.jsonl" "$W/" 2>/dev/null
mkdir -p /tmp/d && cp lasad_engine/assets/default-vq.safetensors /tmp/d/
RUN=$RUN python3 - <<'PY' >> "$W/train.log" 2>&1
import os
from lasad_engine import load_checkpoint, save_checkpoint
from lasad_train.formats import split_file
m = load_checkpoint(os.path.join(os.environ["RUN"], "model.safetensors"))
meta = {**m.checkpoint_meta, "tokenizer": "default-vq.safetensors"}
save_checkpoint("/tmp/d/default.safetensors", m.half(), meta=meta)
print([str(p) for p in split_file("/tmp/d/default.safetensors", os.environ["OUT"])])
PY
log "deploy file split"
SETTINGS=()
[ -n "${DEMO_SETTINGS:-}" ] && SETTINGS=(--settings $DEMO_SETTINGS)
for grid in ${DEMO_GRIDS:-default}; do
  [ "$grid" = none ] && continue
  GRID=(); NAME=sweep
  [ "$grid" != default ] && GRID=(--grid "$grid") && NAME=sweep-$grid
  timeout 100 python3 benchmarks/demo_model.py sample --checkpoint /tmp/d/default.safetensors --labels .carry/demo/labels.npy \
    --out "$OUT/$NAME.npz" "${GRID[@]}" "${SETTINGS[@]}" > "$W/sample-$grid.log" 2>&1
  log "sweep $grid rc=$?"; tail -12 "$W/sample-$grid.log"
done
# Triton's cache, xz-compressed (gzip: 18 MB, over the 16 MB a returned file may have)
[ "${DEMO_TCACHE:-1}" = 1 ] && (cd "$RUN/triton-cache" && tar cJf "$OUT/tcache.txz" .) && log "tcache $(du -h "$OUT/tcache.txz" | cut -f1)"
du -sb "$RUN/state" 2>/dev/null
(cd "$W" && tar czf "$OUT/results.tgz" ./*)
ls -la "$OUT"
log end
