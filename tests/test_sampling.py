"""Tests for lasad_engine.sampling.

The reference below is independent of the implementation. It works in float64 with per-row
Python loops, builds the kept set explicitly, renormalises the probabilities over that set, and
then takes argmax(p / noise).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from lasad_engine.sampling import cfg_duplicate, draw_noise, sample


# ----------------------------------------------------------------------------------------------
# float64 reference
# ----------------------------------------------------------------------------------------------
def _ref_guided(logits, *, cfg, cfg_scale, cfg_active=True):
    """float64 list of rows: the guided logits (or the conditional / plain logits)."""
    rows = logits.double().tolist()
    if not cfg:
        return rows
    b = len(rows) // 2
    out = []
    for i in range(b):
        c, u = rows[i], rows[b + i]
        if cfg_active:
            out.append([uj + cfg_scale * (cj - uj) for cj, uj in zip(c, u)])
        else:
            out.append(list(c))
    return out


def _ref_kept_probs(row, *, temperature, top_k, top_p):
    """Return (kept index set, dict index -> renormalised probability) for one float64 row."""
    v = len(row)
    t = max(temperature, 1e-5)
    x = [r / t for r in row]
    kept = set(range(v))
    if 0 < top_k < v:
        kth = sorted(x, reverse=True)[top_k - 1]
        kept = {i for i in range(v) if x[i] >= kth}
    m = max(x[i] for i in kept)
    z = sum(math.exp(x[i] - m) for i in kept)
    probs = {i: math.exp(x[i] - m) / z for i in kept}
    if top_p < 1.0:
        order = sorted(kept, key=lambda i: -probs[i])
        chosen, acc = [], 0.0
        for i in order:
            chosen.append(i)
            acc += probs[i]
            if acc >= top_p:
                break
        last = probs[chosen[-1]]
        kept = set(chosen) | {i for i in kept if probs[i] == last}
        z = sum(probs[i] for i in kept)
        probs = {i: probs[i] / z for i in kept}
    return kept, probs


def _ref_sample(logits, noise, *, cfg, cfg_scale, temperature, top_k, top_p, cfg_active=True):
    guided = _ref_guided(logits, cfg=cfg, cfg_scale=cfg_scale, cfg_active=cfg_active)
    noise = noise.double().tolist()
    ids = []
    for row, nrow in zip(guided, noise):
        if temperature == 0:
            ids.append(max(range(len(row)), key=lambda i: row[i]))
            continue
        _, probs = _ref_kept_probs(row, temperature=temperature, top_k=top_k, top_p=top_p)
        ids.append(max(probs, key=lambda i: probs[i] / nrow[i]))
    return ids


def _exp_noise(gen, b, v):
    return draw_noise(gen, 1, b, v, device="cpu")[0]


# ----------------------------------------------------------------------------------------------
# 1. CFG mixing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 1.5, 4.0, torch.tensor(2.75)])
def test_cfg_greedy_matches_direct_float64(scale):
    g = torch.Generator().manual_seed(1)
    b, v = 16, 97
    logits = torch.randn(2 * b, v, generator=g) * 3
    noise = _exp_noise(g, b, v)
    s = float(scale)
    c, u = logits[:b].double(), logits[b:].double()
    expected = (u + s * (c - u)).argmax(-1)
    got = sample(logits, noise, cfg=True, cfg_scale=scale, temperature=0.0, top_k=0, top_p=1.0)
    assert got.dtype == torch.int64 and got.shape == (b,)
    assert torch.equal(got, expected)
    # guidance really changes the answer for some rows (otherwise the test proves nothing)
    if s != 1.0:
        assert not torch.equal(expected, c.argmax(-1))


@pytest.mark.parametrize("inactive", [torch.tensor(False), torch.tensor(0.0)])
def test_cfg_active_false_uses_conditional_logits(inactive):
    g = torch.Generator().manual_seed(2)
    b, v = 16, 50
    logits = torch.randn(2 * b, v, generator=g) * 3
    noise = _exp_noise(g, b, v)
    c = logits[:b]
    got = sample(logits, noise, cfg=True, cfg_scale=4.0, temperature=0.0, cfg_active=inactive)
    assert torch.equal(got, c.double().argmax(-1))
    guided = sample(logits, noise, cfg=True, cfg_scale=4.0, temperature=0.0)
    assert not torch.equal(guided, got)
    # active=True gives the guided result
    on = sample(logits, noise, cfg=True, cfg_scale=4.0, temperature=0.0,
                cfg_active=torch.tensor(True))
    assert torch.equal(on, guided)
    # with sampling: cfg off for the step == sampling on c alone (exactly, same noise)
    kw = dict(temperature=1.0, top_k=10, top_p=0.9)
    a = sample(logits, noise, cfg=True, cfg_scale=4.0, cfg_active=inactive, **kw)
    ref = sample(c.clone(), noise, cfg=False, **kw)
    assert torch.equal(a, ref)


def test_no_cfg_uses_logits_as_is():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 40, generator=g)
    noise = _exp_noise(g, 8, 40)
    assert torch.equal(sample(logits, noise, cfg=False, temperature=0.0), logits.argmax(-1))


# ----------------------------------------------------------------------------------------------
# 2. degenerate settings collapse to greedy; top_k >= V is off
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [False, True])
def test_degenerate_settings_equal_greedy(cfg):
    g = torch.Generator().manual_seed(4)
    b, v = 64, 128
    rows = 2 * b if cfg else b
    logits = torch.randn(rows, v, generator=g) * 2
    kw = dict(cfg=cfg, cfg_scale=3.0)
    greedy = sample(logits, _exp_noise(g, b, v), temperature=0.0, **kw)
    for _ in range(5):  # regardless of the noise
        noise = _exp_noise(g, b, v)
        assert torch.equal(sample(logits, noise, temperature=1.0, top_k=1, **kw), greedy)
        assert torch.equal(sample(logits, noise, temperature=1.0, top_p=1e-9, **kw), greedy)
        assert torch.equal(sample(logits, noise, temperature=1.0, top_p=0.0, **kw), greedy)
        assert torch.equal(sample(logits, noise, temperature=1e-6, **kw), greedy)
        # sanity: ordinary sampling does differ from greedy on this noise
        assert not torch.equal(sample(logits, noise, temperature=1.0, **kw), greedy)


def test_temperature_zero_is_exact_argmax_even_for_near_ties():
    # T == 0 is greedy, not "T = 1e-5": a 1e-6 logit gap would be a near coin flip at 1e-5.
    b = 64
    logits = torch.tensor([[1.0, 1.0 - 1e-6, -3.0]]).expand(b, 3).contiguous()
    noise = torch.ones(b, 3)
    noise[:, 0] = 50.0  # noise strongly favouring token 1 in a sampled race
    assert sample(logits, noise, cfg=False, temperature=0.0).tolist() == [0] * b
    assert sample(logits, noise, cfg=False, temperature=1e-5).tolist() == [1] * b
    # exact ties: the lowest index, like torch.argmax
    tied = torch.tensor([[0.5, 2.0, 2.0]])
    assert sample(tied, torch.ones(1, 3), cfg=False, temperature=0.0).tolist() == [1]


def test_top_k_at_or_above_vocab_is_off():
    g = torch.Generator().manual_seed(5)
    b, v = 256, 20
    logits = torch.randn(b, v, generator=g)
    noise = _exp_noise(g, b, v)
    off = sample(logits, noise, cfg=False, temperature=1.0, top_k=0, top_p=0.8)
    for k in (v, v + 1, 10 * v):
        assert torch.equal(sample(logits, noise, cfg=False, temperature=1.0, top_k=k, top_p=0.8), off)
    # and a k < V really does restrict
    assert not torch.equal(sample(logits, noise, cfg=False, temperature=1.0, top_k=v - 15), off)


# ----------------------------------------------------------------------------------------------
# 3. the exponential race is a correct sampler
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (2.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.7), (1.5, 4, 0.8)],
)
def test_exponential_race_frequencies(temperature, top_k, top_p):
    n = 20000
    base = torch.tensor([1.2, 0.3, -0.5, 0.9, -1.5, 0.0])
    v = base.numel()
    g = torch.Generator().manual_seed(6)
    logits = base.expand(n, v).contiguous()
    noise = _exp_noise(g, n, v)
    ids = sample(logits, noise, cfg=False, temperature=temperature, top_k=top_k, top_p=top_p)
    freq = torch.bincount(ids, minlength=v).double() / n
    _, probs = _ref_kept_probs(base.double().tolist(), temperature=temperature, top_k=top_k,
                               top_p=top_p)
    expected = torch.tensor([probs.get(i, 0.0) for i in range(v)], dtype=torch.float64)
    assert (freq - expected).abs().max() < 0.02, (freq, expected)
    # removed tokens are never drawn
    for i in range(v):
        if expected[i] == 0:
            assert freq[i] == 0


# ----------------------------------------------------------------------------------------------
# 4. kept set and chosen ids vs the float64 reference
# ----------------------------------------------------------------------------------------------
_TEMPS = (0.5, 1.0, 2.0)
_PS = (1.0, 0.9, 0.5)


def _kept_set_by_adversarial_noise(row, *, temperature, top_k, top_p):
    """Row j of the batch has noise 1e-30 on token j and 1 elsewhere, so token j wins iff it is
    allowed at all: the kept set is {j : chosen[j] == j}."""
    v = row.numel()
    logits = row.expand(v, v).contiguous()
    noise = torch.ones(v, v)
    noise.fill_diagonal_(1e-30)
    ids = sample(logits, noise, cfg=False, temperature=temperature, top_k=top_k, top_p=top_p)
    return {j for j in range(v) if ids[j].item() == j}


def test_kept_set_matches_reference_adversarial_noise():
    g = torch.Generator().manual_seed(7)
    v = 24
    for trial, (t, k, p) in enumerate(itertools.product(_TEMPS, (0, 1, 5, v), _PS)):
        for _ in range(3):
            row = torch.randn(v, generator=g) * 2
            ref_kept, _ = _ref_kept_probs(row.double().tolist(), temperature=t, top_k=k, top_p=p)
            got = _kept_set_by_adversarial_noise(row, temperature=t, top_k=k, top_p=p)
            assert got == ref_kept, (t, k, p, sorted(got), sorted(ref_kept))
            if k == 0 and p == 1.0:
                assert got == set(range(v))


@pytest.mark.parametrize("cfg", [False, True])
def test_ids_match_reference_random(cfg):
    g = torch.Generator().manual_seed(8)
    b, v = 32, 40
    n_cases = 0
    for t, k, p in itertools.product(_TEMPS, (0, 1, 5, v), _PS):
        rows = 2 * b if cfg else b
        logits = torch.randn(rows, v, generator=g) * 2.5
        noise = _exp_noise(g, b, v)
        scale = 2.5
        got = sample(logits, noise, cfg=cfg, cfg_scale=scale, temperature=t, top_k=k, top_p=p)
        ref = _ref_sample(logits, noise, cfg=cfg, cfg_scale=scale, temperature=t, top_k=k, top_p=p)
        assert got.tolist() == ref, (t, k, p)
        n_cases += 1
    assert n_cases == 36


def test_ids_match_reference_with_cfg_inactive():
    g = torch.Generator().manual_seed(9)
    b, v = 32, 40
    logits = torch.randn(2 * b, v, generator=g) * 2.5
    noise = _exp_noise(g, b, v)
    kw = dict(cfg=True, cfg_scale=3.0, temperature=1.0, top_k=5, top_p=0.9)
    got = sample(logits, noise, cfg_active=torch.tensor(False), **kw)
    assert got.tolist() == _ref_sample(logits, noise, cfg_active=False, **kw)
    got = sample(logits, noise, cfg_active=torch.tensor(True), **kw)
    assert got.tolist() == _ref_sample(logits, noise, cfg_active=True, **kw)


# ----------------------------------------------------------------------------------------------
# 5. noise: seeding and in-place drawing
# ----------------------------------------------------------------------------------------------
def test_same_seed_same_noise_same_ids():
    s, b, v = 3, 8, 64
    n1 = draw_noise(torch.Generator().manual_seed(123), s, b, v, device="cpu")
    n2 = draw_noise(torch.Generator().manual_seed(123), s, b, v, device="cpu")
    n3 = draw_noise(torch.Generator().manual_seed(124), s, b, v, device="cpu")
    assert n1.shape == (s, b, v) and n1.dtype == torch.float32
    assert torch.equal(n1, n2)
    assert not torch.equal(n1, n3)
    assert bool((n1 > 0).all()) and abs(n1.mean().item() - 1.0) < 0.05  # Exp(1)
    logits = torch.randn(2 * b, v, generator=torch.Generator().manual_seed(0))
    kw = dict(cfg=True, cfg_scale=2.0, temperature=1.0, top_k=20, top_p=0.95)
    ids1 = [sample(logits, n1[t], **kw) for t in range(s)]
    ids2 = [sample(logits, n2[t], **kw) for t in range(s)]
    ids3 = [sample(logits, n3[t], **kw) for t in range(s)]
    assert all(torch.equal(a, c) for a, c in zip(ids1, ids2))
    assert not all(torch.equal(a, c) for a, c in zip(ids1, ids3))
    # generator=None uses torch's default CPU generator
    torch.manual_seed(77)
    d1 = draw_noise(None, s, b, v, device="cpu")
    torch.manual_seed(77)
    d2 = draw_noise(None, s, b, v, device="cpu")
    assert torch.equal(d1, d2)


def _allocated_bytes(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    return sum(max(e.cpu_memory_usage, 0) for e in prof.events()), result


def test_draw_noise_out_in_place_no_allocation():
    s, b, v = 4, 8, 1000
    buf = torch.full((s, b, v), -1.0)
    ptr = buf.data_ptr()
    nbytes, res = _allocated_bytes(
        lambda: draw_noise(torch.Generator().manual_seed(5), s, b, v, device="cpu", out=buf)
    )
    assert res is buf and buf.data_ptr() == ptr
    assert nbytes == 0
    assert bool((buf > 0).all())
    assert torch.equal(buf, draw_noise(torch.Generator().manual_seed(5), s, b, v, device="cpu"))
    # the probe does see allocations: without out a fresh tensor is allocated
    nbytes_alloc, _ = _allocated_bytes(
        lambda: draw_noise(torch.Generator().manual_seed(5), s, b, v, device="cpu")
    )
    assert nbytes_alloc >= s * b * v * 4
    with pytest.raises(ValueError):
        draw_noise(None, s, b, v + 1, device="cpu", out=buf)


# ----------------------------------------------------------------------------------------------
# 6. ties
# ----------------------------------------------------------------------------------------------
def test_top_k_keeps_all_ties():
    # k = 2, but three tokens share the largest value: all three stay (documented behaviour).
    row = torch.tensor([3.0, 1.0, 3.0, 3.0, 0.0, 2.5, -1.0])
    assert _kept_set_by_adversarial_noise(row, temperature=1.0, top_k=2, top_p=1.0) == {0, 2, 3}
    # tie at the k-th value (k = 3: values 5, 4, then 2 tied twice)
    row = torch.tensor([5.0, 2.0, 4.0, 2.0, 1.0])
    assert _kept_set_by_adversarial_noise(row, temperature=1.0, top_k=3, top_p=1.0) == {0, 1, 2, 3}


def test_top_p_keeps_ties_at_boundary():
    # probabilities ~ [0.4, 0.2, 0.2, 0.2]: p = 0.5 reaches the mass with one of the 0.2 tokens,
    # and every token tied with that last kept one is kept too, whatever order the sort chose.
    row = torch.tensor([math.log(0.4), math.log(0.2), math.log(0.2), math.log(0.2)])
    row = torch.cat([row, torch.tensor([-30.0])])
    assert _kept_set_by_adversarial_noise(row, temperature=1.0, top_k=0, top_p=0.5) == {0, 1, 2, 3}
    assert _kept_set_by_adversarial_noise(row, temperature=1.0, top_k=0, top_p=0.3) == {0}


# ----------------------------------------------------------------------------------------------
# out buffer, graph-friendliness
# ----------------------------------------------------------------------------------------------
def test_out_buffer_filled_in_place_for_both_cfg_halves():
    g = torch.Generator().manual_seed(10)
    b, v = 6, 30
    logits = torch.randn(2 * b, v, generator=g)
    noise = _exp_noise(g, b, v)
    kw = dict(cfg=True, cfg_scale=2.0, temperature=1.0, top_k=8)
    expected = sample(logits, noise, **kw)
    for shape in ((2 * b,), (2 * b, 1)):
        out = torch.full(shape, -1, dtype=torch.int64)
        ret = sample(logits, noise, out=out, **kw)
        flat = out.view(-1)
        assert torch.equal(flat[:b], expected) and torch.equal(flat[b:], expected)
        assert torch.equal(ret, expected) and ret.data_ptr() == out.data_ptr()
    out = torch.full((b,), -1, dtype=torch.int64)
    sample(logits[:b], noise, cfg=False, temperature=0.0, out=out)
    assert torch.equal(out, logits[:b].argmax(-1))
    assert torch.equal(cfg_duplicate(expected), torch.cat([expected, expected]))


# aten ops that sync with the host or produce data-dependent shapes
_FORBIDDEN = {"_local_scalar_dense", "nonzero", "masked_select", "item", "unique", "_unique",
              "_unique2", "unique_consecutive", "unique_dim", "masked_scatter", "equal", "is_nonzero"}


def _aten_name(op) -> str:
    """'aten.sort.default' -> 'sort' (non-aten targets such as operator.getitem -> their str)."""
    s = str(op)
    return s.split(".")[1] if s.startswith("aten.") else s


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(func)
        if func.overloadpacket in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_):
            idx = args[1]
            assert not any(t is not None and t.dtype == torch.bool for t in idx), func
        return func(*args, **kwargs)


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 0.9), (1.0, 100, 0.5)]
)
def test_no_host_sync_or_data_dependent_ops(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(11)
    b, v = 4, 64
    logits = torch.randn(2 * b, v, generator=g)
    noise = _exp_noise(g, b, v)
    out = torch.empty(2 * b, dtype=torch.int64)
    with _OpRecorder() as rec:
        sample(logits, noise, cfg=True, cfg_scale=torch.tensor(2.0), temperature=temperature,
               top_k=top_k, top_p=top_p, cfg_active=torch.tensor(True), out=out)
    names = [str(op) for op in rec.ops]
    assert names, "recorder saw no ops"
    bad = [n for n in names if _aten_name(n) in _FORBIDDEN]
    assert not bad, bad


def test_torch_export_static_graph():
    class Step(torch.nn.Module):
        def forward(self, logits, noise, scale, active):
            return sample(logits, noise, cfg=True, cfg_scale=scale, temperature=1.0, top_k=5,
                          top_p=0.9, cfg_active=active)

    g = torch.Generator().manual_seed(12)
    b, v = 4, 64
    args = (torch.randn(2 * b, v, generator=g), _exp_noise(g, b, v), torch.tensor(3.0),
            torch.tensor(True))
    ep = torch.export.export(Step(), args)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if _aten_name(t) in _FORBIDDEN], targets
    # every intermediate shape is static (no unbacked symbols from data-dependent ops)
    for n in ep.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert all(isinstance(d, int) for d in val.shape), (n, val.shape)
    for active in (torch.tensor(True), torch.tensor(False)):
        a = (args[0], args[1], args[2], active)
        assert torch.equal(ep.module()(*a), Step()(*a))


def test_rejects_tensor_hyperparameters():
    logits, noise = torch.randn(2, 5), torch.ones(2, 5)
    with pytest.raises(TypeError):
        sample(logits, noise, cfg=False, temperature=torch.tensor(1.0))
    with pytest.raises(ValueError):
        sample(logits, noise, cfg=False, temperature=-1.0)
    with pytest.raises(ValueError):
        sample(logits, noise, cfg=False, top_p=1.5)
