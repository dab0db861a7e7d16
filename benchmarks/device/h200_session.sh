#!/usr/bin/env bash
# The training runs of the demo model, the ablation and the multi-GPU checks, one device call each.
#
#   bash benchmarks/device/h200_session.sh demo    # nvidia-h200-x2, ~9.5 min: issue 4 numbers, demo model, ablation
#   bash benchmarks/device/h200_session.sh multi [STEP ...]  # nvidia-h200-x2, ~9.5 min: DDP / FSDP on two GPUs
#   bash benchmarks/device/h200_session.sh final   # nvidia-h200-x2, ~9.5 min: the demo GPT again, longer; the ablation
#
# Runs on the GPU machine from the repository root with $OUT set (the device tool's result folder).
# Carried (git-ignored): .whl/ (fla wheels), .carry/emoji5.npz (lasad_train.formats.pack_image_set
# of `lasad-train data emoji5`), .carry/commit.txt, optionally Triton's compile cache
# (.carry/tcache.tgz.part*, returned by `multi`, compiled binaries only). `multi` and `final` encode
# with the bundled tokenizer (lasad_engine/assets/default-vq.safetensors, which `demo` trained);
# `multi` can take the codes instead of the images (.carry/codes.tgz: `tar czf .carry/codes.tgz -C
# DIR codes` of `lasad-train codes ... DIR/codes --label-set identity`), which keeps the carry under
# the 64 MiB a call takes with the Triton cache beside it.
# What comes back is at most 8 files under $OUT (the device tool's limit).
set -u -o pipefail
mode=${1:?usage: h200_session.sh demo|multi [STEP ...]|final}; shift
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { echo $(( ${END_S:-570} - ($(date +%s) - T0) )); }  # seconds to the end of the call
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# Triton keeps only the compiled binaries in its cache (no IR text): a fifth of the size to carry back
export PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=/tmp/tcache TRITON_STORE_BINARY_ONLY=1 \
  LASAD_COMMIT=$(head -1 .carry/commit.txt 2>/dev/null)
# Triton's compile cache from an earlier call, if carried (fla's first compile takes ~200 s)
if ls .carry/tcache.tgz.part000 >/dev/null 2>&1; then
  python3 -c "from lasad_train.formats import join_files as j; j('.carry/tcache.tgz.part000', '/tmp/tcache.tgz')" \
    && mkdir -p /tmp/tcache && tar xzf /tmp/tcache.tgz -C /tmp/tcache && echo "triton cache restored"
fi
LT="python3 -m lasad_train.cli"
W=/tmp/w
mkdir -p "$W" "$OUT"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$W/gpus.csv"
if [ -f .carry/codes.tgz ] && [ "$mode" = multi ]; then
  tar xzf .carry/codes.tgz -C "$W" && [ -f "$W/codes/manifest.json" ] || exit 1
else
  python3 -c "from lasad_train.formats import unpack_image_set as u; u('.carry/emoji5.npz', '$W/emoji5')" || exit 1
fi
log "unpacked"

pack() {  # bring back logs and small results as one archive
  (cd "$W" && tar czf "$OUT/results.tgz" --ignore-failed-read gpus.csv *.log check abl/train.json abl/*.npy \
     abl/gpt-*/log.jsonl abl/*.out vq/log.jsonl gpt/log.jsonl codes-id/manifest.json multi 2>/dev/null)
  ls -la "$OUT"
}

package_demo() {  # the demo GPT (and with "with-vq" its tokenizer) as the package's fp16 files, in $OUT
  python3 - "$W" "$OUT" "${1:-}" <<'PY' || log "packaging failed"
import sys
from pathlib import Path
from lasad_engine import load_checkpoint, save_checkpoint
from lasad_engine.tokenizer import load_tokenizer, save_tokenizer
from lasad_train.formats import split_file
w, out = Path(sys.argv[1]), Path(sys.argv[2])
if sys.argv[3] == "with-vq":
    save_tokenizer(out / "default-vq.safetensors", load_tokenizer(w / "vq" / "vq.safetensors").half())
m = load_checkpoint(w / "gpt" / "model.safetensors")
save_checkpoint(w / "default.safetensors", m.half(), meta={"tokenizer": "default-vq.safetensors",
                                                         "step": m.checkpoint_meta.get("step")})
split_file(w / "default.safetensors", out)  # parts under the 16 MB return limit
PY
}

if [ "$mode" = demo ]; then
  VQ_S=${VQ_S:-210}; GPT_S=${GPT_S:-200}; ABL_S=${ABL_S:-170}
  # GPU 1: issue 4's numbers (GPT tokens/s, fla vs torch) and the GPU tests; warms Triton's cache
  (CUDA_VISIBLE_DEVICES=1 timeout 270 python3 benchmarks/gpu_check.py --out "$W/check" --stages train,pytest \
     > "$W/check.log" 2>&1; log "check rc=$?") &
  check=$!
  # GPU 0: the demo tokenizer (f = 4, 4096 codes) on Emoji-5, then its codes (identity classes, flips)
  CUDA_VISIBLE_DEVICES=0 $LT tokenizer "$W/emoji5" "$W/vq" --preset vq-f4-demo --steps 1000000 --batch-size 128 \
    --lr 3e-4 --time-limit "$VQ_S" --no-progress --log-every 100 > "$W/vq.log" 2>&1 || { log "vq failed"; tail -5 "$W/vq.log"; }
  log "tokenizer done: $(tail -1 "$W/vq/log.jsonl")"
  CUDA_VISIBLE_DEVICES=0 $LT codes "$W/emoji5" "$W/vq/vq.safetensors" "$W/codes-id" --label-set identity \
    --device cuda --no-progress --batch-size 256 > "$W/codes.log" 2>&1 || log "codes failed"
  $LT data subset "$W/emoji5" "$W/sub40" --label-set subgroup --min-count 40 >> "$W/codes.log" 2>&1
  log "codes done"
  # GPU 1, once the checks are done: the four ablation variants side by side
  wait $check
  (CUDA_VISIBLE_DEVICES=1 timeout "$(left)" python3 benchmarks/ablation.py train --images "$W/sub40" --vq "$W/vq/vq.safetensors" \
     --work "$W/abl" --steps 2500 --parallel --time-limit "$ABL_S" > "$W/abl.log" 2>&1; log "ablation rc=$?") &
  abl=$!
  # GPU 0: the demo GPT (lasad-S shape, 5 layers), EMA weights deployed
  CUDA_VISIBLE_DEVICES=0 $LT gpt "$W/codes-id" "$W/gpt" --preset lasad-S --set n_layer=5 --steps 1000000 \
    --batch-size 256 --lr 6e-4 --warmup 200 --ema 0.999 --time-limit "$GPT_S" --no-progress --log-every 50 \
    --save-every 1000000 > "$W/gpt.log" 2>&1 || log "gpt failed"
  log "gpt done: $(tail -1 "$W/gpt/log.jsonl")"
  package_demo with-vq
  wait $abl
  pack
elif [ "$mode" = multi ]; then
  bash benchmarks/device/multi_gpu.sh "$W" "$@"    # steps: multi_gpu.sh's names (default: its steps 1-3)
  pack
  # hand Triton's compile cache on to the next call when it is small enough to carry
  (cd /tmp/tcache && find . \( -name '*.cubin' -o -name '*.json' -o -name '*.so' \) | tar czf /tmp/tcache.tgz -T -)
  ls -la /tmp/tcache.tgz
  if [ "$(stat -c %s /tmp/tcache.tgz)" -lt 31000000 ]; then
    python3 -c "from lasad_train.formats import split_file as s; s('/tmp/tcache.tgz', '$OUT')"
  fi
elif [ "$mode" = final ]; then
  # the demo GPT, longer, on the tokenizer that `demo` trained (bundled), and the ablation beside it
  GPT_S=${GPT_S:-290}
  CUDA_VISIBLE_DEVICES=0 $LT codes "$W/emoji5" lasad_engine/assets/default-vq.safetensors "$W/codes" --label-set identity \
    --device cuda --no-progress --batch-size 256 > "$W/codes.log" 2>&1 || log "codes failed"
  $LT data subset "$W/emoji5" "$W/sub40" --label-set subgroup --min-count 40 >> "$W/codes.log" 2>&1
  log "codes done"
  (CUDA_VISIBLE_DEVICES=1 timeout "$(left)" python3 benchmarks/ablation.py train --images "$W/sub40" \
     --vq lasad_engine/assets/default-vq.safetensors --work "$W/abl" --steps 1500 --parallel --time-limit 300 > "$W/abl.log" 2>&1
   log "ablation rc=$?"; ONE_GPU=1 END_S=$(left) bash benchmarks/device/multi_gpu.sh "$W" b1-nodrop; log "b1-nodrop done") &
  abl=$!
  CUDA_VISIBLE_DEVICES=0 $LT gpt "$W/codes" "$W/gpt" --preset lasad-S --set n_layer=5 --steps 1000000 \
    --batch-size 256 --lr 8e-4 --warmup 200 --ema 0.999 --time-limit "$GPT_S" --no-progress --log-every 50 \
    --save-every 1000000 > "$W/gpt.log" 2>&1 || log "gpt failed"
  log "gpt done: $(tail -1 "$W/gpt/log.jsonl")"
  package_demo
  wait $abl
  pack
  END_S=$(( $(left) - 15 )) bash benchmarks/device/multi_gpu.sh "$W" b2-nodrop xl-fsdp-mem
  pack
else
  echo "unknown mode $mode (demo | multi | final)"; exit 2
fi
log "end"
