"""The LasadStep plugin through NVIDIA's own `tensorrt.plugin` layer (TensorRT OSS v11.1, from
../shared/third_party) over a CPU stand-in for TensorRT's compiled core (tests/trt_standin/),
driven as onnx-tensorrt's plugin importer and the builder drive it, on the exported LasadStep
nodes of a small model; and the kernel ABI it hands TensorRT (docs/tensorrt.md).

The driver runs in a subprocess (tests/trt_standin/conformance.py): Triton must compile PTX there
(this process runs kernels in Triton's interpreter) and the stand-in `tensorrt` module must not
leak into other tests. Skips with the reason where ../shared is absent."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import HAS_TRITON, randomize_

from lasad_engine import LasadConfig, LasadGen
from lasad_engine.ops.lasad import aot
from lasad_plugins import contract as C

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "trt_standin"))
import standin  # noqa: E402

LAYER = standin.find_plugin_layer(REPO)
TARGET = aot.CudaTarget(arch=90, cuda=(13, 0))  # the H200 with the R580 driver
ROWS = [2, 8, 64, 512]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if LAYER is None:
        pytest.skip(f"NVIDIA's tensorrt.plugin layer is not here: no {standin.LAYER} under ../shared beside "
                    f"{REPO} (see ../shared/third_party/tensorrt-oss-11.1/README.md)")
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    pytest.importorskip("onnx")
    from lasad_tools.onnx_export import export_step
    tmp = tmp_path_factory.mktemp("conformance")
    cfg = LasadConfig.from_preset("lasad-tiny", row_start="reset", vocab_size=64, grid_height=4, grid_width=5)
    model = randomize_(LasadGen(cfg), seed=3).eval()
    step = export_step(model, tmp / "step.onnx", max_batch=2)
    out = tmp / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(REPO / "tests" / "trt_standin" / "conformance.py"), "--layer", str(LAYER),
                        "--onnx", str(step), "--out", str(out), "--arch", str(TARGET.arch),
                        "--cuda", "%d.%d" % TARGET.cuda], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0 and out.is_file(), r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert "crash" not in rep, rep.get("crash")
    import onnx
    rep["model"] = cfg
    rep["onnx_nodes"] = {str(next(a.i for a in n.attribute if a.name == "has_lower_bound")): n
                         for n in onnx.load(str(step)).graph.node if n.op_type == C.OP_TYPE}
    return rep


def test_the_layer_is_nvidias_over_the_stand_in(report):
    assert Path(report["tensorrt_module"]).name == "__init__.py"
    assert set(report["nodes"]) == {"0", "1"}  # layer 0 has no lower bound, the others have one


def test_registration_is_atomic_and_idempotent(report):
    r = report["registration"]
    cause = "No return annotation found for aot_impl function"
    # validated before anything is recorded: nothing left behind, the same cause again
    assert cause in r["first"] and cause in r["second"]
    assert r["after_first"] == r["after_second"] == {"op": False, "aot_impl": False, "creators": 0}
    # without the validators registration stops half way; the next call still names the cause
    assert cause in r["unvalidated"] and r["after_unvalidated"]["aot_impl"] is False
    assert cause in r["unvalidated_again"] and "already has a defintion" not in r["unvalidated_again"]
    # the real definitions: registered once, completely; a second call changes nothing
    assert r["ok"] is None and r["again"] is None
    assert r["after_ok"] == {"op": True, "aot_impl": True, "creators": 1}
    assert r["functions"] == ["lasad_step_desc", "lasad_step_autotune", "lasad_step_aot"]
    assert r["aot_attr_names"] == list(C.ATTRIBUTES)


def test_creator_found_and_fields_built_as_the_onnx_parser_does(report):
    for flag, node in report["onnx_nodes"].items():
        n = report["nodes"][flag]
        assert n["creator"] == [C.OP_TYPE, C.PLUGIN_VERSION, C.PLUGIN_NAMESPACE]
        kinds = {"int": "INT32", "float": "FLOAT32"}
        assert n["creator_fields"] == [[name, kinds[kind]] for name, (kind, _) in C.ATTRIBUTES.items()]
        import onnx
        values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert [f[0] for f in n["fields"]] == list(C.ATTRIBUTES)  # the creator's order, not the node's
        for name, ftype, dtype, size, data in n["fields"]:
            assert size == 1 and ftype == kinds[C.ATTRIBUTES[name][0]]
            assert dtype == ("<i4" if ftype == "INT32" else "<f4")
            assert data[0] == pytest.approx(values[name], rel=1e-7)
        assert n["request"] == "STRICT_AOT" and values["aot"] == 1
        assert n["plugin_class"] == "_TemplateAOTPlugin"
        assert {k: v[0] for k, v in n["plugin_attrs"].items()} == {k: "int32" if kind == "int" else "float32"
                                                                  for k, (kind, _) in C.ATTRIBUTES.items()}


def test_int_attributes_would_break_nvidias_creator_on_numpy_2_4(report):
    """Why the attributes are declared as 1-element arrays: NVIDIA's creator calls int() on the
    parser's array for an `int` attribute, which numpy >= 2.4 refuses; ours was created above."""
    r = report["numpy"]
    if tuple(int(x) for x in r["numpy"].split(".")[:2]) < (2, 4):
        assert r["int_annotation_error"] is None
    else:
        assert "only 0-dimensional arrays can be converted" in r["int_annotation_error"]


def test_types_aliasing_and_symbolic_shapes(report):
    cfg = report["model"]
    H, K, V = cfg.n_head, cfg.head_k_dim, cfg.head_v_dim
    for n in report["nodes"].values():
        assert (n["H"], n["K"], n["V"]) == (H, K, V)
        assert n["output_types"] == ["FLOAT", "FLOAT"]
        past = C.INPUTS.index(C.ALIASES["present_state"])
        assert n["aliases"] == [-1 if o not in C.ALIASES else past for o in C.OUTPUTS]
        for rows in ROWS:
            assert n["output_shapes"][str(rows)] == [[rows, H, V], [rows, H, K, V]]


def test_a_qfv_of_the_wrong_width_is_refused_at_build(report):
    cfg = report["model"]
    S = 2 * cfg.n_head * cfg.head_k_dim + cfg.n_head * cfg.head_v_dim
    assert f"qfv has {S + 1} columns" in report["wrong_width"] and f"need 2HK + HV = {S}" in report["wrong_width"]


def test_format_combinations_and_tactic(report):
    for n in report["nodes"].values():
        assert n["combinations"] == [[[t, "LINEAR"] for t in ("FLOAT", "FLOAT", "FLOAT", "BOOL", "FLOAT", "FLOAT")]]
        assert n["tactic"] == 0 and n["timing_cache_id"] == ""


def test_launch_parameters(report):
    from lasad_engine.ops.lasad.step import step_tiles
    cfg = report["model"]
    H, K, V = cfg.n_head, cfg.head_k_dim, cfg.head_v_dim
    BK, BV, warps = step_tiles(K, V, 0)
    for n in report["nodes"].values():
        shared = {n["launch"][str(r)]["shared_mem"] for r in ROWS}
        assert len(shared) == 1 and shared.pop() >= 0
        for rows in ROWS:
            got = n["launch"][str(rows)]
            assert (got["grid_x"], got["grid_y"], got["grid_z"]) == (-(-V // BV), rows * H, 1)
            assert (got["block_x"], got["block_y"], got["block_z"]) == (warps * 32, 1, 1)
        assert n["extras"] == [["INT32", [H] * len(ROWS)], ["INT32", [2 * H * K + H * V] * len(ROWS)]]


def test_ptx_entry_takes_exactly_what_tensorrt_passes(report):
    """TensorRT's AOT launch passes the plugin's inputs, then the extra int32 scalars, then the
    outputs: the PTX entry must take exactly these, in order, with their sizes."""
    for n in report["nodes"].values():
        expected = [(8, True)] * len(C.INPUTS) + [(4, False)] * len(n["extras"]) + [(8, True)] * len(C.OUTPUTS)
        assert [(p[2], p[3]) for p in n["ptx_params"]] == expected
        assert all(p[0] == f"{n['kernel_name']}_param_{i}" for i, p in enumerate(n["ptx_params"]))
        assert n["ptx_target"] in (f"sm_{TARGET.arch}", f"sm_{TARGET.arch}a")
        assert n["ptx_version"] <= aot.ptx_isa_for_cuda(*TARGET.cuda) == 90  # the R580 driver's ISA


def test_the_build_compiles_every_node_before_tensorrt_asks(report):
    """trt_build compiles each node's kernel first (defs.compile_nodes), so an ABI failure stops
    the build with its reason instead of inside TensorRT's callback."""
    got = report["compile_nodes"]
    assert len(got) == report["model"].n_layer
    assert all(n == "lasad_step_plugin_kernel" and isa <= 90 and params == 8 for n, isa, params in got)


def test_ptx_isa_table():
    assert aot.ptx_isa_for_cuda(13, 0) == 90 and aot.ptx_isa_for_cuda(12, 8) == 87
    assert aot.ptx_isa_for_cuda(12, 6) == aot.ptx_isa_for_cuda(12, 7) == 85
    assert aot.ptx_isa_for_cuda(14, 3) == max(aot.PTX_ISA_BY_CUDA.values())  # newer drivers take older PTX
    with pytest.raises(aot.KernelABIError, match="older than"):
        aot.ptx_isa_for_cuda(10, 2)


PTX = """.version 9.4
.target sm_90a
.address_size 64
.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u32 k_param_1,
\t.param .u64 .ptr .global .align 1 k_param_2,
\t.param .u64 .ptr .global .align 1 k_param_3
)
{
\tld.param.b64 %rd1, [k_param_0];
\tld.param.b32 %r1, [k_param_1];
BODY
\tret;
}
"""


@pytest.mark.parametrize("body,scratch,error", [
    ("", 0, None),
    ("\tld.param.b64 %rd2, [k_param_3];", 0, "uses Triton's hidden parameter k_param_3"),
    ("", 64, "needs Triton's scratch memory"),
])
def test_hidden_parameters_are_dropped_only_when_unused(body, scratch, error):
    meta = SimpleNamespace(global_scratch_size=scratch, profile_scratch_size=0)
    ptx = PTX.replace("BODY", body)
    if error:
        with pytest.raises(aot.KernelABIError, match=error):
            aot._strip_hidden(ptx, "k", 2, meta)
        return
    out, removed = aot._strip_hidden(ptx, "k", 2, meta)
    assert removed == 2 and [p.name for p in aot.entry_params(out, "k")] == ["k_param_0", "k_param_1"]
    assert out.count("ld.param") == 2 and aot.ptx_version(out) == 94


def test_compiling_needs_triton_not_its_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    constants, warps = aot.plugin_kernel_constants(64, 64, "unit", True, 0.125)
    with pytest.raises(aot.KernelABIError, match="TRITON_INTERPRET"):
        aot.compile_step_kernel(constants, warps, TARGET)


def test_attribute_values_arrive_as_python_scalars():
    from lasad_plugins.lasad_step.defs import node_settings
    i = lambda v: np.array([v], np.int32)  # noqa: E731
    s = node_settings(i(20), i(64), i(64), i(2), i(1), np.array([0.125], np.float32))
    assert s == dict(H=20, K=64, V=64, row_start="reset", has_lower_bound=True, scale=0.125)
    assert all(type(s[k]) is int for k in "HKV") and type(s["scale"]) is float
    with pytest.raises(ValueError, match="row_start=7"):
        node_settings(i(20), i(64), i(64), i(7), i(1), np.array([0.125], np.float32))


def test_attribute_annotations_are_classes_numpy_layer_can_read():
    """NVIDIA's layer calls issubclass(annotation, TensorDesc) on every parameter of the register
    function before it recognises numpy arrays; Python 3.12 with numpy 2.5 refuses that for the
    `npt.NDArray[...]` alias (seen on the H200 machine). Our annotations are classes that still read
    as NDArray[int32] / NDArray[float32] the way NVIDIA's `_infer_numpy_type` reads them."""
    import inspect
    import typing

    import numpy as np

    from lasad_plugins.lasad_step import defs
    params = list(inspect.signature(defs.lasad_step_desc).parameters.values())
    assert all(isinstance(p.annotation, type) for p in params)
    attrs = {p.name: p.annotation for p in params[4:]}
    assert set(attrs) == set(C.ATTRIBUTES)
    for name, ann in attrs.items():
        assert ann.__origin__ is np.ndarray
        args = typing.get_args(ann) or ann.__args__  # read as NVIDIA's _utils._infer_numpy_type reads it
        (dtype,) = typing.get_args(args[1]) or args[1].__args__
        assert dtype is (np.int32 if C.ATTRIBUTES[name][0] == "int" else np.float32)
