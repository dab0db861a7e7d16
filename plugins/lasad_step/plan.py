"""What a TensorRT plan with the LasadStep plugin is tied to, and the checks it must pass before it
is written or loaded (docs/tensorrt.md). The engine's tensorrt backend uses these, so they live
here and not in lasad_tools.

`engine.json` beside a plan records the fingerprint (`FINGERPRINT_KEYS`: TensorRT, CUDA, GPU and
compute capability, opset, plugin id and version), the versions the plan was built with (CUDA
driver, Triton, the PTX ISA of the embedded kernel) and the aliasing TensorRT reported. A plan
built elsewhere is refused with `PlanMismatch` (exit 3 from the command-line tools), and so is
one whose kernel's PTX ISA is newer than this machine's driver accepts.
"""

from __future__ import annotations

import os
from pathlib import Path

from lasad_engine.io import UserError, loads_strict
from lasad_plugins import contract as C

FINGERPRINT_KEYS = ("tensorrt", "cuda", "gpu", "compute_capability", "opset", "plugin", "lasad_format")
PLUGIN = f"{C.PLUGIN_NAMESPACE}::{C.OP_TYPE}/{C.PLUGIN_VERSION}"


class PlanMismatch(UserError):
    """A plan built for another TensorRT / GPU / plugin / driver; the message says how to rebuild
    it. The command-line tools exit with code 3 on it."""

    exit_code = 3


class PlanRefused(UserError):
    """A freshly built plan that would not update the state in place as the step contract says."""


def isa_text(isa: int | None) -> str | None:
    return None if isa is None else f"{isa // 10}.{isa % 10}"


def versions() -> dict:
    """TensorRT, CUDA driver (and the PTX ISA it accepts), Triton and plugin of this machine."""
    from lasad_engine.ops.lasad.aot import cuda_driver_version, ptx_isa_for_cuda
    try:
        import tensorrt as trt
        tensorrt = trt.__version__
    except ImportError:
        tensorrt = None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    driver = cuda_driver_version()
    return {"tensorrt": tensorrt, "cuda_driver": None if driver is None else "%d.%d" % driver,
            "driver_ptx_isa": None if driver is None else isa_text(ptx_isa_for_cuda(*driver)),
            "triton": triton_version, "plugin": PLUGIN}


def current_fingerprint(opset: int) -> dict:
    import tensorrt as trt
    import torch
    p = torch.cuda.get_device_properties(0)
    return {"tensorrt": trt.__version__, "cuda": torch.version.cuda, "gpu": p.name,
            "compute_capability": f"{p.major}.{p.minor}", "opset": int(opset), "plugin": PLUGIN,
            "lasad_format": C.CONTRACT_VERSION, "driver_ptx_isa": versions()["driver_ptx_isa"]}


def fingerprint_path(plan: str | os.PathLike) -> Path:
    return Path(plan).with_suffix(".json")


def _isa(text) -> int:
    major, minor = str(text).split(".")
    return 10 * int(major) + int(minor)


def check_fingerprint(plan: str | os.PathLike, current: dict, rebuild_hint: str) -> dict:
    """Compare engine.json with this machine; raise PlanMismatch naming the first difference."""
    path = fingerprint_path(plan)
    if not path.is_file():
        raise PlanMismatch(f"{plan}: no {path.name} beside it; rebuild with {rebuild_hint}")
    try:
        recorded = loads_strict(path.read_text())
        if not isinstance(recorded, dict):
            raise ValueError(f"it holds a JSON {type(recorded).__name__}, not an object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PlanMismatch(f"{path}: not a lasad plan record ({e}); rebuild with {rebuild_hint}") from None
    for key in FINGERPRINT_KEYS:
        if recorded.get(key) != current.get(key):
            raise PlanMismatch(f"{plan} was built for {key} {recorded.get(key)!r}, this machine has "
                               f"{current.get(key)!r}; rebuild with {rebuild_hint}")
    kernel, driver = recorded.get("kernel_ptx_isa"), current.get("driver_ptx_isa")
    if kernel is not None and driver is not None and _isa(kernel) > _isa(driver):
        raise PlanMismatch(f"{plan} holds a PTX ISA {kernel} kernel; this machine's CUDA driver accepts "
                           f"{driver} at most; rebuild with {rebuild_hint}")
    return recorded


def check_aliasing(engine, n_layer: int) -> dict:
    """Check that each layer's present_state can alias its past_state in the deserialised
    `engine` (a tensorrt.ICudaEngine): past_state.{i} an input and present_state.{i} an output of
    the same shape and dtype, and, where TensorRT reports aliasing
    (ICudaEngine.get_aliased_input_tensor, where
    this TensorRT has it), no other input aliased. Raises
    PlanRefused with one line; returns {present name: the input TensorRT reports, or None}."""
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    query = getattr(engine, "get_aliased_input_tensor", None)
    reported = {}
    for i in range(n_layer):
        past, present = C.PAST_STATE.format(i), C.PRESENT_STATE.format(i)
        for name, mode in ((past, "INPUT"), (present, "OUTPUT")):
            if name not in names or engine.get_tensor_mode(name).name != mode:
                raise PlanRefused(f"the plan has no {mode.lower()} {name}; the state cannot be updated in place")
        a, b = tuple(engine.get_tensor_shape(past)), tuple(engine.get_tensor_shape(present))
        if a != b or engine.get_tensor_dtype(past) != engine.get_tensor_dtype(present):
            raise PlanRefused(f"{present} {b} {engine.get_tensor_dtype(present)} cannot alias {past} {a} "
                              f"{engine.get_tensor_dtype(past)}")
        alias = query(present) if query is not None else None
        if alias not in (None, past):
            raise PlanRefused(f"TensorRT aliases {present} to {alias}, not to {past}")
        reported[present] = alias
    return reported
