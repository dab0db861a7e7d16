"""Build a TensorRT plan from an exported step, with the LasadStep plugin, and fingerprint it.

Every LasadStep node's kernel is compiled first (`defs.compile_nodes`: a kernel without
TensorRT's launch ABI stops the build with its reason). The builder runs with
PreviewFeature.ALIASED_PLUGIN_IO_10_03 on (TensorRT consults the plugin's
aliasing of present_state onto past_state only then) and the ONNX parser takes the plugin's
ahead-of-time kernel (the node's `aot` attribute). The built plan is deserialised once and its
aliasing checked (`plan.check_aliasing`) before anything is written; a plan that fails is refused
with one line. `engine.json` beside the plan records what the plan is tied to and the versions
it was built with (`lasad_plugins.lasad_step.plan`); the tensorrt backend checks it before
deserialising. Written against the TensorRT >= 10.9 Python API; the TensorRT runtime cannot run
on our machines (docs/tensorrt.md): its end-to-end test carries the `tensorrt` marker, and the
code path here is tested over a mock of the builder API.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lasad_engine.checkpoint import file_fingerprint
from lasad_engine.config import LasadConfig
from lasad_engine.io import atomic_path, atomic_write_text
from lasad_plugins import contract as C
from lasad_plugins.lasad_step import plan as P
from lasad_plugins.lasad_step.plan import (FINGERPRINT_KEYS, PlanMismatch, PlanRefused,  # noqa: F401 (re-exported)
                                           check_fingerprint, current_fingerprint, fingerprint_path)


def enable_plugin_aliasing(trt, config) -> None:
    """Turn on the preview feature under which TensorRT honours a plugin's aliased outputs."""
    feature = getattr(getattr(trt, "PreviewFeature", None), "ALIASED_PLUGIN_IO_10_03", None)
    if feature is None:
        raise PlanRefused(f"TensorRT {trt.__version__} has no PreviewFeature.ALIASED_PLUGIN_IO_10_03: the plugin's "
                          "in-place state update needs it (TensorRT >= 10.9)")
    config.set_preview_feature(feature, True)
    if not config.get_preview_feature(feature):
        raise PlanRefused(f"TensorRT {trt.__version__} did not turn on PreviewFeature.ALIASED_PLUGIN_IO_10_03")


def build_plan(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, *, max_rows: int, opset: int,
               timing_cache: str | os.PathLike | None = None, verbose: bool = False,
               meta: dict | None = None) -> Path:
    """Build `plan_path` (+ engine.json) from `onnx_path`; `meta` replaces the ONNX file's
    `lasad.meta` in engine.json (paths in it are relative to the plan)."""
    import onnx
    import tensorrt as trt

    from lasad_engine.ops.lasad.aot import KernelABIError
    from lasad_plugins.lasad_step import defs
    proto = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    config_dict = json.loads(props["lasad.config"])
    # every node against the contract and the model's config before TensorRT's parser sees it
    C.check_step_graph(proto, LasadConfig.from_dict(config_dict), str(onnx_path))
    del proto
    defs.register()
    try:
        kernels = defs.compile_nodes(onnx_path)
    except KernelABIError as e:
        raise PlanRefused(f"the LasadStep kernel cannot be built for TensorRT here: {e}") from None
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    enable_plugin_aliasing(trt, config)
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
    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(serialized))
    if engine is None:
        raise PlanRefused(f"TensorRT cannot deserialise the plan it built from {onnx_path}")
    aliases = P.check_aliasing(engine, int(config_dict["n_layer"]))
    del engine
    plan_path = Path(plan_path)
    with atomic_path(plan_path) as tmp:
        Path(tmp).write_bytes(bytes(serialized))
    if timing_cache:
        with atomic_path(timing_cache) as tmp:
            Path(tmp).write_bytes(bytes(config.get_timing_cache().serialize()))
    isa = max((k.ptx_isa for k in kernels), default=None)
    record = {**P.current_fingerprint(opset), **P.versions(), "kernel_ptx_isa": P.isa_text(isa),
              "aliases_reported": aliases, "onnx_sha256": file_fingerprint(onnx_path), "max_rows": max_rows,
              "config": config_dict, "meta": json.loads(props.get("lasad.meta", "{}")) if meta is None else meta}
    atomic_write_text(fingerprint_path(plan_path), json.dumps(record, indent=2) + "\n")
    return plan_path
