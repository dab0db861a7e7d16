"""The engine: teacher forcing == parallel forward, CFG and sampling against direct computation,
determinism, fixed buffers, any grid; and the pipeline API."""

import pytest
import torch
from conftest import assert_close, randomize_

from lasad_engine import LasadConfig, LasadGen, save_checkpoint
from lasad_engine.engine import EngineError, LasadEngine, SamplingParams, parse_grid
from lasad_engine.pipeline import LasadPipeline
from lasad_engine.tokenizer import VQ_PRESETS, VQModel, save_tokenizer


def tiny(mode="unit", seed=0, **kw):
    cfg = LasadConfig.from_preset("lasad-tiny", row_start=mode, **kw)
    return randomize_(LasadGen(cfg), seed).eval()


@pytest.mark.parametrize("mode", ["unit", "reset", "none"])
@pytest.mark.parametrize("cfg_rows", [False, True])
def test_teacher_forced_engine_equals_parallel(mode, cfg_rows):
    model = tiny(mode)
    engine = LasadEngine(model, max_batch=3)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (3, 35), generator=gen)
    labels = torch.tensor([0, 5, 9])
    got = engine.teacher_forced_logits(tokens, labels, cfg_rows=cfg_rows)
    with torch.no_grad():
        ref = model(tokens, labels)
        assert_close("engine vs parallel", got[:3], ref, 1e-5)
        if cfg_rows:
            null = torch.full_like(labels, model.config.null_class)
            assert_close("null rows", got[3:], model(tokens, null), 1e-5)


def greedy_reference(model, labels, h, w, scale, interval=-1):
    """Greedy CFG generation by repeated parallel forwards, guidance mixed by hand in float64."""
    n = len(labels)
    labels = torch.tensor(labels)
    null = torch.full_like(labels, model.config.null_class)
    tokens = torch.zeros(n, 0, dtype=torch.int64)
    with torch.no_grad():
        for p in range(h * w):
            inp = torch.cat([tokens, torch.zeros(n, 1, dtype=torch.int64)], 1)
            c = model(inp, labels, width=w)[:, p].double()
            u = model(inp, null, width=w)[:, p].double()
            mixed = u + scale * (c - u) if (interval < 0 or p <= interval) else c
            tokens = torch.cat([tokens, mixed.argmax(-1, keepdim=True)], 1)
    return tokens.view(n, h, w)


@pytest.mark.parametrize("scale,interval", [(1.0, -1), (4.0, -1), (2.5, 6)])
def test_greedy_cfg_generation_matches_direct_computation(scale, interval):
    model = tiny()
    engine = LasadEngine(model, max_batch=4)
    params = SamplingParams(cfg_scale=scale, cfg_interval=interval, temperature=0.0)
    got = engine.generate([1, 7, 3], grid=(3, 5), params=params)
    assert torch.equal(got, greedy_reference(model, [1, 7, 3], 3, 5, scale, interval))


def test_greedy_does_not_depend_on_max_batch():
    model = tiny()
    params = SamplingParams(temperature=0.0)
    a = LasadEngine(model, max_batch=2).generate([1, 2, 3, 4, 5], params=params)
    b = LasadEngine(model, max_batch=8).generate([1, 2, 3, 4, 5], params=params)
    assert a.shape == (5, 5, 7) and torch.equal(a, b)


@pytest.mark.parametrize("extreme", [dict(top_k=1), dict(top_p=1e-9), dict(temperature=1e-7)])
def test_sampling_extremes_are_greedy(extreme):
    model = tiny()
    engine = LasadEngine(model, max_batch=2)
    greedy = engine.generate([4, 8], params=SamplingParams(cfg_scale=3.0, temperature=0.0))
    got = engine.generate([4, 8], params=SamplingParams(cfg_scale=3.0, **extreme),
                          generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, greedy)


def test_same_seed_same_tokens_and_seeds_differ():
    model = tiny()
    engine = LasadEngine(model, max_batch=4)
    params = SamplingParams(cfg_scale=2.0, top_k=20, top_p=0.9)
    run = lambda seed: engine.generate([1, 2, 3], params=params, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < model.config.vocab_size


def test_sampling_follows_the_logits():
    """Zero logits (LlamaGen's zero head) sample uniformly; a dominant logit is always taken."""
    model = tiny()
    with torch.no_grad():
        model.output.weight.zero_()
    engine = LasadEngine(model, max_batch=2)
    gen = torch.Generator().manual_seed(0)
    tokens = engine.generate([0, 1], params=SamplingParams(cfg_scale=1.0), generator=gen)
    assert tokens.unique().numel() > 35  # 70 uniform draws from 97 tokens
    with torch.no_grad():
        model.output.weight[5] = 50 * model.norm(torch.ones(model.config.dim)).sign()
        model.norm.weight.fill_(1.0)
    tokens = engine.generate([0, 1], params=SamplingParams(cfg_scale=1.0), generator=gen)
    with torch.no_grad():
        logits = model(tokens.flatten(1), torch.tensor([0, 1]))
    assert (tokens.flatten(1) == logits.argmax(-1)).float().mean() > 0.9


def test_buffers_are_allocated_once():
    model = tiny()
    engine = LasadEngine(model, max_batch=4)
    b = engine.buffers
    t = b.tables
    ptrs = lambda: [x.data_ptr() for x in (b.state.ssm, t.ids, t.row_int, t.logits, t.img_int, t.img_f32, t.tokens)]
    before = ptrs()
    params = SamplingParams(cfg_scale=2.0)
    first = engine.generate([1, 2], params=params, generator=torch.Generator().manual_seed(0))
    for i in range(6):
        engine.generate([i, 1, 2][: 1 + i % 3], params=params, generator=torch.Generator().manual_seed(i))
    again = engine.generate([1, 2], params=params, generator=torch.Generator().manual_seed(0))
    assert ptrs() == before
    assert torch.equal(first, again)  # a slot is zeroed completely when an image joins
    assert engine.state_nbytes == model.config.state_nbytes(2 * 4)


class _ReplayByCalling:
    """CudaGraphRunner's interface on the CPU: prepare records the function (after warming it up
    and resetting, as the real runner does), replay calls it."""

    def __init__(self):
        self.graphs, self.prepared = {}, []

    def prepare(self, key, fn, reset):
        if key not in self.graphs:
            reset()
            fn()
            reset()
            self.graphs[key] = fn
            self.prepared.append(key)

    def replay(self, key):
        self.graphs[key]()

    def close(self):
        self.graphs.clear()


@pytest.mark.parametrize("capturable", [True, False])
def test_graphed_step_parts_give_the_plain_loops_tokens(capturable, monkeypatch):
    """With graphs, a capturable backend's whole step is the graph; a backend that runs its own
    part (onnxruntime) runs eagerly each step and only the sampler and bookkeeping are the graph,
    never the model step. Either way the tokens and teacher-forced logits are the plain loop's,
    and capturing a new bucket while other images run leaves them untouched."""
    model = tiny()
    plain = LasadEngine(model, max_batch=2)
    params = SamplingParams(cfg_scale=2.0, top_k=20)
    want = plain.generate([1, 2], params=params, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=gen)
    want_logits = plain.teacher_forced_logits(tokens, [3, 4], cfg_rows=True)

    engine = LasadEngine(model, max_batch=2)
    sched = engine.scheduler
    sched.graphs = _ReplayByCalling()
    sched.sampler_backend = "triton"  # the graphed sampler (Triton's interpreter on the CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(engine.backend, "capturable", capturable)
    calls = {"decode": 0, "in_graph": 0}
    decode = engine.backend.decode
    graphing = False  # True while a replay runs

    def counting(*args):
        calls["decode"] += 1
        calls["in_graph"] += graphing
        return decode(*args)
    monkeypatch.setattr(engine.backend, "decode", counting)
    real_replay = sched.graphs.replay

    def replay(key):
        nonlocal graphing
        graphing = True
        real_replay(key)
        graphing = False
    sched.graphs.replay = replay
    got = engine.generate([1, 2], params=params, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, want) and len(sched.graphs.prepared) == 1
    steps = want[0].numel()
    assert calls["decode"] >= steps and calls["in_graph"] == (steps if capturable else 0)
    assert_close("graphed teacher forcing", engine.teacher_forced_logits(tokens, [3, 4], cfg_rows=True),
                 want_logits, 1e-6)


def test_any_grid_with_the_same_buffers():
    model = tiny()
    engine = LasadEngine(model, max_batch=2)
    state_ptr = engine.buffers.state.ssm.data_ptr()
    params = SamplingParams(temperature=0.0, cfg_scale=2.0)
    small = engine.generate([3], grid="2x4", params=params)
    assert small.shape == (1, 2, 4)
    assert torch.equal(small, greedy_reference(model, [3], 2, 4, 2.0))
    big = engine.generate([3], grid=(9, 11), params=params)  # more tokens than the trained grid
    assert big.shape == (1, 9, 11) and engine.buffers.state.ssm.data_ptr() == state_ptr


def test_callback_sees_every_step():
    engine = LasadEngine(tiny(), max_batch=1)
    seen = []
    engine.generate([2], params=SamplingParams(temperature=0.0),
                    callback=lambda step, toks: seen.append((step, toks[0, step].item())))
    final = engine.generate([2], params=SamplingParams(temperature=0.0))
    assert [s for s, _ in seen] == list(range(35))
    assert [t for _, t in seen] == final.flatten().tolist()


def test_engine_errors():
    model = tiny()
    with pytest.raises(EngineError, match="backend='jax' is not one of torch, cuda, onnxruntime, tensorrt"):
        LasadEngine(model, backend="jax")
    with pytest.raises(EngineError, match="needs a CUDA device"):
        LasadEngine(model, backend="cuda", device="cpu")
    with pytest.raises(EngineError, match="onnxruntime"):
        LasadEngine(model, backend="onnxruntime")
    engine = LasadEngine(model)
    with pytest.raises(EngineError, match="class 11 is out of range: this model has classes 0..9"):
        engine.generate([11])
    with pytest.raises(EngineError, match="top_p=0"):
        SamplingParams(top_p=0)
    with pytest.raises(EngineError, match="temperature=-1"):
        SamplingParams(temperature=-1)
    for bad in ("32", "axb", "0x4"):
        with pytest.raises(EngineError, match="grid"):
            parse_grid(bad, (16, 16))
    assert parse_grid("32X24", (16, 16)) == (32, 24) and parse_grid(None, (5, 7)) == (5, 7)


@pytest.fixture
def checkpoint(tmp_path):
    cfg = LasadConfig.from_preset("lasad-tiny", vocab_size=64, grid_height=4, grid_width=4,
                                  class_names=[f"class {i}" for i in range(9)] + ["golden retriever"])
    save_checkpoint(tmp_path / "m.pt", randomize_(LasadGen(cfg), 2), meta={"tokenizer": "vq.safetensors"})
    save_tokenizer(tmp_path / "vq.safetensors", VQModel(VQ_PRESETS["vq-tiny"]))
    return tmp_path / "m.pt"


def test_pipeline_outputs_and_lifetime(checkpoint):
    with LasadPipeline.from_checkpoint(checkpoint, max_batch=2) as pipe:
        assert pipe.max_batch == 2 and pipe.state_nbytes == pipe.model.config.state_nbytes(4)
        kw = dict(generator=torch.Generator().manual_seed(0), temperature=0.0)
        pil = pipe(["golden retriever", 3], **kw)
        assert [im.size for im in pil.images] == [(8, 8), (8, 8)]
        arr = pipe([9, 3], output_type="np", **kw).images
        assert arr.shape == (2, 8, 8, 3) and arr.dtype.name == "uint8"
        pt = pipe([9, 3], output_type="pt", **kw)
        assert pt.images.shape == (2, 3, 8, 8) and 0 <= pt.images.min() and pt.images.max() <= 1
        assert torch.equal(pt.tokens, pil.tokens)
        import numpy as np
        assert np.array_equal(np.asarray(pil.images[0]), arr[0])
        toks = pipe(9, output_type="tokens", **kw).images
        assert toks.shape == (1, 4, 4)
        with pytest.raises(EngineError, match="output_type='gif'"):
            pipe([1], output_type="gif")
        with pytest.raises(EngineError, match="unknown class 'golden retreiver'; did you mean 'golden retriever'"):
            pipe(["golden retreiver"])
    with pytest.raises(EngineError, match="closed"):
        pipe([1])


def test_pipeline_missing_tokenizer(checkpoint):
    (checkpoint.parent / "vq.safetensors").unlink()
    from lasad_engine import CheckpointError
    with pytest.raises(CheckpointError, match="tokenizer file not found"):
        LasadPipeline.from_checkpoint(checkpoint)
