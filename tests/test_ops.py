"""The three forms of the LASAD op agree with a float64 reference, for every row-start mode."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_TRITON, assert_close

from lasad_engine.ops.lasad import (ROW_START_MODES, chunk_lasad, lasad_step_, layer_lower_bounds,
                                    naive_recurrent_lasad, row_start_mask)
from lasad_engine.ops.lasad.gates import gates, input_gate, log_decay
from lasad_engine.ops.lasad.mask import RESET_LOG_DECAY_FLOOR, apply_row_start
from lasad_engine.ops.lasad.step import lasad_step_ref_

MODES = list(ROW_START_MODES)


def make_inputs(B, T, H, K, V, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    g = F.logsigmoid(2 * r(B, T, H, K))            # log-decays from ~0 to strongly negative
    return r(B, T, H, K), input_gate(g), r(B, T, H, V), g


def python_recurrence(q, k, v, g, width, mode, scale, start_pos=0, S0=None):
    """Independent float64 reference: scalar loops over positions, the row-start rule written
    out from the spec (class position never masked; image token t = p - 1 starts a row when
    t % width == 0)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = torch.zeros(B, H, K, V, dtype=torch.float64) if S0 is None else S0.double().clone()
    o = torch.zeros(B, T, H, V, dtype=torch.float64)
    for i in range(T):
        p = start_pos + i
        decay = g[:, i].double().exp()
        if p >= 1 and (p - 1) % width == 0:
            if mode == "unit":
                decay = torch.ones_like(decay)
            elif mode == "reset":
                decay = torch.zeros_like(decay)
        S = decay[..., None] * S + k[:, i].double()[..., None] * v[:, i].double()[..., None, :]
        o[:, i] = torch.einsum("bhk,bhkv->bhv", q[:, i].double() * scale, S)
    return o, S


def test_row_start_mask_matches_the_rule():
    for width in (1, 5, 7, 16):
        pos = torch.arange(0, 200)
        expected = [p >= 1 and (p - 1) % width == 0 for p in range(200)]
        assert row_start_mask(pos, width).tolist() == expected
        # width as a device tensor, as the decode step passes it
        assert row_start_mask(pos, torch.tensor([width])).tolist() == expected


@pytest.mark.parametrize("mode", MODES)
def test_apply_row_start_only_touches_row_starts(mode):
    g = -torch.rand(2, 20, 3, 4, dtype=torch.float64)
    mask = row_start_mask(torch.arange(20), 7)
    out = apply_row_start(g, mask, mode)
    assert torch.equal(out[:, ~mask], g[:, ~mask])
    expected = {"none": g[:, mask], "unit": torch.zeros_like(g[:, mask]),
                "reset": torch.full_like(g[:, mask], -math.inf)}[mode]
    assert torch.equal(out[:, mask], expected)
    if mode == "reset":
        assert (apply_row_start(g, mask, mode, finite=True)[:, mask] == RESET_LOG_DECAY_FLOOR).all()


def test_gates_against_formulas():
    f = torch.randn(5, 12, dtype=torch.float64)
    lb = torch.rand(12, dtype=torch.float64) * 0.9
    g = log_decay(f, lb)
    assert_close("bounded", g, torch.log(lb + (1 - lb) / (1 + torch.exp(-f))), 1e-12)
    assert_close("unbounded", log_decay(f, None), -torch.log1p(torch.exp(-f)), 1e-12)
    assert_close("input gate", input_gate(g), 1 - g.exp(), 1e-12)
    g2, k2 = gates(f, lb)
    assert torch.equal(g2, g)
    assert_close("k without cancellation", k2, 1 - g.exp(), 1e-12)
    assert_close("k, no bound", gates(f, None)[1], 1 - log_decay(f, None).exp(), 1e-12)
    raw = torch.randn(6, 12, dtype=torch.float64)
    bounds = layer_lower_bounds(raw)
    p = raw.exp() / raw.exp().sum(0)
    for layer in range(6):
        assert_close(f"lb{layer}", bounds[layer], p[1:layer + 1].sum(0) if layer else torch.zeros(12), 1e-6)
    assert (bounds[1:] > bounds[:-1]).all() and (bounds < 1).all()


SHAPES = [  # B, T, H, K, V, width (grid 5×7 -> width 7; 16×16 -> 16), start_pos
    (2, 63, 3, 60, 20, 7, 0),
    (1, 63, 2, 64, 64, 16, 0),
    (3, 36, 2, 17, 9, 5, 0),
    (2, 40, 2, 32, 16, 16, 11),  # a continuation that starts mid-sequence with a state
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-H{}-K{}-V{}-w{}-p{}".format(*s))
def test_naive_and_chunked_match_reference(mode, shape):
    B, T, H, K, V, width, start = shape
    q, k, v, g = make_inputs(B, T, H, K, V, seed=T + K + start)
    S0 = torch.randn(B, H, K, V, dtype=torch.float64) if start else None
    ref_o, ref_S = python_recurrence(q, k, v, g, width, mode, K ** -0.5, start, S0)
    kw = dict(width=width, row_start=mode, initial_state=S0, output_final_state=True, start_pos=start)
    o, S = naive_recurrent_lasad(q, k, v, g, **kw)
    assert_close("naive o (fp64)", o, ref_o, 1e-12)
    assert_close("naive S (fp64)", S, ref_S, 1e-12)
    o, S = chunk_lasad(q, k, v, g, **kw)
    assert_close("chunk o (fp64)", o, ref_o, 1e-10)
    assert_close("chunk S (fp64)", S, ref_S, 1e-10)
    f32 = [x.float() for x in (q, k, v, g)]
    kw32 = {**kw, "initial_state": None if S0 is None else S0.float()}
    for chunk_size in (16, 64):
        o, S = chunk_lasad(*f32, chunk_size=chunk_size, **kw32)
        assert o.dtype == torch.float32
        assert_close(f"chunk{chunk_size} o (fp32)", o, ref_o, 1e-5)
        assert_close(f"chunk{chunk_size} S (fp32)", S, ref_S, 1e-5)
    o, S = naive_recurrent_lasad(*f32, **kw32)
    assert_close("naive o (fp32)", o, ref_o, 1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_chunked_gradients_match_naive(mode, dtype, tol):
    """Backward through the chunked form (what training differentiates) == through the loop, for
    every input and the initial state, with an odd length that leaves a partial chunk."""
    B, T, H, K, V, width = 2, 37, 2, 12, 10, 6
    inputs = [x.to(dtype).requires_grad_() for x in make_inputs(B, T, H, K, V, seed=5)]
    S0 = torch.randn(B, H, K, V, dtype=dtype, generator=torch.Generator().manual_seed(6)).requires_grad_()
    gen = torch.Generator().manual_seed(7)
    do, dS = torch.randn(B, T, H, V, generator=gen).to(dtype), torch.randn(B, H, K, V, generator=gen).to(dtype)
    grads = {}
    for name, fn in (("naive", naive_recurrent_lasad), ("chunk", chunk_lasad)):
        o, S = fn(*inputs, width=width, row_start=mode, initial_state=S0, output_final_state=True, start_pos=3)
        grads[name] = torch.autograd.grad((o * do).sum() + (S * dS).sum(), [*inputs, S0])
    for label, gn, gc in zip(("dq", "dk", "dv", "dg", "dS0"), grads["naive"], grads["chunk"]):
        assert gn is not None and torch.isfinite(gc).all(), label
        assert_close(f"{mode} {label}", gc, gn, tol)


def run_steps(q, k, v, g, width, mode, backend, S0=None):
    B, T, H, K = q.shape
    state = torch.zeros(B, H, K, v.shape[-1]) if S0 is None else S0.float().clone()
    width_t = torch.tensor([width])
    outs = []
    for p in range(T):
        start = row_start_mask(torch.tensor([p]), width_t)
        out = torch.full((B, H, v.shape[-1]), float("nan"))  # poisoned: every element must be written
        lasad_step_(q[:, p], k[:, p], v[:, p], g[:, p], state, start, mode, out=out, backend=backend)
        outs.append(out)
    return torch.stack(outs, 1), state


STEP_BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "B{}-T{}-H{}-K{}-V{}-w{}".format(*s))
def test_step_matches_reference(mode, shape, backend):
    B, T, H, K, V, width, _ = shape
    q, k, v, g = (x.float() for x in make_inputs(B, T, H, K, V, seed=7 * T + K))
    ref_o, ref_S = python_recurrence(q, k, v, g, width, mode, K ** -0.5)
    o, S = run_steps(q, k, v, g, width, mode, backend)
    assert_close(f"{backend} step o", o, ref_o, 1e-5)
    assert_close(f"{backend} step S", S, ref_S, 1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[test]' in lasad's folder)")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,H,K,V", [(2, 3, 60, 20), (3, 2, 64, 64), (1, 4, 17, 33)])
def test_triton_step_kernel_matches_its_reference(mode, B, H, K, V):
    """One call of the kernel (TRITON_INTERPRET=1 on a CPU) vs `lasad_step_ref_`, on output and
    state, from a random state, at a row start and elsewhere."""
    gen = torch.Generator().manual_seed(B * 100 + K)
    for is_start in (False, True):
        q, k, v = (torch.randn(B, H, n, generator=gen) for n in (K, K, V))
        g = F.logsigmoid(torch.randn(B, H, K, generator=gen))
        S0 = torch.randn(B, H, K, V, generator=gen)
        start = torch.tensor([is_start])
        s_ref, s_tri = S0.clone(), S0.clone()
        o_ref = lasad_step_ref_(q, k, v, g, s_ref, start, mode)
        o_tri = lasad_step_(q, k, v, g, s_tri, start, mode, backend="triton")
        assert_close("o", o_tri, o_ref, 1e-6)
        assert_close("state", s_tri, s_ref, 1e-6)
        if mode == "reset" and is_start:  # cleared, then one rank-1 write
            assert_close("reset state", s_tri, k[..., None] * v[..., None, :], 1e-6)


def test_step_rejects_bad_state():
    q = torch.randn(1, 1, 4)
    with pytest.raises(ValueError, match="float32"):
        lasad_step_(q, q, q, q, torch.zeros(1, 1, 4, 4, dtype=torch.float64), torch.tensor([False]))
    with pytest.raises(ValueError, match="row_start"):
        lasad_step_(q, q, q, q, torch.zeros(1, 1, 4, 4), torch.tensor([False]), "sometimes")
