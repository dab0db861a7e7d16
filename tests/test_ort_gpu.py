"""The onnxruntime backend's GPU path, checked where it can be without a GPU: export options
(dtype, fixed rows), the two alternating state buffers (on the CPU provider), the CUDA bindings
and run options (against a recording stand-in for onnxruntime's session), the provider checks,
the custom-op library's build and registration, the PTX attributes, and the wheel packer. The
runs on the H200 are `gpu` tests at the end and benchmarks/ort_gpu_bench.py."""

import copy
import json
import os
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_close, randomize_, rel_err

from lasad_engine import LasadConfig, LasadGen, quant
from lasad_engine.backends import ort as ort_backend
from lasad_engine.engine import LasadEngine, SamplingParams
from lasad_engine.params import EngineError
from lasad_plugins import contract as C
from lasad_tools.check import TOLERANCES
from lasad_tools.onnx_export import export_step

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[export]' in lasad's folder)")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "device"))  # pack_ort_gpu.py: the GPU machine's harness


@pytest.fixture(scope="module")
def model():
    cfg = LasadConfig.from_preset("lasad-tiny", row_start="unit", vocab_size=64, grid_height=3, grid_width=5)
    return randomize_(LasadGen(cfg), seed=3).eval()


def _forced(model, n=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, model.config.vocab_size, (n, model.config.seq_len), generator=gen),
            torch.randint(0, model.config.num_classes, (n,), generator=gen))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dtype_export_keeps_state_and_logits_fp32(model, tmp_path, dtype):
    path = export_step(model, tmp_path / "step.onnx", dtype=dtype, max_batch=2)
    proto = onnx.load(path)
    types_ = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]}
    F = onnx.TensorProto
    assert types_["logits"] == F.FLOAT and types_["ids"] == F.INT64
    assert all(types_[C.PAST_STATE.format(i)] == F.FLOAT and types_[C.PRESENT_STATE.format(i)] == F.FLOAT
               for i in range(model.config.n_layer))
    want = {"fp16": F.FLOAT16, "bf16": F.BFLOAT16}[dtype]
    big = [t for t in proto.graph.initializer if len(t.dims) == 2 and t.name.endswith(".weight")]  # weight matrices
    assert big and all(t.data_type == want for t in big)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["lasad.dtype"] == dtype and meta["lasad.rows"] == "dynamic"
    # the custom node's readout is in the activation dtype (its value info says so)
    custom = onnx.load(export_step(model, tmp_path / "custom.onnx", dtype=dtype, max_batch=2))
    o_names = {n.output[0] for n in custom.graph.node if n.op_type == C.OP_TYPE}
    assert {v.type.tensor_type.elem_type for v in custom.graph.value_info
            if v.name in o_names} == {want}
    onnx.checker.check_model(custom)


def test_fp16_export_on_the_cpu_provider_within_the_stated_bound(model, tmp_path):
    tokens, labels = _forced(model)
    ref = LasadEngine(model, max_batch=2).teacher_forced_logits(tokens, labels, cfg_rows=True)
    path = export_step(model, tmp_path / "step.onnx", portable=True, dtype="fp16", max_batch=2)
    got = LasadEngine(model, backend="onnxruntime", max_batch=2, artifact=path).teacher_forced_logits(
        tokens, labels, cfg_rows=True)
    err = rel_err(got, ref)
    assert err <= TOLERANCES["fp16"]
    assert err > 1e-5  # it really ran in fp16 (an fp32 graph would agree to ~1e-7)


def test_bf16_and_custom_fp16_on_the_cpu_say_so_in_one_line(model, tmp_path):
    bf16 = export_step(model, tmp_path / "bf16.onnx", portable=True, dtype="bf16", max_batch=2)
    engine = LasadEngine(model, backend="onnxruntime", max_batch=2, artifact=bf16)
    with pytest.raises(EngineError, match="could not load") as e:  # no bf16 kernels on onnxruntime's CPU provider
        engine.generate([1], params=SamplingParams(temperature=0.0))
    assert "\n" not in str(e.value)
    custom = export_step(model, tmp_path / "custom16.onnx", dtype="fp16", max_batch=2)
    with pytest.raises(EngineError, match="fp32 only"):
        LasadEngine(model, backend="onnxruntime", max_batch=2, artifact=custom)


def test_fixed_rows_export_runs_its_rows_and_refuses_others(model, tmp_path):
    path = export_step(model, tmp_path / "rows4.onnx", portable=True, rows=4, max_batch=2)
    proto = onnx.load(path)
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [4] and {p.key: p.value for p in proto.metadata_props}["lasad.rows"] == "4"
    tokens, labels = _forced(model)
    ref = LasadEngine(model, max_batch=2).teacher_forced_logits(tokens, labels, cfg_rows=True)
    engine = LasadEngine(model, backend="onnxruntime", max_batch=2, artifact=path)
    assert_close("fixed rows", engine.teacher_forced_logits(tokens, labels, cfg_rows=True), ref, 1e-4)
    # one image (2 rows): every step still runs the export's 4 rows, the others padding
    params = SamplingParams(temperature=0.0)
    assert torch.equal(engine.generate([1], params=params), LasadEngine(model, max_batch=2).generate([1], params=params))
    with pytest.raises(EngineError, match="exported for 4 rows"):
        LasadEngine(model, backend="onnxruntime", max_batch=3, artifact=path)  # 6 rows of slots


class _Residual(torch.nn.Module):
    """h = x + y (or x + a bias), RMSNorm(h) as the model traces it, and h going on."""

    def __init__(self, n: int, bias: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.rand(n, generator=g) + 0.5)
        self.bias = torch.nn.Parameter(torch.randn(n, generator=g)) if bias else None

    def forward(self, x, y):
        from lasad_engine.ops.norms import rms_norm
        h = x + (self.bias if self.bias is not None else y)
        return rms_norm(h, self.weight, 1e-5, backend="torch"), h * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_residual_norm_fusion_on_a_small_graph(tmp_path, dtype, bias):
    """A residual add and the RMSNorm after it become one SkipSimplifiedLayerNormalization whose
    fourth output carries the sum on, with the same outputs on onnxruntime's CPU provider as the
    unfused graph; a bias add (a constant input) and bf16 activations (no such kernel on every
    provider) are left alone."""
    n = 96
    path = tmp_path / "residual.onnx"
    x, y = torch.randn(3, n, dtype=dtype), torch.randn(3, n, dtype=dtype)
    with torch.no_grad():
        torch.onnx.export(_Residual(n, bias).to(dtype), (x, y), str(path), dynamo=False, opset_version=17,
                          input_names=["x", "y"], output_names=["normed", "carried"])
    proto = onnx.load(str(path))
    fused = ort_backend.fuse_residual_norms(proto)
    assert fused == (0 if bias or dtype == torch.bfloat16 else 1)
    if not fused:
        assert proto == onnx.load(str(path))
        return
    onnx.checker.check_model(proto)
    skip = [nd for nd in proto.graph.node if nd.op_type == ort_backend.SKIP_NORM]
    assert len(skip) == 1 and skip[0].output[3] and not [nd for nd in proto.graph.node if nd.op_type == "Add"]
    feed = {"x": x.numpy(), "y": y.numpy()}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    want = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feed)
    got = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)
    h = (x + y).double()  # the sum rounded to the activation dtype, as the model has it
    ref = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * _Residual(n, False).weight.detach().double()
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    for a, b in zip(got, want):
        assert np.abs(a.astype(np.float64) - b.astype(np.float64)).max() <= tol * np.abs(b).max()
    assert np.abs(got[0].astype(np.float64) - ref.numpy()).max() <= 4 * tol * ref.abs().max().item()


def test_two_state_buffers_alternate_and_current_says_where(model, tmp_path):
    """Every step's state, read where the backend says it is, equals the torch backend's; the
    buffer alternates every step, and the next request starts at zero wherever the last one ended."""
    path = export_step(model, tmp_path / "step.onnx", portable=True, max_batch=2)
    tokens, labels = _forced(model)
    T = 7  # odd: the first request ends in the other buffer

    def run(engine, states, places, ptr):
        def keep(req, images):
            cur = engine.scheduler.backend.current(engine.scheduler.state).ssm
            states.append(torch.cat([cur[:, list(img.rows)] for img in sorted(images, key=lambda i: i.index)], 1).clone())
            places.append(cur.data_ptr() == ptr)
        engine.wait(engine.submit(labels, grid=_grid(T), params=_forced_params(), forced=tokens[:, :T], on_step=keep))

    ref = LasadEngine(model, max_batch=2)
    ref_states = []
    run(ref, ref_states, [], 0)
    engine = LasadEngine(model, backend="onnxruntime", max_batch=2, artifact=path)
    state_ptr = engine.buffers.state.ssm.data_ptr()
    for _ in range(2):  # the second request starts over although the first ended in buffer B
        got_states, places = [], []
        run(engine, got_states, places, state_ptr)
        for p in range(T):
            assert_close(f"state after step {p}", got_states[p], ref_states[p], 1e-5)
        assert all(a != b for a, b in zip(places, places[1:]))  # one buffer, then the other
    assert engine.buffers.state.ssm.data_ptr() == state_ptr


def _grid(T):
    from lasad_engine.params import Grid
    return Grid(1, T)


def _forced_params():
    return SamplingParams(cfg_scale=1.0, temperature=0.0, top_k=0)


class _Recorder:
    """Stands in for onnxruntime's IOBinding and session: records what is bound and run."""

    def __init__(self):
        self.inputs, self.outputs = {}, {}

    def bind_input(self, name, kind, index, dtype, shape, ptr):
        self.inputs[name] = (kind, index, np.dtype(dtype), tuple(shape), ptr)

    def bind_output(self, name, kind, index, dtype, shape, ptr):
        self.outputs[name] = (kind, index, np.dtype(dtype), tuple(shape), ptr)


class _RunOptions:
    def __init__(self):
        self.entries = {}

    def add_run_config_entry(self, k, v):
        self.entries[k] = v


def test_cuda_bindings_alternate_buffers_and_graph_ids(model):
    """The CUDA path's bindings (built against a recording session; no GPU needed): every tensor
    bound by address on 'cuda', state past/present swapped between the two directions, graph ids
    1 and 2, no synchronisation at the end of a run."""
    be = object.__new__(ort_backend.OnnxRuntimeBackend)
    be.model, be.device, be.cuda_graph = model, torch.device("cuda", 0), True
    be.ort = types.SimpleNamespace(RunOptions=_RunOptions)
    be.sessions = {6: types.SimpleNamespace(io_binding=_Recorder)}
    be.bindings, be.other, be.parity, be.fixed_rows = {}, None, 0, None
    from lasad_engine.scheduler import _Rows
    state = model.allocate_state(8, "cpu")
    rows = _Rows(torch.zeros(8, dtype=torch.int64)[:6], torch.zeros(8, dtype=torch.int64)[:6],
                 torch.ones(8, dtype=torch.int64)[:6], None, state.logits[:6])
    session, pair = be._binding(rows, state)
    (b1, o1), (b2, o2) = pair
    L, H, K, V = model.config.n_layer, model.config.n_head, model.config.head_k_dim, model.config.head_v_dim
    assert be.other.shape == (L, 8, H, K, V)  # sized like the engine's whole pool, once
    for b in (b1, b2):
        assert b.inputs["ids"] == ("cuda", 0, np.dtype(np.int64), (6,), rows.ids.data_ptr())
        assert b.inputs["pos"] == ("cuda", 0, np.dtype(np.int64), (6,), rows.pos.data_ptr())  # one per row
        assert b.inputs["width"][3:] == ((6,), rows.width.data_ptr())
        assert b.outputs["logits"] == ("cuda", 0, np.dtype(np.float32), (6, model.config.vocab_size),
                                       state.logits.data_ptr())
    for i in range(L):
        a, b = state.ssm[i].data_ptr(), be.other[i].data_ptr()
        assert b1.inputs[C.PAST_STATE.format(i)][3:] == ((6, H, K, V), a)
        assert b1.outputs[C.PRESENT_STATE.format(i)][3:] == ((6, H, K, V), b)
        assert b2.inputs[C.PAST_STATE.format(i)][4] == b and b2.outputs[C.PRESENT_STATE.format(i)][4] == a
    assert o1.entries == {"disable_synchronize_execution_providers": "1", "gpu_graph_id": "1"}
    assert o2.entries["gpu_graph_id"] == "2"
    be.parity = 1
    assert be.current(state).ssm.data_ptr() == be.other.data_ptr()
    be.cuda_graph = False
    assert be._run_options(1).entries["gpu_graph_id"] == "-1"


def test_cuda_provider_missing_is_one_line():
    fake = types.SimpleNamespace(get_available_providers=lambda: ["CPUExecutionProvider"], __version__="1.32.0")
    with pytest.raises(EngineError, match="needs onnxruntime-gpu") as e:
        ort_backend.check_cuda_provider(fake)
    assert "\n" not in str(e.value) and "pip install onnxruntime-gpu" in str(e.value)


def test_both_packages_in_one_folder_is_one_line(monkeypatch):
    dist = lambda v: types.SimpleNamespace(version=v, locate_file=lambda p: Path("/site"))  # noqa: E731
    monkeypatch.setattr(ort_backend, "_installed", lambda name: dist("1.32.0" if name == "onnxruntime" else "1.31.1"))
    fake = types.SimpleNamespace(get_available_providers=lambda: ["CUDAExecutionProvider"], __version__="1.31.1")
    with pytest.raises(EngineError, match="both onnxruntime 1.32.0 and onnxruntime-gpu 1.31.1"):
        ort_backend.check_cuda_provider(fake)


def test_custom_node_on_cuda_without_library_names_the_build_command(monkeypatch, tmp_path):
    from lasad_plugins import ort as op
    monkeypatch.setenv(op.LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(EngineError, match="python -m lasad_tools.ort_op build"):
        op.find_library()


def _run_build(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lasad_tools.ort_op", "build", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def test_build_without_a_compiler_says_so(tmp_path):
    r = _run_build("--out", str(tmp_path), env={"PATH": str(tmp_path), "CXX": ""})
    assert r.returncode == 1 and "no C++ compiler found" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_build_without_headers_says_which(tmp_path):
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("needs a C++ compiler on PATH to get past the compiler check")
    (tmp_path / "inc").mkdir()
    r = _run_build("--out", str(tmp_path), "--ort-include", str(tmp_path / "inc"))
    assert r.returncode == 1 and "no onnxruntime_c_api.h" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _headers():
    for p in (os.environ.get("ORT_INCLUDE"), ROOT / ".carry" / "ort-include"):
        if p and Path(p, "onnxruntime_c_api.h").is_file():
            return Path(p)
    return None


@pytest.mark.skipif(_headers() is None or shutil.which("g++") is None,
                    reason="needs g++ and onnxruntime's C API headers ($ORT_INCLUDE or .carry/ort-include; "
                           "the wheels ship none and this machine cannot download them)")
def test_library_builds_and_registers_the_node(model, tmp_path):
    r = _run_build("--out", str(tmp_path), "--ort-include", str(_headers()))
    assert r.returncode == 0, r.stderr
    lib = json.loads(r.stdout.strip().splitlines()[-1])["library"]
    step = export_step(model, tmp_path / "custom.onnx", max_batch=2)
    plain = ort.SessionOptions()
    with pytest.raises(Exception, match="not a registered function/op"):
        ort.InferenceSession(str(step), plain, providers=["CPUExecutionProvider"])
    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    # the schema is now known; its kernel exists for the CUDA provider only
    with pytest.raises(Exception, match="Could not find an implementation for LasadStep"):
        ort.InferenceSession(str(step), so, providers=["CPUExecutionProvider"])


def test_attach_kernels_compiles_the_plugin_kernel_per_distinct_node(model, tmp_path):
    """In a fresh process without Triton's interpreter (which conftest sets): PTX for sm_90."""
    step = export_step(model, tmp_path / "custom.onnx", dtype="fp16", max_batch=2)
    code = f"""
import json, onnx
from lasad_plugins.ort import attach_kernels, KERNEL_ATTRIBUTES
from lasad_engine.ops.lasad.aot import CudaTarget
from onnx import helper
p = onnx.load({str(step)!r})
n = attach_kernels(p, CudaTarget(90, (13, 0)))
nodes = [{{a.name: helper.get_attribute_value(a) for a in x.attribute}} for x in p.graph.node if x.op_type == "LasadStep"]
print(json.dumps(dict(n=n, keys=[sorted(k for k in d if k in KERNEL_ATTRIBUTES) for d in nodes],
    has_lb=[d["has_lower_bound"] for d in nodes], entry=[d["kernel_name"].decode() for d in nodes],
    in_ptx=[d["kernel_name"] in d["kernel_ptx"] for d in nodes], fp16=[b".f16" in d["kernel_ptx"] or b".b16" in d["kernel_ptx"] for d in nodes],
    params=[d["kernel_params"] for d in nodes], grid=[d["kernel_grid_x"] for d in nodes], block=[d["kernel_block"] for d in nodes])))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0 and "triton" in r.stderr.lower() and "No module" in r.stderr:
        pytest.skip("needs triton")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    cfg = model.config
    assert out["n"] == len(set(out["has_lb"]))  # one kernel per distinct node configuration
    assert all(k == sorted(("kernel_ptx", "kernel_name", "kernel_grid_x", "kernel_block", "kernel_shared",
                            "kernel_params")) for k in out["keys"])
    assert all(out["in_ptx"]) and all(out["fp16"]) and all(p == 8 for p in out["params"])  # TensorRT's ABI
    from lasad_engine.ops.lasad.aot import plugin_kernel_constants
    constants, warps = plugin_kernel_constants(cfg.head_k_dim, cfg.head_v_dim, "unit", True, cfg.head_k_dim ** -0.5)
    assert set(out["grid"]) == {-(-cfg.head_v_dim // constants["BV"])} and set(out["block"]) == {32 * warps}


def _elf_with_section(name: bytes, payload: bytes) -> bytes:
    """A minimal 64-bit little-endian ELF file with one named section besides .shstrtab."""
    shstr = b"\0" + name + b"\0.shstrtab\0"
    data_off = 64
    shstr_off = data_off + len(payload)
    sh_off = (shstr_off + len(shstr) + 7) // 8 * 8
    header = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, sh_off, 0, 64, 0, 0,
                                                              64, 3, 2)
    body = payload + shstr + bytes(sh_off - shstr_off - len(shstr))
    null = bytes(64)
    sec = struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, data_off, len(payload), 0, 0, 8, 0)
    strsec = struct.pack("<IIQQQQIIQQ", 1 + len(name) + 1, 3, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0)
    return header + body + null + sec + strsec


def _fatbin(entries) -> bytes:
    """One fatbin container of (arch, payload, zstd_decompressed_size or 0) entries (64-byte headers)."""
    body = b""
    for arch, payload, dsize in entries:
        size = (len(payload) + 7) // 8 * 8
        head = struct.pack("<HHIQIIHHIIIQQQ", 2, 257, 64, size, len(payload) if dsize else 0, 0, 8, 1, arch, 0, 0,
                           0x8011, 0, dsize)
        body += head + payload + bytes(size - len(payload))
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def test_pack_prunes_other_architectures_on_a_synthetic_fatbin():
    import pack_ort_gpu as P
    rng = np.random.default_rng(0)
    cubin = lambda n: rng.integers(0, 256, n, dtype=np.uint8).tobytes()  # noqa: E731
    zstd = shutil.which("zstd")
    compressed = (subprocess.run([zstd, "-c"], input=bytes(5000) + cubin(300), capture_output=True).stdout
                  if zstd else None)
    first = [(75, cubin(120), 0), (90, cubin(200), 0), (120, cubin(96), 0)]
    second = [(80, cubin(64), 0), (90, cubin(40), 0)] + ([(86, compressed, 5300)] if compressed else [])
    fat = _fatbin(first) + bytes(8) + _fatbin(second)
    elf = _elf_with_section(b".nv_fatbin", fat)
    new, kept, pruned = P.prune(elf, 90)
    P.verify(elf, new, kept, pruned)
    assert len(new) == len(elf)
    assert sorted(e.arch for e in kept) == [90, 90]
    assert sorted(e.arch for e in pruned) == sorted([75, 120, 80] + ([86] if compressed else []))
    for e in kept:
        assert new[e.start:e.start + e.size] == elf[e.start:e.start + e.size]
    for e in pruned:
        if e.compressed:
            out = subprocess.run([zstd, "-d", "-c"], input=bytes(new[e.start:e.start + e.compressed]),
                                 capture_output=True, check=True).stdout
            assert out == bytes(5300)
        else:
            assert not any(new[e.start:e.start + e.size])
    # any other change is caught
    bad = bytearray(new)
    bad[kept[0].start] ^= 1
    with pytest.raises(AssertionError):
        P.verify(elf, bad, kept, pruned)


def test_bench_decode_split_steps_the_schedulers_own_rows(model, monkeypatch):
    """benchmarks/ort_gpu_bench.py's `decode_split` times the backend's step on the scheduler's
    row buffers (it broke unseen when they moved): after a generation, one call writes the
    logits that model.step gives on the same ids, positions, widths and a copy of the state."""
    import dataclasses

    import ort_gpu_bench as bench
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)   # timed on the CPU here
    engine = LasadEngine(model, backend="torch", max_batch=2)
    engine.generate([1, 2], params=SamplingParams(temperature=0.0, cfg_scale=1.0))
    tab, state = engine.buffers.tables, engine.buffers.state
    R = 2   # one row an image at cfg 1.0
    ids, pos, width, slots = (t[:R].clone() for t in (tab.ids, tab.pos, tab.width, tab.slot))
    copy_state = dataclasses.replace(state, ssm=state.ssm.clone(), logits=state.logits.clone())
    times = bench.decode_split(engine, 1, torch.device("cpu"), calls=1)
    assert times["decode_ms"] >= times["decode_issue_ms"] > 0
    want = torch.empty(R, model.config.vocab_size)
    for _ in range(2):   # decode_split steps twice (a warm-up, then `calls`) on the same ids and positions
        model.step(ids, pos, copy_state, backend="torch", width=width, slots=slots, logits=want)
    assert_close("decode_split's logits vs model.step", tab.logits[:R], want, 1e-6)
    assert_close("its state vs model.step's", state.ssm, copy_state.ssm, 1e-6)


@pytest.mark.gpu
def test_onnxruntime_on_cuda_equals_torch(model, tmp_path):
    """Teacher-forced logits and same-seed tokens through onnxruntime-gpu (portable, fp32, CUDA
    graphs) equal the torch backend's on the GPU."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with its CUDA provider")
    dev = torch.device("cuda")
    m = model.to(dev)
    path = export_step(m, tmp_path / "step.onnx", portable=True, max_batch=2)
    tokens, labels = (t.to(dev) for t in _forced(m))
    ref = LasadEngine(m, backend="torch", device=dev, max_batch=2).teacher_forced_logits(tokens, labels, cfg_rows=True)
    engine = LasadEngine(m, backend="onnxruntime", device=dev, max_batch=2, artifact=path)
    assert_close("onnxruntime cuda", engine.teacher_forced_logits(tokens, labels, cfg_rows=True), ref, 1e-4)
    params = SamplingParams(cfg_scale=2.0, top_k=16)
    a = LasadEngine(m, backend="torch", device=dev, max_batch=2).generate([2, 9], params=params,
                                                                          generator=torch.Generator(dev).manual_seed(4))
    b = engine.generate([2, 9], params=params, generator=torch.Generator(dev).manual_seed(4))
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,opset", [("int8", 17), ("fp8", 19)])
def test_quantised_export_on_cuda_equals_the_torch_step_on_the_same_weights(model, tmp_path, fmt, opset):
    """`lasad-export --weights int8 / fp8` (DequantizeLinear on the layer weights, portable form)
    through onnxruntime-gpu's CUDA provider, with its CUDA graphs: teacher-forced logits equal the
    torch backend's on the same quantised weights (lasad_engine.quant, what the cuda kernels
    compute), fp32 rounding apart (the graph multiplies by W_q · s, the torch step by W_q, then s);
    and sampling through it draws valid tokens."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with its CUDA provider")
    dev = torch.device("cuda")
    m = copy.deepcopy(model).cpu()  # exported on the CPU, as lasad-export does
    path = export_step(m, tmp_path / "step.onnx", portable=True, max_batch=2, weights=fmt, opset=opset)
    qmodel = quant.quantize_(copy.deepcopy(m), fmt).to(dev)
    m = m.to(dev)
    tokens, labels = (t.to(dev) for t in _forced(m))
    ref = LasadEngine(qmodel, backend="torch", device=dev, max_batch=2).teacher_forced_logits(tokens, labels,
                                                                                              cfg_rows=True)
    engine = LasadEngine(m, backend="onnxruntime", device=dev, max_batch=2, artifact=path)
    got = engine.teacher_forced_logits(tokens, labels, cfg_rows=True)
    plain = LasadEngine(m, backend="torch", device=dev, max_batch=2).teacher_forced_logits(tokens, labels,
                                                                                           cfg_rows=True)
    assert_close(f"onnxruntime cuda {fmt} vs torch {fmt}", got, ref, 1e-4)
    assert rel_err(got, plain) > 10 * rel_err(got, ref)  # the export is quantised, not the float step
    out = engine.generate([2, 9], params=SamplingParams(cfg_scale=2.0, top_k=16),
                          generator=torch.Generator(dev).manual_seed(4))
    assert out.shape[0] == 2 and int(out.min()) >= 0 and int(out.max()) < m.config.vocab_size
