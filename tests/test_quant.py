"""Weight-only int8 / fp8 decode weights (lasad_engine/quant.py, ops/linear.py `quantized_gemm`):
the quantisation against float64 arithmetic, the Triton kernel (interpreted here) against the
torch definition, the model's step against its parallel forward, checkpoints, the pipeline, the
CLIs and the ONNX QDQ export on onnxruntime's CPU provider. GPU tests are marked `gpu`."""

import copy
import json
import os

import pytest
import torch
from click.testing import CliRunner
from conftest import HAS_CUDA, HAS_TRITON, assert_close, randomize_, rel_err

from lasad_engine import LasadConfig, LasadGen, save_checkpoint
from lasad_engine import quant
from lasad_engine.checkpoint import CheckpointError, load_checkpoint, stored_weights
from lasad_engine.engine import LasadEngine
from lasad_engine.ops import linear as L
from lasad_engine.ops.linear import LinearTiles, fused_linear, quantized_gemm
from lasad_engine.params import EngineError

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
FORMATS = ["int8", "fp8"]
# Triton's CPU interpreter truncates fp32 -> bf16 where the GPU rounds (tests/test_linear.py): one
# truncation more than float weights have (the scale's rounding), so a little more than their 3e-2
TOL_INTERPRETED = {torch.float32: 1e-6, torch.bfloat16: 4e-2}
# Teacher-forced logits, quantised weights vs the same model's float weights (fp32 activations):
# the bound per preset (measured values in benchmarks/results/*int8*.json and the README).
# Measured on this CPU (2026-12-06): int8 tiny 0.030, B 0.026, the bundled model 0.0089; fp8 0.095,
# 0.092, 0.031.
LOGIT_BOUND = {"int8": {"lasad-tiny": 0.05, "lasad-B": 0.04, "default": 0.015},
               "fp8": {"lasad-tiny": 0.15, "lasad-B": 0.15, "default": 0.05}}


def test_quantize_weight_matches_float64_arithmetic():
    """s = amax/Q per row, W_q = round(W / s) (int8: half to even; e4m3: nearest), computed
    independently in float64; the dequantised matrix is within half a step of W."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(37, 53, generator=gen) * torch.rand(37, 1, generator=gen) * 3
    w[5] = 0  # a row of zeros: scale 1, codes 0
    w[7, 3] = -w[7].abs().max() * 2  # the channel's extreme is negative
    for fmt, qmax in (("int8", 127), ("fp8", 448)):
        q, s = quant.quantize_weight(w, fmt)
        assert q.dtype == quant.FORMATS[fmt] and s.dtype == torch.float32 and s.shape == (37,)
        w64 = w.double()
        s64 = w64.abs().amax(1) / qmax
        s64[5] = 1
        assert_close(f"{fmt} scale", s, s64, 1e-7)
        ratio = w64 / s.double()[:, None]
        deq = quant.dequantize_weight(q, s).double()
        if fmt == "int8":
            ref = ratio.round().clamp(-127, 127)
            near_tie = ((ratio - ratio.floor()) - 0.5).abs() < 1e-4  # fp32 vs fp64 division at .5
            assert torch.equal(q.double()[~near_tie], ref[~near_tie])
            assert ((deq - w64).abs() <= s.double()[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
        else:  # e4m3: 3 mantissa bits, so within 2^-4 relative (or the subnormal step 2^-9 · s)
            step = torch.maximum(w64.abs() * 2.0 ** -4, s.double()[:, None] * 2.0 ** -9)
            assert ((deq - w64).abs() <= step * (1 + 1e-6)).all()
        assert q.abs().float().max() <= qmax and q[7, 3].float() == -qmax
        assert (q[5].float() == 0).all() and s[5] == 1


def _naive_quantized(x, q, s, norm_weight=None, groups=1, residual=None, swiglu=False):
    """float64 from the formulas: rms norm, a · (W_q · s)^T, silu(a)·b, + residual."""
    from test_linear import naive_linear
    return naive_linear(x, q.double() * s.double()[:, None], norm_weight, 1e-5, groups, residual, swiglu)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_definition_rounds_as_documented(fmt, dtype):
    """quantized_gemm = round_act(round_act(a · W_q^T) · s), against float64 arithmetic; in
    bf16 each element within one bf16 step of the two roundings written out in float64 (the
    GEMM's own fp32 sum may round once more)."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(5, 70, generator=gen).to(dtype)
    q, s = quant.quantize_weight(torch.randn(33, 70, generator=gen) / 8, fmt)
    y = quantized_gemm(a, q, s)
    assert y.dtype == dtype
    assert_close("vs float64", y, a.double() @ (q.double() * s.double()[:, None]).T,
                 1e-6 if dtype == torch.float32 else 1e-2)
    if dtype == torch.bfloat16:
        two = ((a.double() @ q.double().T).to(dtype).double() * s.double()).to(dtype).double()
        assert ((y.double() - two).abs() <= two.abs() * 2.0 ** -8 * (1 + 1e-9)).all()


def _case(R, N, K, dtype, fmt, norm, groups, residual, swiglu, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(R, K, generator=gen).to(dtype)
    q, s = quant.quantize_weight(torch.randn(N, K, generator=gen) / K ** 0.5, fmt)
    kw = dict(weight_scale=s, norm_weight=(1 + 0.2 * torch.randn(K, generator=gen)).to(dtype) if norm else None,
              norm_groups=groups, swiglu=swiglu,
              residual=torch.randn(R, N // 2 if swiglu else N, generator=gen).to(dtype) if residual else None)
    return x, q, kw


def _check_kernel(x, q, kw, tiles=None, tol=None):
    dtype = x.dtype
    ref64 = _naive_quantized(x, q, kw["weight_scale"], kw["norm_weight"], kw["norm_groups"], kw["residual"],
                             kw["swiglu"])
    ref = fused_linear(x, q, backend="torch", **kw)
    assert_close("torch definition vs float64", ref, ref64, 1e-6 if dtype == torch.float32 else 2e-2)
    out = torch.full(ref.shape, float("nan"), dtype=dtype, device=x.device)
    got = fused_linear(x, q, backend="triton", out=out, tiles=tiles, **kw)
    assert got.data_ptr() == out.data_ptr() and torch.isfinite(got).all(), "outputs left unwritten"
    assert_close("triton vs torch definition", got, ref, tol or TOL_INTERPRETED[dtype])
    return got


VARIANTS = [(False, 1, False, False), (True, 1, False, False), (True, 4, True, False), (True, 1, False, True),
            (False, 1, True, True)]


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("norm,groups,residual,swiglu", VARIANTS, ids=str)
@pytest.mark.parametrize("R", [1, 3, 16, 45])  # FMA rows, tensor-core rows, two row blocks
def test_kernel_equals_the_torch_definition(fmt, norm, groups, residual, swiglu, R):
    x, q, kw = _case(R, 2 * 47, 4 * 21, torch.float32, fmt, norm, groups, residual, swiglu, seed=R)  # N=94, K=84
    _check_kernel(x, q, kw)


@needs_triton
@pytest.mark.parametrize("R", [2, 37])
def test_kernel_bf16_activations(R):
    for i, (norm, groups, residual, swiglu) in enumerate([(True, 3, True, False), (True, 1, False, True)]):
        x, q, kw = _case(R, 70, 60, torch.bfloat16, "int8", norm, groups, residual, swiglu, seed=R + i)
        _check_kernel(x, q, kw)


@needs_triton
@pytest.mark.parametrize("tiles,norm,groups,swiglu", [
    (LinearTiles(4, 2), True, 1, False),              # split K, statistics from the whole row
    (LinearTiles(8, 3), True, 1, True),               # uneven split of K=200, SwiGLU partials
    (LinearTiles(16, 4), True, 4, True),              # one norm group per program
    (LinearTiles(16, 3, mma=True), False, 1, True),
], ids=str)
@pytest.mark.parametrize("R", [3, 40])  # one row block; two (the split-K counters per row block)
def test_kernel_forced_tiles(tiles, norm, groups, swiglu, R):
    x, q, kw = _case(R, 2 * 30, 200, torch.float32, "int8", norm, groups, True, swiglu, seed=R)
    a = _check_kernel(x, q, kw, tiles=tiles)
    assert torch.equal(a, fused_linear(x, q, backend="triton", tiles=tiles, **kw)), "split K not reproducible"
    assert int(L._counters(x.device, 1)[:64].abs().sum()) == 0


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tiles,K,norm,groups,swiglu", [
    (LinearTiles(8, 1, num_warps=2, block_k=64), 200, True, 1, False),   # 4 chunks, the last partial
    (LinearTiles(4, 3, block_k=32), 200, True, 1, True),                # split K, whole-row statistics
    (LinearTiles(16, 2, num_warps=1, block_k=64), 256, True, 4, False),  # a norm group per chunk
    (LinearTiles(8, 5, block_k=16), 120, False, 1, True),               # more splits than needed
], ids=str)
@pytest.mark.parametrize("R", [1, 2, 4])
def test_gemv_kernel_forced_tiles(fmt, tiles, K, norm, groups, swiglu, R):
    """gemv_kernel (K in chunks, the weights read as int32 words of four) with tiles chosen by
    hand against the torch definition and float64, reproducible run to run."""
    x, q, kw = _case(R, 2 * 29, K, torch.float32, fmt, norm, groups, True, swiglu, seed=R + K)
    a = _check_kernel(x, q, kw, tiles=tiles)
    assert torch.equal(a, fused_linear(x, q, backend="triton", tiles=tiles, **kw)), "not reproducible"
    assert int(L._counters(x.device, 1)[:64].abs().sum()) == 0


def test_gemv_tiles_refused_in_one_line():
    x, w = torch.randn(5, 64), torch.randn(8, 64)
    q, s = quant.quantize_weight(w)
    t = LinearTiles(8, 1, block_k=64)
    with pytest.raises(ValueError, match="at most 4 rows"):
        fused_linear(x, q, weight_scale=s, backend="triton", tiles=t)
    with pytest.raises(ValueError, match="int8 / e4m3 weights"):
        fused_linear(x[:2], w, backend="triton", tiles=t)
    with pytest.raises(ValueError, match="multiple of the norm group"):
        fused_linear(x[:2], q, weight_scale=s, norm_weight=torch.ones(64), norm_groups=2, backend="triton",
                     tiles=LinearTiles(8, 1, block_k=16))


@needs_triton
def test_many_rows_take_quant_mm(monkeypatch):
    """Quantised weights above ROWS_MAX rows: the decode kernel's row blocks would each read every
    weight, so the norm runs alone and the GEMM is `quant_mm` (a K-looped GEMM converting the
    weights in registers), still the torch definition; tiles passed explicitly take the kernel."""
    x, q, kw = _case(L.ROWS_MAX + 5, 2 * 30, 64, torch.float32, "int8", True, 1, True, False, seed=4)
    calls, mm = [], []
    kernel, quant_mm = L._fused_linear_triton, L.quant_mm
    monkeypatch.setattr(L, "_fused_linear_triton", lambda *a: calls.append(1) or kernel(*a))
    monkeypatch.setattr(L, "quant_mm", lambda *a, **k: mm.append(1) or quant_mm(*a, **k))
    _check_kernel(x, q, kw)
    assert calls == [] and mm == [1]
    _check_kernel(x, q, kw, tiles=LinearTiles(16, 1, mma=True))
    assert calls == [1]


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M,N,K,tiles", [(40, 96, 80, L.MmTiles(32, 32, 32, 2, 4, 2)),   # K in 3 steps, last partial
                                         (7, 50, 33, L.MmTiles(16, 32, 16, 3, 4, 8)),    # ragged everything
                                         (130, 64, 64, None),                            # the default tiles
                                         (40, 96, 80, L.MmTiles(32, 32, 16, 2, 4, 2, swap=True)),   # W · a^T
                                         (7, 50, 33, L.MmTiles(16, 32, 16, 2, 4, 8, split_k=3)),    # 3 slices
                                         (40, 96, 80, L.MmTiles(16, 32, 16, 2, 4, 2, True, 2)),     # both
                                         (9, 40, 100, L.MmTiles(16, 16, 32, 2, 4, 8, split_k=8))],  # 4 of 8 left
                         ids=str)
def test_quant_mm_equals_the_torch_definition(fmt, M, N, K, tiles):
    """quant_mm against quantized_gemm in float64 (fp32 activations: exact products, fp32 sums)
    and against the torch definition in bf16, on random weights and activations, with
    leading batch dimensions kept."""
    gen = torch.Generator().manual_seed(M + N)
    q, s = quant.quantize_weight(torch.randn(N, K, generator=gen), fmt)
    a = torch.randn(2, M, K, generator=gen)
    ref64 = quantized_gemm(a.double(), q, s.double())
    got = L.quant_mm(a, q, s, tiles)
    assert got.shape == (2, M, N) and got.dtype == torch.float32
    assert_close("quant_mm fp32 vs float64", got, ref64, 1e-6)
    got16 = L.quant_mm(a.bfloat16(), q, s, tiles)
    assert_close("quant_mm bf16 vs torch definition", got16, quantized_gemm(a.bfloat16(), q, s),
                 TOL_INTERPRETED[torch.bfloat16])
    res = torch.randn(2, M, N, generator=gen)
    want = res + quantized_gemm(a, q, s)
    assert_close("quant_mm + residual", L.quant_mm(a, q, s, tiles, residual=res), want, 1e-6)
    assert L.quant_mm(a, q, s, tiles, residual=res, out=res) is res   # in place, as the decode step adds
    assert_close("quant_mm + residual in place", res, want, 1e-6)


def test_bad_weight_scale():
    x, w = torch.randn(2, 8), torch.randn(6, 8)
    q, s = quant.quantize_weight(w)
    with pytest.raises(ValueError, match="weight_scale goes with int8"):
        fused_linear(x, w, weight_scale=s)
    with pytest.raises(ValueError, match="weight_scale goes with int8"):
        fused_linear(x, q)
    with pytest.raises(ValueError, match=r"fp32 \[6\]"):
        fused_linear(x, q, weight_scale=s[:5])
    with pytest.raises(ValueError, match=r"fp32 \[6\]"):
        fused_linear(x, q, weight_scale=s.double())


def _tiny(seed=3):
    cfg = LasadConfig.from_preset("lasad-tiny", vocab_size=64, grid_height=4, grid_width=5)
    return randomize_(LasadGen(cfg), seed=seed).eval()


def test_quantized_model_keeps_its_format_through_casts_and_moves():
    model = quant.quantize_(_tiny(), "int8")
    n = _tiny().num_parameters()
    assert model.num_parameters() == n and quant.weights_format(model) == "int8"
    model.to(torch.bfloat16)
    for name in quant.target_names(model):
        m = model.get_submodule(name)
        assert isinstance(m, quant.QuantLinear) and m.weight.dtype == torch.int8
        assert m.weight_scale.dtype == torch.float32 and not m.weight.requires_grad
    assert model.norm.weight.dtype == torch.bfloat16 and quant.activation_dtype(model) == torch.bfloat16
    keys = model.state_dict().keys()
    assert "layers.0.attention.qfv.weight_scale" in keys and "output.weight_scale" in keys
    assert "tok_embeddings.weight_scale" not in keys  # embeddings and norms stay as they are
    fp8 = quant.quantize_(_tiny(), "fp8").half()
    assert fp8.output.weight.dtype == torch.float8_e4m3fn and fp8.output.weight_scale.dtype == torch.float32
    with pytest.raises(EngineError, match="refusing to quantise them again"):
        quant.quantize_(fp8, "int8")
    no_head = quant.quantize_(_tiny(), "int8", head=False)
    assert not isinstance(no_head.output, quant.QuantLinear)


@pytest.mark.parametrize("fmt", FORMATS)
def test_teacher_forced_step_equals_parallel_forward(fmt):
    """fp32 activations: the decode step with quantised weights (torch definitions) gives the
    parallel forward's logits (the same definition in both), and the same through the engine."""
    model = quant.quantize_(_tiny(), fmt)
    cfg = model.config
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=gen)
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        parallel = model(tokens, labels, backend="naive")
    stepped = LasadEngine(model, max_batch=2).teacher_forced_logits(tokens, labels)
    assert_close("step vs parallel", stepped, parallel, 1e-5)


@needs_triton
def test_step_kernels_equal_the_torch_step():
    """The decode step through the Triton kernels (interpreted) with int8 weights: the torch
    step's logits, over a few positions."""
    model = quant.quantize_(_tiny(), "int8")
    ids = torch.tensor([1, 4, 9])
    states = {b: model.allocate_state(3) for b in ("torch", "triton")}
    for p in range(3):
        out = {}
        for b, st in states.items():
            st.pos.fill_(p)
            out[b] = model.step(ids, st.pos, st, backend=b).clone()
        assert_close(f"position {p}", out["triton"], out["torch"], 1e-5)
        ids = out["torch"][:, :8].argmax(-1)


def _logit_error(model, fmt, tokens, labels):
    with torch.no_grad():
        ref = model(tokens, labels)
        got = quant.quantize_(copy.deepcopy(model), fmt)(tokens, labels)
    return rel_err(got, ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_logit_error_within_its_bound(fmt):
    """Teacher-forced logits with quantised weights vs the float weights, fp32 activations: the
    bundled model (real weights, its own sampled tokens) and random lasad-tiny / lasad-B (std
    0.02, as benchmarks/int8_bench.py), each within LOGIT_BOUND and above zero (the error exists)."""
    from lasad_engine.pipeline import LasadPipeline
    errs = {}
    with LasadPipeline.from_pretrained("default", device="cpu") as pipe:
        labels = torch.tensor([207, 5, 1000, 33])
        tokens = pipe(labels, temperature=0.9, cfg_scale=1.5, output_type="tokens",
                      generator=torch.Generator().manual_seed(0)).tokens.flatten(1)
        errs["default"] = _logit_error(pipe.model, fmt, tokens, labels)
    for preset, T in (("lasad-tiny", None), ("lasad-B", 48)):
        torch.manual_seed(0)
        cfg = LasadConfig.from_preset(preset, token_dropout=0, resid_dropout=0, ffn_dropout=0)
        model = LasadGen(cfg).eval()
        with torch.no_grad():
            model.output.weight.normal_(std=0.02)
            model.lower_bounds.normal_()
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, cfg.vocab_size, (2, T or cfg.seq_len), generator=gen)
        errs[preset] = _logit_error(model, fmt, tokens, torch.tensor([1, 2]))
    print(json.dumps({fmt: errs}))
    for name, err in errs.items():
        assert 0 < err <= LOGIT_BOUND[fmt][name], (name, err)


def test_checkpoint_halves_and_loads_on_a_cpu(tmp_path):
    """An int8 checkpoint of an fp16 model is about half the file (embeddings and norms stay
    fp16); on a CPU it loads dequantised to fp32 by default, as int8 when asked, and a float
    checkpoint quantises at load from its stored values."""
    model = _tiny().half()
    ref = quant.quantize_(copy.deepcopy(model).float(), "int8")  # quantised from the same fp16 values
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 64, (2, 20), generator=gen)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        expected = ref(tokens, labels)
    for suffix in (".safetensors", ".pt"):
        f = save_checkpoint(tmp_path / f"f{suffix}", model)
        q = save_checkpoint(tmp_path / f"q{suffix}", quant.quantize_(copy.deepcopy(model), "int8"))
        ratio = os.path.getsize(q) / os.path.getsize(f)
        assert 0.45 < ratio < 0.62, ratio
        assert stored_weights(q) == "int8" and stored_weights(f) == "float"
        default = load_checkpoint(q)  # CPU: dequantised
        assert quant.weights_format(default) == "float" and default.output.weight.dtype == torch.float32
        as_int8 = load_checkpoint(q, weights="int8")
        assert quant.weights_format(as_int8) == "int8"
        assert torch.equal(as_int8.output.weight, ref.output.weight)
        assert torch.equal(as_int8.output.weight_scale, ref.output.weight_scale)
        from_float = load_checkpoint(f, weights="int8")
        with torch.no_grad():
            assert torch.equal(from_float(tokens, labels), expected)
            assert torch.equal(as_int8(tokens, labels), expected)
            assert_close("dequantised at load", default(tokens, labels), expected, 1e-5)
        with pytest.raises(CheckpointError, match="would quantise them twice"):
            load_checkpoint(q, weights="fp8")
        bf16 = load_checkpoint(q, weights="int8", dtype=torch.bfloat16)
        assert bf16.output.weight.dtype == torch.int8 and bf16.output.weight_scale.dtype == torch.float32


def test_damaged_quantised_checkpoints_are_one_line(tmp_path):
    from safetensors.torch import load_file, save_file
    q = save_checkpoint(tmp_path / "q.safetensors", quant.quantize_(_tiny(), "int8"))
    from safetensors import safe_open
    with safe_open(str(q), "pt") as f:
        metadata = f.metadata()
    state = load_file(q)
    cases = {
        "float weight": ({**state, "output.weight": state["output.weight"].float()}, "not int8 or float8"),
        "scale on an embedding": ({**state, "tok_embeddings.weight_scale": torch.ones(64)}, "only the decode matrices"),
        "bad scale shape": ({**state, "output.weight_scale": torch.ones(3)}, "output.weight_scale is"),
    }
    for name, (bad, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        save_file(bad, path, metadata=metadata)
        with pytest.raises(CheckpointError, match=message) as e:
            load_checkpoint(path, weights="int8")
        assert "\n" not in str(e.value), name


def test_pipeline_and_save_pretrained(tmp_path):
    from lasad_engine.pipeline import LasadPipeline
    with pytest.raises(EngineError, match="compute capability 8.9"):
        LasadPipeline.from_pretrained("default", device="cpu", weights="fp8")
    with pytest.raises(EngineError, match="is not one of float, int8, fp8"):
        LasadPipeline.from_pretrained("default", device="cpu", weights="int4")
    gen = lambda: torch.Generator().manual_seed(0)
    with LasadPipeline.from_pretrained("default", device="cpu", weights="int8", max_batch=2) as pipe:
        assert pipe.weights == "int8" and pipe.dtype == torch.float32
        a = pipe([207, 5], output_type="tokens", generator=gen()).tokens
        pipe.to(torch.float16)  # activations follow; the weights keep their format
        assert pipe.weights == "int8" and pipe.dtype == torch.float16
        pipe.to(torch.float32)
        assert torch.equal(pipe([207, 5], output_type="tokens", generator=gen()).tokens, a)
        folder = pipe.save_pretrained(tmp_path / "m8")
    with LasadPipeline.from_pretrained(folder, device="cpu", weights="int8", max_batch=2) as again:
        assert torch.equal(again([207, 5], output_type="tokens", generator=gen()).tokens, a)
    assert stored_weights(folder) == "int8"


def test_cli_options_are_one_line_errors(tmp_path):
    from lasad_engine.cli import run_main
    from lasad_tools.export import main as export_main
    for cmd, args, code, message in (
            (run_main, ["-c", "1", "--weights", "int4"], 2, "'int4' is not one of 'float', 'int8', 'fp8'"),
            (run_main, ["-c", "1", "--weights", "fp8", "--device", "cpu"], 1, "compute capability 8.9"),
            (export_main, [str(tmp_path / "s.onnx"), "--weights", "fp8"], 2, "needs --opset 19"),
            (export_main, [str(tmp_path / "s.onnx"), "--weights", "int4"], 2, "is not one of")):
        r = CliRunner().invoke(cmd, args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "Warning" not in ln]
        assert r.exit_code == code and len(lines) == 1 and message in lines[0], (args, r.output)
    assert not list(tmp_path.iterdir())
    r = CliRunner().invoke(run_main, ["-c", "207", "-n", "1", "--weights", "int8", "--no-progress",
                                      "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "x.json").read_text())["weights"] == "int8"


# ONNX: the QDQ form on onnxruntime's CPU provider

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[export]')")


@pytest.mark.parametrize("form", ["portable", "custom"])
@pytest.mark.parametrize("fmt,opset", [("int8", 17), ("fp8", 19)])
def test_qdq_export_runs_on_onnxruntime_and_matches_the_torch_step(form, fmt, opset, tmp_path):
    import onnx
    from lasad_tools.onnx_export import export_step
    if form == "custom":
        pytest.importorskip("onnxruntime_extensions", reason="the custom form needs onnxruntime-extensions on the CPU")
    if fmt == "fp8" and form == "custom":
        pytest.skip("one fp8 form is enough on the CPU (the pass does not depend on the form)")
    model = _tiny(seed=7)
    qmodel = quant.quantize_(copy.deepcopy(model), fmt)
    path = export_step(model, tmp_path / "step.onnx", portable=form == "portable", max_batch=2, weights=fmt,
                       opset=opset)
    same = export_step(qmodel, tmp_path / "same.onnx", portable=form == "portable", max_batch=2, opset=opset)
    plain = export_step(model, tmp_path / "plain.onnx", portable=form == "portable", max_batch=2, opset=opset)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == len(quant.target_names(model))
    inits = {t.name: t for t in proto.graph.initializer}
    elem = {"int8": onnx.TensorProto.INT8, "fp8": onnx.TensorProto.FLOAT8E4M3FN}[fmt]
    for n in dq:
        assert inits[n.input[0]].data_type == elem and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT
    assert onnx.load(same).graph.initializer == proto.graph.initializer  # a quantised model exports the same
    assert os.path.getsize(path) < 0.4 * os.path.getsize(plain)  # fp32 -> 1 byte, embeddings left
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["lasad.weights"] == fmt and json.loads(props["lasad.meta"])["weights"] == fmt
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (2, model.config.seq_len), generator=gen)
    ref = LasadEngine(qmodel, max_batch=2).teacher_forced_logits(tokens, [2, 9], cfg_rows=True)
    engine = LasadEngine(model, backend="onnxruntime", max_batch=2, artifact=path)
    # the graph computes a · (W_q · s)^T, the torch step (a · W_q^T) · s: fp32 rounding apart
    assert_close(f"{form} {fmt} onnxruntime vs torch", engine.teacher_forced_logits(tokens, [2, 9], cfg_rows=True),
                 ref, 1e-4)


def test_qdq_export_in_fp16(tmp_path):
    """--dtype fp16: DequantizeLinear (fp32 scales) then a Cast, so the weights the graph
    multiplies are round_fp16(W_q · s); onnxruntime runs it."""
    import onnx
    from lasad_tools.onnx_export import export_step
    model = _tiny(seed=7)
    path = export_step(model, tmp_path / "step.onnx", portable=True, max_batch=2, weights="int8", dtype="fp16")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("DequantizeLinear") == ops[: 2 * ops.count("DequantizeLinear")].count("Cast") > 0
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (2, model.config.seq_len), generator=gen)
    ref = LasadEngine(quant.quantize_(copy.deepcopy(model), "int8"), max_batch=2).teacher_forced_logits(tokens, [2, 9])
    got = LasadEngine(model, backend="onnxruntime", max_batch=2, artifact=path).teacher_forced_logits(tokens, [2, 9])
    assert_close("fp16 QDQ vs torch int8 (fp32)", got, ref, 5e-3)


# GPU

@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("R", [1, 2, 5, 16, 32, 64, 128])
def test_kernel_on_cuda_at_lasad_shapes(fmt, R):
    """lasad-B and lasad-XL decode shapes (the head included) with int8 / fp8 weights, bf16
    activations, default tiles and PDL: the torch definition, bit-reproducible run to run."""
    if fmt == "fp8" and torch.cuda.get_device_capability() < quant.FP8_CAPABILITY:
        pytest.skip("fp8 weights need compute capability 8.9+")
    shapes = [(2304, 768, True, 1, False, False), (768, 768, True, 12, True, False), (4096, 768, True, 1, False, True),
              (768, 2048, False, 1, True, False), (16384, 768, True, 1, False, False),
              (3840, 1280, True, 1, False, False), (7168, 1280, True, 1, False, True), (1280, 3584, False, 1, True, False)]
    for i, (N, K, norm, groups, residual, swiglu) in enumerate(shapes):
        x, q, kw = _case(R, N, K, torch.bfloat16, fmt, norm, groups, residual, swiglu, seed=i)
        x, q = x.cuda(), q.cuda()
        kw = {k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()}
        got = _check_kernel(x, q, kw, tol=1e-2)
        assert torch.equal(got, fused_linear(x, q, backend="triton", **kw)), "not reproducible"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tiles", [L.MmTiles(128, 64, 128, 3, 4, swap=True), L.MmTiles(128, 128, 64, 3, 8, swap=True),
                                   L.MmTiles(64, 64, 128, 4, 4, swap=True, split_k=4),
                                   L.MmTiles(128, 128, 64, 3, 8, split_k=5), L.MmTiles(128, 256, 64, 3, 8)], ids=str)
def test_quant_mm_tiles_on_cuda(fmt, tiles):
    """quant_mm's swapped product (wgmma with the converted weights in registers) and its split K
    on the GPU, at 128 rows (64 images with CFG) of lasad-XL's shapes and a ragged one: the torch
    definition in fp32 (exact products, fp32 sums in another order) and bf16, the residual in
    place, and bit-identical run to run (the slices are added in a fixed order)."""
    if fmt == "fp8" and torch.cuda.get_device_capability() < quant.FP8_CAPABILITY:
        pytest.skip("fp8 weights need compute capability 8.9+")
    gen = torch.Generator().manual_seed(tiles.block_n + tiles.split_k)
    for M, N, K in ((128, 1280, 3584), (128, 3840, 1280), (100, 200, 1000)):
        q, s = quant.quantize_weight(torch.randn(N, K, generator=gen), fmt)
        q, s = q.cuda(), s.cuda()
        a = torch.randn(M, K, generator=gen).cuda()
        assert_close("fp32", L.quant_mm(a, q, s, tiles), quantized_gemm(a.double(), q, s.double()), 1e-5)
        a16 = a.bfloat16()
        got = L.quant_mm(a16, q, s, tiles)
        assert_close("bf16", got, quantized_gemm(a16, q, s), 1e-2)
        assert torch.equal(got, L.quant_mm(a16, q, s, tiles)), "not reproducible"
        res = torch.randn(M, N, generator=gen).cuda().bfloat16()
        want = (res.float() + quantized_gemm(a16, q, s).float()).bfloat16()
        assert L.quant_mm(a16, q, s, tiles, residual=res, out=res) is res
        assert_close("bf16 + residual in place", res, want, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("R", [1, 2, 4, 16, 128])
def test_int8_byte_permute_conversion_equals_tritons_own(R, monkeypatch):
    """The int8 -> fp32 / bf16 conversion by byte permutes (inline PTX, ops.linear._int8_to_f32,
    _bytes_f32) against Triton's own conversion: every int8 value in every byte position, whole
    GEMMs (gemv_kernel, per-row FMA, tensor cores, quant_mm) bit-identical, in bf16 and fp32."""
    q = torch.arange(-128, 128, dtype=torch.int8, device="cuda").reshape(8, 32)
    q = torch.cat([q, q.flip(1)]).contiguous()   # every value, in both byte positions orders
    s = torch.rand(q.shape[0], device="cuda") + 0.5
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(R, q.shape[1], device="cuda").to(dtype)
        outs = {}
        for asm in (True, False):
            monkeypatch.setattr(L, "INT8_ASM", asm)
            tiles = [None]
            if R <= L.ROWS_MAX:
                tiles = [LinearTiles(8, 1), LinearTiles(16, 2, mma=True)]
            if R <= L.FMA_ROWS_MAX:
                tiles += [LinearTiles(8, 1, block_k=16), LinearTiles(4, 2, num_warps=1, block_k=64)]
            outs[asm] = [fused_linear(x, q, weight_scale=s, backend="triton", tiles=t) for t in tiles]
            outs[asm].append(L.quant_mm(x, q, s, L.MmTiles(16, 16, 32, 2, 4)))
        for a, b in zip(outs[True], outs[False]):
            assert torch.equal(a, b), f"{dtype} R={R}: byte permutes differ from Triton's conversion"
        assert_close(f"{dtype} vs torch definition", outs[True][-1], quantized_gemm(x, q, s),
                     1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_backend_graphed_equals_torch_backend(fmt):
    """The cuda backend (Triton kernels, one CUDA graph) with quantised weights: the torch
    backend's teacher-forced logits, in fp32 and bf16, and the same tokens for a seed in fp32."""
    if fmt == "fp8" and torch.cuda.get_device_capability() < quant.FP8_CAPABILITY:
        pytest.skip("fp8 weights need compute capability 8.9+")
    from lasad_engine.engine import SamplingParams
    cfg = LasadConfig.from_preset("lasad-tiny", vocab_size=512, grid_height=8, grid_width=8)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        model = quant.quantize_(randomize_(LasadGen(cfg), seed=2, std=0.05).eval(), fmt).cuda().to(dtype)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=gen).cuda()
        ref = LasadEngine(model, backend="torch", max_batch=2).teacher_forced_logits(tokens, [1, 2], cfg_rows=True)
        cuda = LasadEngine(model, backend="cuda", max_batch=2)
        assert_close(f"{dtype}", cuda.teacher_forced_logits(tokens, [1, 2], cfg_rows=True), ref, tol)
        if dtype == torch.float32:
            p = SamplingParams(temperature=0.0, cfg_scale=2.0)
            a = LasadEngine(model, backend="torch", max_batch=2).generate([1, 2], params=p)
            assert torch.equal(a, cuda.generate([1, 2], params=p))
        cuda.close()


@pytest.mark.skipif(HAS_CUDA, reason="checks the error a machine without a GPU gives")
def test_fp8_without_a_gpu_is_one_line():
    with pytest.raises(EngineError, match="needs a CUDA GPU of compute capability 8.9") as e:
        quant.check_device("fp8", "cpu")
    assert "\n" not in str(e.value)
    quant.check_device("int8", "cpu")


def test_lasad_check_compares_an_int8_export_with_the_same_quantisation(tmp_path):
    """lasad-check of an int8 export loads the checkpoint with the export's weights form (the
    float model would differ by the quantisation itself, ~3 % here) and passes at fp32's bound."""
    from lasad_tools.check import main as check_main
    from lasad_tools.onnx_export import export_step
    model = _tiny(seed=7)
    ckpt = save_checkpoint(tmp_path / "m.pt", model)
    step = export_step(model, tmp_path / "step.onnx", portable=True, max_batch=2, weights="int8")
    r = CliRunner().invoke(check_main, [str(step), str(ckpt), "--images", "2"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["rel_err"] < 1e-4


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_persistent_step_kernel_refuses_quantised_weights_in_one_line(fmt):
    """The persistent step reads float weights only: asking for it with int8/fp8 weights is a one-line
    EngineError when it is chosen, not a ValueError from inside the decode loop at the first small
    bucket; float weights are accepted. (The backend's setter alone: its constructor needs a GPU.)"""
    from lasad_engine.backends.cuda import CudaBackend

    for model, ok in ((_tiny(), True), (quant.quantize_(_tiny(), fmt), False)):
        backend = CudaBackend.__new__(CudaBackend)
        backend.model, backend._step_kernel = model, "ops"
        if ok:
            backend.step_kernel = "persistent"
            assert backend.step_kernel == "persistent"
        else:
            with pytest.raises(EngineError, match=f"float weights .*not {fmt}") as e:
                backend.step_kernel = "persistent"
            assert "\n" not in str(e.value) and backend.step_kernel == "ops"
