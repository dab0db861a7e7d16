"""The `onnxruntime` backend: runs an exported decode step (`lasad-export ckpt.pt step.onnx`).

Either form runs: the portable graph (standard ops) as it is, the custom-node graph through an
onnxruntime custom-op implementation of `LasadStep` (onnxruntime-extensions' Python ops, whose
custom domain is fixed: the session gets a copy of the graph with the node's domain mapped onto
it; the file keeps `ai.lasad`). Inputs and outputs are bound once (I/O binding) to the engine's
fixed buffers; the present state lands in a scratch buffer allocated once and is copied back,
since onnxruntime does not promise that an output may alias an input.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from lasad_plugins import contract as C

from ..checkpoint import CheckpointError
from ..config import LasadConfig
from ..io import loads_strict, one_line
from ..model import LasadState
from ..params import EngineError
from .base import Backend

_REGISTERED = False


def read_onnx_config(path: str | os.PathLike) -> tuple[LasadConfig, dict, str]:
    """(config, meta, form) from an exported step's metadata; one-line errors for other files."""
    try:
        import onnx
    except ImportError:
        raise EngineError("reading an exported step needs onnx: pip install 'lasad[export]'") from None
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, not an ONNX file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise CheckpointError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if "lasad.config" not in props:
        if "lasad.sampler" in props:
            raise CheckpointError(f"{path}: the sampler graph lasad-export writes beside a step, not a decode step; "
                                  "pass the step's .onnx")
        raise CheckpointError(f"{path}: an ONNX file but not a lasad decode step (no lasad.config metadata)")
    try:
        cfg = LasadConfig.from_dict(loads_strict(props["lasad.config"]))
        meta = loads_strict(props.get("lasad.meta", "{}"))
    except (TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: damaged lasad metadata ({one_line(e)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: damaged lasad metadata (lasad.meta is a {type(meta).__name__}, not an object)")
    return cfg, meta, props.get("lasad.form", "")


def lasad_step_numpy(qfv, lower_bound, past_state, start, num_heads, head_k_dim, head_v_dim, row_start,
                     has_lower_bound, scale):
    """LasadStep on numpy arrays, through the torch definition (`fused_gates` + the step)."""
    from ..ops.lasad import fused_gates, lasad_step_functional
    t = torch.from_numpy
    lb = t(np.ascontiguousarray(lower_bound)) if has_lower_bound else None
    q, k, v, g = fused_gates(t(np.ascontiguousarray(qfv)), lb, num_heads, head_k_dim, head_v_dim)
    o, new = lasad_step_functional(q, k, v, g, t(np.ascontiguousarray(past_state)),
                                   t(np.ascontiguousarray(start)), C.ROW_START_NAMES[int(row_start)], scale)
    return o.numpy(), new.numpy()


def _register_custom_op() -> str:
    """Register LasadStep with onnxruntime-extensions once; returns its custom-op library path."""
    global _REGISTERED
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError:
        raise EngineError("this step.onnx uses the LasadStep node, which needs onnxruntime-extensions: "
                          "pip install 'lasad[export]' (or export with --portable)") from None
    if not _REGISTERED:
        T = PyCustomOpDef
        attrs = {name: T.dt_int64 if kind == "int" else T.dt_float for name, (kind, _) in C.ATTRIBUTES.items()}
        onnx_op(op_type=C.OP_TYPE, inputs=[T.dt_float, T.dt_float, T.dt_float, T.dt_bool],
                outputs=[T.dt_float, T.dt_float], attrs=attrs)(lasad_step_numpy)
        _REGISTERED = True
    return get_library_path()


class OnnxRuntimeBackend(Backend):
    """Runs step.onnx on onnxruntime's CPU provider, bound to the engine's buffers."""

    name = "onnxruntime"

    def __init__(self, model, device: torch.device, onnx_path: str | os.PathLike):
        try:
            import onnx
            import onnxruntime as ort
        except ImportError:
            raise EngineError("backend 'onnxruntime' needs onnx and onnxruntime: pip install 'lasad[export]'") from None
        if device.type != "cpu":
            raise EngineError(f"backend 'onnxruntime' runs on the CPU here, got device={device}")
        super().__init__(model, device)
        proto = onnx.load(str(onnx_path))
        opts = ort.SessionOptions()
        custom = [n for n in proto.graph.node if n.op_type == C.OP_TYPE and n.domain == C.DOMAIN]
        if custom:
            opts.register_custom_ops_library(_register_custom_op())
            from onnxruntime_extensions import _ocos
            domain = _ocos.default_opset_domain()
            for n in custom:
                n.domain = domain
                keep = [a for a in n.attribute if a.name not in C.PARSER_ATTRIBUTES]
                del n.attribute[:]
                n.attribute.extend(keep)
            for imp in proto.opset_import:
                if imp.domain == C.DOMAIN:
                    imp.domain = domain
        self.session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.form = "custom" if custom else "portable"
        cfg = model.config
        self.L = cfg.n_layer
        self.scratch = None
        self.bindings = {}

    def _binding(self, ids, state: LasadState):
        rows = ids.shape[0]
        key = (rows, state.ssm.data_ptr(), state.logits.data_ptr(), ids.data_ptr())
        if key in self.bindings:
            return self.bindings[key]
        cfg = self.model.config
        if self.scratch is None or self.scratch.shape[1] < rows:
            self.scratch = torch.zeros(self.L, max(rows, state.batch), cfg.n_head, cfg.head_k_dim, cfg.head_v_dim)
        b = self.session.io_binding()
        bind = lambda fn, name, t: fn(name, "cpu", 0, {torch.int64: np.int64, torch.float32: np.float32}[t.dtype],
                                      list(t.shape), t.data_ptr())
        bind(b.bind_input, "ids", ids)
        bind(b.bind_input, "pos", state.pos)
        bind(b.bind_input, "width", state.width)
        bind(b.bind_output, "logits", state.logits[:rows])
        for i in range(self.L):
            bind(b.bind_input, C.PAST_STATE.format(i), state.ssm[i, :rows])
            bind(b.bind_output, C.PRESENT_STATE.format(i), self.scratch[i, :rows])
        self.bindings[key] = b
        return b

    def decode(self, ids: torch.Tensor, pos: torch.Tensor, state: LasadState) -> torch.Tensor:
        if not (ids.is_contiguous() and state.logits.is_contiguous()):
            raise EngineError("the onnxruntime backend needs contiguous id and logit buffers")
        self.session.run_with_iobinding(self._binding(ids, state))
        rows = ids.shape[0]
        state.ssm.copy_(self.scratch[:, :rows])
        return state.logits

    def close(self):
        self.bindings.clear()
        self.scratch = None
