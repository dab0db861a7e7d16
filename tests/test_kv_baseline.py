"""The KV-cache baseline decodes what its own parallel causal forward computes, inside LasadEngine."""

import torch
from conftest import assert_close, randomize_

from lasad_engine import LasadConfig, LasadGen
from lasad_engine.engine import LasadEngine, SamplingParams
from lasad_tools.kv_baseline import KVCacheGPT, apply_rope, rope_2d_table


def kv_model():
    cfg = LasadConfig.from_preset("lasad-tiny", dim=64, n_head=4)
    return randomize_(KVCacheGPT(cfg), seed=1).eval()


def test_rope_table_is_llamagen_2d():
    table = rope_2d_table(3, 5, 8)
    assert table.shape == (16, 4, 2) and torch.equal(table[0], torch.zeros(4, 2))
    # token t = 7 is row 1, col 2 (width 5): position 8
    freqs = 10000.0 ** (-torch.arange(2) / 2)
    expect = torch.cat([1 * freqs, 2 * freqs])
    assert_close("angles", torch.atan2(table[8, :, 1], table[8, :, 0]), expect, 1e-6)
    x = torch.randn(2, 3, 8)
    assert_close("rotation keeps norms", apply_rope(x, table[8]).norm(dim=-1), x.norm(dim=-1), 1e-6)


def test_cached_step_equals_parallel_forward():
    model = kv_model()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (3, model.config.seq_len), generator=gen)
    labels = torch.tensor([1, 4, model.config.null_class])
    ref = model.forward_reference(tokens, labels)
    got = LasadEngine(model, max_batch=3).teacher_forced_logits(tokens, labels)
    assert_close("kv step vs parallel", got, ref, 1e-5)


def test_same_engine_same_sampler():
    model = kv_model()
    engine = LasadEngine(model, max_batch=2)
    params = SamplingParams(cfg_scale=2.0, top_k=10)
    a = engine.generate([1, 2], params=params, generator=torch.Generator().manual_seed(3))
    b = engine.generate([1, 2], params=params, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 5, 7) and torch.equal(a, b)
    assert engine.state_nbytes == 2 * 2 * 2 * 2 * 4 * 36 * 16 * 4  # k and v, L, rows, H, S, hd, fp32


def test_same_parameter_count_as_lasad_but_the_mixer_extras():
    cfg = LasadConfig.from_preset("lasad-B")
    with torch.device("meta"):
        kv, lasad = KVCacheGPT(cfg), LasadGen(cfg)
    n = lambda m: sum(p.numel() for p in m.parameters())
    extras = cfg.n_layer * cfg.dim + cfg.n_layer * cfg.n_head * cfg.head_k_dim  # g_norm + lower bounds
    assert n(lasad) - n(kv) == extras
