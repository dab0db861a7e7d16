#!/usr/bin/env bash
# What a user runs to draw through onnxruntime-gpu (README, "Deploying the exported step"), on the
# bundled model, end to end: build the custom-op library to the place the backend looks, export
# the step, `lasad-run --checkpoint step.onnx --device cuda`, `lasad-check` on CUDA; then the same
# seed through the torch backend in fp32 against an fp32 export (byte-identical PNGs: the same tokens).
#
#   bash benchmarks/device/ort_cli_check.sh DIR      (needs onnxruntime-gpu and its headers: $ORT_INCLUDE)
set -u -o pipefail
D=$1
mkdir -p "$D"
run() { echo "+ $*"; local t=$(date +%s%N); "$@"; local rc=$?; echo "  rc=$rc in $(( ($(date +%s%N) - t) / 1000000 )) ms"; return $rc; }
# the console scripts of pyproject.toml, from a checkout that is importable but not pip-installed
script() { local name=$1 module=$2; shift 2
  python3 -c "import sys; sys.argv[0] = '$name'; from $module import ${name//-/_} as main; main()" "$@"; }
lasad_run() { script lasad-run lasad_engine.entry "$@"; }
lasad_export() { script lasad-export lasad_tools.entry "$@"; }
lasad_check() { script lasad-check lasad_tools.entry "$@"; }
cd "$D"
# the README's block, as written
run lasad_export default step-fp16-portable.onnx --portable --dtype fp16 --force
run lasad_run --checkpoint step-fp16-portable.onnx --device cuda -c 207
run python3 -m lasad_tools.ort_op build ${ORT_INCLUDE:+--ort-include "$ORT_INCLUDE"}
run lasad_export default step-fp16.onnx --dtype fp16 --force
run lasad_run --checkpoint step-fp16.onnx --device cuda -c 207
run lasad_check step-fp16.onnx default --device cuda
# the same seed in fp32: onnxruntime-gpu (custom node) against the torch backend
run lasad_export default step-fp32.onnx --force
run lasad_run --checkpoint step-fp32.onnx --device cuda -c 207 --seed 3 -o ort-fp32.png
run lasad_run --backend torch --precision fp32 --device cuda -c 207 --seed 3 -o torch-fp32.png
run lasad_run --backend cuda --device cuda -c 207 -o cuda-bf16.png
if cmp -s ort-fp32.png torch-fp32.png; then echo "fp32 onnxruntime-gpu == torch backend: identical PNG (the same tokens)"
else echo "fp32 onnxruntime-gpu != torch backend: the PNGs differ"; fi
run lasad_check step-fp32.onnx default --device cuda
rm -f ./*.onnx ./*.onnx.data
ls -la
