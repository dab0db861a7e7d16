#!/usr/bin/env bash
# Training on two GPUs, checked against one (called by h200_session.sh multi; W = work folder with
# the unpacked Emoji-5 set in W/emoji5, OUT = the device tool's result folder):
#   1. lasad-B, same global batch (64) and seed: 210 steps on one GPU, 200 on two (DDP, NCCL);
#      then two GPUs with 64 per GPU (batch 128) for the weak-scaling tokens/s
#   2. lasad-XL on two GPUs, global batch 32: DDP vs FSDP (full sharding, bf16), peak memory per GPU
#   3. the two-GPU checkpoints resume on one GPU (DDP lasad-B to step 210, to compare with the
#      one-GPU run; FSDP lasad-XL for 5 more steps) and the lasad-B deploy checkpoint draws in lasad-run
# Every run's log.jsonl (loss, tokens/s, peak memory per step window) lands in W/multi.
#   4. (later call) the same lasad-B comparison with dropout off (b1-nodrop, b2-nodrop): the
#      default dropouts draw different masks when the batch is split, so only without them do the
#      two curves follow one trajectory; lasad-XL with FSDP, log only (xl-fsdp-mem)
#   5. (next call) xl-fsdp + xl-fsdp-resume1 (the FSDP checkpoint continued on one GPU)
#   6. the noise floor of that comparison, with the loss of every step (n1..., n2...): one GPU twice
#      at once (n1 on GPU 0, n1-repeat on GPU 1: is one GPU deterministic, and are two GPUs alike?),
#      one GPU in micro-batches of 32 and of 16 (n1-accum2, n1-accum4: the per-rank batches of n2
#      and n2-accum2, and the size of the trajectory noise that a change of summation order makes),
#      two GPUs twice (n2, n2-repeat) and in micro-batches of 16 (n2-accum2); then the lasad-XL FSDP
#      checkpoint drawn by lasad-run (xl-run)
#   7. the gpu-marked FSDP test (fsdp-test); n1 and n1-accum2 in fp32 (f1, f1-accum2)
# Usage: multi_gpu.sh W [STEP ...] (default: the steps of 1-3); ONE_GPU picks the GPU of one-GPU steps.
set -u -o pipefail
W=$1; shift
WANT=" ${*:-codes b1 b2 b2w run b2-resume1 xl-ddp xl-fsdp xl-fsdp-resume1} "
G=${ONE_GPU:-0}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=8
LT="python3 -m lasad_train.cli"
TR="python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m lasad_train.cli"
M=$W/multi
mkdir -p "$M"
T0=$(date +%s)
left() { echo $(( ${END_S:-540} - ($(date +%s) - T0) )); }
step() {  # name, command...: run with the time left, log its exit status and duration
  local name=$1; shift
  case "$WANT" in *" $name "*) ;; *) return ;; esac
  local t=$(date +%s) budget; budget=$(left)
  if [ "$budget" -lt 20 ]; then echo "skip $name (no time left)" | tee -a "$M/steps.txt"; return; fi
  timeout "$budget" "$@" > "$M/$name.out" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t )) s" | tee -a "$M/steps.txt"
}
python3 -c "import torch; print(torch.cuda.device_count(), 'GPUs', torch.__version__)" | tee "$M/env.txt"
[ -f "$W/codes/manifest.json" ] || step codes env CUDA_VISIBLE_DEVICES=$G $LT codes "$W/emoji5" lasad_engine/assets/default-vq.safetensors "$W/codes" \
  --label-set identity --device cuda --no-progress --batch-size 256
B=(--preset lasad-B --batch-size 64 --lr 3e-4 --warmup 20 --seed 0 --log-every 5 --no-progress --save-every 1000000)
step b1 env CUDA_VISIBLE_DEVICES=$G $LT gpt "$W/codes" "$M/b1" "${B[@]}" --steps 210
step b2 $TR gpt "$W/codes" "$M/b2" "${B[@]}" --steps 200
step b2w $TR gpt "$W/codes" "$M/b2w" "${B[@]}" --batch-size 128 --steps 40
step run env CUDA_VISIBLE_DEVICES=$G python3 -m lasad_engine.cli --checkpoint "$M/b2/model.safetensors" \
  --tokenizer lasad_engine/assets/default-vq.safetensors \
  --class 207 -n 4 --seed 0 --no-progress -o "$M/b2-run.png"
step b2-resume1 env CUDA_VISIBLE_DEVICES=$G $LT gpt "$W/codes" "$M/b2" "${B[@]}" --steps 210 --resume
NODROP=(--set token_dropout=0 --set resid_dropout=0 --set ffn_dropout=0 --set class_dropout=0 --no-save)
# 6. the noise floor with the loss of every step; two one-GPU runs at a time, one on each GPU
N=("${B[@]}" "${NODROP[@]}" --log-every 1 --steps 200)
one() { local name=$1 gpu=$2; shift 2; step "$name" env CUDA_VISIBLE_DEVICES=$gpu $LT gpt "$W/codes" "$M/$name" "${N[@]}" "$@"; }
one n1 0 & one n1-repeat 1 & wait
one n1-accum2 0 --grad-accum 2 & one n1-accum4 1 --grad-accum 4 & wait
step n2 $TR gpt "$W/codes" "$M/n2" "${N[@]}"
step n2-repeat $TR gpt "$W/codes" "$M/n2-repeat" "${N[@]}"
step n2-accum2 $TR gpt "$W/codes" "$M/n2-accum2" "${N[@]}" --grad-accum 2
# FSDP's checkpoint against the rules a one-GPU resume relies on (a gpu-marked test, one GPU)
step fsdp-test env CUDA_VISIBLE_DEVICES=$G python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpt_train.py -k fsdp
X=(--preset lasad-XL --batch-size 32 --lr 1e-4 --seed 0 --log-every 5 --no-progress --save-every 1000000)
step xl-ddp $TR gpt "$W/codes" "$M/xl-ddp" "${X[@]}" --steps 20
rm -f "$M/xl-ddp/last.pt"  # 9 GB not needed again
step xl-fsdp $TR gpt "$W/codes" "$M/xl-fsdp" "${X[@]}" --fsdp --steps 20
step xl-fsdp-resume1 env CUDA_VISIBLE_DEVICES=$G $LT gpt "$W/codes" "$M/xl-fsdp" "${X[@]}" --steps 25 --resume --no-save
step xl-run env CUDA_VISIBLE_DEVICES=$G python3 -m lasad_engine.cli --checkpoint "$M/xl-fsdp/model.safetensors" \
  --tokenizer lasad_engine/assets/default-vq.safetensors \
  --class 207 -n 4 --seed 0 --no-progress -o "$M/xl-run.png"
# 7. the pair n1 / n1-accum2 again without bf16 (--precision fp32: fp32 GEMMs, TF32 inside fla's
#    kernels): if their gap is bf16 rounding grown along the trajectory, it shrinks here
one f1 0 --precision fp32 & one f1-accum2 1 --precision fp32 --grad-accum 2 & wait
step b1-nodrop env CUDA_VISIBLE_DEVICES=$G $LT gpt "$W/codes" "$M/b1-nodrop" "${B[@]}" "${NODROP[@]}" --steps 200
step b2-nodrop $TR gpt "$W/codes" "$M/b2-nodrop" "${B[@]}" "${NODROP[@]}" --steps 200
step xl-fsdp-mem $TR gpt "$W/codes" "$M/xl-fsdp-mem" "${X[@]}" --fsdp --no-save --steps 15
du -sh "$M"/*/last.pt 2>/dev/null | tee -a "$M/steps.txt"
rm -f "$M"/*/last.pt "$M"/*/model.safetensors
