"""The decode step's fused ops against their definitions: norms, SwiGLU, gates+step, the fused
linear layers, and the model's whole step on each kernel set against the parallel forward;
Triton kernels run in the interpreter on a CPU."""

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_TRITON, assert_close, randomize_

from lasad_engine import LasadConfig, LasadGen
from lasad_engine.ops.lasad import ROW_START_MODES, lasad_fused_step_
from lasad_engine.ops.lasad.gates import input_gate, log_decay
from lasad_engine.ops.lasad.step import lasad_step_ref_
from lasad_engine.ops.norms import rms_norm, swiglu

KERNELS = ["torch"] + (["triton"] if HAS_TRITON else [])
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def naive_rms(x, w, eps, groups):
    xf = x.double().unflatten(-1, (groups, -1))
    return (xf / (xf.pow(2).mean(-1, keepdim=True) + eps).sqrt()).flatten(-2) * w.double()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups,N", [(1, 96), (4, 64), (3, 60)])
def test_rms_norm_kernel(dtype, groups, N):
    gen = torch.Generator().manual_seed(N)
    x, r = (torch.randn(5, N, generator=gen).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(N, generator=gen)).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert_close("torch vs naive", rms_norm(x, w, 1e-5, groups, backend="torch"), naive_rms(x, w, 1e-5, groups), tol)
    out = rms_norm(x, w, 1e-5, groups, backend="triton")
    assert out.dtype == dtype
    assert_close("triton vs torch", out, rms_norm(x, w, 1e-5, groups, backend="torch"), tol)
    (o1, h1), (o2, h2) = (rms_norm(x, w, 1e-5, groups, residual=r, backend=b) for b in ("triton", "torch"))
    assert torch.equal(h2, x + r)
    # (Triton's CPU interpreter truncates fp32 -> bf16 where the GPU rounds to nearest)
    assert torch.equal(h1, h2) if dtype == torch.float32 else (h1.float() - h2.float()).abs().max() <= 0.02
    assert_close("fused add", o1, o2, tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel(dtype):
    ab = torch.randn(3, 2 * 1300, generator=torch.Generator().manual_seed(0)).to(dtype)
    ref = F.silu(ab[:, :1300].double()) * ab[:, 1300:].double()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert_close("torch", swiglu(ab, backend="torch"), ref, tol)
    assert_close("triton", swiglu(ab, backend="triton"), swiglu(ab, backend="torch"), tol)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", ROW_START_MODES)
@pytest.mark.parametrize("with_lb", [False, True])
def test_fused_gates_and_step(kernel, mode, with_lb):
    """One fused projection in, the same state and output as gates.py + lasad_step_."""
    B, H, K, V = 3, 2, 24, 20
    gen = torch.Generator().manual_seed(K + with_lb)
    qfv = 2 * torch.randn(B, 2 * H * K + H * V, generator=gen)
    lb = torch.rand(H * K, generator=gen) * 0.9 if with_lb else None
    S0 = torch.randn(B, H, K, V, generator=gen)
    for flag in (False, True):
        start = torch.tensor([flag])
        q, f, v = qfv.double().split([H * K, H * K, H * V], -1)
        g = log_decay(f, None if lb is None else lb.double())
        s_ref = S0.double().clone()
        o_ref = lasad_step_ref_(F.silu(q).unflatten(-1, (H, K)), input_gate(g).unflatten(-1, (H, K)),
                                v.unflatten(-1, (H, V)), g.unflatten(-1, (H, K)), s_ref, start, mode)
        s = S0.clone()
        o = lasad_fused_step_(qfv, lb, s, start, mode, backend=kernel)
        assert_close("o", o, o_ref, 1e-5)
        assert_close("state", s, s_ref, 1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode,output_norm,lower_bound,decay", [
    ("unit", "rms", True, True), ("reset", "group", True, True), ("none", "rms", False, True),
    ("reset", "rms", True, False)])  # decay=False: the no-decay ablation
def test_model_step_equals_parallel_forward(kernel, mode, output_norm, lower_bound, decay):
    cfg = LasadConfig.from_preset("lasad-tiny", row_start=mode, output_norm=output_norm,
                                  use_lower_bound=lower_bound, decay=decay)
    model = randomize_(LasadGen(cfg), seed=4).eval()
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, cfg.vocab_size, (3, 20), generator=gen)
    labels = torch.tensor([1, 2, cfg.null_class])
    with torch.no_grad():
        ref = model(tokens, labels, backend="naive")
    state = model.allocate_state(3)
    outs = []
    for p in range(20):
        state.pos.fill_(p)
        outs.append(model.step(labels if p == 0 else tokens[:, p - 1], state.pos, state, backend=kernel).clone())
    assert_close("decode vs parallel", torch.stack(outs, 1), ref, 1e-5)


@needs_triton
def test_model_step_bf16_weights():
    cfg = LasadConfig.from_preset("lasad-tiny")
    model = randomize_(LasadGen(cfg), seed=4, std=0.1).eval()
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, cfg.vocab_size, (2, 14), generator=gen)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        ref = model(tokens, labels)
    model = model.to(torch.bfloat16)
    outs = {}
    for kernel in ("torch", "triton"):
        state, res = model.allocate_state(2), []
        for p in range(14):
            state.pos.fill_(p)
            res.append(model.step(labels if p == 0 else tokens[:, p - 1], state.pos, state, backend=kernel).clone())
        outs[kernel] = torch.stack(res, 1)
    # Both within bf16 error of the fp32 truth. (Tighter kernel-vs-torch bounds are checked on the
    # GPU: Triton's CPU interpreter truncates fp32 -> bf16 where the GPU rounds to nearest.)
    assert_close("bf16 torch step vs fp32", outs["torch"], ref, 3e-2)
    assert_close("bf16 triton step vs fp32", outs["triton"], ref, 3e-2)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embed_step_kernel(kernel, dtype):
    """The step's input (class row at p = 0, token row after, ids clamped) and its row-start flag,
    against plain indexing and the mask rule, for a width given as a tensor or a constant."""
    from lasad_engine.ops.embed import embed_step
    from lasad_engine.ops.lasad import row_start_mask
    gen = torch.Generator().manual_seed(3)
    C, V, D = 7, 13, 40
    cls_t, tok_t = (torch.randn(n, D, generator=gen).to(dtype) for n in (C + 1, V))
    ids = torch.tensor([0, 3, 12, 7, -2, 99])
    for p in (0, 1, 5, 6, 8):
        for width in (torch.tensor([5]), 1, 3):
            pos = torch.tensor([p])
            x, start = embed_step(ids, pos, width, cls_t, tok_t, backend=kernel)
            table, top = (cls_t, C) if p == 0 else (tok_t, V - 1)
            assert torch.equal(x, table[ids.clamp(0, top)])
            assert start.dtype == torch.bool and bool(start) == bool(row_start_mask(pos, width))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", ["unit", "reset"])
def test_rows_at_their_own_positions_widths_and_slots(kernel, mode):
    """The serving step: rows of different images at different positions, with different grid
    widths, on scattered slots of a larger state pool, joining at different steps (each slot zeroed
    when its row joins). Every row's logits equal the parallel forward of its own sequence."""
    cfg = LasadConfig.from_preset("lasad-tiny", row_start=mode)
    model = randomize_(LasadGen(cfg), seed=6).eval()
    gen = torch.Generator().manual_seed(7)
    R, T, pool = 4, 12, 9
    tokens = torch.randint(0, cfg.vocab_size, (R, T), generator=gen)
    labels = torch.tensor([1, 2, cfg.null_class, 3])
    widths = torch.tensor([3, 5, 4, 3])
    joins = [0, 2, 5, 3]              # the step each row starts at
    slots = torch.tensor([7, 1, 4, 0])  # its state row in the pool
    with torch.no_grad():
        refs = [model(tokens[r:r + 1], labels[r:r + 1], width=int(widths[r]), backend="naive")[0] for r in range(R)]
    state = model.allocate_state(pool)
    state.ssm.normal_(generator=gen)  # what earlier images left behind: a joining row zeroes its slot
    logits = torch.empty(R, cfg.vocab_size)
    got = [[] for _ in range(R)]
    for t in range(max(joins) + T):
        live = [r for r in range(R) if joins[r] <= t < joins[r] + T]
        new = [r for r in live if t == joins[r]]
        if new:
            state.zero_rows(slots[new])
        pos = torch.tensor([t - joins[r] for r in live])
        ids = torch.tensor([int(labels[r]) if t == joins[r] else int(tokens[r, t - joins[r] - 1]) for r in live])
        out = model.step(ids, pos, state, backend=kernel, width=widths[live], slots=slots[live],
                         logits=logits[:len(live)])
        for i, r in enumerate(live):
            got[r].append(out[i].clone())
    for r in range(R):
        assert_close(f"row {r}", torch.stack(got[r]), refs[r], 1e-5)
