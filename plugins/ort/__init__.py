"""LasadStep on onnxruntime's CUDA provider: a compiled custom-op library (`lasad_step_op.cc`,
built by `python -m lasad_tools.ort_op build`) that launches the step kernel of
lasad_engine/ops/lasad/step.py (`lasad_step_plugin_kernel`, the same kernel and the same 8-argument
launch as the TensorRT plugin) on onnxruntime's compute stream.

The library holds no kernel of its own: the kernel arrives as PTX in attributes of each LasadStep
node, which `attach_kernels` adds to the in-memory graph before the session is made (the file on
disk keeps the contract's attributes only). Triton compiles one PTX per distinct node (dtype,
H, K, V, row start, lower bound, scale) for the session's GPU; the library loads it with the CUDA
driver (`cuModuleLoadData`) when onnxruntime creates the kernel and launches it with
`cuLaunchKernel`. Attributes added here (the library reads exactly these):

| attribute | type | meaning |
|---|---|---|
| kernel_ptx | string | PTX of the step kernel for this node |
| kernel_name | string | its entry point |
| kernel_grid_x | int | programs along the value dim (grid y is rows x H at run time) |
| kernel_block | int | threads per program (num_warps x 32) |
| kernel_shared | int | dynamic shared memory in bytes |
| kernel_params | int | parameters of the entry: the 8 of the launch, then null scratch pointers |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lasad_plugins import contract as C

LIBRARY_NAME = "liblasad_ort_op.so"
LIBRARY_ENV = "LASAD_ORT_OP"
SOURCE = Path(__file__).with_name("lasad_step_op.cc")
KERNEL_ATTRIBUTES = ("kernel_ptx", "kernel_name", "kernel_grid_x", "kernel_block", "kernel_shared", "kernel_params")
# ONNX element type of the node's qfv input -> Triton pointer type.
TRITON_TYPES = {1: "fp32", 10: "fp16", 16: "bf16"}
BUILD_HINT = "python -m lasad_tools.ort_op build"


def default_library_path() -> Path:
    """Where `lasad_tools.ort_op build` puts the library by default (per onnxruntime version)."""
    import onnxruntime
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lasad" / f"ort-{onnxruntime.__version__}" / LIBRARY_NAME


def find_library() -> str:
    """The custom-op library: $LASAD_ORT_OP, else the default build location; one-line error if absent."""
    from lasad_engine.params import EngineError
    given = os.environ.get(LIBRARY_ENV)
    path = Path(given) if given else default_library_path()
    if not path.is_file():
        where = f"${LIBRARY_ENV}={given}" if given else str(path)
        raise EngineError(f"this step.onnx has LasadStep nodes, which run on CUDA through the lasad custom-op library; "
                          f"none at {where}: build it with `{BUILD_HINT}` (or export with --portable)")
    return str(path)


@dataclass(frozen=True)
class StepKernel:
    """One compiled step kernel and how to launch it."""
    name: str
    ptx: str
    grid_x: int
    block: int
    shared: int
    params: int


def compile_step_kernel(dtype: str, num_heads: int, head_k_dim: int, head_v_dim: int, row_start: int,
                        has_lower_bound: int, scale: float, target) -> StepKernel:
    """PTX of `lasad_step_plugin_kernel` for one node's attributes and activation dtype
    (fp32 | fp16 | bf16) for `target` (a CudaTarget: compute capability and driver), through the
    TensorRT plugin's compile path (`lasad_engine.ops.lasad.aot`: the 8-parameter launch ABI, the
    driver's PTX ISA)."""
    from lasad_engine.ops.lasad.aot import compile_step_kernel as compile_aot
    from lasad_engine.ops.lasad.aot import plugin_kernel_constants
    constants, warps = plugin_kernel_constants(head_k_dim, head_v_dim, C.ROW_START_NAMES[int(row_start)],
                                               bool(has_lower_bound), scale)
    k = compile_aot(constants, warps, target, dtype)
    return StepKernel(k.name, k.ptx, k.value_blocks, k.threads, k.shared, len(k.params))


def attach_kernels(proto, target) -> int:
    """Add the kernel attributes (table above) to every LasadStep node of `proto`, compiled for
    `target` (a `lasad_engine.ops.lasad.aot.CudaTarget`, e.g. `CudaTarget.current()`); returns the
    number of distinct kernels."""
    from onnx import helper, shape_inference

    types = _qfv_types(proto, shape_inference)
    cache: dict[tuple, StepKernel] = {}
    for node in proto.graph.node:
        if node.op_type != C.OP_TYPE or node.domain != C.DOMAIN:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        dtype = TRITON_TYPES[types.get(node.input[0], 1)]
        key = (dtype, *(attrs[name] for name in C.ATTRIBUTES))
        if key not in cache:
            cache[key] = compile_step_kernel(dtype, *(attrs[name] for name in C.ATTRIBUTES), target=target)
        k = cache[key]
        keep = [a for a in node.attribute if a.name not in KERNEL_ATTRIBUTES]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.extend([helper.make_attribute("kernel_ptx", k.ptx), helper.make_attribute("kernel_name", k.name),
                               helper.make_attribute("kernel_grid_x", k.grid_x),
                               helper.make_attribute("kernel_block", k.block),
                               helper.make_attribute("kernel_shared", k.shared),
                               helper.make_attribute("kernel_params", k.params)])
    return len(cache)


def _qfv_types(proto, shape_inference) -> dict[str, int]:
    """ONNX element type of every value in the graph (graph inputs, value_info, inferred)."""
    inferred = shape_inference.infer_shapes(proto)
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    return {v.name: v.type.tensor_type.elem_type for v in values}
