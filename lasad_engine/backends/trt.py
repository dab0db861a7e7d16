"""The `tensorrt` backend: runs engine.plan (built by `lasad-export CKPT engine.plan`) with the
LasadStep plugin, its enqueue captured in a CUDA graph like the cuda backend's step.

Before deserialising, the plan's fingerprint (`engine.json`: TensorRT, CUDA, GPU, opset, plugin,
the kernel's PTX ISA against this driver) is compared with this machine; a mismatch raises
`PlanMismatch` ("rebuild with lasad-export ...", exit 3 from the CLIs). The plan embeds the
plugin's kernel (ahead of time), so loading it registers no plugin. Tensor addresses are bound
once to the engine's buffers: each layer's `present_state.{i}` gets the address of
`past_state.{i}` (the plugin declares the alias), so the state is updated in place. Written
against the TensorRT >= 10.9 Python API; it cannot run on our machines (docs/tensorrt.md), so
its tests carry the `tensorrt` marker.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lasad_plugins import contract as C

from ..model import LasadState
from ..params import EngineError
from .base import Backend, require_cuda


def read_plan_config(plan: str | os.PathLike):
    """(LasadConfig, fingerprint record) from the engine.json beside a plan."""
    from ..config import LasadConfig
    from ..io import loads_strict, one_line
    path = Path(plan).with_suffix(".json")
    if not path.is_file():
        raise EngineError(f"{plan}: no {path.name} beside it; rebuild with lasad-export CKPT {plan}")
    try:
        record = loads_strict(path.read_text())
        if not isinstance(record, dict):
            raise ValueError(f"it holds a JSON {type(record).__name__}, not an object")
        if not isinstance(record.get("meta", {}), dict):
            raise ValueError("its meta is not an object")
        if isinstance(record.get("opset"), bool) or not isinstance(record.get("opset"), int):
            raise ValueError("it records no integer opset")
        from ..params import MAX_BATCH
        rows = record.get("max_rows", 1)
        if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= 2 * MAX_BATCH:
            raise ValueError(f"max_rows={str(rows)[:40]!r} is not a row count in 1..{2 * MAX_BATCH}")
        return LasadConfig.from_dict(record.get("config")), record
    except (OSError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise EngineError(f"{path}: not a lasad plan record ({one_line(e)}); rebuild with lasad-export CKPT {plan}") from None


class TensorRTBackend(Backend):
    name = "tensorrt"
    capturable = True

    def __init__(self, model, device: torch.device, plan_path: str | os.PathLike):
        try:
            import tensorrt as trt
        except ImportError:
            raise EngineError("backend 'tensorrt' needs NVIDIA TensorRT >= 10.9 on a GPU it supports: "
                              "pip install -e '.[tensorrt]' in lasad's folder; "
                              "or use one of: torch, cuda, onnxruntime") from None
        require_cuda(self.name, device)
        if str(plan_path).endswith(".onnx"):
            raise EngineError("backend 'tensorrt' runs an engine.plan: lasad-export CKPT engine.plan, then load it")
        super().__init__(model, device)
        from lasad_plugins.lasad_step.plan import check_aliasing, check_fingerprint, current_fingerprint
        _, record = read_plan_config(plan_path)
        check_fingerprint(plan_path, current_fingerprint(record["opset"]), f"lasad-export CKPT {plan_path}")
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise EngineError(f"{plan_path}: TensorRT could not deserialise the plan; rebuild with lasad-export")
        check_aliasing(self.engine, model.config.n_layer)
        self.context = self.engine.create_execution_context()
        self.bound = None

    def _bind(self, rows, state: LasadState):
        R = rows.ids.shape[0]
        key = (R, rows.ids.data_ptr(), rows.pos.data_ptr(), rows.width.data_ptr(), state.ssm.data_ptr(),
               rows.logits.data_ptr())
        if self.bound == key:
            return
        ctx = self.context
        for name, t in (("ids", rows.ids), ("pos", rows.pos), ("width", rows.width)):
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        ctx.set_tensor_address("logits", rows.logits.data_ptr())
        for i in range(self.model.config.n_layer):
            layer = state.ssm[i, :R]  # [rows, H, K, V], contiguous
            ctx.set_input_shape(C.PAST_STATE.format(i), tuple(layer.shape))
            ctx.set_tensor_address(C.PAST_STATE.format(i), layer.data_ptr())
            ctx.set_tensor_address(C.PRESENT_STATE.format(i), layer.data_ptr())  # aliased: in place
        self.bound = key

    def decode(self, rows, state: LasadState) -> torch.Tensor:
        if rows.slots is not None:
            raise EngineError("the tensorrt backend runs row r on state row r (it is not indexed)")
        self._bind(rows, state)
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise EngineError("TensorRT enqueue failed")
        return rows.logits
