"""The exported step on onnxruntime-gpu's CUDA provider, beside the `cuda` backend, in one run.

    python benchmarks/ort_gpu_bench.py --out DIR [--presets lasad-B,lasad-XL] [--images 1,8,64] [--budget 300]
                                      [--forms portable,custom] [--dtypes fp16,bf16,fp32] [--anatomy] [--unfused]
                                      [--weights float,int8,fp8]

For each preset (random weights, std 0.02): the `cuda` backend (bf16, CUDA graph) and every
exported form (portable; custom node when `python -m lasad_tools.ort_op build` succeeds here) in
every dtype (fp16, bf16, fp32), exported here and run through LasadEngine(backend="onnxruntime",
device="cuda") with onnxruntime's CUDA graphs: ms per step and per 16x16 image at 1, 8 and 64
images (CFG: 2 rows per image, cfg 4.0, top-k 2000). Then, for lasad-B: the teacher-forced
logits of each export against the torch backend in fp32 (relative error, beside lasad-check's
bound for the dtype) and the tokens of each fp32 export against the torch backend's for the same
seed. Configurations that fail record their one-line error; those that do not fit in --budget
seconds are listed as skipped. With --anatomy, each configuration's kernels at one image, by
family (benchmarks/step_anatomy.py, eager onnxruntime runs without its CUDA graph). With
--unfused, each configuration once more with the session graph as exported (the backend's
residual-add + RMSNorm fusion off), which is what that fusion buys. With --weights int8 (or fp8),
each form is also exported with `lasad-export --weights` (QDQ DequantizeLinear on the layer
weights), timed, and its logits compared with the torch backend on the same quantised weights
(`lasad_engine.quant`, the definition the cuda kernels compute). Each configuration also
records the backend's part of a step alone (`decode_split`: ms per call, and ms the host takes
to issue one: whether the step is bound by the host or by its kernels). JSON in
DIR/ort_gpu.json, the table last on stdout.
Targets: within 2x of the cuda backend at 1 image and 1.3x at 64.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repo  # noqa: E402,F401

from engine_bench import random_model  # noqa: E402
from step_anatomy import anatomy, family_lines, kernels_per_step  # noqa: E402

from lasad_engine import quant  # noqa: E402
from lasad_engine.backends import ort as ort_backend  # noqa: E402
from lasad_engine.engine import LasadEngine, SamplingParams  # noqa: E402
from lasad_engine.params import Grid  # noqa: E402
from lasad_tools.check import TOLERANCES  # noqa: E402
from lasad_tools.onnx_export import export_step  # noqa: E402

PARAMS = SamplingParams(cfg_scale=4.0, top_k=2000)
TIMED = Grid(8, 8)    # 64 timed steps per measurement
DTYPE_ORDER = ("fp16", "bf16", "fp32")
T0 = time.perf_counter()
FUSE = ort_backend.fuse_residual_norms


def elapsed() -> float:
    return time.perf_counter() - T0


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def ms_per_step(engine: LasadEngine, n: int, device) -> float:
    labels = list(range(n))
    # warm up on the timed grid: another grid is another captured graph (and maybe token buffer)
    engine.generate(labels, grid=TIMED, params=PARAMS, generator=torch.Generator(device).manual_seed(0))
    runs = []
    for r in range(2):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        engine.generate(labels, grid=TIMED, params=PARAMS, generator=torch.Generator(device).manual_seed(r))
        torch.cuda.synchronize(device)
        runs.append((time.perf_counter() - t) * 1e3 / TIMED.tokens)
    return statistics.median(runs)


def decode_split(engine: LasadEngine, n: int, device, calls: int = 200) -> dict:
    """The backend's part of a step at n images, called back to back (after a generation made its
    bindings): ms per call until the GPU is done, and ms the host takes to issue one call. When the
    second nears the first, the step is bound by the host, not by its kernels."""
    rows = engine.buffers.tables.step_rows(2 * n, engine.scheduler.indexed)   # as the scheduler hands them
    state, decode = engine.buffers.state, engine.backend.decode
    decode(rows, state)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(calls):
        decode(rows, state)
    issued = time.perf_counter() - t
    torch.cuda.synchronize(device)
    done = time.perf_counter() - t
    return {"decode_ms": done * 1e3 / calls, "decode_issue_ms": issued * 1e3 / calls}


def build_op(out: Path) -> dict:
    """Build the custom-op library for this machine; where the backend finds it ($LASAD_ORT_OP)."""
    include = next((p for p in (os.environ.get("ORT_INCLUDE"), "/tmp/ortsite/ort-include", ".carry/ort-include")
                    if p and Path(p, "onnxruntime_c_api.h").is_file()), None)
    cmd = [sys.executable, "-m", "lasad_tools.ort_op", "build", "--out", str(out)]
    cmd += ["--ort-include", include] if include else []
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=_repo.ROOT,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(_repo.ROOT), os.environ.get("PYTHONPATH", "")])})
    if done.returncode != 0:
        return {"ok": False, "error": (done.stderr or done.stdout).strip()[-400:]}
    info = json.loads(done.stdout.strip().splitlines()[-1])
    os.environ["LASAD_ORT_OP"] = info["library"]
    return {"ok": True, **info}


def bench_preset(name: str, images: list[int], forms: list[str], dtypes: list[str], device, tmp: Path,
                 budget: float, parity: bool, kernels: bool, unfused: bool = False,
                 weights: tuple[str, ...] = ("float",)) -> dict:
    res: dict = {"preset": name, "cuda": {}, "onnxruntime": {}, "parity": {}, "tokens": {}, "skipped": []}
    model32 = random_model(name, device, torch.float32)
    bf16 = random_model(name, device, torch.bfloat16)
    cuda = LasadEngine(bf16, backend="cuda", device=device, max_batch=max(images))
    for n in images:
        res["cuda"][n] = ms_per_step(cuda, n, device)
    cuda.close()
    if kernels:
        try:
            res["cuda_anatomy"] = anatomy(bf16, device)
        except Exception as e:  # noqa: BLE001 - the anatomy is extra; the timings above stand
            res["cuda_anatomy"] = {"error": one_line(e)}
    del cuda, bf16
    torch.cuda.empty_cache()
    ref, refs = None, {}
    if parity:
        g = torch.Generator().manual_seed(1)
        T = 32
        tokens = torch.randint(0, model32.config.vocab_size, (2, T), generator=g).to(device)
        labels = torch.tensor([3, 7], device=device)
        ref = LasadEngine(model32, backend="torch", device=device, max_batch=2).teacher_forced_logits(
            tokens, labels, cfg_rows=True)
        for fmt in (w for w in weights if w != "float"):  # the torch step on the same quantised weights
            qmodel = quant.quantize_(copy.deepcopy(model32), fmt)
            refs[fmt] = LasadEngine(qmodel, backend="torch", device=device, max_batch=2).teacher_forced_logits(
                tokens, labels, cfg_rows=True)
            del qmodel
        ref_tokens = LasadEngine(model32, backend="torch", device=device, max_batch=2).generate(
            [3, 7], grid=Grid(16, 16), params=PARAMS, generator=torch.Generator(device).manual_seed(5))
    cpu_model = model32.to("cpu")  # the exporter's copy; the onnxruntime engines use only its config
    variants = [(f, d, w, fuse) for w in weights for f in forms for d in dtypes
                for fuse in ((True, False) if unfused else (True,))]
    for form, dtype, fmt, fuse in variants:
        key = f"{form}-{dtype}" + ("" if fmt == "float" else f"-{fmt}") + ("" if fuse else "-unfused")
        if elapsed() > budget:
            res["skipped"].append(key)
            continue
        entry: dict = {}
        res["onnxruntime"][key] = entry
        path = tmp / f"{name}-{key}.onnx"
        if not fuse:  # the backend's session graph as exported: residual adds not fused with the norms
            ort_backend.fuse_residual_norms = lambda proto: 0
        try:
            t = time.perf_counter()
            export_step(cpu_model, path, portable=form == "portable", dtype=dtype, max_batch=max(images),
                        **({} if fmt == "float" else {"weights": fmt, "opset": 19 if fmt == "fp8" else 17}))
            entry["export_s"] = round(time.perf_counter() - t, 1)
            entry["ms_per_step"] = {}
            for graphs in (True, False):  # without onnxruntime's CUDA graphs only if they fail
                engine = LasadEngine(model32, backend="onnxruntime", device=device, max_batch=max(images),
                                     artifact=path, use_cuda_graph=graphs)
                try:
                    for n in images:
                        entry["ms_per_step"][n] = ms_per_step(engine, n, device)
                        entry.setdefault("decode_split", {})[n] = decode_split(engine, n, device)
                    entry["cuda_graph"] = graphs
                    break
                except Exception as e:  # noqa: BLE001
                    if not graphs:
                        raise
                    entry["graph_error"] = one_line(e)
                finally:
                    engine.close()
            if kernels:
                entry["anatomy"] = anatomy(model32, device, backend="onnxruntime", artifact=path,
                                           weight_bytes=1 if fmt != "float" else 4 if dtype == "fp32" else 2)
                print("\n".join([f"{name} {key}: {kernels_per_step(entry['anatomy']):.0f} kernels/step"]
                                 + family_lines(entry["anatomy"])), flush=True)
            if ref is not None and fuse:
                e2 = LasadEngine(model32, backend="onnxruntime", device=device, max_batch=2, artifact=path,
                                 use_cuda_graph=entry["cuda_graph"])
                got = e2.teacher_forced_logits(tokens, labels, cfg_rows=True)
                want = ref if fmt == "float" else refs[fmt]
                err = ((got.double() - want.double()).norm() / want.double().norm()).item()
                res["parity"][key] = {"rel_err": err, "bound": TOLERANCES[dtype], "pass": err <= TOLERANCES[dtype],
                                      **({} if fmt == "float" else {"against": f"torch backend, {fmt} weights"})}
                if dtype == "fp32" and fmt == "float":
                    toks = e2.generate([3, 7], grid=Grid(16, 16), params=PARAMS,
                                       generator=torch.Generator(device).manual_seed(5))
                    same = (toks == ref_tokens)
                    first = int((~same.flatten(1)).float().argmax(1).min()) if not same.all() else None
                    res["tokens"][key] = {"equal_fraction": same.float().mean().item(), "first_difference": first}
                e2.close()
        except Exception as e:  # noqa: BLE001 - record and go on: one failing form must not hide the others
            entry["error"] = one_line(e)
            traceback.print_exc()
        finally:
            ort_backend.fuse_residual_norms = FUSE
            for f in tmp.glob(f"{name}-{key}.onnx*"):
                f.unlink()
            torch.cuda.empty_cache()
        print(f"[{elapsed():.0f} s] {name} {key}: {json.dumps(entry)}", flush=True)
    return res


def table(results: list[dict], images: list[int]) -> str:
    head = f"{'preset':10s} {'backend':22s} " + " ".join(f"{f'{n} img ms/step':>15s} {'ms/img':>8s} {'x cuda':>7s}"
                                                       for n in images)
    lines = [head, "-" * len(head)]
    for r in results:
        rows = [("cuda bf16", r["cuda"])] + [(k, e.get("ms_per_step", {})) for k, e in r["onnxruntime"].items()]
        for label, ms in rows:
            cells = []
            for n in images:
                v = ms.get(n)
                cells.append(f"{v:15.3f} {v * 256 / n:8.2f} {v / r['cuda'][n]:7.2f}" if v else f"{'-':>15s} {'-':>8s} {'-':>7s}")
            err = r["onnxruntime"].get(label, {}).get("error")
            lines.append(f"{r['preset']:10s} {label:22s} " + " ".join(cells) + (f"  {err[:60]}" if err else ""))
        for k, e in r["onnxruntime"].items():
            for n, d in e.get("decode_split", {}).items():
                lines.append(f"{r['preset']:10s} {k:22s} {n} img: decode alone {d['decode_ms']:.3f} ms/call, "
                             f"host issues one in {d['decode_issue_ms']:.3f} ms")
        for k, p in r["parity"].items():
            tok = r["tokens"].get(k)
            lines.append(f"{r['preset']:10s} parity {k:15s} rel_err {p['rel_err']:.2e} (bound {p['bound']:.0e}, "
                         f"{'pass' if p['pass'] else 'FAIL'})" + (f"  tokens equal {tok['equal_fraction']:.3f}" if tok else ""))
        if r["skipped"]:
            lines.append(f"{r['preset']:10s} skipped (time): {', '.join(r['skipped'])}")
    lines.append("targets: ORT within 2x of cuda at 1 image, 1.3x at 64")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--presets", default="lasad-B,lasad-XL")
    ap.add_argument("--images", default="1,8,64")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds after which configurations are skipped")
    ap.add_argument("--forms", default="portable,custom", help="custom runs where the op library builds")
    ap.add_argument("--dtypes", default=",".join(DTYPE_ORDER))
    ap.add_argument("--weights", default="float",
                    help="float and/or int8, fp8: the layer weights as exported (lasad-export --weights)")
    ap.add_argument("--anatomy", action="store_true", help="kernels per step of each configuration at one image")
    ap.add_argument("--unfused", action="store_true",
                    help="each configuration also without the backend's residual-add + RMSNorm fusion")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort
    device = torch.device("cuda")
    images = [int(x) for x in args.images.split(",")]
    record = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(device),
              "torch": torch.__version__, "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
              "commit": os.environ.get("LASAD_COMMIT", ""), "images": images, "params": str(PARAMS)}
    record["op_library"] = build_op(args.out / "build")
    forms = [f for f in args.forms.split(",") if f != "custom" or record["op_library"]["ok"]]
    dtypes = args.dtypes.split(",")
    print(f"[{elapsed():.0f} s] op library: {json.dumps(record['op_library'])}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="ortbench-", dir="/tmp") as tmp:
        for i, name in enumerate(args.presets.split(",")):
            results.append(bench_preset(name, images, forms, dtypes, device, Path(tmp), args.budget, parity=i == 0,
                                        kernels=args.anatomy, unfused=args.unfused,
                                        weights=tuple(args.weights.split(","))))
            record["results"] = results
            (args.out / "ort_gpu.json").write_text(json.dumps(record, indent=1, default=str))
    print(table(results, images))
    return 0


if __name__ == "__main__":
    sys.exit(main())
