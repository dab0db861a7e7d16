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
