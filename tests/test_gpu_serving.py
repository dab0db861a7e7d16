"""The slot scheduler on a GPU (cuda backend, CUDA graphs per bucket, Triton sampler with Philox
noise): the same tokens as the torch backend; teacher forcing through graphed buckets that
change while other images run; byte-identical tokens under load with `reproducible`, and the
per-image sampler kernel against its torch definition."""

import threading

import pytest
import torch
from conftest import assert_close, randomize_

from lasad_engine import LasadConfig, LasadGen
from lasad_engine.engine import LasadEngine, SamplingParams
from lasad_engine.sampling import SamplerTable, philox_noise, sample_images

pytestmark = pytest.mark.gpu


def small(dtype=torch.float32, seed=0):
    cfg = LasadConfig.from_preset("lasad-tiny", vocab_size=4096, dim=128, n_head=2, n_layer=3)
    return randomize_(LasadGen(cfg), seed).to("cuda", dtype).eval()


def test_philox_noise_and_sampler_kernel_equal_their_torch_definition():
    gen = torch.Generator("cuda").manual_seed(0)
    B, V, R = 6, 5000, 10
    seeds = torch.randint(0, 2**62, (B,), generator=gen, device="cuda")
    rows = torch.randperm(R, device="cuda")
    pos = torch.randint(0, 300, (R,), generator=gen, device="cuda")
    minus = torch.tensor([-1], device="cuda")
    uncond = torch.stack([rows[B], minus[0], rows[B + 1], minus[0], rows[B + 2], minus[0]])  # guided: even images
    table = SamplerTable(cond_row=rows[:B], uncond_row=uncond, cfg_scale=torch.rand(B, generator=gen, device="cuda") * 4,
                         cfg_interval=torch.tensor([-1, 3, 500, -1, 0, -1], device="cuda"),
                         temperature=torch.tensor([1.0, 0.7, 0.0, 1.3, 1.0, 0.9], device="cuda"),
                         top_k=torch.tensor([0, 50, 0, 2000, 1, 7], device="cuda"),
                         top_p=torch.tensor([1.0, 0.9, 1.0, 0.5, 1.0, 1.0], device="cuda"),
                         seed=seeds, tok_off=torch.arange(B, device="cuda") * 1000, k_max=2000, use_p=True)
    logits = torch.randn(R, V, generator=gen, device="cuda") * 3
    ids = {b: torch.full((R,), -7, dtype=torch.int64, device="cuda") for b in ("torch", "triton")}
    toks = {b: torch.zeros(B * 1000, dtype=torch.int64, device="cuda") for b in ("torch", "triton")}
    for b in ("torch", "triton"):
        sample_images(logits, table, pos, ids=ids[b], tokens=toks[b], backend=b)
    assert torch.equal(ids["torch"], ids["triton"]) and torch.equal(toks["torch"], toks["triton"])
    # the noise itself: the same words on the GPU as the definition computes on the CPU
    n_cpu = philox_noise(seeds.cpu(), pos[:B].cpu(), V)
    assert_close("philox noise", philox_noise(seeds, pos[:B], V).cpu(), n_cpu, 1e-6)


def test_cuda_backend_gives_the_torch_backends_tokens():
    model = small()
    params = SamplingParams(cfg_scale=3.0, top_k=100, top_p=0.95)
    a = LasadEngine(model, backend="torch", max_batch=4).generate(
        [1, 2, 3], params=params, generator=torch.Generator().manual_seed(0))
    cuda = LasadEngine(model, backend="cuda", max_batch=4)
    b = cuda.generate([1, 2, 3], params=params, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    cuda.close()


def test_teacher_forcing_through_changing_graphed_buckets():
    """Teacher forcing while other requests join and leave (new buckets captured mid-flight)
    equals the parallel forward: no capture touches an image in flight."""
    model = small()
    engine = LasadEngine(model, backend="cuda", max_batch=8)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, model.config.vocab_size, (2, 35), generator=gen)
    stop = threading.Event()

    def noise():
        i = 0
        while not stop.is_set():
            engine.generate([i % 10] * (1 + i % 5), grid=(1 + i % 3, 5), params=SamplingParams(cfg_scale=2.0),
                            generator=torch.Generator().manual_seed(i))
            i += 1

    t = threading.Thread(target=noise)
    t.start()
    try:
        got = engine.teacher_forced_logits(tokens, [4, 5], cfg_rows=True)
    finally:
        stop.set()
        t.join()
    with torch.no_grad():
        ref = model(tokens.cuda(), torch.tensor([4, 5], device="cuda"))
    assert_close("forced under load", got[:2], ref, 1e-5)
    engine.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reproducible_tokens_under_load_on_the_gpu(dtype):
    model = small(dtype)
    params = SamplingParams(cfg_scale=4.0, top_k=200)
    solo = LasadEngine(model, backend="cuda", max_batch=16, reproducible=True)
    want = [solo.generate([i], params=params, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    solo.close()
    engine = LasadEngine(model, backend="cuda", max_batch=16, reproducible=True)
    got = [None] * 6

    def call(i):
        got[i] = engine.generate([i], params=params, generator=torch.Generator().manual_seed(i))

    background = engine.submit(list(range(10)), grid=(6, 7), params=params, generator=torch.Generator().manual_seed(9))
    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.wait(background)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    engine.close()


def test_persistent_step_kernel_behind_the_scheduler():
    """The engine with the persistent step for 1-2 images (per op beyond): the torch backend's
    tokens in fp32, and teacher forcing equal to the parallel forward."""
    model = small()
    params = SamplingParams(cfg_scale=3.0, top_k=100)
    ref = LasadEngine(model, backend="torch", max_batch=4)
    eng = LasadEngine(model, backend="cuda", max_batch=4, step_kernel="persistent")
    for labels in ([3], [1, 2, 3]):
        want = ref.generate(labels, params=params, generator=torch.Generator().manual_seed(len(labels)))
        got = eng.generate(labels, params=params, generator=torch.Generator().manual_seed(len(labels)))
        assert torch.equal(got, want)
    assert eng.backend.persistent is not None
    tokens = torch.randint(0, model.config.vocab_size, (1, 35), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(tokens.cuda(), torch.tensor([4], device="cuda"))
    assert_close("persistent forced", eng.teacher_forced_logits(tokens, [4]), want, 1e-5)
    eng.close()
    ref.close()
