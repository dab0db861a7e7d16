"""Run the LasadStep plugin through NVIDIA's `tensorrt.plugin` layer over the stand-in core and
report what happened as JSON (tests/test_trt_plugin_conformance.py asserts on it).

    python tests/trt_standin/conformance.py --layer DIR --onnx step.onnx --out report.json

Runs in its own process: the stand-in `tensorrt` must not leak into other tests, and Triton must
compile (TRITON_INTERPRET unset). Steps: registration (a failing definition first, to show that
nothing is left half-registered and that a second call re-raises the cause; then the real one,
twice), NVIDIA's creator on numpy's 1-element arrays, the import of the exported LasadStep nodes
as onnx-tensorrt does it, and the builder's calls on the created plugins for sm_90 / CUDA 13.0.
"""

# No `from __future__ import annotations`: tensorrt.plugin checks annotations as objects.
import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _error(fn):
    try:
        fn()
    except Exception as e:  # the report carries the error for the test to check
        return f"{type(e).__name__}: {e}"
    return None


def registration(trt, trtp, defs) -> dict:
    """The shipped aot_impl (no return annotation): validated first, it must fail before anything
    is recorded, and again with the same cause; without the validators, registration stops half
    way and the next call must re-raise the cause (not "already has a definition"). Then the real
    definitions register, and registering again is a no-op."""
    good = defs.lasad_step_aot

    def shipped(qfv, lower_bound, past_state, start, num_heads: defs.INT32, head_k_dim: defs.INT32,
                head_v_dim: defs.INT32, row_start: defs.INT32, has_lower_bound: defs.INT32, scale: defs.FLOAT32,
                outputs, tactic: int):
        return good(qfv, lower_bound, past_state, start, num_heads, head_k_dim, head_v_dim, row_start,
                    has_lower_bound, scale, outputs, tactic)

    def state():
        pd = getattr(getattr(trtp.op, "lasad", None), "LasadStep", None)
        return {"op": pd is not None, "aot_impl": pd is not None and pd.aot_impl_func is not None,
                "creators": sum(c.name == "LasadStep" for c in trt.get_plugin_registry().all_creators)}

    out = {}
    validate = defs._prevalidate
    defs.lasad_step_aot = shipped
    try:  # validated first: nothing may be recorded
        out["first"], out["after_first"], out["second"] = _error(defs.register), state(), _error(defs.register)
        out["after_second"] = state()
        defs._prevalidate = lambda: None  # a tensorrt.plugin without the validators: resumable steps
        out["unvalidated"], out["after_unvalidated"] = _error(defs.register), state()
        out["unvalidated_again"] = _error(defs.register)
    finally:
        defs.lasad_step_aot, defs._prevalidate = good, validate
    out["ok"], out["again"], out["after_ok"] = _error(defs.register), _error(defs.register), state()
    pd = trtp.op.lasad.LasadStep
    out["functions"] = [f.__qualname__ for f in (pd.register_func, pd.autotune_func, pd.aot_impl_func)]
    out["aot_attr_names"] = list(pd.aot_impl_attr_names)
    return out


def numpy_scalars(trt, trtp) -> dict:
    """NVIDIA's creator on an `int`-annotated attribute, fed the parser's 1-element INT32 array."""
    import numpy as np
    from typing import Tuple

    def toy_desc(x: trtp.TensorDesc, n: int) -> Tuple[trtp.TensorDesc]:
        return (x.like(),)

    trtp.register("lasadtest::IntAttr")(toy_desc)
    creator = trt.get_plugin_registry().get_creator("IntAttr", "1", "lasadtest")
    fc = trt.PluginFieldCollection([trt.PluginField("n", np.array([3], np.int32), trt.PluginFieldType.INT32)])
    err = _error(lambda: creator.create_plugin("IntAttr", "lasadtest", fc, trt.TensorRTPhase.BUILD))
    return {"numpy": np.__version__, "int_annotation_error": err}


def import_and_build(trt, standin, defs, node, rows, extra_columns=0) -> dict:
    from lasad_engine.ops.lasad.aot import entry_params, ptx_version
    plugin, creator, fields = standin.import_node(trt, node)
    attrs = {a.name: a for a in node.attribute}
    H, K, V = (attrs[n].i for n in ("num_heads", "head_k_dim", "head_v_dim"))
    S = 2 * H * K + H * V
    T = standin.Tensor
    inputs = [T(trt.DataType.FLOAT, (standin.ROWS, S + extra_columns)), T(trt.DataType.FLOAT, (H * K,)),
              T(trt.DataType.FLOAT, (standin.ROWS, H, K, V)), T(trt.DataType.BOOL, (1,))]
    built = standin.build(trt, plugin, inputs, opt_rows=8, max_rows=max(rows))
    params = entry_params(built.ptx, built.kernel_name)
    return {
        "creator": [creator.name, creator.plugin_version, creator.plugin_namespace],
        "creator_fields": [[f.name, f.type.name] for f in creator.field_names],
        "fields": [[f.name, f.type.name, f.data.dtype.str, f.data.shape[0], f.data.tolist()] for f in fields],
        "request": standin.creation_request(trt, node).name,
        "plugin_class": type(plugin).__name__,
        "plugin_attrs": {k: [str(v.dtype), v.tolist()] for k, v in plugin.attrs.items()},
        "H": H, "K": K, "V": V, "S": S,
        "output_types": [t.name for t in built.output_types],
        "aliases": built.aliases,
        "output_shapes": {str(r): [[e.evaluate({standin.ROWS: r}) for e in shape] for shape in built.output_shapes]
                          for r in rows},
        "combinations": [[[t.name, f.name] for t, f in c] for c in built.combinations],
        "tactic": built.tactic,
        "launch": {str(r): built.launch_values(r) for r in rows},
        "extras": [[d.name, [e.evaluate({standin.ROWS: r}) for r in rows]] for d, e in built.extras],
        "kernel_name": built.kernel_name,
        "ptx_params": [[p.name, p.decl, p.nbytes, p.is_pointer] for p in params],
        "ptx_version": ptx_version(built.ptx),
        "ptx_target": next(line.split()[1] for line in built.ptx.splitlines() if line.startswith(".target")),
        "timing_cache_id": built.timing_cache_id,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=Path, required=True, help="NVIDIA's tensorrt/plugin folder")
    ap.add_argument("--onnx", type=Path, required=True, help="a step.onnx with LasadStep nodes")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--cuda", default="13.0", help="the driver's CUDA version the PTX must load on")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import standin
    tmp = tempfile.mkdtemp(prefix="trt-standin-")
    sys.path.insert(0, str(standin.install(args.layer, tmp)))
    report = {}
    try:
        import onnx
        import tensorrt as trt
        import tensorrt.plugin as trtp

        from lasad_engine.ops.lasad.aot import CudaTarget
        from lasad_plugins import contract as C
        from lasad_plugins.lasad_step import defs
        report["tensorrt_module"] = trt.__file__
        report["registration"] = registration(trt, trtp, defs)
        report["numpy"] = numpy_scalars(trt, trtp)
        defs.KERNEL_TARGET = CudaTarget(args.arch, tuple(int(x) for x in args.cuda.split(".")))
        nodes = [n for n in onnx.load(str(args.onnx)).graph.node if n.op_type == C.OP_TYPE]
        has_lb = {}
        for n in nodes:  # one node without and one with a lower bound (layer 0 has none)
            flag = next(a.i for a in n.attribute if a.name == "has_lower_bound")
            has_lb.setdefault(flag, n)
        report["nodes"] = {str(flag): import_and_build(trt, standin, defs, n, [2, 8, 64, 512])
                           for flag, n in sorted(has_lb.items())}
        report["wrong_width"] = _error(lambda: import_and_build(trt, standin, defs, nodes[0], [2], extra_columns=1))
        report["compile_nodes"] = [[k.name, k.ptx_isa, len(k.params)] for k in defs.compile_nodes(args.onnx)]
    except Exception:
        report["crash"] = traceback.format_exc()
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
