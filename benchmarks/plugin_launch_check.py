"""The LasadStep plugin's kernel launched exactly as TensorRT launches it (docs/tensorrt.md).

    # here (CPU): the PTX that aot_impl returns with this machine's Triton, for sm_90 / CUDA 13.0,
    # and a copy of NVIDIA's tensorrt.plugin layer, into a git-ignored folder to carry:
    python benchmarks/plugin_launch_check.py --prepare build/plugin-launch
    # on the H200 (carry build/plugin-launch):
    python benchmarks/plugin_launch_check.py --carried build/plugin-launch --out $OUT
    # anywhere without a GPU: everything but the launches (PTX, launch parameters, argument packing)
    python benchmarks/plugin_launch_check.py --carried build/plugin-launch --out DIR --dry-run

For each row_start mode and with / without lower bound, the plugin is created from a LasadStep
node and built by the stand-in builder over NVIDIA's unmodified plugin layer (tests/trt_standin:
creator lookup, fields as the ONNX parser makes them, output types, aliasing, shapes, formats,
configure, launch parameters, get_kernel). Its PTX is loaded with cuModuleLoadData and launched
with cuLaunchKernel using the grid, block, shared memory and the argument list TensorRT passes:
the 4 inputs, the int32 extras (H, S), the 2 outputs, present_state at past_state's address
(aliased in place). Each launch is compared with the float64 reference (fused_gates +
lasad_step_functional) at the lasad-B/L/XL/XXL head shapes (H = 12, 16, 20, 24; K = V = 64),
rows 2, 8, 64, 512, the row-start flags (one per row) all off, all on and mixed. Two PTX sources: compiled on the GPU machine by
its Triton (aot_impl for the GPU and driver there), and compiled here with Triton 3.9 for sm_90 /
CUDA 13.0 (carried). Two controls, recorded but not judged: Triton's own PTX (hidden parameters,
its default ISA) loaded and launched with TensorRT's 8 arguments.

Every CUDA return code is checked; outputs are poisoned (NaN) before each launch. Writes
DIR/plugin_launch_check.json, prints a table last, exits non-zero on any error over --tol.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _repo import ROOT  # noqa: E402  (the checkout importable as installed)

sys.path.insert(0, str(ROOT / "tests" / "trt_standin"))
import standin  # noqa: E402

HEADS = {"lasad-B": 12, "lasad-L": 16, "lasad-XL": 20, "lasad-XXL": 24}
K = V = 64
ROWS = (2, 8, 64, 512)
MODES = ("none", "unit", "reset")
PTX_SOURCE_HERE = "triton-{} (this machine, aot_impl)"


def layer_path(carried: Path | None) -> Path | None:
    return standin.find_plugin_layer(ROOT, carried)


def lasad_node(H: int, row_start: str, has_lb: bool):
    """A LasadStep node as lasad-export writes it (contract attributes + the parser's)."""
    from onnx import helper

    from lasad_plugins import contract as C
    attrs = dict(num_heads=H, head_k_dim=K, head_v_dim=V, row_start=C.ROW_START_CODES[row_start],
                 has_lower_bound=int(has_lb), scale=float(K ** -0.5), **C.PARSER_ATTRIBUTES)
    return helper.make_node(C.OP_TYPE, list(C.INPUTS), list(C.OUTPUTS), domain=C.DOMAIN, **attrs)


def build_kernels(layer: Path | None, target) -> dict:
    """For every (mode, lower bound): the PTX aot_impl returns and, per H, the launch parameters
    and extras, evaluated at each row count. Through NVIDIA's layer over the stand-in when it is
    here; else from compile_step_kernel alone (recorded as such)."""
    out = {}
    if layer is not None:
        sys.path.insert(0, str(standin.install(layer, tempfile.mkdtemp(prefix="trt-standin-"))))
        import tensorrt as trt

        from lasad_plugins.lasad_step import defs
        defs.register()
        defs.KERNEL_TARGET = target
        T, R = standin.Tensor, standin.ROWS
        for mode in MODES:
            for lb in (False, True):
                entry = {"launch": {}, "extras": {}, "launch_params_from": "tensorrt.plugin over the stand-in core"}
                for H in HEADS.values():
                    plugin, _, _ = standin.import_node(trt, lasad_node(H, mode, lb))
                    S = 2 * H * K + H * V
                    built = standin.build(trt, plugin, [T(trt.DataType.FLOAT, (R, S)), T(trt.DataType.FLOAT, (H * K,)),
                                                        T(trt.DataType.FLOAT, (R, H, K, V)), T(trt.DataType.BOOL, (1,))],
                                          opt_rows=8, max_rows=max(ROWS))
                    if built.aliases != [-1, 2]:
                        raise RuntimeError(f"the plugin declares aliases {built.aliases}, expected [-1, 2]")
                    entry["launch"][H] = {r: built.launch_values(r) for r in ROWS}
                    entry["extras"][H] = [[d.name, e.evaluate({R: 0})] for d, e in built.extras]
                    entry["name"], entry["ptx"] = built.kernel_name, built.ptx
                kernel = next(k for k in defs.COMPILED.values() if k.name == entry["name"] and k.ptx == entry["ptx"])
                entry.update(ptx_isa=kernel.ptx_isa, hidden_removed=kernel.hidden_removed, triton_ptx=kernel.triton_ptx)
                out[(mode, lb)] = entry
        return out
    from lasad_engine.ops.lasad.aot import compile_step_kernel, plugin_kernel_constants
    for mode in MODES:
        for lb in (False, True):
            constants, warps = plugin_kernel_constants(K, V, mode, lb, K ** -0.5)
            k = compile_step_kernel(constants, warps, target)
            launch = {H: {r: dict(zip(("grid_x", "grid_y", "grid_z"), k.grid(r, H)), block_x=k.threads, block_y=1,
                              block_z=1, shared_mem=k.shared) for r in ROWS} for H in HEADS.values()}
            extras = {H: [["INT32", H], ["INT32", 2 * H * K + H * V]] for H in HEADS.values()}
            out[(mode, lb)] = {"launch": launch, "extras": extras, "name": k.name, "ptx": k.ptx, "ptx_isa": k.ptx_isa,
                               "hidden_removed": k.hidden_removed, "triton_ptx": k.triton_ptx,
                               "launch_params_from": "compile_step_kernel (NVIDIA's layer not carried)"}
    return out


def prepare(folder: Path) -> int:
    """PTX from this machine's Triton for sm_90 / CUDA 13.0 (the H200, driver R580) + NVIDIA's layer."""
    import triton

    from lasad_engine.ops.lasad.aot import CudaTarget
    layer = layer_path(None)
    if layer is None:
        print("NVIDIA's tensorrt.plugin layer is not under ../shared/third_party: cannot prepare", file=sys.stderr)
        return 1
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(layer, folder / "plugin", dirs_exist_ok=True)
    kernels = build_kernels(layer, CudaTarget(90, (13, 0)))
    manifest = {"triton": triton.__version__, "target": "sm_90 / CUDA 13.0", "kernels": []}
    for (mode, lb), e in kernels.items():
        stem = f"{mode}-{'lb' if lb else 'nolb'}"
        (folder / f"{stem}.ptx").write_text(e["ptx"])
        (folder / f"{stem}.triton.ptx").write_text(e["triton_ptx"])
        manifest["kernels"].append({"mode": mode, "has_lb": lb, "ptx": f"{stem}.ptx", "triton_ptx": f"{stem}.triton.ptx",
                                    **{k: e[k] for k in ("name", "launch", "extras", "ptx_isa", "hidden_removed",
                                                         "launch_params_from")}})
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"prepared {len(kernels)} kernels (Triton {triton.__version__}) and NVIDIA's layer in {folder}")
    return 0


def carried_kernels(folder: Path) -> tuple[str, dict]:
    m = json.loads((folder / "manifest.json").read_text())
    out = {}
    for k in m["kernels"]:
        out[(k["mode"], k["has_lb"])] = {
            "name": k["name"], "ptx": (folder / k["ptx"]).read_text(), "triton_ptx": (folder / k["triton_ptx"]).read_text(),
            "launch": {int(H): {int(r): v for r, v in rows.items()} for H, rows in k["launch"].items()},
            "extras": {int(H): v for H, v in k["extras"].items()}, "ptx_isa": k["ptx_isa"],
            "hidden_removed": k["hidden_removed"], "launch_params_from": k["launch_params_from"]}
    return f"triton-{m['triton']} (carried, compiled for {m['target']})", out


class Driver:
    """cuda-python's driver API (`cuda.bindings.driver`, or the older `cuda.cuda`); every call's
    CUresult is checked."""

    def __init__(self):
        try:
            from cuda.bindings import driver as cu
        except ImportError:
            from cuda import cuda as cu
        self.cu = cu
        self.check(cu.cuInit(0), "cuInit")

    def check(self, result, what):
        err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        if int(err) != 0:
            _, name = self.cu.cuGetErrorName(err)
            raise RuntimeError(f"{what}: {name.decode() if isinstance(name, bytes) else name}")
        return rest[0] if len(rest) == 1 else rest

    def try_call(self, result) -> str:
        err = result[0] if isinstance(result, tuple) else result
        if int(err) == 0:
            return "CUDA_SUCCESS"
        _, name = self.cu.cuGetErrorName(err)
        return name.decode() if isinstance(name, bytes) else str(name)

    def version(self) -> int:
        return self.check(self.cu.cuDriverGetVersion(), "cuDriverGetVersion")

    def load(self, ptx: str, name: str):
        module = self.check(self.cu.cuModuleLoadData(ptx.encode() + b"\0"), "cuModuleLoadData")
        return module, self.check(self.cu.cuModuleGetFunction(module, name.encode()), "cuModuleGetFunction")

    def launch(self, function, launch: dict, args: list, stream: int):
        err = self.cu.cuLaunchKernel(function, launch["grid_x"], launch["grid_y"], launch["grid_z"], launch["block_x"],
                                     launch["block_y"], launch["block_z"], launch["shared_mem"], stream,
                                     ctypes.addressof(args[0]), 0)
        return err[0] if isinstance(err, tuple) else err


def pack(tensors_and_extras: list) -> tuple:
    """TensorRT's argument list: a void*[] whose entries point at each argument's storage (device
    pointers as 8-byte values, int32 extras as 4-byte values). Returns (array, storage)."""
    storage = []
    for kind, value in tensors_and_extras:
        storage.append(ctypes.c_uint64(value) if kind == "ptr" else ctypes.c_int32(value))
    array = (ctypes.c_void_p * len(storage))(*[ctypes.addressof(s) for s in storage])
    return [array], storage


def unpack(args: list, sizes: list) -> list:
    """Read the argument list back as the driver does: entry i points at sizes[i] bytes."""
    read = {8: ctypes.c_uint64, 4: ctypes.c_int32}
    return [read[n].from_address(args[0][i]).value for i, n in enumerate(sizes)]


START_CASES = ("off", "on", "mixed")  # every row's flag off, on, or a random mix (one flag per row)


def case_inputs(H, rows, has_lb, start, gen, device):
    """Random fp32 inputs on `device` (drawn there, from `gen` of that device; uninitialised
    buffers when `gen` is None: a dry run only packs their addresses). `start`: START_CASES."""
    import torch
    S = 2 * H * K + H * V
    if gen is None:
        return (torch.empty(rows, S), torch.zeros(H * K), torch.empty(rows, H, K, V),
                torch.zeros(rows, dtype=torch.bool))
    qfv = torch.randn(rows, S, generator=gen, device=device)
    lb = torch.rand(H * K, generator=gen, device=device) * 0.9 if has_lb else torch.zeros(H * K, device=device)
    past = torch.randn(rows, H, K, V, generator=gen, device=device)
    if start == "mixed":
        flags = torch.rand(rows, generator=gen, device=device) < 0.5
    else:
        flags = torch.full((rows,), start == "on", dtype=torch.bool, device=device)
    return qfv, lb, past, flags


def reference(qfv, lb, past, start, H, mode, has_lb):
    from lasad_engine.ops.lasad import fused_gates, lasad_step_functional
    q, k, v, g = fused_gates(qfv.double(), lb.double() if has_lb else None, H, K, V)
    return lasad_step_functional(q, k, v, g, past.double(), start, mode, K ** -0.5)


def rel(x, ref) -> float:
    import torch
    x = x.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def run_source(source: str, kernels: dict, drv: Driver | None, device, seed: int) -> tuple[list, dict]:
    import torch
    cases, info = [], {}
    gen = torch.Generator(device).manual_seed(seed) if drv is not None else None
    from lasad_engine.ops.lasad.aot import entry_params
    for (mode, lb), e in kernels.items():
        sizes = [p.nbytes for p in entry_params(e["ptx"], e["name"])]
        if sizes != [8, 8, 8, 8, 4, 4, 8, 8]:
            raise RuntimeError(f"{source} {mode}: the PTX entry takes parameters of {sizes} bytes, not TensorRT's 8")
        function = None
        if drv is not None:
            _, function = drv.load(e["ptx"], e["name"])
        info[f"{mode}/{'lb' if lb else 'no-lb'}"] = {k: e[k] for k in ("name", "launch_params_from", "ptx_isa",
                                                                      "hidden_removed")}
        for preset, H in HEADS.items():
            (_, h), (_, s) = e["extras"][H]
            if (h, s) != (H, 2 * H * K + H * V):
                raise RuntimeError(f"{source} {mode}: extras {(h, s)} for H={H}")
            for rows in ROWS:
                launch = e["launch"][H][rows]
                for start in START_CASES:
                    qfv, lbt, past, st = case_inputs(H, rows, lb, start, gen, device)
                    if drv is not None:
                        o_ref, s_ref = reference(qfv, lbt, past, st, H, mode, lb)
                    o = torch.full((rows, H, V), float("nan"), device=device)  # poisoned
                    args, keep = pack([("ptr", qfv.data_ptr()), ("ptr", lbt.data_ptr()), ("ptr", past.data_ptr()),
                                       ("ptr", st.data_ptr()), ("i32", h), ("i32", s), ("ptr", o.data_ptr()),
                                       ("ptr", past.data_ptr())])  # present_state aliases past_state
                    case = {"source": source, "preset": preset, "H": H, "rows": rows, "mode": mode, "has_lb": lb,
                            "start": start, "launch": launch, "nargs": len(keep)}
                    if drv is None:  # what the driver would read from the argument list
                        values = [qfv.data_ptr(), lbt.data_ptr(), past.data_ptr(), st.data_ptr(), h, s,
                                  o.data_ptr(), past.data_ptr()]
                        if unpack(args, sizes) != values:
                            raise RuntimeError(f"{source} {mode}: the packed arguments do not read back")
                        case.update(o_err=None, state_err=None)
                    else:
                        drv.check(drv.launch(function, launch, args, torch.cuda.current_stream().cuda_stream),
                                  "cuLaunchKernel")
                        drv.check(drv.cu.cuCtxSynchronize(), "cuCtxSynchronize")
                        case.update(o_err=rel(o, o_ref), state_err=rel(past, s_ref))
                    cases.append(case)
    return cases, info


def controls_in_child(ptxs: dict, out: Path) -> dict:
    """The controls in a child process: launching a kernel with fewer arguments than its entry
    declares lets the driver read past the argument list, which may kill the process instead of
    returning an error; a crash is recorded as such."""
    import subprocess
    out.mkdir(parents=True, exist_ok=True)
    path = out / "controls_input.json"
    path.write_text(json.dumps(ptxs))
    r = subprocess.run([sys.executable, __file__, "--controls", str(path)], capture_output=True, text=True, timeout=120)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {label: {"child process": f"exit {r.returncode} (negative: killed by that signal)",
                    "stderr": r.stderr[-300:]} for label in ptxs}


def controls(drv: Driver, ptxs: dict, device) -> dict:
    """Triton's own PTX launched with TensorRT's 8 arguments (what the shipped plugin did), for
    H = 12 and 2 rows with that kernel's launch parameters."""
    import torch
    out = {}
    for label, (ptx, name, launch) in ptxs.items():
        mod = drv.cu.cuModuleLoadData(ptx.encode() + b"\0")
        result = {"cuModuleLoadData": drv.try_call(mod)}
        if result["cuModuleLoadData"] == "CUDA_SUCCESS":
            fn = drv.cu.cuModuleGetFunction(mod[1], name.encode())
            result["cuModuleGetFunction"] = drv.try_call(fn)
            if result["cuModuleGetFunction"] == "CUDA_SUCCESS":
                H, rows = 12, 2
                qfv, lb, past, st = case_inputs(H, rows, True, False, torch.Generator(device).manual_seed(0), device)
                o = torch.full((rows, H, V), float("nan"), device=device)
                args, _ = pack([("ptr", qfv.data_ptr()), ("ptr", lb.data_ptr()), ("ptr", past.data_ptr()),
                                ("ptr", st.data_ptr()), ("i32", H), ("i32", 2 * H * K + H * V), ("ptr", o.data_ptr()),
                                ("ptr", past.data_ptr())])
                result["cuLaunchKernel with 8 arguments"] = drv.try_call(
                    drv.launch(fn[1], launch, args, torch.cuda.current_stream().cuda_stream))
                result["cuCtxSynchronize"] = drv.try_call(drv.cu.cuCtxSynchronize())
        out[label] = result
    return out


def environment(drv: Driver | None, device) -> dict:
    import torch
    import triton

    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout.strip() or None
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            return f"unavailable ({type(e).__name__})"
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": run(["git", "rev-parse", "--short", "HEAD"]), "torch": torch.__version__,
           "triton": triton.__version__, "python": sys.version.split()[0], "command": " ".join(sys.argv)}
    try:
        from importlib.metadata import version
        env["cuda_bindings"] = version("cuda-bindings")
    except Exception:  # noqa: BLE001
        env["cuda_bindings"] = None
    if drv is not None:
        v = drv.version()
        env.update(device=torch.cuda.get_device_name(device), cuda_driver=f"{v // 1000}.{(v % 1000) // 10}",
                   driver=run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepare", type=Path, help="write the carried folder here and stop")
    ap.add_argument("--carried", type=Path, help="the folder --prepare wrote")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="no GPU: build, compile and pack, but do not launch")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--controls", type=Path, help=argparse.SUPPRESS)  # the child of controls_in_child
    args = ap.parse_args(argv)
    import faulthandler
    faulthandler.enable()  # a crash in a driver call prints where it happened
    if args.controls:
        import torch
        drv = Driver()
        torch.zeros(1, device="cuda")
        ptxs = {k: tuple(v) for k, v in json.loads(args.controls.read_text()).items()}
        print(json.dumps(controls(drv, ptxs, torch.device("cuda"))))
        return 0
    if args.prepare:
        return prepare(args.prepare)
    if args.out is None:
        ap.error("--out is required (or --prepare)")
    import torch
    import triton

    from lasad_engine.ops.lasad.aot import CudaTarget
    t0 = time.perf_counter()
    drv = None if args.dry_run else Driver()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if drv is not None:
        torch.zeros(1, device=device)  # torch's primary context, current on this thread
    target = CudaTarget(90, (13, 0)) if args.dry_run else CudaTarget.current()
    layer = layer_path(args.carried)
    sources = {PTX_SOURCE_HERE.format(triton.__version__): build_kernels(layer, target)}
    if args.carried and (args.carried / "manifest.json").is_file():
        label, kernels = carried_kernels(args.carried)
        sources[label] = kernels
    cases, info = [], {}
    for source, kernels in sources.items():
        c, i = run_source(source, kernels, drv, device, args.seed)
        cases += c
        info[source] = i
    ctrl = {}
    if drv is not None:
        here = sources[PTX_SOURCE_HERE.format(triton.__version__)][("unit", True)]
        ptxs = {f"Triton {triton.__version__} PTX as emitted (this machine)":
                (here["triton_ptx"], here["name"], here["launch"][12][2])}
        for label, kernels in sources.items():
            if "carried" in label:
                k = kernels[("unit", True)]
                ptxs[f"{label.split(' ')[0]} PTX as emitted (carried)"] = (k["triton_ptx"], k["name"], k["launch"][12][2])
        ctrl = controls_in_child(ptxs, args.out)
    errs = [max(c["o_err"], c["state_err"]) for c in cases if c["o_err"] is not None]
    ok = (args.dry_run or (bool(errs) and max(errs) <= args.tol)) and all(c["nargs"] == 8 for c in cases)
    result = {"environment": environment(drv, device), "target": {"arch": target.arch, "cuda": list(target.cuda),
                                                                 "ptx_isa": target.ptx_isa},
              "dry_run": args.dry_run, "tol": args.tol, "sources": info, "controls": ctrl, "cases": cases,
              "max_err": max(errs) if errs else None, "pass": ok, "seconds": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plugin_launch_check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    for label, r in ctrl.items():
        print(f"control: {label}: " + ", ".join(f"{k} -> {v}" for k, v in r.items()))
    print(f"{'source':52} {'mode':6} {'lb':3} {'cases':>5} {'args':>4} {'max o err':>10} {'max state err':>13}")
    for source in sources:
        for mode in MODES:
            for lb in (False, True):
                sel = [c for c in cases if c["source"] == source and c["mode"] == mode and c["has_lb"] == lb]
                fmt = lambda k: "-" if args.dry_run else f"{max(c[k] for c in sel):.2e}"  # noqa: E731
                print(f"{source[:52]:52} {mode:6} {'yes' if lb else 'no':3} {len(sel):>5} {sel[0]['nargs']:>4} "
                      f"{fmt('o_err'):>10} {fmt('state_err'):>13}")
    print(("DRY RUN (no launches)" if args.dry_run else "PASS" if ok else "FAIL") +
          f" in {result['seconds']:.1f} s -> {args.out / 'plugin_launch_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
