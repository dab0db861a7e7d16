"""NVIDIA's `tensorrt.plugin` layer over the CPU stand-in core, driven as TensorRT drives it.

- `install(layer, dest)`: dest/tensorrt/__init__.py = tensorrt_core.py beside this file, and
  dest/tensorrt/plugin = NVIDIA's unmodified package (TensorRT OSS v11.1, Apache-2.0, found under
  ../shared/third_party by `find_plugin_layer`). Put dest first on sys.path, then import.
- `import_node(trt, node)`: what onnx-tensorrt's FallbackPluginImporter does with a node whose op
  type has no built-in importer (onnxOpImporters.cpp, importerUtils.cpp): find the creator by op
  type + `plugin_version` (default "1") + `plugin_namespace` (then the node's domain); build the
  fields in the creator's field order from the node's attributes (INT -> 1-element INT32, FLOAT
  -> 1-element FLOAT32, STRING -> CHAR; attributes that are not fields are skipped); the request
  from the `aot` attribute (nonzero: STRICT_AOT, zero: STRICT_JIT); createPlugin(op type, ns,
  fields, BUILD, request).
- `build(trt, plugin, inputs, ...)`: the calls the builder makes on a quickly deployable AOT
  plugin, in the order of NvInferPythonPlugin.h: output types, aliasing (only with
  PreviewFeature.ALIASED_PLUGIN_IO_10_03 on), symbolic output shapes, format combinations, the
  choice the strongly typed network forces, configure, tactics, launch parameters, kernel.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYER = Path("third_party") / "tensorrt-oss-11.1" / "tensorrt_plugin_layer" / "plugin"
ROWS = "rows"  # the symbol of the dynamic row dimension


def _shared_candidates(repo: Path):
    yield repo / "shared"
    yield repo.parent / "shared"
    git = repo / ".git"
    if git.is_file():  # a git worktree: the shared folder sits beside the main checkout
        text = git.read_text().strip()
        if text.startswith("gitdir:"):
            common = Path(text.split(":", 1)[1].strip()).resolve().parents[1]  # <main>/.git
            yield common.parent.parent / "shared"


def find_plugin_layer(repo: Path, extra: Path | None = None) -> Path | None:
    """NVIDIA's plugin package: under `extra` (a folder holding it, or a copy), else under
    ../shared/third_party beside the checkout (the main checkout for a git worktree)."""
    candidates = []
    if extra is not None:
        candidates += [Path(extra), Path(extra) / "plugin", Path(extra) / LAYER]
    candidates += [s / LAYER for s in _shared_candidates(repo)]
    return next((c for c in candidates if (c / "_lib.py").is_file()), None)


def install(layer: Path, dest: Path) -> Path:
    pkg = Path(dest) / "tensorrt"
    pkg.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "tensorrt_core.py", pkg / "__init__.py")
    shutil.copytree(layer, pkg / "plugin", dirs_exist_ok=True)
    return Path(dest)


def _attributes(node) -> dict:
    import onnx
    return {a.name: a for a in node.attribute}, onnx


def find_creator(trt, node):
    """importPluginCreator: name, version and namespace must all match; then the node's domain."""
    attrs, onnx = _attributes(node)
    get = onnx.helper.get_attribute_value
    version = get(attrs["plugin_version"]).decode() if "plugin_version" in attrs else "1"
    namespace = get(attrs["plugin_namespace"]).decode() if "plugin_namespace" in attrs else ""
    for ns in (namespace, node.domain):
        for c in trt.get_plugin_registry().all_creators:
            if (c.name, c.plugin_version, c.plugin_namespace) == (node.op_type, version, ns):
                return c, ns
    raise LookupError(f"Plugin not found: {node.op_type}, plugin_version {version}, plugin_namespace {namespace!r}")


def plugin_fields(trt, node, creator):
    """loadFields: one field per creator field present on the node, in the creator's order."""
    import numpy as np
    attrs, onnx = _attributes(node)
    A = onnx.AttributeProto
    fields = []
    for spec in creator.field_names:
        a = attrs.get(spec.name)
        if a is None:
            continue
        if a.type == A.INT:
            fields.append(trt.PluginField(a.name, np.array([a.i], dtype=np.int32), trt.PluginFieldType.INT32))
        elif a.type == A.FLOAT:
            fields.append(trt.PluginField(a.name, np.array([a.f], dtype=np.float32), trt.PluginFieldType.FLOAT32))
        elif a.type == A.STRING:
            fields.append(trt.PluginField(a.name, a.s + b"\0", trt.PluginFieldType.CHAR))
        else:
            raise TypeError(f"attribute {a.name} of type {A.AttributeType.Name(a.type)} is not a plugin field here")
    return trt.PluginFieldCollection(fields)


def creation_request(trt, node):
    attrs, onnx = _attributes(node)
    if "aot" not in attrs:
        return trt.QuickPluginCreationRequest.UNKNOWN
    aot = onnx.helper.get_attribute_value(attrs["aot"])
    return trt.QuickPluginCreationRequest.STRICT_AOT if aot else trt.QuickPluginCreationRequest.STRICT_JIT


def import_node(trt, node):
    creator, ns = find_creator(trt, node)
    fields = plugin_fields(trt, node, creator)
    plugin = creator.create_plugin(node.op_type, ns, fields, trt.TensorRTPhase.BUILD, creation_request(trt, node))
    return plugin, creator, fields


@dataclass
class Tensor:
    """A network tensor feeding the plugin: dtype and shape, ROWS for the dynamic dimension."""
    dtype: object
    shape: tuple


@dataclass
class Built:
    output_types: list
    aliases: list
    output_shapes: list          # per output, a list of IDimensionExpr
    combinations: list           # per combination, [(type, format)] over inputs + outputs
    chosen: list
    tactic: int
    launch: dict                 # grid_x ... shared_mem -> IDimensionExpr
    extras: list                 # [(PluginArgDataType, IDimensionExpr)]
    kernel_name: str
    ptx: str
    timing_cache_id: str
    notes: list = field(default_factory=list)

    def launch_values(self, rows: int) -> dict:
        return {k: e.evaluate({ROWS: rows}) for k, e in self.launch.items()}

    def extra_values(self, rows: int) -> list:
        return [e.evaluate({ROWS: rows}) for _, e in self.extras]


def _dims(trt, shape, rows):
    return trt.Dims([rows if d == ROWS else d for d in shape])


def build(trt, plugin, inputs: list[Tensor], *, opt_rows: int, max_rows: int, aliased_io: bool = True) -> Built:
    eb = trt.IExprBuilder()
    n_in = len(inputs)
    core = plugin.get_capability_interface(None)
    n_out = core.get_num_outputs()
    out_types = list(core.get_output_data_types([t.dtype for t in inputs], [len(t.shape) for t in inputs]))
    aliases = [core.get_aliased_input(i) for i in range(n_out)] if aliased_io else [-1] * n_out
    in_exprs = []
    for t in inputs:
        e = trt.DimsExprs(len(t.shape))
        for j, d in enumerate(t.shape):
            e[j] = eb.symbol(ROWS) if d == ROWS else eb.constant(d)
        in_exprs.append(e)
    out_exprs = [list(e) for e in core.get_output_shapes(in_exprs, [], eb)]

    def dyn(shape_exprs, dtype):
        shape = [ROWS if not e.is_constant() else e.get_constant_value() for e in shape_exprs]
        d = trt.DynamicPluginTensorDesc(min=_dims(trt, shape, 1), opt=_dims(trt, shape, opt_rows),
                                        max=_dims(trt, shape, max_rows))
        d.desc.dims, d.desc.type, d.desc.format = _dims(trt, shape, -1), dtype, trt.TensorFormat.LINEAR
        return d

    in_out = [dyn(e, t.dtype) for e, t in zip(in_exprs, inputs)] + [dyn(e, dt) for e, dt in zip(out_exprs, out_types)]
    flat = core.get_supported_format_combinations(in_out, n_in)
    n = len(in_out)
    combos = [[(d.type, d.format) for d in flat[i:i + n]] for i in range(0, len(flat), n)]
    wanted = [t.dtype for t in inputs] + out_types  # a strongly typed network fixes every type
    chosen = next((c for c in combos if [ty for ty, _ in c] == wanted), None)
    if chosen is None:
        raise RuntimeError(f"no supported format combination has the network's types {wanted}: {combos}")
    for d, (ty, fmt) in zip(in_out, chosen):
        d.desc.type, d.desc.format = ty, fmt
    core.configure_plugin(in_out[:n_in], in_out[n_in:])
    tactics = core.get_valid_tactics()
    tactic = tactics[0] if tactics else 0  # no custom tactics: the default one
    core.set_tactic(tactic)
    launch, extras = trt.IKernelLaunchParams(), trt.ISymExprs()
    core.get_launch_params(in_exprs, in_out, n_in, launch, extras, eb)
    names = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")
    descs = []
    for d in in_out:
        p = trt.PluginTensorDesc()
        p.dims, p.type, p.format = _dims(trt, [ROWS if x == -1 else x for x in d.desc.dims], opt_rows), d.desc.type, d.desc.format
        descs.append(p)
    name, ptx = core.get_kernel(descs[:n_in], descs[n_in:])
    return Built(output_types=out_types, aliases=aliases, output_shapes=out_exprs, combinations=combos,
                 chosen=chosen, tactic=tactic, launch={k: getattr(launch, k).expr for k in names},
                 extras=[(extras[i].dtype, extras[i].expr) for i in range(len(extras))],
                 kernel_name=name.decode() if isinstance(name, bytes) else name,
                 ptx=ptx.decode() if isinstance(ptx, bytes) else ptx,
                 timing_cache_id=core.get_timing_cache_id())
