"""GPU checks (marked `gpu`; skipped without CUDA): the Triton step kernel and fla's chunk_gla
against the torch forms, and the whole model's decode on the GPU against its parallel forward."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, randomize_

from lasad_engine import LasadConfig, LasadGen
from lasad_engine.ops.lasad import (ROW_START_MODES, chunk_lasad, input_gate, lasad_step_,
                                    lasad_step_ref_, naive_recurrent_lasad)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mode", ROW_START_MODES)
@pytest.mark.parametrize("B,H", [(2, 12), (64, 20), (512, 24)])
def test_triton_step_on_cuda(mode, B, H):
    gen = torch.Generator(device="cuda").manual_seed(B + H)
    K = V = 64
    q, k, v = (torch.randn(B, H, K, device="cuda", generator=gen) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, H, K, device="cuda", generator=gen))
    S0 = torch.randn(B, H, K, V, device="cuda", generator=gen)
    for start in (torch.tensor([False], device="cuda"), torch.tensor([True], device="cuda")):
        s_tri, s_ref64 = S0.clone(), S0.double().clone()
        o_ref = lasad_step_ref_(q.double(), k.double(), v.double(), g.double(), s_ref64, start, mode)
        o_tri = lasad_step_(q, k, v, g, s_tri, start, mode)
        assert_close("o", o_tri, o_ref, 1e-5)
        assert_close("state", s_tri, s_ref64, 1e-5)


@pytest.mark.parametrize("mode", ROW_START_MODES)
@pytest.mark.parametrize("width", [16, 7])
def test_fla_chunk_matches_torch_chunk(mode, width):
    gen = torch.Generator(device="cuda").manual_seed(width)
    B, T, H, K, V = 2, 256, 4, 64, 64
    q = torch.randn(B, T, H, K, device="cuda", generator=gen)
    g = F.logsigmoid(2 * torch.randn(B, T, H, K, device="cuda", generator=gen))
    k, v = input_gate(g), torch.randn(B, T, H, V, device="cuda", generator=gen)
    S0 = torch.randn(B, H, K, V, device="cuda", generator=gen)
    ref_o, ref_S = naive_recurrent_lasad(q.double(), k.double(), v.double(), g.double(), width=width,
                                         row_start=mode, initial_state=S0.double(), output_final_state=True)
    kw = dict(width=width, row_start=mode, initial_state=S0, output_final_state=True)
    o_t, S_t = chunk_lasad(q, k, v, g, backend="torch", **kw)
    o_f, S_f = chunk_lasad(q, k, v, g, backend="fla", **kw)
    assert_close("torch chunk", o_t, ref_o, 1e-5)
    tol = 2e-3  # fla computes its intra-chunk products in tf32
    assert_close("fla o", o_f, ref_o, tol)
    assert_close("fla state", S_f, ref_S, tol)


@pytest.mark.parametrize("mode", ROW_START_MODES)
def test_model_decode_on_cuda_equals_parallel(mode):
    cfg = LasadConfig.from_preset("lasad-tiny", row_start=mode, head_k_dim=64, dim=128, grid_width=16)
    model = randomize_(LasadGen(cfg), seed=1).cuda().eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (3, 48), generator=gen).cuda()
    labels = torch.tensor([0, 3, cfg.null_class]).cuda()
    with torch.no_grad():
        ref = model.cpu().double()(tokens.cpu(), labels.cpu(), op="naive")
        model.cuda().float()
        state = model.allocate_state(3)
        outs = []
        for p in range(48):
            state.pos.fill_(p)
            outs.append(model.step(labels if p == 0 else tokens[:, p - 1], state.pos, state).clone())
        par = model(tokens, labels)
    assert_close("fla forward", par.cpu(), ref, 5e-3)
    assert_close("triton decode", torch.stack(outs, 1).cpu(), ref, 1e-5)
