"""Build a TensorRT plan from an exported step, with the LasadStep plugin, and fingerprint it.

`engine.json` beside the plan records what the plan is tied to (TensorRT, CUDA, GPU and its
compute capability, opset, plugin id and version, the ONNX file's hash); the tensorrt backend
checks it before deserialising and refuses a plan built elsewhere (exit 3 from the CLI, with the
command that rebuilds it). Written against the TensorRT >= 10 Python API; cannot run on our
machines (see docs/tensorrt.md): tests carry the `tensorrt` marker.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lasad_engine.checkpoint import file_fingerprint
from lasad_engine.io import UserError, atomic_path, atomic_write_text
from lasad_plugins import contract as C

FINGERPRINT_KEYS = ("tensorrt", "cuda", "gpu", "compute_capability", "opset", "plugin", "lasad_format")


class PlanMismatch(UserError):
    """A plan built for another TensorRT / GPU / plugin; the message says how to rebuild it.
    The command-line tools exit with code 3 on it."""

    exit_code = 3


def current_fingerprint(opset: int) -> dict:
    import tensorrt as trt
    import torch
    p = torch.cuda.get_device_properties(0)
    return {"tensorrt": trt.__version__, "cuda": torch.version.cuda, "gpu": p.name,
            "compute_capability": f"{p.major}.{p.minor}", "opset": int(opset),
            "plugin": f"{C.PLUGIN_NAMESPACE}::{C.OP_TYPE}/{C.PLUGIN_VERSION}", "lasad_format": 1}


def fingerprint_path(plan: str | os.PathLike) -> Path:
    return Path(plan).with_suffix(".json")


def check_fingerprint(plan: str | os.PathLike, current: dict, rebuild_hint: str) -> dict:
    """Compare engine.json with this machine; raise PlanMismatch naming the first difference."""
    path = fingerprint_path(plan)
    if not path.is_file():
        raise PlanMismatch(f"{plan}: no {path.name} beside it; rebuild with {rebuild_hint}")
    recorded = json.loads(path.read_text())
    for key in FINGERPRINT_KEYS:
        if recorded.get(key) != current.get(key):
            raise PlanMismatch(f"{plan} was built for {key} {recorded.get(key)!r}, this machine has "
                               f"{current.get(key)!r}; rebuild with {rebuild_hint}")
    return recorded


def build_plan(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, *, max_rows: int, opset: int,
               timing_cache: str | os.PathLike | None = None, verbose: bool = False) -> Path:
    import tensorrt as trt

    from lasad_plugins.lasad_step.defs import register
    register()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = list(t.shape)
        if shape and shape[0] == -1:  # the dynamic rows axis
            lo, hi = [1] + shape[1:], [max_rows] + shape[1:]
            profile.set_shape(t.name, lo, hi, hi)
    config.add_optimization_profile(profile)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build a plan from {onnx_path} (run with -v for the builder log)")
    plan_path = Path(plan_path)
    with atomic_path(plan_path) as tmp:
        Path(tmp).write_bytes(bytes(serialized))
    if timing_cache:
        with atomic_path(timing_cache) as tmp:
            Path(tmp).write_bytes(bytes(config.get_timing_cache().serialize()))
    import onnx
    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    record = {**current_fingerprint(opset), "onnx_sha256": file_fingerprint(onnx_path), "max_rows": max_rows,
              "config": json.loads(props["lasad.config"]), "meta": json.loads(props.get("lasad.meta", "{}"))}
    atomic_write_text(fingerprint_path(plan_path), json.dumps(record, indent=2) + "\n")
    return plan_path
