"""fused_linear (ops/linear.py): the Triton kernel against the torch definition against a float64
reference written out from the formulas; the torch definition against the model's modules; the
PDL build of the kernels for Hopper (compiled here, without a GPU); real launches on a GPU."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import HAS_TRITON, assert_close, randomize_

from lasad_engine import LasadConfig, LasadGen
from lasad_engine.ops import linear as L
from lasad_engine.ops.linear import LinearTiles, fused_linear

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
# Triton's CPU interpreter truncates fp32 -> bf16 where the GPU rounds to nearest: bf16 results
# of the interpreted kernel drift by about one bf16 ulp per rounding (up to four in a SwiGLU).
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
TOL_INTERPRETED = {torch.float32: 1e-6, torch.bfloat16: 3e-2, torch.float16: 2e-3}


def naive_linear(x, w, norm_weight=None, eps=1e-5, groups=1, residual=None, swiglu=False):
    """float64, from the formulas: x / sqrt(mean_group(x^2) + eps) * g; x W^T; silu(a)·b with
    silu(a) = a / (1 + e^-a); + residual."""
    x, w = x.double(), w.double()
    if norm_weight is not None:
        xg = x.unflatten(-1, (groups, -1))
        x = (xg / torch.sqrt((xg * xg).mean(-1, keepdim=True) + eps)).flatten(-2) * norm_weight.double()
    y = torch.einsum("...k,nk->...n", x, w)
    if swiglu:
        a, b = y.chunk(2, -1)
        y = a / (1 + torch.exp(-a)) * b
    return y if residual is None else y + residual.double()


def make(R, N, K, dtype, norm, groups, residual, swiglu, seed=0, lead=()):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)
    x = rnd(*lead, R, K).to(dtype)
    w = (rnd(N, K) / K ** 0.5).to(dtype)
    nw = (1 + 0.2 * rnd(K)).to(dtype) if norm else None
    n_out = N // 2 if swiglu else N
    res = rnd(*lead, R, n_out).to(dtype) if residual else None
    return x, w, dict(norm_weight=nw, norm_groups=groups, residual=res, swiglu=swiglu)


def check(x, w, kw, dtype, tiles=None, interpreted=True):
    """Triton (into a NaN-poisoned out) vs the torch definition vs float64; returns the output."""
    ref64 = naive_linear(x, w, kw["norm_weight"], 1e-5, kw["norm_groups"], kw["residual"], kw["swiglu"])
    ref = fused_linear(x, w, backend="torch", **kw)
    assert ref.dtype == dtype and ref.shape == ref64.shape
    assert_close("torch definition vs float64", ref, ref64, TOL[dtype])
    out = torch.full(ref.shape, float("nan"), dtype=dtype, device=x.device)
    got = fused_linear(x, w, backend="triton", out=out, tiles=tiles, **kw)
    assert got.data_ptr() == out.data_ptr()
    assert torch.isfinite(got).all(), "outputs left unwritten"
    tol = (TOL_INTERPRETED if interpreted else TOL)[dtype]
    assert_close("triton vs torch definition", got, ref, tol)
    assert_close("triton vs float64", got, ref64, tol + TOL[dtype])
    return got


VARIANTS = [  # (norm, groups, residual, swiglu): every combination the layers use, and the rest
    (False, 1, False, False), (False, 1, True, False), (True, 1, False, False), (True, 1, True, False),
    (True, 4, True, False), (True, 4, False, False), (True, 1, False, True), (False, 1, False, True),
    (True, 4, True, True), (False, 1, True, True)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm,groups,residual,swiglu", VARIANTS,
                         ids=lambda v: str(v) if not isinstance(v, bool) else ("y" if v else "n"))
@pytest.mark.parametrize("R", [1, 3, 16])
def test_variants(dtype, norm, groups, residual, swiglu, R):
    x, w, kw = make(R, 2 * 47, 4 * 21, dtype, norm, groups, residual, swiglu, seed=R)  # N=94, K=84
    check(x, w, kw, dtype)


@needs_triton
@pytest.mark.parametrize("R", [2, 7])
def test_fp16(R):
    for i, (norm, groups, residual, swiglu) in enumerate([(True, 3, True, False), (True, 1, False, True)]):
        x, w, kw = make(R, 70, 60, torch.float16, norm, groups, residual, swiglu, seed=R + i)
        check(x, w, kw, torch.float16)


@needs_triton
@pytest.mark.parametrize("R", list(range(1, 10)) + [16, 32])
def test_rows(R):
    """Every row count up to 9, and 16, 32 (the limit): FMA rows and tl.dot rows, both layers."""
    for i, (norm, groups, residual, swiglu) in enumerate([(True, 3, True, False), (True, 1, False, True)]):
        x, w, kw = make(R, 70, 60, torch.float32, norm, groups, residual, swiglu, seed=10 * R + i)
        check(x, w, kw, torch.float32)


@needs_triton
@pytest.mark.parametrize("tiles,norm,groups,swiglu", [
    (LinearTiles(4, 2), True, 1, False),        # split K, statistics from the whole row
    (LinearTiles(8, 3), True, 1, True),         # uneven split of K=200, SwiGLU partials
    (LinearTiles(4, 2), True, 4, False),        # grouped norm, two groups per program
    (LinearTiles(16, 4), True, 4, True),        # one group per program
    (LinearTiles(16, 2, mma=True), True, 1, False),
    (LinearTiles(16, 3, mma=True), False, 1, True),
    (LinearTiles(32, 1, mma=True), True, 5, False),   # group size 40: padded segments
    (LinearTiles(64, 1), True, 1, False),       # more columns per program than N has
], ids=str)
@pytest.mark.parametrize("R", [2, 5])
def test_forced_tiles(tiles, norm, groups, swiglu, R):
    x, w, kw = make(R, 2 * 30, 200, torch.float32, norm, groups, True, swiglu, seed=R)
    check(x, w, kw, torch.float32, tiles=tiles)


def test_tile_policy_answers_only_for_the_band_it_was_measured_in(monkeypatch):
    """TILE_POLICY's choices apply to the row band they were measured for (1-4 rows: FMA tiles;
    5-32: tensor-core tiles) and only on an H200 (sm_90): a shape measured at 16 rows alone must
    not hand its split-K tensor-core tiles to 2 rows (that made lasad-L's one image 1.45x slower)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    dev = torch.device("cuda")
    for (bound, n, k), choice in L.TILE_POLICY.items():
        lo = 1 if bound == L.FMA_ROWS_MAX else L.FMA_ROWS_MAX + 1
        for rows in (lo, bound):
            assert L.tile_policy(rows, n, k, dev) == choice, (bound, n, k, rows)
        other = L.ROWS_MAX if bound == L.FMA_ROWS_MAX else L.FMA_ROWS_MAX
        assert L.tile_policy(other, n, k, dev) == L.TILE_POLICY.get((other, n, k)), (bound, n, k, other)
    assert L.tile_policy(L.ROWS_MAX + 1, 768, 768, dev) is None
    assert L.tile_policy(2, 16384, 768, dev) == L.LIBRARY  # the head
    # quantised weights: their own measured tiles first (QUANT_TILE_POLICY, in its band only),
    # then bf16's in the bands that follow them, never the library (the head too); above ROWS_MAX
    # no choice, as for floats (fused_linear's row limit decides: tests/test_quant.py)
    for (bound, n, k), choice in L.TILE_POLICY.items():
        got = L.tile_policy(bound, n, k, dev, quantized=True)
        follows = bound in L.QUANT_FOLLOWS_FLOAT_POLICY and choice != L.LIBRARY
        want = L.QUANT_TILE_POLICY.get((bound, n, k), choice if follows else None)
        assert got == want, (bound, n, k, got)
    for (bound, n, k), choice in L.QUANT_TILE_POLICY.items():
        lo = 1 if bound == L.FMA_ROWS_MAX else L.FMA_ROWS_MAX + 1
        for rows in (lo, bound):
            assert L.tile_policy(rows, n, k, dev, quantized=True) == choice, (bound, n, k, rows)
            float_choice = L.LIBRARY if n >= 8192 else L.TILE_POLICY.get((bound, n, k))
            assert L.tile_policy(rows, n, k, dev) == float_choice, "float weights unaffected"
    assert L.tile_policy(2, 16384, 768, dev, quantized=True) is None   # lasad-B's head: gemv_tiles decides
    assert L.tile_policy(L.ROWS_MAX + 1, 768, 768, dev, quantized=True) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert L.tile_policy(2, 2304, 768, dev) is None


@needs_triton
def test_split_k_is_reproducible_and_resets_its_counters():
    x, w, kw = make(3, 2 * 40, 192, torch.float32, True, 1, True, True, seed=3)
    tiles = LinearTiles(4, 3)
    a = fused_linear(x, w, backend="triton", tiles=tiles, **kw)
    b = fused_linear(x, w, backend="triton", tiles=tiles, **kw)
    assert torch.equal(a, b)
    assert int(L._counters(x.device, 1)[:64].abs().sum()) == 0


@needs_triton
def test_leading_dims_and_fallback_above_rows_max():
    x, w, kw = make(3, 40, 50, torch.float32, True, 5, True, False, seed=1, lead=(2,))
    check(x, w, kw, torch.float32)                    # [2, 3, K]: 6 rows
    for swiglu in (False, True):  # more rows: the GEMM library, with the norm and epilogue kernels around it
        x, w, kw = make(L.ROWS_MAX + 1, 40, 50, torch.float32, True, 1, True, swiglu, seed=2)
        assert_close("above ROWS_MAX", fused_linear(x, w, backend="triton", **kw),
                     fused_linear(x, w, backend="torch", **kw), 1e-6)


@needs_triton
def test_tile_choice_covers_the_gpu():
    """For the lasad-B decode shapes the default tiles spread over all 132 SMs and stay in budget."""
    for rows in (1, 2, 16, 32):
        for n_out, K, groups, norm, sw in ((2304, 768, 1, True, False), (768, 768, 12, True, False),
                                          (2048, 768, 1, True, True), (768, 2048, 1, False, False),
                                          (16384, 768, 1, True, False)):
            t = L.linear_tiles(rows, n_out, K, groups=groups, has_norm=norm, swiglu=sw)
            seg, nseg = L._segments(K, groups, norm, t.split_k)
            kp = L._pow2(seg) * L._pow2(nseg)
            assert -(-n_out // t.block_n) * t.split_k >= 132, (rows, n_out, K, t)
            assert t.block_n * (2 if sw else 1) * kp <= L.TILE_ELEMS
            assert t.mma == (rows > L.FMA_ROWS_MAX)


def test_bad_arguments():
    x, w = torch.randn(2, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="features"):
        fused_linear(torch.randn(2, 7), w)
    with pytest.raises(ValueError, match="norm_groups"):
        fused_linear(x, w, norm_weight=torch.ones(8), norm_groups=3)
    with pytest.raises(ValueError, match="swiglu"):
        fused_linear(x, torch.randn(5, 8), swiglu=True)
    if HAS_TRITON:
        with pytest.raises(ValueError, match="one dtype"):
            fused_linear(x, w.double(), backend="triton")
        with pytest.raises(ValueError, match="split_k"):
            fused_linear(x, w, norm_weight=torch.ones(8), norm_groups=2, backend="triton", tiles=LinearTiles(4, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_definition_is_the_models_numerics(dtype):
    """fused_linear(backend="torch") runs the very ops of the model's modules, bitwise (the model
    owns the stacked W_q|W_f|W_i and W_1|W_3 matrices the step reads)."""
    from lasad_engine.ops.norms import swiglu
    cfg = LasadConfig.from_preset("lasad-tiny", output_norm="group")
    model = randomize_(LasadGen(cfg), seed=5).to(dtype).eval()
    blk, head_norm = model.layers[1], model.norm
    a, f = blk.attention, blk.feed_forward
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, cfg.dim, generator=gen).to(dtype)
    o = torch.randn(3, cfg.n_head * cfg.head_v_dim, generator=gen).to(dtype)
    u = torch.randn(3, cfg.ffn_dim, generator=gen).to(dtype)
    with torch.no_grad():
        kw = dict(backend="torch")
        h = fused_linear(o, a.o_proj.weight, norm_weight=a.g_norm.weight, eps=cfg.norm_eps,
                         norm_groups=a.g_norm.groups, residual=x, **kw)
        assert torch.equal(h, x + a.o_proj(a.g_norm(o)))
        assert torch.equal(fused_linear(u, f.w2.weight, residual=x, **kw), x + f.w2(u))
        assert torch.equal(fused_linear(x, model.output.weight, norm_weight=head_norm.weight, **kw),
                           model.output(head_norm(x)))
        ffn = fused_linear(x, f.w13.weight, norm_weight=blk.ffn_norm.weight, swiglu=True, **kw)
        assert torch.equal(ffn, swiglu(f.w13(blk.ffn_norm(x)), backend="torch"))
        qfv = fused_linear(x, a.qfv.weight, norm_weight=blk.attention_norm.weight, **kw)
        assert torch.equal(qfv, a.qfv(blk.attention_norm(x)))


@needs_triton
def test_pdl_kernels_compile_for_hopper():
    """The PDL switch compiles to griddepcontrol on sm_90, with the weight (and state) loads issued
    before the wait; without it there is no griddepcontrol at all."""
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = os.path.join(os.path.dirname(__file__), "hopper_ptx.py")
    run = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(run.stdout.strip().splitlines()[-1])
    for name in ("linear", "linear_int8", "gemv_int8", "step"):
        on, off = facts[f"{name}_pdl=True"], facts[f"{name}_pdl=False"]
        assert on["wait"] and on["launch_dependents"] and on["launch_before_wait"], (name, on)
        assert on["loads_before_wait"] and on["vector_loads_before_wait"] >= 2, (name, on)
        if name != "linear_int8":
            assert on["wide_loads_before_wait"] >= 2, (name, on)   # 16 bytes a load
        assert not off["wait"] and not off["launch_dependents"], (name, off)
    # the int8 tile in the layout of the activations: no more block barriers than with bf16 weights
    # (loaded 16 features a thread, the converted tile crossed shared memory in 39-139 pieces)
    assert facts["linear_int8_pdl=True"]["barriers"] <= facts["linear_pdl=True"]["barriers"], facts
    # int8 weights converted by byte permutes (ops.linear._bytes_f32), no int -> float conversion
    for name in ("linear_int8_pdl=True", "gemv_int8_pdl=True", "quant_mm_int8", "quant_mm_int8_swap",
                 "quant_mm_int8_swap_split"):
        assert facts[name]["prmt"] > 0 and facts[name]["cvt_s8"] == 0, (name, facts[name])
    # quant_mm on Hopper's wgmma both ways: the plain product reads both operands from shared
    # memory (the converted weights are written back there every K step); the swapped one takes
    # the converted weights as its register operand
    mm, swap, split = facts["quant_mm_int8"], facts["quant_mm_int8_swap"], facts["quant_mm_int8_swap_split"]
    assert mm["wgmma"] > 0 and mm["wgmma_a_regs"] == 0, facts
    assert swap["wgmma_a_regs"] == swap["wgmma"] > 0 and split["wgmma_a_regs"] == split["wgmma"] > 0, facts


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("R", [1, 2, 5, 16, 32])
def test_lasad_b_shapes_on_cuda(dtype, R):
    """The lasad-B layer shapes at decode row counts, default tiles, PDL on (where the GPU has it)."""
    shapes = [(2304, 768, True, 1, False, False), (768, 768, True, 12, True, False),
              (768, 768, True, 1, True, False), (4096, 768, True, 1, False, True),
              (768, 2048, False, 1, True, False), (16384, 768, True, 1, False, False)]
    for i, (N, K, norm, groups, residual, swiglu) in enumerate(shapes):
        x, w, kw = make(R, N, K, dtype, norm, groups, residual, swiglu, seed=i)
        x, w = x.cuda(), w.cuda()
        kw = {k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()}
        got = check(x, w, kw, dtype, interpreted=False)
        again = fused_linear(x, w, backend="triton", **kw)
        assert torch.equal(got, again), "not reproducible run to run"


@pytest.mark.gpu
@pytest.mark.parametrize("key", [k for k, v in L.TILE_POLICY.items() if v != L.LIBRARY], ids=str)
def test_every_measured_tile_choice_on_its_shape(key):
    """Each TILE_POLICY entry (measured tiles per shape, docs/performance.md) against the reference
    on the GPU, at a row count it serves, with a norm prologue and a residual epilogue."""
    bound, N, K = key
    R = 2 if bound == L.FMA_ROWS_MAX else 16
    x, w, kw = make(R, N, K, torch.bfloat16, True, 1, True, False, seed=N + K)
    x, w = x.cuda(), w.cuda()
    kw = {k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()}
    assert L.tile_policy(R, N, K, x.device) in (L.TILE_POLICY[key], None)  # None: not an H200
    check(x, w, kw, torch.bfloat16, tiles=L.TILE_POLICY[key], interpreted=False)


@pytest.mark.gpu
def test_pdl_chain_in_a_cuda_graph():
    """A chain of dependent fused_linear calls and LASAD steps, with and without PDL, eager and
    replayed from a CUDA graph: the same bits every way."""
    from lasad_engine.ops.lasad import lasad_fused_step_
    torch.manual_seed(0)
    d, H, Kh, F_, R = 256, 4, 64, 512, 2
    layers = [dict(qfv=torch.randn(3 * H * Kh, d) / d ** 0.5, o=torch.randn(d, H * Kh) / 16,
                   w13=torch.randn(2 * F_, d) / d ** 0.5, w2=torch.randn(d, F_) / F_ ** 0.5,
                   n1=1 + 0.1 * torch.randn(d), n2=1 + 0.1 * torch.randn(H * Kh), n3=1 + 0.1 * torch.randn(d))
              for _ in range(3)]
    layers = [{k: v.cuda().bfloat16() for k, v in p.items()} for p in layers]
    x0 = torch.randn(R, d, device="cuda").bfloat16()
    state0 = torch.randn(3, R, H, Kh, Kh, device="cuda") * 0.1
    start = torch.zeros(1, dtype=torch.bool, device="cuda")

    def chain(x, state, pdl):
        for i, p in enumerate(layers):
            qfv = fused_linear(x, p["qfv"], norm_weight=p["n1"], pdl=pdl)
            o = lasad_fused_step_(qfv, None, state[i], start, "unit", pdl=pdl)
            h = fused_linear(o.flatten(-2), p["o"], norm_weight=p["n2"], norm_groups=H, residual=x, pdl=pdl)
            u = fused_linear(h, p["w13"], norm_weight=p["n3"], swiglu=True, pdl=pdl)
            x = fused_linear(u, p["w2"], residual=h, pdl=pdl)
        return x

    results = {}
    for pdl in (False, True):
        s = state0.clone()
        results[f"eager pdl={pdl}"] = (chain(x0, s, pdl), s)
        s = state0.clone()
        x_in = x0.clone()
        chain(x_in, s.clone(), pdl)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = chain(x_in, s, pdl)
        s.copy_(state0)
        graph.replay()
        results[f"graph pdl={pdl}"] = (y.clone(), s.clone())
    (y0, s0), *rest = results.values()
    for name, (y, s) in list(results.items())[1:]:
        assert torch.equal(y, y0), name
        assert torch.equal(s, s0), name


@pytest.mark.gpu
def test_step_kernel_pdl_is_the_same_step():
    from lasad_engine.ops.lasad import lasad_fused_step_
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, H, K = 2, 12, 64
    qfv = torch.randn(B, 3 * H * K, device="cuda", generator=gen).bfloat16()
    lb = torch.rand(H * K, device="cuda", generator=gen) * 0.9
    s0 = torch.randn(B, H, K, K, device="cuda", generator=gen)
    for flag in (False, True):
        start = torch.tensor([flag], device="cuda")
        a, b = s0.clone(), s0.clone()
        oa = lasad_fused_step_(qfv, lb, a, start, "reset", pdl=False)
        ob = lasad_fused_step_(qfv, lb, b, start, "reset", pdl=True)
        assert torch.equal(oa, ob) and torch.equal(a, b)


@pytest.mark.parametrize("rows", [3, L.ROWS_MAX + 5])  # the Triton kernel, and the GEMM-library path
def test_residual_stream_updated_in_place(rows):
    """out=residual (how the decode step keeps its residual stream) gives the out-of-place result
    and writes it into the residual's buffer."""
    x, w, kw = make(rows, 40, 50, torch.float32, True, 1, True, False, seed=7)
    expected = fused_linear(x, w, backend="torch", **kw)
    for backend in ["torch"] + (["triton"] if HAS_TRITON else []):
        residual = kw["residual"].clone()
        got = fused_linear(x, w, backend=backend, **{**kw, "residual": residual}, out=residual)
        assert got.data_ptr() == residual.data_ptr()
        assert_close(f"{backend} in place", residual, expected, 1e-6)
