"""LasadGen: teacher-forced decode == parallel forward, causality, the row-start modes' reach,
configs and presets."""

import pytest
import torch
from conftest import HAS_TRITON, assert_close, randomize_

from lasad_engine import LASAD_PRESET_NAMES, LasadConfig, LasadGen
from lasad_engine.model import upgrade_state_dict
from lasad_engine.ops.lasad import ROW_START_MODES, fused_gates, naive_recurrent_lasad


def tiny(mode="unit", seed=0, **kw):
    cfg = LasadConfig.from_preset("lasad-tiny", row_start=mode, **kw)
    torch.manual_seed(seed)
    return randomize_(LasadGen(cfg), seed).eval()


def random_batch(cfg, B, T, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, cfg.vocab_size, (B, T), generator=gen),
            torch.randint(0, cfg.num_classes + 1, (B,), generator=gen))


def teacher_forced(model, tokens, labels, width, backend=None):
    """Drive `step` with the ground-truth tokens; return the per-step logits `[B, T, V]`."""
    B, T = tokens.shape
    state = model.allocate_state(B, width=width)
    outs = []
    for p in range(T):
        ids = labels if p == 0 else tokens[:, p - 1]
        state.pos.fill_(p)
        outs.append(model.step(ids, state.pos, state).clone())
    return torch.stack(outs, 1), state


@pytest.mark.parametrize("mode", ROW_START_MODES)
@pytest.mark.parametrize("output_norm", ["rms", "group"])
@pytest.mark.parametrize("width", [7, 16])
def test_teacher_forced_step_equals_parallel(mode, output_norm, width):
    model = tiny(mode, output_norm=output_norm)
    tokens, labels = random_batch(model.config, 3, 40, seed=width)
    with torch.no_grad():
        parallel = model(tokens, labels, width=width)
        naive = model(tokens, labels, width=width, backend="naive")
    assert_close("chunk vs naive forward", parallel, naive, 1e-5)
    stepped, _ = teacher_forced(model, tokens, labels, width)
    assert_close("step vs parallel", stepped, parallel, 1e-5)


def test_state_reset_reuses_buffers():
    model = tiny()
    tokens, labels = random_batch(model.config, 2, 12, seed=1)
    state = model.allocate_state(2)
    ptrs = (state.ssm.data_ptr(), state.logits.data_ptr())
    runs = []
    for _ in range(2):
        state.reset()
        outs = []
        for p in range(12):
            state.pos.fill_(p)
            outs.append(model.step(labels if p == 0 else tokens[:, p - 1], state.pos, state).clone())
        runs.append(torch.stack(outs))
    assert torch.equal(runs[0], runs[1])
    assert (state.ssm.data_ptr(), state.logits.data_ptr()) == ptrs
    assert state.nbytes >= model.config.state_nbytes(2)


def test_no_decay_ablation_never_forgets():
    """decay=False: the state only accumulates, S_p = sum of k v^T (checked against the naive op
    with g = 0), and the parallel and recurrent forms still agree."""
    model = tiny("reset", decay=False)
    cfg = model.config
    tokens, labels = random_batch(cfg, 2, 20, seed=8)
    a = model.layers[1].attention
    lb = model._lower_bounds()[1]
    with torch.no_grad():
        parallel = model(tokens, labels)
        x = torch.randn(2, 20, cfg.dim, generator=torch.Generator().manual_seed(1))
        q, k, v, g = fused_gates(a.qfv(x), lb, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim)
        o, _ = naive_recurrent_lasad(q.double(), k.double(), v.double(), torch.zeros_like(g).double(),
                                     width=cfg.grid_width, row_start="none")
        ref = a.o_proj(a.g_norm(o.float().flatten(-2)))
        assert (k > 0).all() and (g < 0).all()  # the input gate keeps its value; only the decay is gone
        assert_close("mixer vs g = 0 everywhere", a(x, lb, cfg.grid_width), ref, 1e-5)
    assert_close("step vs parallel", teacher_forced(model, tokens, labels, 7)[0], parallel, 1e-5)


def test_without_lower_bound():
    model = tiny(use_lower_bound=False)
    assert not hasattr(model, "lower_bounds")
    tokens, labels = random_batch(model.config, 2, 20, seed=3)
    with torch.no_grad():
        parallel = model(tokens, labels)
    assert_close("step vs parallel", teacher_forced(model, tokens, labels, 7)[0], parallel, 1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_teacher_forced_through_the_triton_kernel():
    """The model's step with the Triton kernel (interpreted on a CPU) == the parallel forward."""
    model = tiny("unit")
    tokens, labels = random_batch(model.config, 2, 16, seed=5)
    with torch.no_grad():
        parallel = model(tokens, labels)
    state = model.allocate_state(2, width=7)
    outs = []
    for p in range(16):
        state.pos.fill_(p)
        outs.append(model.step(labels if p == 0 else tokens[:, p - 1], state.pos, state, backend="triton").clone())
    assert_close("triton step vs parallel", torch.stack(outs, 1), parallel, 1e-5)


@pytest.mark.parametrize("mode", ROW_START_MODES)
def test_causality(mode):
    """Changing token t changes no logits at positions ≤ t (logits[:, p] predict x_p)."""
    model = tiny(mode)
    tokens, labels = random_batch(model.config, 2, 30, seed=11)
    with torch.no_grad():
        base = model(tokens, labels)
        for t in (0, 6, 7, 20):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % model.config.vocab_size
            out = model(changed, labels)
            assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"position ≤ {t} saw token {t}"
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:]), "later positions ignore token t"


@pytest.mark.parametrize("mode", ROW_START_MODES)
def test_which_modes_see_the_class_beyond_row_zero(mode):
    """With `reset` in every layer, rows ≥ 1 depend only on their own row: the class is
    invisible there. `unit` and `none` carry it across rows."""
    model = tiny(mode)
    w = model.config.grid_width
    tokens, _ = random_batch(model.config, 1, 4 * w, seed=2)
    with torch.no_grad():
        a = model(tokens, torch.tensor([1]))
        b = model(tokens, torch.tensor([2]))
    first_row_differs = not torch.allclose(a[:, :w], b[:, :w])
    later_rows_equal = torch.allclose(a[:, w:], b[:, w:], rtol=0, atol=1e-6)
    assert first_row_differs
    assert later_rows_equal == (mode == "reset")


def test_training_mode_dropouts_and_class_dropout():
    model = tiny()
    model.config.class_dropout = 1.0  # every label becomes the null class
    model.cls_embedding.dropout = 1.0
    tokens, labels = random_batch(model.config, 2, 10, seed=4)
    model.train()
    for m in model.modules():  # switch off the other dropouts to compare exactly
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    dropped = model(tokens, labels)
    model.eval()
    null = model(tokens, torch.full_like(labels, model.config.null_class))
    assert_close("class dropout -> null class", dropped, null, 1e-6)


def test_gradients_flow_to_every_parameter():
    model = tiny().train()
    tokens, labels = random_batch(model.config, 2, 21, seed=9)
    logits = model(tokens, labels)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    for name, p in model.named_parameters():
        if name.startswith("cls_embedding") or name == "lower_bounds":
            continue  # only the rows of the labels used / layer 0's bound gets none by design
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fresh_model_follows_llamagen_init():
    cfg = LasadConfig.from_preset("lasad-tiny")
    model = LasadGen(cfg)
    assert torch.count_nonzero(model.output.weight) == 0
    w = model.layers[0].feed_forward.w13.weight
    assert abs(w.std().item() - 0.02) < 0.004 and abs(w.mean().item()) < 0.004
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


# Parameter counts of the paper's sizes (LlamaGen's GPT-B/L/XL/XXL; vocab 16384, 1000 classes).
PAPER_PARAMS = {"lasad-B": 111e6, "lasad-L": 343e6, "lasad-XL": 775e6, "lasad-XXL": 1.4e9}


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_preset_parameter_counts(name):
    cfg = LasadConfig.from_preset(name)
    with torch.device("meta"):
        n = LasadGen(cfg).num_parameters()
    d, L, ffn = cfg.dim, cfg.n_layer, cfg.ffn_dim
    by_hand = L * (4 * d * d + 3 * d * ffn + 3 * d + d) + 2 * cfg.vocab_size * d + (cfg.num_classes + 1) * d + d
    assert n == by_hand
    assert abs(n - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.01, f"{name}: {n / 1e6:.1f}M"


def test_config_json_round_trip_and_errors():
    for name in LASAD_PRESET_NAMES:
        cfg = LasadConfig.from_preset(name, row_start="reset", output_norm="group")
        assert LasadConfig.from_json(cfg.to_json()) == cfg
        assert LasadConfig.from_dict(cfg.to_dict()) == cfg
    assert LasadConfig.from_preset("LASAD-b").n_layer == 12
    assert LasadConfig.from_preset("lasad-B").ffn_dim == 2048
    assert LasadConfig.from_preset("lasad-XL").ffn_dim == 3584
    with pytest.raises(ValueError, match="unknown preset 'lasad-Q'.*lasad-B"):
        LasadConfig.from_preset("lasad-Q")
    with pytest.raises(ValueError, match="row_start='both'.*none, unit, reset"):
        LasadConfig(row_start="both")
    with pytest.raises(ValueError, match="unknown LasadConfig fields: colour"):
        LasadConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="n_layer=0"):
        LasadConfig(n_layer=0)


def test_older_checkpoints_with_separate_matrices_load():
    """Format-1 state dicts hold q_proj/f_proj/i_proj and w1/w3; the model stacks them itself."""
    model = randomize_(LasadGen(LasadConfig.from_preset("lasad-tiny")), seed=4).eval()
    cfg = model.config
    old = {}
    for k, v in model.state_dict().items():
        if k.endswith("attention.qfv.weight"):
            q, f, i = v.split([cfg.n_head * cfg.head_k_dim] * 2 + [cfg.n_head * cfg.head_v_dim])
            old.update({k.replace("qfv", "q_proj"): q, k.replace("qfv", "f_proj"): f, k.replace("qfv", "i_proj"): i})
        elif k.endswith("feed_forward.w13.weight"):
            w1, w3 = v.chunk(2)
            old.update({k.replace("w13", "w1"): w1, k.replace("w13", "w3"): w3})
        else:
            old[k] = v
    assert not any(k.endswith(("qfv.weight", "w13.weight")) for k in old)
    fresh = LasadGen(cfg).eval()
    fresh.load_state_dict(old, strict=True)
    tokens, labels = random_batch(cfg, 2, 12, seed=2)
    with torch.no_grad():
        assert torch.equal(fresh(tokens, labels), model(tokens, labels))
    assert set(upgrade_state_dict(old)) == set(model.state_dict())
