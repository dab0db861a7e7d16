"""Export one LASADGen decode step (and the sampler) as ONNX.

The step graph follows the step contract (docs/design.md): inputs `ids` int64 [rows], `pos`
int64 [rows] and `width` int64 [rows] (each row's position and grid width: rows of images at
different positions share a step), `past_state.{i}` fp32 [rows, H, K, V] per layer; outputs `logits`
fp32 [rows, vocab] and `present_state.{i}`. `rows` is a dynamic axis (up to 2 × max_batch with
CFG), or fixed with `rows=N` (what onnxruntime's CUDA graphs and TensorRT's static shapes want:
no shape arithmetic is left in the graph). Weights and activations are in `dtype` (fp32, fp16 or
bf16); the state and the logits stay fp32 whatever the dtype (docs/design.md, the step contract). It is the model's own decode step (`LasadGen.decode_step`), traced with the LASAD op as
- the custom node `ai.lasad::LasadStep` (contract in `lasad_plugins.contract`), one per layer, or
- `portable=True`: the same step in standard ONNX ops (the torch definition, traced).

The sampler is a second small graph (`<name>.sampler.onnx`): logits, noise, cfg_scale,
cfg_active -> ids. It is separate because its settings (temperature, top-k, top-p) are fixed
per export while the step is not, so one step graph serves every sampler, and because the step
is the part a TensorRT plugin accelerates.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from lasad_engine.io import atomic_path
from lasad_engine.model import LasadGen
from lasad_engine.ops.lasad import fused_gates, lasad_step_functional
from lasad_engine.sampling import sample
from lasad_plugins import contract as C

EXTERNAL_DATA_THRESHOLD = 2 << 30  # protobuf's 2 GB limit: larger exports keep their weights beside the graph
INITIALIZER_MIN_BYTES = 1024       # constant tensors at least this large become initializers
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_DTYPES = {"fp32": 1, "fp16": 10, "bf16": 16}  # onnx.TensorProto.FLOAT / FLOAT16 / BFLOAT16


class LasadStepOp(torch.autograd.Function):
    """The LASAD step of one layer; exports as one `ai.lasad::LasadStep` node."""

    @staticmethod
    def forward(ctx, qfv, lb, past, start, H, K, V, row_start, has_lb, scale):
        q, k, v, g = fused_gates(qfv, lb if has_lb else None, H, K, V)
        return lasad_step_functional(q, k, v, g, past, start, C.ROW_START_NAMES[row_start], scale)

    @staticmethod
    def symbolic(g, qfv, lb, past, start, H, K, V, row_start, has_lb, scale):
        o, present = g.op(f"{C.DOMAIN}::{C.OP_TYPE}", qfv, lb, past, start, num_heads_i=H, head_k_dim_i=K,
                          head_v_dim_i=V, row_start_i=row_start, has_lower_bound_i=has_lb, scale_f=scale,
                          plugin_namespace_s=C.PLUGIN_NAMESPACE, plugin_version_s=C.PLUGIN_VERSION,
                          aot_i=C.PARSER_ATTRIBUTES["aot"], outputs=2)
        present.setType(past.type())
        rows = past.type().varyingSizes()[0]  # None where the rows are a dynamic axis
        o.setType(qfv.type().with_sizes([rows, H, V]))  # o [rows, H, V] in qfv's dtype: no "shape inference missing"
        return o, present


class StepGraph(torch.nn.Module):
    """`LasadGen.decode_step` with the LASAD op of each layer as the custom node (or, portable,
    the functional step in standard ops); past states in, present states out."""

    def __init__(self, model: LasadGen, portable: bool):
        super().__init__()
        self.model = model
        cfg = model.config
        self.H, self.K, self.V = cfg.n_head, cfg.head_k_dim, cfg.head_v_dim
        self.mode, _ = cfg.row_rule(cfg.grid_width)
        self.portable = portable
        self.scale = cfg.head_k_dim ** -0.5

    def _op(self, qfv, lb, past, start):
        if self.portable:
            q, k, v, g = fused_gates(qfv, lb, self.H, self.K, self.V)
            return lasad_step_functional(q, k, v, g, past, start, self.mode, self.scale)
        has_lb = lb is not None
        lb = lb if has_lb else torch.zeros(self.H * self.K)
        return LasadStepOp.apply(qfv, lb, past, start, self.H, self.K, self.V, C.ROW_START_CODES[self.mode],
                                 int(has_lb), self.scale)

    def forward(self, ids, pos, width, *past):
        logits, present = self.model.decode_step(ids, pos, width, past, self._op, backend="torch")
        return (logits.float(), *present)


@contextlib.contextmanager
def _frozen(model: LasadGen):
    """The model without gradients for the trace (its weights become initialisers), restored after."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


class SamplerGraph(torch.nn.Module):
    def __init__(self, cfg: bool, temperature: float, top_k: int, top_p: float):
        super().__init__()
        self.kw = dict(cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p)

    def forward(self, logits, noise, cfg_scale, cfg_active):
        return sample(logits, noise, cfg_scale=cfg_scale, cfg_active=cfg_active, **self.kw)


def _tensor_bytes(t) -> int:
    from onnx import helper
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def constants_to_initializers(graph, min_bytes: int = INITIALIZER_MIN_BYTES) -> int:
    """Move the tensors of top-level `Constant` nodes of at least `min_bytes` into
    `graph.initializer`, named as the node's output, and drop the nodes: whatever the tracer made
    a constant becomes an initializer, which the external-data path stores beside the graph. A tensor that the tracer
    already wrote to an external file keeps its reference (load its data afterwards). Returns the
    number of tensors moved."""
    moved = []
    for i, node in enumerate(graph.node):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
            continue
        a = node.attribute[0]
        if a.name == "value" and _tensor_bytes(a.t) >= min_bytes:
            moved.append(i)
    for i in moved:
        init = graph.initializer.add()
        init.CopyFrom(graph.node[i].attribute[0].t)
        init.name = graph.node[i].output[0]
    for i in reversed(moved):
        del graph.node[i]
    return len(moved)


def _save(model_proto, path: Path, scratch: Path) -> None:
    """Write `model_proto` to `path`: one file, or (over EXTERNAL_DATA_THRESHOLD) the graph plus
    its initializers in `path.name + ".data"` beside it. Both are written and checked under
    `scratch` (a folder beside `path`), then renamed into place, the data file first."""
    import onnx
    tmp = Path(scratch) / path.name
    data = path.name + ".data"
    big = sum(_tensor_bytes(t) for t in model_proto.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    if big:
        onnx.save_model(model_proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
    else:
        onnx.save_model(model_proto, tmp)
    onnx.checker.check_model(str(tmp))  # by path: reads external data, works past 2 GB
    if big:
        os.replace(tmp.parent / data, path.parent / data)
    os.replace(tmp, path)
    if not big and (path.parent / data).is_file():  # the data file of an earlier, larger export
        os.unlink(path.parent / data)


def _annotate(model_proto, cfg, rows_name: str | int, dtype: str = "fp32") -> None:
    """Value info for the custom nodes' outputs, so shape inference runs through the graph."""
    from onnx import TensorProto, helper
    vi = {v.name for v in model_proto.graph.value_info}
    for node in model_proto.graph.node:
        if node.op_type != C.OP_TYPE or node.domain != C.DOMAIN:
            continue
        o, present = node.output
        if o not in vi:
            model_proto.graph.value_info.append(helper.make_tensor_value_info(
                o, ONNX_DTYPES[dtype], [rows_name, cfg.n_head, cfg.head_v_dim]))
        if present not in vi:
            model_proto.graph.value_info.append(helper.make_tensor_value_info(
                present, TensorProto.FLOAT, [rows_name, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim]))
    shapes = {"logits": [rows_name, cfg.vocab_size]}
    shapes.update({C.PRESENT_STATE.format(i): [rows_name, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim]
                   for i in range(cfg.n_layer)})
    for out in model_proto.graph.output:
        if out.name in shapes:
            dims = out.type.tensor_type.shape.dim
            for d, size in zip(dims, shapes[out.name]):
                if isinstance(size, int):
                    d.dim_value = size
                else:
                    d.dim_param = size


QDQ_MIN_OPSET = {"int8": 13, "fp8": 19}  # DequantizeLinear with a per-axis scale; float8 inputs from opset 19


def quantized_matrices(model: LasadGen) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module name, W_q, scale) of each weight-only quantised matrix of `model` (quant.QuantLinear)."""
    from lasad_engine.quant import QuantLinear
    return [(name, m.weight.detach().cpu(), m.weight_scale.detach().cpu()) for name, m in model.named_modules()
            if isinstance(m, QuantLinear)]


def quantize_initializers(proto, matrices, dtype: str = "fp32") -> int:
    """The weight-only QDQ form of an exported step: every initializer that holds a quantised
    matrix as the trace stored it (W_q · s in `dtype`, `[N, K]` or transposed `[K, N]`, under
    whatever name the tracer gave it) becomes the int8 / e4m3 matrix, its fp32 scales `[N]` and a
    `DequantizeLinear` over the output-channel axis (then a `Cast` to `dtype` unless fp32), whose
    output keeps the initializer's name: the graph computes exactly what it computed before, from
    half the bytes (a quarter of fp32's). onnxruntime runs DequantizeLinear as a standard op;
    TensorRT reads a DequantizeLinear on a constant weight as a weight-only quantised layer.
    Matched by value, not by name. Returns the number of initializers replaced."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from lasad_engine.quant import dequantize_weight

    bits = {1: torch.int32, 2: torch.int16}
    want = {}  # raw bytes of the traced initializer -> (name, W_q laid out the same way, scale, axis)
    for name, q, s in matrices:
        w = dequantize_weight(q, s, DTYPES[dtype])
        for axis, laid in ((0, w), (1, w.t())):
            raw = laid.contiguous().view(bits.get(w.element_size(), torch.int32)).numpy().tobytes()
            want.setdefault((tuple(laid.shape), raw), (name, q if axis == 0 else q.t(), s, axis))
    graph = proto.graph
    inputs = {i.name for i in graph.input}
    new_nodes, replaced = [], []
    for t in graph.initializer:
        if t.data_type != ONNX_DTYPES[dtype] or len(t.dims) != 2 or not t.HasField("raw_data"):
            continue
        hit = want.get((tuple(t.dims), t.raw_data))
        if hit is None:
            continue
        name, q, s, axis = hit
        q_name, s_name = f"{name}.weight_quantized", f"{name}.weight_scale"
        while q_name in {i.name for i in graph.initializer}:  # one matrix may be used twice
            q_name, s_name = q_name + "_", s_name + "_"
        if q.dtype == torch.int8:
            q_init = numpy_helper.from_array(q.contiguous().numpy(), q_name)
        else:  # e4m3: its bytes, typed FLOAT8E4M3FN
            q_init = helper.make_tensor(q_name, TensorProto.FLOAT8E4M3FN, list(q.shape),
                                        q.contiguous().view(torch.uint8).numpy().tobytes(), raw=True)
        out = t.name if dtype == "fp32" else t.name + "_dequantized"
        new_nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name], [out], axis=axis,
                                          name=f"{name}.DequantizeLinear"))
        if dtype != "fp32":
            new_nodes.append(helper.make_node("Cast", [out], [t.name], to=ONNX_DTYPES[dtype], name=f"{name}.Cast"))
        replaced.append((t, [q_init, numpy_helper.from_array(s.float().numpy(), s_name)]))
    for t, inits in replaced:
        graph.initializer.remove(t)
        graph.initializer.extend(inits)
        if t.name in inputs:
            graph.input.remove(next(i for i in graph.input if i.name == t.name))
    for node in reversed(new_nodes):
        graph.node.insert(0, node)
    if replaced:
        onnx.checker.check_model(proto)
    return len(replaced)


def export_step(model: LasadGen, path: str | os.PathLike, *, portable: bool = False, max_batch: int = 8,
                opset: int = 17, meta: dict | None = None, dtype: str = "fp32", rows: int | None = None,
                weights: str | None = None) -> Path:
    """Write the decode step of `model` (on the CPU, weights in `dtype`: fp32 | fp16 | bf16; state
    and logits fp32) to `path` atomically, its weights as initializers (over 2 GB in
    `path.name + ".data"` beside it); returns the path. `rows`: a fixed row count (default: a
    dynamic axis). `weights`: "int8" | "fp8" writes the decode matrices weight-only quantised
    (`quantize_initializers`; a model whose matrices are quantised already keeps them), "float"
    dequantises them; default: as the model holds them."""
    import onnx

    from lasad_engine import quant

    path = Path(path)
    held = quant.weights_format(model)
    weights = weights or held
    if weights not in quant.WEIGHT_CHOICES:
        raise ValueError(f"weights={weights!r} is not one of {', '.join(quant.WEIGHT_CHOICES)}")
    if weights != "float" and opset < QDQ_MIN_OPSET[weights]:
        raise ValueError(f"{weights} weights need opset {QDQ_MIN_OPSET[weights]} or later (DequantizeLinear), "
                         f"got {opset}")
    matrices, copied = [], False  # the caller's model is never changed: a copy is
    if weights != "float":  # traced with W_q · s in dtype; the matrices go back in by quantize_initializers
        model, copied = quant.quantize_(copy.deepcopy(model).cpu(), weights), True
        matrices = quantized_matrices(model)
    if weights != "float" or held != "float":
        model = quant.dequantize_(model if copied else copy.deepcopy(model), torch.float32)
        copied = True
    w = model.output.weight
    if w.dtype != DTYPES[dtype] or w.device.type != "cpu":
        model = (model if copied else copy.deepcopy(model)).to(device="cpu", dtype=DTYPES[dtype])
    cfg = model.config
    graph = StepGraph(model.eval(), portable).eval()
    fixed, rows = rows is not None, rows or 2 * max_batch
    L, H, K, V = cfg.n_layer, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim
    past = [torch.zeros(rows, H, K, V) for _ in range(L)]
    args = (torch.zeros(rows, dtype=torch.int64), torch.ones(rows, dtype=torch.int64),
            torch.full((rows,), cfg.grid_width, dtype=torch.int64), *past)
    inputs = list(C.GRAPH_INPUTS) + [C.PAST_STATE.format(i) for i in range(L)]
    outputs = list(C.GRAPH_OUTPUTS) + [C.PRESENT_STATE.format(i) for i in range(L)]
    dyn = None if fixed else {n: {0: "rows"} for n in inputs + outputs}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lasad-export-") as tmp, torch.no_grad(), \
            warnings.catch_warnings(), _frozen(model):
        warnings.simplefilter("ignore")
        traced = Path(tmp) / "traced"  # torch's output; over 2 GB, with its tensors in files beside it
        traced.mkdir()
        torch.onnx.export(graph, args, str(traced / "step.onnx"), dynamo=False, opset_version=opset,
                          input_names=inputs, output_names=outputs, dynamic_axes=dyn,
                          custom_opsets=None if portable else {C.DOMAIN: C.OP_VERSION}, do_constant_folding=True)
        del graph, model, args, past
        gc.collect()
        proto = onnx.load(str(traced / "step.onnx"), load_external_data=False)
        constants_to_initializers(proto.graph)
        onnx.load_external_data_for_model(proto, str(traced))
        shutil.rmtree(traced)
        _annotate(proto, cfg, rows if fixed else "rows", dtype)
        if matrices and quantize_initializers(proto, matrices, dtype) != len(matrices):
            raise RuntimeError("a quantised matrix was not found among the traced initializers")
        info = {"lasad.config": json.dumps(cfg.to_dict()), "lasad.contract": str(C.CONTRACT_VERSION),
                "lasad.form": "portable" if portable else "custom",
                "lasad.dtype": dtype, "lasad.rows": str(rows) if fixed else "dynamic", "lasad.weights": weights,
                "lasad.op": json.dumps({"op_type": C.OP_TYPE, "domain": C.DOMAIN, "version": C.OP_VERSION,
                                        "plugin_namespace": C.PLUGIN_NAMESPACE}),
                "lasad.opset": str(opset), "lasad.max_batch": str(max_batch),
                "lasad.meta": json.dumps({**(meta or {}), **({"weights": weights} if matrices else {})})}
        for k, v in info.items():
            proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
        _save(proto, path, Path(tmp))
    return path


def export_sampler(path: str | os.PathLike, *, vocab: int, max_batch: int = 8, cfg: bool = True,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, opset: int = 17) -> Path:
    """Write the sampler graph: logits [rows, V], noise [B, V], cfg_scale [], cfg_active [] -> ids [B]."""
    import onnx

    path = Path(path)
    B = max_batch
    args = (torch.randn(2 * B if cfg else B, vocab), torch.rand(B, vocab) + 0.1, torch.tensor(2.0), torch.tensor(True))
    names = ["logits", "noise", "cfg_scale", "cfg_active"]
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on Python scalars that are constants by design
        torch.onnx.export(SamplerGraph(cfg, temperature, top_k, top_p), args, tmp, dynamo=False,
                          opset_version=opset, input_names=names, output_names=["ids"],
                          dynamic_axes={"logits": {0: "rows"}, "noise": {0: "images"}, "ids": {0: "images"}})
        proto = onnx.load(tmp)
        onnx.checker.check_model(proto)
        proto.metadata_props.append(onnx.StringStringEntryProto(key="lasad.sampler", value=json.dumps(
            dict(cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p))))
        onnx.save_model(proto, tmp)
    return path
