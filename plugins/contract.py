"""The LasadStep custom op, defined once for the exporter, the onnxruntime implementation and the
TensorRT plugin.

One node per layer: the fused projection in, the gates (HGRN2: docs/model.md, the mixer, steps 1–4), the spatial-
aware decay and the state update (steps 5–7) inside, the per-head readout and the new state out.
It computes what `lasad_engine.ops.lasad.lasad_fused_step_` computes (Triton kernel
`lasad_step_kernel` with FUSED_GATES), functionally: present_state is a new tensor in ONNX, and
an alias of past_state in the TensorRT plugin.

| # | input | shape | dtype |
|---|---|---|---|
| 0 | qfv | [rows, 2·H·K + H·V] | activation (fp32 / fp16 / bf16) |
| 1 | lower_bound | [H·K] | fp32 (zeros when has_lower_bound = 0) |
| 2 | past_state | [rows, H, K, V] | fp32 |
| 3 | start | [rows] | bool: the row's position starts an image row (each row has its own position) |

| # | output | shape | dtype |
|---|---|---|---|
| 0 | o | [rows, H, V] | activation |
| 1 | present_state | [rows, H, K, V] | fp32 (aliases past_state in TensorRT) |
"""

import math

from lasad_engine.io import UserError

OP_TYPE = "LasadStep"
DOMAIN = "ai.lasad"          # ONNX domain of the node
OP_VERSION = 2               # ONNX opset version of DOMAIN (2: a start flag per row)
# The step graph's contract: 2 = a position, a grid width and a row-start flag per row (rows of
# different images at different positions share a step: the serving engine's slots); 1 = one
# position for every row (lasad before 2026-12-06: re-export those files).
CONTRACT_VERSION = 2
PLUGIN_NAMESPACE = "lasad"   # TensorRT plugin namespace (the node carries it as plugin_namespace)
PLUGIN_VERSION = "1"         # TensorRT's quickly deployable plugins are all version 1; a plan records
                             # the contract as lasad_format (plugins/lasad_step/plan.py)

INPUTS = ("qfv", "lower_bound", "past_state", "start")
OUTPUTS = ("o", "present_state")
ALIASES = {"present_state": "past_state"}  # output -> input it may overwrite in place

# Attributes: name -> (type, meaning). The TensorRT plugin's fields are exactly these.
ATTRIBUTES = {
    "num_heads": ("int", "H"),
    "head_k_dim": ("int", "K (d_k)"),
    "head_v_dim": ("int", "V (d_v)"),
    "row_start": ("int", "0 = none, 1 = unit, 2 = reset (ROW_START_CODES)"),
    "has_lower_bound": ("int", "1: g = log(lb + (1 - lb)·sigmoid(f)); 0: g = logsigmoid(f)"),
    "scale": ("float", "query scale, K ** -0.5"),
}
# Carried by the node for TensorRT's ONNX parser (onnx-tensorrt's plugin importer): it finds the
# plugin by op type + plugin_version + plugin_namespace, and a nonzero INT `aot` asks for the
# ahead-of-time implementation (QuickPluginCreationRequest STRICT_AOT: the kernel is embedded in the
# plan, which then runs without Python). They are not plugin fields; the onnxruntime implementation
# drops them.
PARSER_ATTRIBUTES = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION, "aot": 1}
ROW_START_CODES = {"none": 0, "unit": 1, "reset": 2}
ROW_START_NAMES = {v: k for k, v in ROW_START_CODES.items()}

# Per-layer state I/O names of the exported step graph.
PAST_STATE = "past_state.{}"
PRESENT_STATE = "present_state.{}"
GRAPH_INPUTS = ("ids", "pos", "width")  # int64 [rows] each: ids, each row's position and grid width
GRAPH_OUTPUTS = ("logits",)

# Metadata an exported step carries (tools/onnx_export.py writes it; `check_step_metadata` reads it).
STEP_FORMS = ("custom", "portable")
STEP_DTYPES = ("fp32", "fp16", "bf16")


class ContractError(UserError):
    """A LasadStep node or a step graph that breaks this contract: one line naming the node, the
    value and what is allowed. The command-line tools exit 1 on it (a damaged or foreign file)."""


# The checks below are the one definition of what a LasadStep node and an exported step may hold.
# Every reader calls them before a runtime sees the graph: lasad-run and LasadPipeline (through
# the onnxruntime backend and `read_onnx_config`), lasad-check, lasad-export's TensorRT build, the
# plugin's creator (`lasad_step.defs.node_settings`) and the Python op. A bad attribute that
# reached onnxruntime-extensions' Python op or the CUDA library would abort the process (SIGABRT)
# instead of raising.

def _limit(name: str) -> int:
    from lasad_engine.config import LIMITS  # the bounds of a config's fields, one definition
    return LIMITS[name]


ATTRIBUTE_LIMITS = {"num_heads": "n_head", "head_k_dim": "head_k_dim", "head_v_dim": "head_v_dim"}
SCALE_RTOL = 1e-6  # the attribute is fp32: K ** -0.5 rounded to float32 is within 6e-8 of it


def _scalar(name: str, value, kind: str, where: str):
    """An attribute value as a Python int / float / str: plain values, numpy scalars and the
    1-element arrays TensorRT's parser hands over are accepted; anything else is refused."""
    if hasattr(value, "reshape") and hasattr(value, "size"):  # a numpy array (TensorRT's fields)
        if value.size != 1:
            raise ContractError(f"{where}: attribute {name} holds {value.size} values; the contract has one {kind}")
        value = value.reshape(-1)[0]
    if hasattr(value, "item") and not isinstance(value, (bytes, str)):
        value = value.item()
    if kind == "str":
        if isinstance(value, bytes):
            try:
                value = value.decode()
            except UnicodeDecodeError:
                raise ContractError(f"{where}: attribute {name} is not text") from None
        if not isinstance(value, str):
            raise ContractError(f"{where}: attribute {name}={value!r} is not a string")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ContractError(f"{where}: attribute {name}={_shown(value)} is not a{'n int' if kind == 'int' else ' float'}")
    if kind == "int":
        if isinstance(value, float):
            raise ContractError(f"{where}: attribute {name}={value!r} is a float; the contract has an int")
        return int(value)
    if not math.isfinite(value):
        raise ContractError(f"{where}: attribute {name}={value!r} is not a finite number")
    return float(value)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_node_attributes(attrs: dict, config=None, *, layer: int | None = None, where: str = OP_TYPE) -> dict:
    """Check one LasadStep node's attributes against the contract (and, given the model's
    `config`, against it); return them as Python values ({name: int | float}).

    Args:
        attrs: attribute name -> value (Python or numpy scalars, 1-element arrays as TensorRT's
            parser makes them, bytes for the parser's string attributes). `ATTRIBUTES` must all
            be there; `PARSER_ATTRIBUTES`, when there, must hold their values; nothing else.
        config: a LasadConfig: H, K, V, the row-start mode and the lower bound must be the model's.
        layer: the node's layer (its lower bound: none at layer 0), checked with `config`.
        where: how the error names the node.
    Raises:
        ContractError: one line naming the attribute, its value and what is allowed.
    """
    unknown = sorted(set(attrs) - set(ATTRIBUTES) - set(PARSER_ATTRIBUTES))
    if unknown:
        raise ContractError(f"{where}: unknown attribute {_shown(unknown[0])}; a LasadStep node has "
                            f"{', '.join(list(ATTRIBUTES) + list(PARSER_ATTRIBUTES))}")
    missing = [n for n in ATTRIBUTES if n not in attrs]
    if missing:
        raise ContractError(f"{where}: no attribute {missing[0]}; a LasadStep node has {', '.join(ATTRIBUTES)}")
    v = {name: _scalar(name, attrs[name], kind, where) for name, (kind, _) in ATTRIBUTES.items()}
    for name, field in ATTRIBUTE_LIMITS.items():
        top = _limit(field)
        if not 1 <= v[name] <= top:
            raise ContractError(f"{where}: {name}={v[name]} is out of range; allowed 1..{top}")
    if v["row_start"] not in ROW_START_NAMES:
        choices = ", ".join(f"{c} ({n})" for c, n in ROW_START_NAMES.items())
        raise ContractError(f"{where}: row_start={v['row_start']} is not one of {choices}")
    if v["has_lower_bound"] not in (0, 1):
        raise ContractError(f"{where}: has_lower_bound={v['has_lower_bound']} is not 0 or 1")
    expected_scale = v["head_k_dim"] ** -0.5
    if not abs(v["scale"] - expected_scale) <= SCALE_RTOL * expected_scale:
        raise ContractError(f"{where}: scale={v['scale']!r} is not head_k_dim ** -0.5 = {expected_scale:.8g}")
    for name, value in PARSER_ATTRIBUTES.items():
        if name in attrs:
            got = _scalar(name, attrs[name], "str" if isinstance(value, str) else "int", where)
            if got != value:
                raise ContractError(f"{where}: {name}={_shown(got)}; this lasad's LasadStep has {name}={value!r}")
    if config is not None:
        mode = config.row_rule(config.grid_width)[0]  # what the exporter writes (no decay: unit)
        want = {"num_heads": config.n_head, "head_k_dim": config.head_k_dim, "head_v_dim": config.head_v_dim,
                "row_start": ROW_START_CODES[mode]}
        if not config.use_lower_bound or layer is not None:
            want["has_lower_bound"] = int(config.use_lower_bound and (layer or 0) > 0)
        for name, value in want.items():
            if v[name] != value:
                raise ContractError(f"{where}: {name}={v[name]}, but the model's metadata says {value} "
                                    "(a node edited after export, or the metadata of another model)")
    return v


def check_step_graph(proto, config=None, where: str = "step.onnx") -> int:
    """Check an exported step (an onnx ModelProto) against the contract before any runtime sees
    it: the `ai.lasad` domain's version, every node of that domain (op type, inputs, outputs,
    attributes: `check_node_attributes`, with `config` and the node's layer), the number of
    LasadStep nodes (one per layer of `config`), and the graph's named inputs and outputs
    (`ids`, `pos`, `width`, `past_state.{i}`; `logits`, `present_state.{i}`). Shapes are not
    checked here (onnxruntime and TensorRT check them). Returns the number of LasadStep nodes;
    raises ContractError (one line) otherwise."""
    from onnx import AttributeProto, helper

    for imp in proto.opset_import:
        if imp.domain == DOMAIN and imp.version != OP_VERSION:
            raise ContractError(f"{where}: the graph imports {DOMAIN} version {imp.version}; this lasad implements "
                                f"version {OP_VERSION} (re-export the step with this lasad's lasad-export)")
    imported = any(imp.domain == DOMAIN for imp in proto.opset_import)
    kinds = {"int": AttributeProto.INT, "float": AttributeProto.FLOAT}
    nodes = 0
    for node in proto.graph.node:
        if node.domain != DOMAIN and node.op_type != OP_TYPE:
            continue
        name = f"{where}: node {_shown(node.name or node.op_type)}"
        if node.domain != DOMAIN or node.op_type != OP_TYPE:
            raise ContractError(f"{name} is {_shown(node.domain)}:{_shown(node.op_type)}; the {DOMAIN} domain has "
                                f"one op, {DOMAIN}:{OP_TYPE}")
        if not imported:
            raise ContractError(f"{where}: a {OP_TYPE} node, but the graph does not import the {DOMAIN} domain")
        if len(node.input) != len(INPUTS) or len(node.output) != len(OUTPUTS):
            raise ContractError(f"{name} has {len(node.input)} inputs and {len(node.output)} outputs; {OP_TYPE} "
                                f"takes {', '.join(INPUTS)} and gives {', '.join(OUTPUTS)}")
        attrs = {}
        for a in node.attribute:
            if a.name in ATTRIBUTES:
                kind = ATTRIBUTES[a.name][0]
            elif a.name in PARSER_ATTRIBUTES:
                kind = "str" if isinstance(PARSER_ATTRIBUTES[a.name], str) else "int"
            else:  # check_node_attributes names it
                kind = None
            expected = kinds.get(kind, AttributeProto.STRING)
            if kind is not None and a.type != expected:
                raise ContractError(f"{name}: attribute {_shown(a.name)} is of type "
                                    f"{AttributeProto.AttributeType.Name(a.type)}; the contract has {kind}")
            attrs[a.name] = helper.get_attribute_value(a)
        check_node_attributes(attrs, config, layer=nodes, where=name)
        nodes += 1
    inputs = {i.name for i in proto.graph.input}
    outputs = {o.name for o in proto.graph.output}
    layers = config.n_layer if config is not None else sum(1 for n in inputs if n.startswith(PAST_STATE[:-2]))
    if config is not None and nodes not in (0, layers):
        raise ContractError(f"{where}: {nodes} {OP_TYPE} nodes for a model of {layers} layers (one per layer)")
    need_in = list(GRAPH_INPUTS) + [PAST_STATE.format(i) for i in range(layers)]
    need_out = list(GRAPH_OUTPUTS) + [PRESENT_STATE.format(i) for i in range(layers)]
    for kind, need, have in (("input", need_in, inputs), ("output", need_out, outputs)):
        absent = [n for n in need if n not in have]
        if absent:
            raise ContractError(f"{where}: the graph has no {kind} {absent[0]}; a lasad decode step has the "
                                f"{kind}s {', '.join(need[:4])}{', ...' if len(need) > 4 else ''}")
    return nodes


def check_step_metadata(props: dict, where: str = "step.onnx") -> dict:
    """The lasad.* metadata of an exported step that readers act on, checked: lasad.form (custom |
    portable), lasad.dtype (fp32 | fp16 | bf16), lasad.rows ("dynamic" or a row count),
    lasad.max_batch (images), within lasad_engine.params.MAX_BATCH. Returns {"form", "dtype",
    "rows" (None = dynamic), "max_batch" (None where absent)}; ContractError otherwise."""
    from lasad_engine.params import MAX_BATCH

    def choice(key, choices, default):
        value = props.get(key, default)
        if value not in choices:
            raise ContractError(f"{where}: {key}={_shown(value)} is not one of {', '.join(choices)}")
        return value

    def count(key, top, default):
        value = props.get(key, default)
        if value == default:
            return None
        text = str(value).strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 12 or not 1 <= int(text) <= top:
            raise ContractError(f"{where}: {key}={_shown(value)} is out of range; allowed 1..{top}"
                                + (f" or {default!r}" if default is not None else ""))
        return int(text)

    out = {"form": choice("lasad.form", STEP_FORMS, "custom"), "dtype": choice("lasad.dtype", STEP_DTYPES, "fp32"),
           "rows": count("lasad.rows", 2 * MAX_BATCH, "dynamic"), "max_batch": count("lasad.max_batch", MAX_BATCH, None)}
    if out["rows"] is not None and out["max_batch"] is not None and out["rows"] > 2 * out["max_batch"]:
        raise ContractError(f"{where}: lasad.rows={out['rows']} is more than 2 x lasad.max_batch={out['max_batch']}")
    return out
