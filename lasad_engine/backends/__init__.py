"""Decode backends behind one interface (`base.Backend`) and a selector that imports the
concrete one lazily, so a CPU install never imports onnxruntime or TensorRT."""

from __future__ import annotations

import importlib
import importlib.util

from ..params import EngineError
from .base import Backend

# name -> (module, class, what it runs, the package it needs and how to get it)
REGISTRY = {
    "torch": ("eager", "TorchBackend", "the torch reference, any device", None),
    "cuda": ("cuda", "CudaBackend", "Triton kernels, captured as a CUDA graph",
             ("triton", "pip install -e '.[gpu]' in lasad's folder")),
    "onnxruntime": ("ort", "OnnxRuntimeBackend", "an exported step.onnx",
                    ("onnxruntime", "pip install -e '.[export]' in lasad's folder")),
    "tensorrt": ("trt", "TensorRTBackend", "an engine.plan built by lasad-export",
                 ("tensorrt", "NVIDIA TensorRT >= 10.9 on a GPU it supports: "
                              "pip install -e '.[tensorrt]' in lasad's folder")),
}
BACKENDS = tuple(REGISTRY)
# Exported artifacts and the backend that runs each.
ARTIFACT_BACKENDS = {".onnx": "onnxruntime", ".plan": "tensorrt"}


def make_backend(name: str, model, device, artifact=None) -> Backend:
    """The backend `name` for `model` on `device`; `artifact` is the exported file that the
    onnxruntime and tensorrt backends run."""
    if name not in REGISTRY:
        raise EngineError(f"backend={name!r} is not one of {', '.join(BACKENDS)}")
    module, cls, _, requires = REGISTRY[name]
    if requires is not None and importlib.util.find_spec(requires[0]) is None:
        others = ", ".join(b for b in BACKENDS if b != name)
        raise EngineError(f"backend {name!r} needs {requires[0]}: {requires[1]}; or use one of: {others}")
    needs = [suffix for suffix, b in ARTIFACT_BACKENDS.items() if b == name]
    if needs and artifact is None:
        raise EngineError(f"backend {name!r} runs an exported step ({needs[0]}): "
                          f"lasad-export CKPT step{needs[0]}, then load that file")
    backend_cls = getattr(importlib.import_module(f".{module}", __name__), cls)
    return backend_cls(model, device, artifact) if needs else backend_cls(model, device)
