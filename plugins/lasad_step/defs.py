"""LasadStep as a TensorRT quickly deployable plugin with an ahead-of-time kernel (TensorRT >= 10.9,
`tensorrt.plugin`; docs/tensorrt.md).

- `lasad_step_desc`: the plugin's I/O and attributes (the fields are `contract.ATTRIBUTES`);
  present_state is declared as an alias of past_state, so the plan updates the state in place
  (the build turns on PreviewFeature.ALIASED_PLUGIN_IO_10_03, without which TensorRT ignores it).
- `lasad_step_aot`: the kernel for the plan: `lasad_engine.ops.lasad.aot.compile_step_kernel`
  (the engine's step kernel body, compiled to PTX with TensorRT's launch ABI: the 4 inputs, the
  int32 extras H and S = 2HK + HV, the 2 outputs). The plan embeds it and runs without Python.
- `lasad_step_autotune`: one type combination (fp32 activations and state, bool start), one
  tactic: no autotuning (a tuner re-running an in-place kernel would corrupt the state).

Attributes arrive as the ONNX parser builds them: 1-element int32 / float32 arrays (onnx-tensorrt
turns an INT attribute into an INT32 field and a FLOAT into FLOAT32). They are declared as such
arrays, so NVIDIA's creator converts them with `astype` (declared as `int`, it calls `int()` on a
1-element array, which numpy >= 2.4 refuses).

`register()` registers all three, atomically and idempotently. TensorRT is optional at import
(the names below exist either way), so the contract can be checked where TensorRT is absent.

| # | input | shape | | # | output | shape |
|---|---|---|---|---|---|---|
| 0 | qfv | [rows, 2HK + HV] | | 0 | o | [rows, H, V] |
| 1 | lower_bound | [HK] | | 1 | present_state (alias of input 2) | [rows, H, K, V] |
| 2 | past_state | [rows, H, K, V] | | | | |
| 3 | start | [rows] bool (one flag per row) | | | | |
"""

# No `from __future__ import annotations`: tensorrt.plugin checks these annotations as objects.
import typing
from typing import List, Tuple, Union

import numpy as np

from lasad_engine.io import UserError
from lasad_plugins import contract as C

PLUGIN_ID = f"{C.PLUGIN_NAMESPACE}::{C.OP_TYPE}"
MIN_TENSORRT = (10, 9)   # tensorrt.plugin.aot_impl


def _ndarray_annotation(dtype) -> type:
    """`numpy.typing.NDArray[dtype]` as NVIDIA's layer reads it (`__origin__` np.ndarray, dtype in
    `__args__`), but a class: the layer first calls `issubclass(annotation, TensorDesc)` on every
    annotation, which Python 3.12 with numpy 2.5 refuses for the `NDArray[...]` alias itself
    ("issubclass() arg 1 must be a class"; seen on the H200 machine, 2026-12-02)."""
    name = np.dtype(dtype).name
    # NVIDIA reads the dtype as `typing.get_args(args[1]) or args[1].__args__`: spelled out here,
    # so the layout does not depend on how this numpy version builds its typing aliases
    dtype_arg = type(f"dtype_{name}", (), {"__args__": (dtype,)})
    return type(f"NDArray_{name}", (), {"__origin__": np.ndarray, "__args__": (typing.Any, dtype_arg),
                                        "__doc__": f"numpy.typing.NDArray[{name}]"})


INT32 = _ndarray_annotation(np.int32)      # an ONNX INT attribute, as the parser hands it over
FLOAT32 = _ndarray_annotation(np.float32)  # an ONNX FLOAT attribute

# The GPU and driver the plugin kernel is compiled for; None: the GPU the plan is built on.
KERNEL_TARGET = None
# Kernels compiled in this process, by (constants, num_warps, target): TensorRT asks for the
# launch parameters more than once per node.
COMPILED = {}

try:  # TensorRT is optional; the names below exist either way for inspection
    import tensorrt.plugin as trtp
    TensorDesc = trtp.TensorDesc
    AutoTuneCombination = trtp.AutoTuneCombination
    KernelLaunchParams = getattr(trtp, "KernelLaunchParams", object)
    SymIntExprs = trtp.SymIntExprs
except ImportError:  # pragma: no cover - the usual case on our machines
    trtp = None
    TensorDesc = AutoTuneCombination = KernelLaunchParams = SymIntExprs = object


class PluginUnavailable(UserError):
    """TensorRT's plugin API (or the Triton that compiles the kernel) is missing or too old."""


def node_settings(num_heads, head_k_dim, head_v_dim, row_start, has_lower_bound, scale) -> dict:
    """The node's attributes as Python values: H, K, V, row_start ("none" | "unit" | "reset"),
    has_lower_bound (bool), scale (float); each checked against the contract first
    (`contract.check_node_attributes`: one ContractError line, never a bad kernel)."""
    v = C.check_node_attributes(dict(num_heads=num_heads, head_k_dim=head_k_dim, head_v_dim=head_v_dim,
                                     row_start=row_start, has_lower_bound=has_lower_bound, scale=scale),
                                where=f"{PLUGIN_ID} plugin")
    return dict(H=v["num_heads"], K=v["head_k_dim"], V=v["head_v_dim"], row_start=C.ROW_START_NAMES[v["row_start"]],
                has_lower_bound=bool(v["has_lower_bound"]), scale=v["scale"])


def lasad_step_desc(qfv: TensorDesc, lower_bound: TensorDesc, past_state: TensorDesc, start: TensorDesc,
                    num_heads: INT32, head_k_dim: INT32, head_v_dim: INT32, row_start: INT32,
                    has_lower_bound: INT32, scale: FLOAT32) -> Tuple[TensorDesc, TensorDesc]:
    """Output descriptors: o [rows, H, V] in qfv's dtype; present_state aliases past_state."""
    s = node_settings(num_heads, head_k_dim, head_v_dim, row_start, has_lower_bound, scale)
    width = qfv.shape_expr[1]
    expected = 2 * s["H"] * s["K"] + s["H"] * s["V"]
    if not width.is_fake and width.is_constant and width.constant_value() != expected:
        raise ValueError(f"qfv has {width.constant_value()} columns; H={s['H']}, K={s['K']}, V={s['V']} "
                         f"need 2HK + HV = {expected}")
    shape = trtp.ShapeExprs.from_tuple((qfv.shape_expr[0], s["H"], s["V"]))
    return trtp.from_shape_expr(shape, dtype=qfv.dtype), past_state.aliased()


def lasad_step_autotune(qfv: TensorDesc, lower_bound: TensorDesc, past_state: TensorDesc, start: TensorDesc,
                        outputs: Tuple[TensorDesc, TensorDesc]) -> List[AutoTuneCombination]:
    return [trtp.AutoTuneCombination("FP32, FP32, FP32, BOOL, FP32, FP32")]


def compile_for(settings: dict):
    """The plugin kernel for one node's settings (`node_settings`), compiled for KERNEL_TARGET or
    this machine's GPU and driver, once per process (lasad_engine.ops.lasad.aot)."""
    from lasad_engine.ops.lasad.aot import CudaTarget, compile_step_kernel, plugin_kernel_constants
    s = settings
    constants, warps = plugin_kernel_constants(s["K"], s["V"], s["row_start"], s["has_lower_bound"], s["scale"])
    target = KERNEL_TARGET or CudaTarget.current()
    key = (tuple(sorted(constants.items())), warps, target)
    if key not in COMPILED:
        COMPILED[key] = compile_step_kernel(constants, warps, target)
    return COMPILED[key]


def compile_nodes(onnx_path) -> list:
    """Compile the kernel of every LasadStep node of an exported step before TensorRT asks for
    it, so that a kernel that cannot have TensorRT's ABI fails here, with its reason; returns the
    compiled kernels (their PTX ISA goes into engine.json)."""
    import onnx
    proto = onnx.load(str(onnx_path), load_external_data=False)
    C.check_step_graph(proto, where=str(onnx_path))
    kernels = []
    for node in proto.graph.node:
        if node.op_type == C.OP_TYPE and node.domain == C.DOMAIN:
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            kernels.append(compile_for(node_settings(**{n: a[n] for n in C.ATTRIBUTES})))
    return kernels


def lasad_step_aot(qfv: TensorDesc, lower_bound: TensorDesc, past_state: TensorDesc, start: TensorDesc,
                   num_heads: INT32, head_k_dim: INT32, head_v_dim: INT32, row_start: INT32,
                   has_lower_bound: INT32, scale: FLOAT32, outputs: Tuple[TensorDesc, TensorDesc],
                   tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes], KernelLaunchParams, SymIntExprs]:
    """The kernel TensorRT embeds in the plan: (entry name, PTX, launch parameters, the int32
    extras H and S). Grid (ceil(V / BV), rows · H), one program per (row, head, value slice)."""
    s = node_settings(num_heads, head_k_dim, head_v_dim, row_start, has_lower_bound, scale)
    kernel = compile_for(s)
    H = s["H"]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = kernel.value_blocks
    launch.grid_y = qfv.shape_expr[0] * H
    launch.block_x = kernel.threads
    launch.shared_mem = kernel.shared
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(H), trtp.SymInt32(2 * H * s["K"] + H * s["V"])])
    return kernel.name, kernel.ptx, launch, extra


def check_versions():
    """Raise PluginUnavailable unless TensorRT >= 10.9 (aot_impl) and Triton >= 3.3 are here."""
    from lasad_engine.ops.lasad.aot import MIN_TRITON, version_tuple
    floor = ".".join(map(str, MIN_TENSORRT))
    if trtp is None:
        raise PluginUnavailable(f"TensorRT >= {floor} with its Python plugin API (tensorrt.plugin) is needed: "
                                "pip install -e '.[tensorrt]' in lasad's folder")
    import tensorrt as trt
    if version_tuple(trt.__version__) < MIN_TENSORRT or not hasattr(trtp, "aot_impl"):
        raise PluginUnavailable(f"TensorRT >= {floor} is needed for the plugin's ahead-of-time kernel "
                                f"(tensorrt.plugin.aot_impl), found {trt.__version__}: "
                                "pip install -e '.[tensorrt]' in lasad's folder")
    try:
        import triton
    except ImportError:
        triton = None
    if triton is None or version_tuple(triton.__version__) < MIN_TRITON:
        found = "none" if triton is None else triton.__version__
        raise PluginUnavailable(f"Triton >= {'.'.join(map(str, MIN_TRITON))} compiles the plugin's kernel, found "
                                f"{found}: pip install -e '.[tensorrt]' in lasad's folder")


def _prevalidate():
    """NVIDIA's own checks of the three definitions, before anything is registered, so that a
    failure leaves no half-registered plugin behind. (They are private to tensorrt.plugin; where
    a version lacks them, the resumable registration in `register` still re-raises the cause.)"""
    try:
        from tensorrt.plugin import _validate as v
        from tensorrt.plugin._lib import PluginDef
        for check in ("_validate_name_and_namespace", "_parse_register_inputs", "_parse_register_return",
                      "_validate_autotune", "_validate_aot_impl"):
            getattr(v, check)
    except (ImportError, AttributeError):  # pragma: no cover - a tensorrt.plugin laid out otherwise
        return
    ns, name = PLUGIN_ID.split("::")
    v._validate_name_and_namespace(ns, name)
    tensors, attrs, _, _ = v._parse_register_inputs(lasad_step_desc, False)
    v._parse_register_return(lasad_step_desc)
    scratch = PluginDef()
    scratch.plugin_id, scratch.input_tensor_names, scratch.input_attrs = PLUGIN_ID, tensors, attrs
    v._validate_autotune(lasad_step_autotune, scratch)
    v._validate_aot_impl(lasad_step_aot, scratch)


def _ours(func, mine) -> bool:
    return func is not None and (func.__module__, func.__qualname__) == (mine.__module__, mine.__qualname__)


def register() -> str:
    """Register LasadStep with TensorRT's plugin registry; returns the plugin id.

    Idempotent (a second call finds the definitions and does nothing) and atomic: every
    definition is validated by tensorrt.plugin's own checks before the first is registered; a
    registration interrupted between steps is completed by the next call, which re-raises the
    real cause if it persists. Only building a plan needs this; a built plan loads without it.
    """
    check_versions()
    _prevalidate()
    ns, name = PLUGIN_ID.split("::")
    existing = getattr(getattr(trtp.op, ns, None), name, None)
    if existing is None:
        trtp.register(PLUGIN_ID)(lasad_step_desc)
        existing = getattr(getattr(trtp.op, ns), name)
    elif not _ours(existing.register_func, lasad_step_desc):
        raise PluginUnavailable(f"{PLUGIN_ID} is already registered by {existing.register_func.__module__}")
    if not _ours(existing.autotune_func, lasad_step_autotune):
        trtp.autotune(PLUGIN_ID)(lasad_step_autotune)
    if not _ours(existing.aot_impl_func, lasad_step_aot):
        trtp.aot_impl(PLUGIN_ID)(lasad_step_aot)
    return PLUGIN_ID
