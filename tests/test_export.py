"""lasad-export and the onnxruntime backend: both ONNX forms against the torch backend, the
LasadStep contract against the plugin, the plugin's kernel, the CLI's errors. TensorRT tests are
marked `tensorrt` and skip where TensorRT is not installed."""

import inspect
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import HAS_TRITON, assert_close, randomize_

from lasad_engine import LasadConfig, LasadGen, LasadPipeline, save_checkpoint
from lasad_engine.engine import LasadEngine, SamplingParams
from lasad_engine.ops.lasad import lasad_fused_step_
from lasad_engine.sampling import sample
from lasad_engine.tokenizer import VQ_PRESETS, VQModel, save_tokenizer
from lasad_plugins import contract as C
from lasad_plugins.lasad_step import defs
from lasad_tools.export import main as export_main
from lasad_tools.onnx_export import export_sampler, export_step

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[export]' in lasad's folder)")


@pytest.fixture(scope="module")
def model():
    cfg = LasadConfig.from_preset("lasad-tiny", row_start="unit", vocab_size=64, grid_height=4, grid_width=5)
    return randomize_(LasadGen(cfg), seed=7).eval()


@pytest.fixture(scope="module", params=["custom", "portable"])
def exported(request, model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / f"step-{request.param}.onnx"
    export_step(model, path, portable=request.param == "portable", max_batch=2, meta={"tokenizer": "vq.pt"})
    return request.param, path


def test_graph_passes_checker_and_shape_inference(model, exported):
    form, path = exported
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in inferred.graph.output}
    cfg = model.config
    assert outs["logits"] == ["rows", cfg.vocab_size]
    assert outs["present_state.0"] == ["rows", cfg.n_head, cfg.head_k_dim, cfg.head_v_dim]
    assert [i.name for i in proto.graph.input][:3] == list(C.GRAPH_INPUTS)
    custom = [n for n in proto.graph.node if n.op_type == C.OP_TYPE]
    assert len(custom) == (cfg.n_layer if form == "custom" else 0)
    props = {p.key: p.value for p in proto.metadata_props}
    assert LasadConfig.from_json(props["lasad.config"]) == cfg and props["lasad.form"] == form
    assert json.loads(props["lasad.op"]) == {"op_type": C.OP_TYPE, "domain": C.DOMAIN, "version": C.OP_VERSION,
                                             "plugin_namespace": C.PLUGIN_NAMESPACE}
    assert props["lasad.opset"] == "17" and json.loads(props["lasad.meta"]) == {"tokenizer": "vq.pt"}
    assert any(o.domain == C.DOMAIN and o.version == C.OP_VERSION for o in proto.opset_import) == (form == "custom")
    # the weights are initializers, not Constant nodes, and all of them are there
    consts = [n for n in proto.graph.node if n.op_type == "Constant"]
    assert all(onnx.numpy_helper.to_array(n.attribute[0].t).nbytes < 1024 for n in consts)
    weights = sum(onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
    assert 0.98 * 4 * model.num_parameters() < weights <= 4 * model.num_parameters()  # the norms stay small constants


def test_node_attributes_match_the_plugin_fields(model, exported):
    form, path = exported
    if form != "custom":
        pytest.skip("the portable form has no LasadStep node")
    node = next(n for n in onnx.load(path).graph.node if n.op_type == C.OP_TYPE)
    assert node.domain == C.DOMAIN and len(node.input) == len(C.INPUTS) and len(node.output) == len(C.OUTPUTS)
    kinds = {onnx.AttributeProto.INT: "int", onnx.AttributeProto.FLOAT: "float", onnx.AttributeProto.STRING: "str"}
    attrs = {a.name: kinds[a.type] for a in node.attribute}
    expected = {name: kind for name, (kind, _) in C.ATTRIBUTES.items()}
    assert attrs == {**expected, **{k: "int" if isinstance(v, int) else "str" for k, v in C.PARSER_ATTRIBUTES.items()}}
    # the plugin's descriptor takes exactly the node's inputs, then its attributes, typed as the
    # 1-element arrays TensorRT's ONNX parser makes of INT (int32) and FLOAT (float32) attributes
    params = inspect.signature(defs.lasad_step_desc).parameters
    assert list(params)[:4] == list(C.INPUTS)
    assert {n: p.annotation for n, p in list(params.items())[4:]} == {
        n: {"int": defs.INT32, "float": defs.FLOAT32}[k] for n, k in expected.items()}
    aot_params = inspect.signature(defs.lasad_step_aot).parameters
    assert list(aot_params) == list(params) + ["outputs", "tactic"]
    assert inspect.signature(defs.lasad_step_aot).return_annotation is not inspect.Signature.empty
    values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    cfg = model.config
    assert (values["num_heads"], values["head_k_dim"], values["head_v_dim"]) == (cfg.n_head, cfg.head_k_dim, cfg.head_v_dim)
    assert values["row_start"] == C.ROW_START_CODES[cfg.row_start] and values["plugin_namespace"] == b"lasad"
    assert values["scale"] == pytest.approx(cfg.head_k_dim ** -0.5)
    assert values["aot"] == 1 and values["plugin_version"] == C.PLUGIN_VERSION.encode()


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("mode", ["none", "unit", "reset"])
@pytest.mark.parametrize("aliased", [False, True])
def test_plugin_kernel_matches_the_op(mode, aliased):
    """The kernel the TensorRT plugin compiles ahead of time, launched here with the constants
    the plugin gives it (interpreter on a CPU), against the torch op: one row-start flag per row
    (all off, all on, mixed)."""
    from lasad_engine.ops.lasad.aot import plugin_kernel_constants
    from lasad_engine.ops.lasad.step import lasad_step_plugin_kernel
    B, H, K, V = 3, 2, 24, 20
    gen = torch.Generator().manual_seed(len(mode))
    qfv = torch.randn(B, 2 * H * K + H * V, generator=gen)
    lb = torch.rand(H * K, generator=gen) * 0.9
    past = torch.randn(B, H, K, V, generator=gen)
    for start in (torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool), torch.tensor([True, False, True])):
        ref_state = past.clone()
        ref_o = lasad_fused_step_(qfv, lb, ref_state, start, mode, backend="torch")
        constants, warps = plugin_kernel_constants(K, V, mode, True, K ** -0.5)
        state_in = past.clone()
        present = state_in if aliased else torch.full_like(past, float("nan"))
        o = torch.full((B, H, V), float("nan"))
        grid = (-(-V // constants["BV"]), B * H)
        lasad_step_plugin_kernel[grid](qfv, lb, state_in, start, H, qfv.shape[1], o, present,
                                                       **constants, num_warps=warps)
        assert_close("o", o, ref_o, 1e-5)
        assert_close("present", present, ref_state, 1e-5)
        if not aliased:
            assert torch.equal(state_in, past)  # the input state is only read


def test_a_step_exported_before_per_row_positions_says_to_export_again(model, exported, tmp_path):
    """A file of the first contract (one position for every row: no lasad.contract) is refused
    in one line naming the command that makes a new one."""
    from lasad_engine.checkpoint import CheckpointError
    from lasad_engine.pipeline import LasadPipeline
    _, path = exported
    proto = onnx.load(path)
    keep = [p for p in proto.metadata_props if p.key != "lasad.contract"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    old = tmp_path / "old.onnx"
    onnx.save(proto, old)
    with pytest.raises(CheckpointError, match="exported by an older lasad .* export it again: lasad-export CKPT old.onnx"):
        LasadPipeline.from_checkpoint(old, device="cpu")


def test_onnxruntime_backend_equals_torch_backend(model, exported):
    form, path = exported
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (2, model.config.seq_len), generator=gen)
    labels = torch.tensor([2, 9])
    ref = LasadEngine(model, max_batch=2).teacher_forced_logits(tokens, labels, cfg_rows=True)
    engine = LasadEngine(model, backend="onnxruntime", max_batch=2, artifact=path)
    assert engine.backend.form == form
    assert_close(f"{form} teacher-forced", engine.teacher_forced_logits(tokens, labels, cfg_rows=True), ref, 1e-4)
    for params in (SamplingParams(temperature=0.0, cfg_scale=3.0), SamplingParams(cfg_scale=2.0, top_k=16, top_p=0.9)):
        a = LasadEngine(model, max_batch=2).generate([2, 9], params=params, generator=torch.Generator().manual_seed(4))
        b = engine.generate([2, 9], params=params, generator=torch.Generator().manual_seed(4))
        assert torch.equal(a, b)
    # one image (fewer rows than the graph was exported for) through the same bindings' buffers
    one = engine.generate([5], params=SamplingParams(temperature=0.0))
    assert torch.equal(one, LasadEngine(model, max_batch=2).generate([5], params=SamplingParams(temperature=0.0)))


def test_onnxruntime_fuses_each_norm_and_swiglu_of_the_exported_step(model, exported, tmp_path):
    """The graph the backend hands onnxruntime (the exported step, each residual add and the RMSNorm
    after it rewritten into SkipSimplifiedLayerNormalization) comes out of onnxruntime's optimizer
    with every norm one node: the 2 per layer after a residual add fused with it, the others
    SimplifiedLayerNormalization; no Pow/Sqrt of a full-width norm left, no residual add left as a
    Gemm's bias (a device copy each on CUDA), every SwiGLU gate one QuickGelu. Checked on the CPU
    provider in fp32, where the same fusions run; the file itself keeps standard ONNX."""
    from lasad_engine.backends.ort import SKIP_NORM
    from lasad_engine.model import RMSNorm
    form, path = exported
    if form == "custom":
        pytest.importorskip("onnxruntime_extensions", reason="the custom form needs onnxruntime-extensions on the CPU")
    backend = LasadEngine(model, backend="onnxruntime", max_batch=2, artifact=path).backend
    L = model.config.n_layer
    assert backend.fused_norms == 2 * L
    assert not any(n.domain == "com.microsoft" for n in onnx.load(str(path)).graph.node)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if backend.library is not None:
        so.register_custom_ops_library(backend.library)
    ort.InferenceSession(backend.model_bytes, so, providers=["CPUExecutionProvider"])
    nodes = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node
    ops = [n.op_type for n in nodes]
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    full = sum(m.groups == 1 for m in norms)
    assert full > 2 * L
    assert ops.count(SKIP_NORM) == 2 * L and ops.count("SimplifiedLayerNormalization") == full - 2 * L
    assert ops.count("Sqrt") == len(norms) - full
    assert not [n for n in nodes if n.op_type == "Gemm" and len(n.input) == 3]
    assert ops.count("QuickGelu") >= L


def test_large_exports_keep_their_weights_beside_the_graph(model, tmp_path, monkeypatch):
    """Over protobuf's 2 GB (the limit lowered here) the initializers go to step.onnx.data beside
    the graph, renamed into place with it; onnx and the onnxruntime backend load the pair from
    wherever the folder moves. A later small export to the same path drops the stale data file."""
    import shutil

    import lasad_tools.onnx_export as E
    monkeypatch.setattr(E, "EXTERNAL_DATA_THRESHOLD", 64 << 10)
    out = tmp_path / "x" / "step.onnx"
    E.export_step(model, out, max_batch=2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["step.onnx", "step.onnx.data"]
    graph = onnx.load(out, load_external_data=False)
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    large = [t for t in graph.graph.initializer if int(np.prod(t.dims)) * 4 >= 1024]  # smaller ones stay inline
    assert {t.name for t in external} == {t.name for t in large} and external
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"step.onnx.data"}
    nbytes = [int(np.prod(t.dims)) * 4 for t in external]
    assert out.stat().st_size < 64 << 10 < sum(nbytes) <= (out.parent / "step.onnx.data").stat().st_size
    moved = tmp_path / "moved"
    shutil.move(out.parent, moved)
    onnx.checker.check_model(str(moved / "step.onnx"), full_check=True)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, model.config.vocab_size, (2, model.config.seq_len), generator=gen)
    ref = LasadEngine(model, max_batch=2).teacher_forced_logits(tokens, [1, 3], cfg_rows=True)
    engine = LasadEngine(model, backend="onnxruntime", max_batch=2, artifact=moved / "step.onnx")
    assert_close("external data", engine.teacher_forced_logits(tokens, [1, 3], cfg_rows=True), ref, 1e-4)
    monkeypatch.setattr(E, "EXTERNAL_DATA_THRESHOLD", 2 << 30)
    E.export_step(model, moved / "step.onnx", max_batch=2)
    assert sorted(p.name for p in moved.iterdir()) == ["step.onnx"]


def test_sampler_graph_matches_torch(tmp_path):
    path = export_sampler(tmp_path / "s.onnx", vocab=50, max_batch=3, temperature=0.7, top_k=10, top_p=0.8)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        logits = 3 * torch.randn(6, 50, generator=gen)
        noise = torch.empty(3, 50).exponential_(generator=gen)
        for active in (True, False):
            got = sess.run(None, {"logits": logits.numpy(), "noise": noise.numpy(),
                                  "cfg_scale": np.array(2.5, np.float32), "cfg_active": np.array(active)})[0]
            ref = sample(logits, noise, cfg=True, cfg_scale=2.5, temperature=0.7, top_k=10, top_p=0.8,
                         cfg_active=torch.tensor(active))
            assert np.array_equal(got, ref.numpy())


@pytest.fixture
def ckpt(tmp_path, model):
    save_tokenizer(tmp_path / "vq.pt", VQModel(VQ_PRESETS["vq-tiny"]))
    return save_checkpoint(tmp_path / "m.pt", model, meta={"tokenizer": "vq.pt"})


def test_cli_exports_and_the_pipeline_runs_it(ckpt, tmp_path):
    r = CliRunner().invoke(export_main, [str(ckpt), str(tmp_path / "out" / "step.onnx"), "--max-batch", "2"])
    assert r.exit_code == 0, r.output
    written = json.loads(r.stdout.strip().splitlines()[-1])["written"]
    assert [p.split("/")[-1] for p in written] == ["step.onnx", "step.sampler.onnx"]
    props = {p.key: p.value for p in onnx.load(tmp_path / "out" / "step.onnx").metadata_props}
    assert json.loads(props["lasad.meta"])["tokenizer"] == "../vq.pt"  # relative to the exported file
    assert "needs --tokenizer" in r.stderr  # the tokenizer lies outside out/: named, not followed
    with LasadPipeline.from_checkpoint(tmp_path / "out" / "step.onnx", max_batch=2,
                                       tokenizer=tmp_path / "vq.pt") as pipe:
        assert pipe.backend == "onnxruntime"
        out = pipe([3, 4], temperature=0.0, output_type="np")
        assert out.images.shape == (2, 8, 10, 3)  # vq-tiny: 2 px per token, 4x5 tokens
    from lasad_engine.cli import run_main
    r = CliRunner().invoke(run_main, ["--checkpoint", str(tmp_path / "out" / "step.onnx"), "-c", "3", "-n", "1",
                                      "--tokenizer", str(tmp_path / "vq.pt"), "--no-progress", "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "x.json").read_text())["backend"] == "onnxruntime"


@pytest.mark.parametrize("args,code,message", [
    (["{ckpt}", "{tmp}/x.bin"], 2, "must end in .onnx or .plan"),
    (["{tmp}/missing.pt", "{tmp}/x.onnx"], 1, "no such checkpoint file"),
    (["{tmp}/bad.pt", "{tmp}/x.onnx"], 1, "not a readable checkpoint"),
    (["{ckpt}", "{tmp}/exists.onnx"], 1, "exists; pass --force to replace it"),
])
def test_cli_errors(ckpt, tmp_path, args, code, message):
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage" * 64)
    (tmp_path / "exists.onnx").write_bytes(b"keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = CliRunner().invoke(export_main, [a.format(ckpt=ckpt, tmp=tmp_path) for a in args])
    assert r.exit_code == code, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing lost
    assert (tmp_path / "exists.onnx").read_bytes() == b"keep me"


def test_plan_without_tensorrt_says_what_to_install(ckpt, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    r = CliRunner().invoke(export_main, [str(ckpt), str(tmp_path / "engine.plan")])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "pip install -e '.[tensorrt]' in lasad's folder" in r.stderr and not (tmp_path / "engine.plan").exists()


def test_plan_fingerprint_mismatch_names_the_difference(tmp_path):
    from lasad_plugins.lasad_step.plan import PlanMismatch, check_fingerprint
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"plan")
    recorded = {"tensorrt": "10.9.0", "cuda": "13.0", "gpu": "NVIDIA H200", "compute_capability": "9.0",
                "opset": 17, "plugin": "lasad::LasadStep/1", "lasad_format": 1, "kernel_ptx_isa": "9.0"}
    (tmp_path / "engine.json").write_text(json.dumps(recorded))
    here = {**recorded, "driver_ptx_isa": "9.0"}
    assert check_fingerprint(plan, here, "lasad-export ckpt.pt engine.plan") == recorded
    with pytest.raises(PlanMismatch, match="built for gpu 'NVIDIA H200', this machine has 'NVIDIA L4'; rebuild with lasad-export") as e:
        check_fingerprint(plan, {**here, "gpu": "NVIDIA L4"}, "lasad-export ckpt.pt engine.plan")
    assert e.value.exit_code == 3  # what the command-line tools exit with
    with pytest.raises(PlanMismatch, match="PTX ISA 9.0 kernel; this machine's CUDA driver accepts 8.8 at most"):
        check_fingerprint(plan, {**here, "driver_ptx_isa": "8.8"}, "lasad-export ckpt.pt engine.plan")
    assert check_fingerprint(plan, {**here, "driver_ptx_isa": "9.1"}, "x") == recorded  # newer drivers take it


@pytest.mark.tensorrt
def test_tensorrt_plan_equals_torch(ckpt, tmp_path, model):
    """Build engine.plan with the plugin and run it through the tensorrt backend (GPU + TensorRT)."""
    r = CliRunner().invoke(export_main, [str(ckpt), str(tmp_path / "engine.plan"), "--max-batch", "2"])
    assert r.exit_code == 0, r.output
    gpu_model = model.cuda()
    tokens = torch.randint(0, model.config.vocab_size, (2, model.config.seq_len)).cuda()
    ref = LasadEngine(gpu_model, backend="torch", max_batch=2).teacher_forced_logits(tokens, [1, 2], cfg_rows=True)
    trt_engine = LasadEngine(gpu_model, backend="tensorrt", max_batch=2, artifact=tmp_path / "engine.plan")
    assert_close("tensorrt", trt_engine.teacher_forced_logits(tokens, [1, 2], cfg_rows=True), ref, 1e-4)


def test_lasad_check_passes_a_good_export_and_fails_a_bad_one(ckpt, tmp_path, model):
    from lasad_tools.check import main as check_main
    step = export_step(model, tmp_path / "step.onnx", max_batch=2)
    r = CliRunner().invoke(check_main, [str(step), str(ckpt), "--images", "2"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["pass"] and summary["rel_err"] < 1e-5 and summary["steps"] == model.config.seq_len
    # an export of different weights must be caught
    other = randomize_(LasadGen(model.config), seed=99).eval()
    bad = export_step(other, tmp_path / "bad.onnx", portable=True, max_batch=2)
    r = CliRunner().invoke(check_main, [str(bad), str(ckpt), "--images", "2"])
    assert r.exit_code == 1 and "relative error" in r.stderr and len(r.stderr.strip().splitlines()) == 1
