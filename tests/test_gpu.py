"""GPU checks (marked `gpu`; skipped without CUDA): the Triton step kernel and fla's chunk_gla
against the torch forms, and the whole model's decode on the GPU against its parallel forward."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, needs_fla, randomize_

from lasad_engine import LasadConfig, LasadGen
from lasad_engine.ops.lasad import ROW_START_MODES, chunk_lasad, lasad_step_, naive_recurrent_lasad
from lasad_engine.ops.lasad.gates import input_gate
from lasad_engine.ops.lasad.step import lasad_step_ref_

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


@needs_fla
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


@needs_fla
@pytest.mark.parametrize("mode", ROW_START_MODES)
def test_model_decode_on_cuda_equals_parallel(mode):
    cfg = LasadConfig.from_preset("lasad-tiny", row_start=mode, head_k_dim=64, dim=128, grid_width=16)
    model = randomize_(LasadGen(cfg), seed=1).cuda().eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (3, 48), generator=gen).cuda()
    labels = torch.tensor([0, 3, cfg.null_class]).cuda()
    with torch.no_grad():
        ref = model.cpu().double()(tokens.cpu(), labels.cpu(), backend="naive")
        model.cuda().float()
        state = model.allocate_state(3)
        outs = []
        for p in range(48):
            state.pos.fill_(p)
            outs.append(model.step(labels if p == 0 else tokens[:, p - 1], state.pos, state).clone())
        par = model(tokens, labels)
    assert_close("fla forward", par.cpu(), ref, 5e-3)
    assert_close("triton decode", torch.stack(outs, 1).cpu(), ref, 1e-5)


def _engine_model(dtype):
    from lasad_engine import LasadConfig, LasadGen
    cfg = LasadConfig.from_preset("lasad-tiny", dim=256, n_head=4, head_k_dim=64, vocab_size=512,
                                  grid_height=16, grid_width=16)
    return randomize_(LasadGen(cfg), seed=3, std=0.05).cuda().to(dtype).eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cuda_backend_equals_torch_backend(dtype, tol):
    """Teacher-forced logits of the cuda backend (fused kernels, CUDA graph) == the torch backend,
    and the same seed gives the same tokens, greedy and sampled."""
    from lasad_engine.engine import LasadEngine, SamplingParams
    model = _engine_model(dtype)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (2, 256), generator=gen).cuda()
    ref = LasadEngine(model, backend="torch", max_batch=2).teacher_forced_logits(tokens, [1, 5], cfg_rows=True)
    cuda = LasadEngine(model, backend="cuda", max_batch=2)
    assert_close("cuda vs torch", cuda.teacher_forced_logits(tokens, [1, 5], cfg_rows=True), ref, tol)
    if dtype == torch.float32:
        for params in (SamplingParams(temperature=0.0), SamplingParams(cfg_scale=3.0, top_k=50, top_p=0.95)):
            a = LasadEngine(model, backend="torch", max_batch=2).generate(
                [1, 5], params=params, generator=torch.Generator("cuda").manual_seed(1))
            b = cuda.generate([1, 5], params=params, generator=torch.Generator("cuda").manual_seed(1))
            assert torch.equal(a, b)


def test_cuda_graph_allocates_nothing_per_step():
    from lasad_engine.engine import LasadEngine, SamplingParams
    model = _engine_model(torch.bfloat16)
    engine = LasadEngine(model, backend="cuda", max_batch=2)
    params = SamplingParams(cfg_scale=2.0, top_k=100)
    for grid in ((16, 16), (32, 32)):
        engine.generate([1, 2], grid=grid, params=params, generator=torch.Generator("cuda").manual_seed(0))
        seen = []
        for seed in range(2):
            engine.generate([1, 2], grid=grid, params=params, generator=torch.Generator("cuda").manual_seed(seed),
                            callback=lambda p, t: seen.append(torch.cuda.memory_allocated()))
        assert min(seen) == max(seen), f"{grid}: memory moved by {max(seen) - min(seen)} bytes"
