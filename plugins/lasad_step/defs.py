"""LasadStep as a TensorRT Quick Deployable Plugin (TensorRT >= 10.8, `tensorrt.plugin`).

- `lasad_step_desc`: the plugin's I/O and attributes (the fields are `contract.ATTRIBUTES`);
  present_state is declared as an alias of past_state, so the plan updates the state in place.
- `lasad_step_aot`: compiles `lasad_step_plugin_kernel` (lasad_engine/ops/lasad/step.py: the
  same kernel body as the cuda backend's) to PTX ahead of time; the plan embeds it and runs
  without Python. The float settings (row-start override, query scale) become constants of the
  compiled kernel; the int32 extras are H and the row stride of the fused projection.
- `lasad_step_autotune`: one type combination (fp32 state, fp32 activations), one tactic: no
  autotuning (a tuner re-running an in-place kernel would corrupt the state).

`register()` registers all three with TensorRT; nothing here imports tensorrt at module load, so
the contract can be checked (tests/test_export.py) where TensorRT is absent.

| # | input | shape | | # | output | shape |
|---|---|---|---|---|---|---|
| 0 | qfv | [rows, 2HK + HV] | | 0 | o | [rows, H, V] |
| 1 | lower_bound | [HK] | | 1 | present_state (alias of input 2) | [rows, H, K, V] |
| 2 | past_state | [rows, H, K, V] | | | | |
| 3 | start | [1] bool | | | | |
"""

# No `from __future__ import annotations`: tensorrt.plugin checks these annotations as objects.
from typing import List, Tuple

from lasad_plugins import contract as C

PLUGIN_ID = f"{C.PLUGIN_NAMESPACE}::{C.OP_TYPE}"

try:  # TensorRT is optional; the names below exist either way for inspection
    import tensorrt.plugin as trtp
    TensorDesc = trtp.TensorDesc
    AutoTuneCombination = trtp.AutoTuneCombination
except ImportError:  # pragma: no cover - the usual case on our machines
    trtp = None
    TensorDesc = AutoTuneCombination = object


def lasad_step_desc(qfv: TensorDesc, lower_bound: TensorDesc, past_state: TensorDesc, start: TensorDesc,
                    num_heads: int, head_k_dim: int, head_v_dim: int, row_start: int, has_lower_bound: int,
                    scale: float) -> Tuple[TensorDesc, TensorDesc]:
    """Output descriptors: o [rows, H, V] in qfv's dtype; present_state aliases past_state."""
    shape = trtp.ShapeExprs.from_tuple((qfv.shape_expr[0], num_heads, head_v_dim))
    return trtp.from_shape_expr(shape, dtype=qfv.dtype), past_state.aliased()


def lasad_step_autotune(qfv: TensorDesc, lower_bound: TensorDesc, past_state: TensorDesc, start: TensorDesc,
                        outputs: Tuple[TensorDesc]) -> List[AutoTuneCombination]:
    return [trtp.AutoTuneCombination("FP32, FP32, FP32, BOOL, FP32, FP32")]


def aot_settings(num_heads: int, head_k_dim: int, head_v_dim: int, row_start: int, has_lower_bound: int,
                 scale: float) -> Tuple[dict, Tuple[int, int, int]]:
    """Constants for the plugin kernel and the tile shape (BK, BV, num_warps); shared with the
    tests, which launch the same kernel with the same constants."""
    from lasad_engine.ops.lasad.mask import row_start_log_decay
    from lasad_engine.ops.lasad.step import step_tiles
    value = row_start_log_decay(C.ROW_START_NAMES[row_start])
    BK, BV, warps = step_tiles(head_k_dim, head_v_dim, 0)  # row count unknown at build: small-batch tiles
    constants = {"K": head_k_dim, "V": head_v_dim, "BK": BK, "BV": BV, "HAS_OVERRIDE": value is not None,
                 "OVERRIDE": 0.0 if value is None else value, "SCALE": float(scale),
                 "HAS_LB": bool(has_lower_bound)}
    return constants, (BK, BV, warps)


def lasad_step_aot(qfv: TensorDesc, lower_bound: TensorDesc, past_state: TensorDesc, start: TensorDesc,
                   num_heads: int, head_k_dim: int, head_v_dim: int, row_start: int, has_lower_bound: int,
                   scale: float, outputs: Tuple[TensorDesc], tactic: int):
    import triton

    from lasad_engine.ops.lasad.step import lasad_step_plugin_kernel
    constants, (BK, BV, warps) = aot_settings(num_heads, head_k_dim, head_v_dim, row_start, has_lower_bound, scale)
    rows = qfv.shape_expr[0]
    stride = 2 * num_heads * head_k_dim + num_heads * head_v_dim
    src = triton.compiler.ASTSource(
        fn=lasad_step_plugin_kernel,
        signature={"qfv": "*fp32", "lb": "*fp32", "past": "*fp32", "start": "*i1", "H": "i32", "S": "i32",
                   "o": "*fp32", "present": "*fp32", **{k: "constexpr" for k in constants}},
        constexprs=constants)
    compiled = triton.compile(src, options={"num_warps": warps})
    launch = trtp.KernelLaunchParams()
    launch.grid_x = triton.cdiv(head_v_dim, BV)
    launch.grid_y = rows * num_heads
    launch.block_x = compiled.metadata.num_warps * 32
    launch.shared_mem = compiled.metadata.shared
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(num_heads), trtp.SymInt32(stride)])
    return compiled.metadata.name, compiled.asm["ptx"], launch, extra


def register() -> str:  # noqa: D401
    """Register LasadStep with TensorRT's plugin registry (idempotent); returns the plugin id."""
    if trtp is None:
        raise RuntimeError("TensorRT >= 10.8 with tensorrt.plugin is needed: pip install 'lasad[tensorrt]'")
    if PLUGIN_ID not in getattr(trtp, "_registered", set()):
        trtp.register(PLUGIN_ID)(lasad_step_desc)
        trtp.autotune(PLUGIN_ID)(lasad_step_autotune)
        trtp.aot_impl(PLUGIN_ID)(lasad_step_aot)
        trtp._registered = getattr(trtp, "_registered", set()) | {PLUGIN_ID}
    return PLUGIN_ID
