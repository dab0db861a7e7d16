"""The `onnxruntime` backend: runs an exported decode step (`lasad-export ckpt.pt step.onnx`) on
onnxruntime's CPU provider or, with onnxruntime-gpu, its CUDA provider.

Either form runs: the portable graph (standard ops) as it is, the custom-node graph through an
implementation of `LasadStep`: on the CPU onnxruntime-extensions' Python op (whose custom domain
is fixed: the session gets a copy of the graph with the node's domain mapped onto it; the file
keeps `ai.lasad`), on CUDA the compiled custom-op library of `lasad_plugins.ort` (the step
kernel of lasad_engine/ops/lasad/step.py as PTX, launched on onnxruntime's stream).

The session's copy of the graph (never the file, which stays standard ONNX for TensorRT) has each
residual add and the RMSNorm after it rewritten into onnxruntime's SkipSimplifiedLayerNormalization
(`fuse_residual_norms`): one kernel where onnxruntime's own optimizer leaves a norm plus a Gemm
whose bias input is a device copy, two per layer.

The state is never copied. onnxruntime does not promise that a graph output may share its buffer
with an input, and on CUDA it runs a step more than once before it captures a graph (warm-up runs),
which an in-place update would apply twice. So the state alternates between two buffers: the
engine's `state.ssm` (A) and one the backend allocates once (B), the whole pool flipping at every
step (every image's rows step together). `current(state)` says which holds the latest state: the
scheduler zeroes a joining image's slots there. Each direction has its own I/O binding, made once
per row count onto the engine's fixed buffers. The backend is not indexed: row r of a step is
state row r (the scheduler lays its rows out so).

On CUDA (docs/design.md, "The step contract"):
- every input and output is bound to the engine's device buffers (no host copy per step);
- onnxruntime runs on torch's current stream (`user_compute_stream`), or, when that is the legacy
  default stream (which cannot be captured), on a stream of its own fenced with events both ways;
  `disable_synchronize_execution_providers` keeps each run free of host syncs;
- with `cuda_graph` one session per row count (the rows dimension fixed by
  `add_free_dimension_override_by_name`, so constant folding removes every shape computation) and
  `enable_cuda_graph`: onnxruntime captures one graph per direction (`gpu_graph_id` 1 and 2) and
  replays it. The backend is not `capturable` (onnxruntime's capture runs inside its `Run` and
  cannot be nested in a capture of torch's): the engine runs it, then replays its own graph of the
  sampler and bookkeeping, so a step costs the host one `Run` and one graph launch.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

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
CUDA_PROVIDER = "CUDAExecutionProvider"
GPU_HINT = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
NUMPY_TYPES = {torch.int64: np.int64, torch.float32: np.float32}
QDQ_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"


def read_onnx_config(path: str | os.PathLike) -> tuple[LasadConfig, dict, str]:
    """(config, meta, form) from an exported step's metadata, the graph checked against the step
    contract and that config (`contract.check_step_graph`); one-line errors for other files."""
    props, proto = _load_step(path)
    try:
        cfg = LasadConfig.from_dict(loads_strict(props["lasad.config"]))
        meta = loads_strict(props.get("lasad.meta", "{}"))
    except (TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: damaged lasad metadata ({one_line(e)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: damaged lasad metadata (lasad.meta is a {type(meta).__name__}, not an object)")
    check_contract(props, path)
    C.check_step_graph(proto, cfg, str(path))
    return cfg, meta, C.check_step_metadata(props, str(path))["form"]


def read_onnx_dtype(path: str | os.PathLike) -> str:
    """The weights' dtype of an exported step (lasad.dtype: fp32 | fp16 | bf16), checked."""
    return C.check_step_metadata(_metadata(path), str(path))["dtype"]


def _metadata(path) -> dict:
    """The metadata properties of a lasad decode step's ONNX file (one-line errors otherwise)."""
    return _load_step(path)[0]


def _load_step(path) -> tuple[dict, object]:
    """(metadata properties, ModelProto without external data) of a lasad decode step's ONNX
    file; one-line errors for anything else."""
    try:
        import onnx
    except ImportError:
        raise EngineError("reading an exported step needs onnx: pip install -e '.[export]' in lasad's folder") from None
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
    return props, proto


def check_contract(props: dict, path) -> None:
    """A step exported for the current step contract (per-row positions), or one line saying to
    export it again."""
    if props.get("lasad.contract") != str(C.CONTRACT_VERSION):
        raise CheckpointError(f"{path}: exported by an older lasad (one position for every row; this one gives each "
                              f"row its own); export it again: lasad-export CKPT {Path(path).name}")


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


_OP_FAILURE = threading.local()  # .error: what the Python op raised in this thread's last run


def lasad_step_op(qfv, lower_bound, past_state, start, **attrs):
    """The Python op onnxruntime-extensions calls for each LasadStep node. It never raises: an
    exception (or a Ctrl-C) escaping a Python op inside onnxruntime ends the process with SIGABRT
    ("terminate called after throwing an instance of pybind11::error_already_set"). It records
    the error instead, returns outputs of the contract's shapes (NaN where it can, empty where the
    shapes are unknown, which stops the run), and the backend raises the error after the run
    (`_raise_op_failure`)."""
    try:
        C.check_node_attributes(attrs)
        return lasad_step_numpy(qfv, lower_bound, past_state, start, **attrs)
    except BaseException as e:  # noqa: BLE001 - reported by the backend after the run
        if getattr(_OP_FAILURE, "error", None) is None:
            _OP_FAILURE.error = e
        rows = qfv.shape[0] if getattr(qfv, "ndim", 0) >= 1 else 0
        H, V = attrs.get("num_heads"), attrs.get("head_v_dim")
        fits = isinstance(H, int) and isinstance(V, int) and 1 <= H and 1 <= V and H * V <= max(qfv.size, 1)
        o = np.full((rows, H, V), np.nan, np.float32) if fits else np.zeros((rows, 0), np.float32)
        return o, np.asarray(past_state, np.float32)


def _raise_op_failure(path, run_error: BaseException | None = None) -> None:
    """After a run: raise what the Python op recorded (a Ctrl-C as itself, an error as one
    EngineError line naming the file), else onnxruntime's own error of the run, if any."""
    error, _OP_FAILURE.error = getattr(_OP_FAILURE, "error", None), None
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        raise error
    if error is not None:
        raise EngineError(f"{path}: the LasadStep node failed inside onnxruntime: "
                          f"{one_line(error if isinstance(error, EngineError) else f'{type(error).__name__}: {error}', 300)}") from None
    if run_error is not None:
        raise EngineError(f"{path}: onnxruntime stopped the step: {one_line(run_error, 300)}") from None


def _register_custom_op() -> str:
    """Register LasadStep with onnxruntime-extensions once; returns its custom-op library path."""
    global _REGISTERED
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError:
        raise EngineError("this step.onnx uses the LasadStep node, which needs onnxruntime-extensions: "
                          "pip install -e '.[export]' in lasad's folder (or export with --portable)") from None
    if not _REGISTERED:
        T = PyCustomOpDef
        attrs = {name: T.dt_int64 if kind == "int" else T.dt_float for name, (kind, _) in C.ATTRIBUTES.items()}
        onnx_op(op_type=C.OP_TYPE, inputs=[T.dt_float, T.dt_float, T.dt_float, T.dt_bool],
                outputs=[T.dt_float, T.dt_float], attrs=attrs)(lasad_step_op)
        _REGISTERED = True
    return get_library_path()


def _installed(dist: str):
    import importlib.metadata as md
    try:
        return md.distribution(dist)
    except md.PackageNotFoundError:
        return None


def check_cuda_provider(ort) -> None:
    """One-line errors when onnxruntime cannot run on CUDA: the GPU package is missing, it has no
    CUDA provider, or both packages share one site folder (the `onnxruntime` module is then
    whichever was installed last)."""
    cpu, gpu = _installed("onnxruntime"), _installed("onnxruntime-gpu")
    if cpu is not None and gpu is not None and cpu.locate_file("") == gpu.locate_file(""):
        raise EngineError(f"both onnxruntime {cpu.version} and onnxruntime-gpu {gpu.version} are installed in "
                          f"{gpu.locate_file('')}; they overwrite each other's module: {GPU_HINT}")
    providers = ort.get_available_providers()
    if CUDA_PROVIDER not in providers:
        what = "onnxruntime-gpu" if gpu is not None else "onnxruntime"
        raise EngineError(f"backend 'onnxruntime' on a CUDA device needs onnxruntime-gpu with its CUDA provider; "
                          f"{what} {ort.__version__} offers only {', '.join(providers)}: {GPU_HINT} "
                          "(and a CUDA runtime it supports)")


class OnnxRuntimeBackend(Backend):
    """Runs step.onnx on onnxruntime (CPU or CUDA provider), bound to the engine's buffers."""

    name = "onnxruntime"

    def __init__(self, model, device: torch.device, onnx_path: str | os.PathLike):
        try:
            import onnx  # noqa: F401 - read by _load_step
            import onnxruntime as ort
        except ImportError:
            hint = GPU_HINT if device.type == "cuda" else "pip install -e '.[export]' in lasad's folder"
            raise EngineError(f"backend 'onnxruntime' needs onnx and onnxruntime: {hint}") from None
        if device.type not in ("cpu", "cuda"):
            raise EngineError(f"backend 'onnxruntime' runs on cpu or cuda, got device={device}")
        if device.type == "cuda":
            check_cuda_provider(ort)
            device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        super().__init__(model, device)
        self.ort, self.path = ort, Path(onnx_path)
        props, proto = _load_step(onnx_path)
        check_contract(props, onnx_path)
        C.check_step_graph(proto, model.config, str(onnx_path))  # before any runtime sees a node
        step = C.check_step_metadata(props, str(onnx_path))
        self.dtype, self.fixed_rows = step["dtype"], step["rows"]
        custom = [n for n in proto.graph.node if n.op_type == C.OP_TYPE and n.domain == C.DOMAIN]
        self.form = "custom" if custom else "portable"
        self.library = None
        if custom and device.type == "cpu":
            if self.dtype != "fp32":
                raise EngineError(f"{onnx_path}: the LasadStep node runs on the CPU in fp32 only (this step is "
                                  f"{self.dtype}); export with --portable, or run it on CUDA")
            self.library = _register_custom_op()
            _map_to_extensions_domain(proto, custom)
        elif custom:
            from lasad_plugins.ort import attach_kernels, find_library
            self.library = find_library()
            from ..ops.lasad.aot import CudaTarget
            attach_kernels(proto, CudaTarget.current(self.device.index or 0))
        self.fused_norms = fuse_residual_norms(proto)
        self.model_bytes = proto.SerializeToString()  # the graph; large weights stay in their file
        self.sessions: dict[int, object] = {}
        self.bindings: dict[tuple, tuple] = {}
        self.other: torch.Tensor | None = None  # state buffer B [L, B_max, H, K, V]
        self.parity = 0                         # 0: the state is in A (state.ssm), 1: in B
        self.stream = None

    def _session(self, rows: int):
        """The session for `rows` rows (CPU: one session for every row count)."""
        if self.fixed_rows is not None and rows != self.fixed_rows:
            raise EngineError(f"{self.path} was exported for {self.fixed_rows} rows (--rows), this step has {rows} "
                              f"(2 per image with CFG); export it without --rows or with --rows {rows}")
        key = rows if self.device.type == "cuda" else 0
        if key in self.sessions:
            return self.sessions[key]
        ort = self.ort
        so = ort.SessionOptions()
        # fatal only: onnxruntime warns that a dynamic-rows export keeps its shape arithmetic on
        # the CPU "use the graph capture feature with caution", but each session fixes its rows;
        # and its errors come back to the backend, which reports each in one line (_raise_op_failure)
        so.log_severity_level = 4
        # nodes run one after the other on the calling thread, where the Python op records a failure
        # for this run (lasad_step_op); onnxruntime's default, kept explicit
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                    str(self.path.resolve().parent))
        # int8 weights (lasad-export --weights int8): onnxruntime fuses DequantizeLinear -> MatMul
        # into MatMulNBits, whose default accuracy level (4) quantises the activations to int8 as
        # well; level 1 computes in fp32, the weight-only numerics of the export
        so.add_session_config_entry(QDQ_ACCURACY_KEY, "1")
        if self.library is not None:
            so.register_custom_ops_library(self.library)
        if self.device.type == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            if self.fixed_rows is None:
                so.add_free_dimension_override_by_name("rows", rows)
            providers = [(CUDA_PROVIDER, self._cuda_options()), "CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(self.model_bytes, so, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise EngineError(f"onnxruntime could not load {self.path} on {self.device}: "
                              f"{' '.join(str(e).split())[:400]}") from None
        self.sessions[key] = session
        return session

    def _cuda_options(self) -> dict:
        """CUDA provider options: torch's stream (or the backend's own, see the module docstring),
        CUDA graphs, and TF32 as torch does it (fp32 means fp32 unless torch allows TF32)."""
        current = torch.cuda.current_stream(self.device)
        if self.stream is None:
            self.stream = current if current.cuda_stream != 0 else torch.cuda.Stream(self.device)
        return {"device_id": str(self.device.index), "user_compute_stream": str(self.stream.cuda_stream),
                "enable_cuda_graph": "1" if self.cuda_graph else "0",
                "use_tf32": "1" if torch.backends.cuda.matmul.allow_tf32 else "0"}

    def _state_pair(self, state: LasadState, rows: int):
        """(A, B): the engine's first `rows` state rows and the same rows of the backend's second
        buffer (as large as the engine's pool)."""
        ssm = state.ssm
        L, full, H, K, V = ssm.shape
        if not ssm.is_contiguous():
            raise EngineError("the onnxruntime backend needs each layer's state rows contiguous")
        if self.other is None or self.other.shape != ssm.shape:
            self.other = torch.zeros_like(ssm)
            self.bindings.clear()
        return ssm[:, :rows], self.other[:, :rows]

    def _binding(self, rows, state: LasadState):
        R = rows.ids.shape[0]
        key = (R, state.ssm.data_ptr(), rows.logits.data_ptr(), rows.ids.data_ptr(), rows.pos.data_ptr(),
               rows.width.data_ptr())
        if key in self.bindings:
            return self.bindings[key]
        session = self._session(R)
        a, b = self._state_pair(state, R)
        pair = []
        for graph_id, (past, present) in enumerate(((a, b), (b, a)), start=1):
            binding = session.io_binding()
            bind_io(binding, self.device, {"ids": rows.ids, "pos": rows.pos, "width": rows.width},
                    {"logits": rows.logits}, past, present)
            pair.append((binding, self._run_options(graph_id)))
        self.bindings[key] = (session, pair)
        return self.bindings[key]

    def _run_options(self, graph_id: int):
        opts = self.ort.RunOptions()
        if self.device.type == "cuda":
            opts.add_run_config_entry("disable_synchronize_execution_providers", "1")
            opts.add_run_config_entry("gpu_graph_id", str(graph_id if self.cuda_graph else -1))
        return opts

    def decode(self, rows, state: LasadState) -> torch.Tensor:
        if rows.slots is not None:
            raise EngineError("the onnxruntime backend runs row r on state row r (it is not indexed)")
        if not all(t.is_contiguous() for t in (rows.ids, rows.pos, rows.width, rows.logits)):
            raise EngineError("the onnxruntime backend needs contiguous id, position, width and logit buffers")
        session, pair = self._binding(rows, state)
        binding, options = pair[self.parity]
        fence = self.device.type == "cuda" and torch.cuda.current_stream(self.device) != self.stream
        if fence:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        _OP_FAILURE.error = None
        try:
            session.run_with_iobinding(binding, options)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            _raise_op_failure(self.path, e)
        _raise_op_failure(self.path)
        if fence:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.parity ^= 1
        return rows.logits

    def current(self, state: LasadState) -> LasadState:
        if self.parity == 0 or self.other is None:
            return state
        return LasadState(self.other, state.pos, state.width, state.logits)

    def close(self):
        self.bindings.clear()
        self.sessions.clear()
        self.other = None


def bind_io(binding, device: torch.device, inputs: dict, outputs: dict, past: torch.Tensor,
            present: torch.Tensor) -> None:
    """Bind named tensors by address (no copy): `inputs`/`outputs` name -> tensor, and each layer
    i's `past_state.{i}` / `present_state.{i}` to `past[i]` / `present[i]` ([rows, H, K, V])."""
    kind, index = device.type, device.index or 0

    def bind(fn, name, t):
        fn(name, kind, index, NUMPY_TYPES[t.dtype], list(t.shape), t.data_ptr())

    for name, t in inputs.items():
        bind(binding.bind_input, name, t)
    for name, t in outputs.items():
        bind(binding.bind_output, name, t)
    for i in range(past.shape[0]):
        bind(binding.bind_input, C.PAST_STATE.format(i), past[i])
        bind(binding.bind_output, C.PRESENT_STATE.format(i), present[i])


SKIP_NORM = "SkipSimplifiedLayerNormalization"  # com.microsoft: residual add + RMSNorm in one kernel
_FUSABLE = {1, 10}  # onnx.TensorProto FLOAT, FLOAT16: the activation dtypes its kernels take everywhere


def fuse_residual_norms(proto) -> int:
    """Rewrite, in place, each residual `Add` of an exported step (ModelProto) whose sum feeds an
    RMSNorm into onnxruntime's com.microsoft `SkipSimplifiedLayerNormalization` (normed output, and
    the sum as its fourth output where the residual stream goes on). onnxruntime's own optimizer
    fuses the norm (SimplifiedLayerNormFusion) but never the add before it: its SkipLayerNormFusion
    reads only LayerNormalization, and its earlier MatMulAddFusion turns each residual add into a
    Gemm whose bias input costs a device copy. Done only on the session's copy of the graph, so the
    file stays standard ONNX for TensorRT. The norm is matched exactly as `ops.norms.rms_norm`
    traces for a full-width norm: [Cast to fp32] -> Pow 2 -> ReduceMean(last axis) -> Add eps ->
    Sqrt -> Div -> [Cast back] -> Mul weight. Returns the number of adds fused (fp32 and fp16
    activations only)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    order = list(graph.node)  # these node objects throughout: they are compared by identity
    consumers: dict[str, list] = {}
    for n in order:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    const = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in order
             if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"}
    weights = {t.name: list(t.dims) for t in graph.initializer}
    for n in order:  # the tracer writes equal weights once and the others as Identity of it
        if n.op_type == "Identity" and n.input[0] in weights:
            weights[n.output[0]] = weights[n.input[0]]
    outputs = {o.name for o in graph.output}

    def sole(name: str, op: str):
        c = consumers.get(name, [])
        return c[0] if len(c) == 1 and c[0].op_type == op and c[0].domain in ("", "ai.onnx") else None

    def scalar(name: str, value=None):
        v = const.get(name)
        return v is not None and v.size == 1 and (value is None or float(v) == value)

    def attr(node, name, default=None):
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)

    def norm_after(h: str):
        """(the norm's nodes, weight, eps, output, fp32 input, activation dtype) when `h` feeds one."""
        casts = [u for u in consumers.get(h, []) if u.op_type == "Cast"]
        nodes, hf = [], h
        if casts:  # normalised in fp32 (the trace casts even an fp32 activation)
            if len(casts) != 1 or attr(casts[0], "to") != TensorProto.FLOAT:
                return None
            nodes, hf = [casts[0]], casts[0].output[0]
        hf_users = consumers.get(hf, [])
        pow_ = next((u for u in hf_users if u.op_type == "Pow" and u.input[0] == hf), None)
        div = next((u for u in hf_users if u.op_type == "Div" and u.input[0] == hf), None)
        if pow_ is None or div is None or not scalar(pow_.input[1], 2.0):
            return None
        mean = sole(pow_.output[0], "ReduceMean")
        if mean is None or attr(mean, "axes") != [-1] or attr(mean, "keepdims", 1) != 1:
            return None
        add = sole(mean.output[0], "Add")
        if add is None or not scalar(add.input[1]):
            return None
        sqrt = sole(add.output[0], "Sqrt")
        if sqrt is None or sole(sqrt.output[0], "Div") is not div or div.input[1] != sqrt.output[0]:
            return None
        nodes += [pow_, mean, add, sqrt, div]
        last, h_type = div.output[0], TensorProto.FLOAT
        back = sole(last, "Cast")  # to the activation dtype (none in fp32)
        if back is not None:
            nodes.append(back)
            last, h_type = back.output[0], attr(back, "to")
        mul = sole(last, "Mul")
        if mul is None or mul.input[0] != last or len(weights.get(mul.input[1], [])) != 1 or h_type not in _FUSABLE:
            return None
        return nodes + [mul], mul.input[1], float(const[add.input[1]]), mul.output[0], hf, h_type

    fused, drop = {}, set()
    for node in order:
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        h = node.output[0]
        if any(i in weights or i in const for i in node.input):  # a bias or a constant, not a residual
            continue
        match = norm_after(h)
        if match is None:
            continue
        nodes, weight, eps, y, hf, h_type = match
        ids = {id(n) for n in nodes}
        # where the residual stream goes on: from the sum, or (fp32) from the cast the trace made of it
        on = [name for name in dict.fromkeys((h, hf))
              if name in outputs or any(id(u) not in ids for u in consumers.get(name, []))]
        if len(on) > 1 or (on == [hf] and hf != h and h_type != TensorProto.FLOAT):
            continue
        outs = [y, "", "", *on] if on else [y]
        fused[id(node)] = helper.make_node(SKIP_NORM, [node.input[0], node.input[1], weight], outs,
                                           name=f"{node.name or h}/{SKIP_NORM}", domain="com.microsoft", epsilon=eps)
        drop |= ids
    if not fused:
        return 0
    kept = [fused.get(id(n), n) for n in order if id(n) not in drop]
    used = {name for n in kept for name in n.input} | outputs
    kept = [n for n in kept if n.op_type != "Constant" or n.output[0] in used]  # eps and the 2 of the norms
    del graph.node[:]
    graph.node.extend(kept)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(fused)


def _map_to_extensions_domain(proto, custom) -> None:
    """Map the LasadStep nodes onto onnxruntime-extensions' fixed domain (its Python ops live there)."""
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
