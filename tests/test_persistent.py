"""PersistentStep (ops/persistent.py): the decode step as one persistent task-interpreter kernel.

On the CPU the kernel runs in Triton's interpreter (one program, or several run one after
another: the ticket scheme needs no co-residency), on tiny odd-sized configs, against the torch
reference (`LasadGen.step(..., backend="torch")`, row by row where rows stand at different
positions), task type by task type, and run to run. On a GPU (marked `gpu`): teacher-forced
logits against the parallel forward in fp32, the same sampled tokens as the torch backend,
bit-identical runs, every launch form, CUDA-graph capture, and the lasad-B shapes in bf16.
"""

import dataclasses

import pytest
import torch
from conftest import HAS_TRITON, assert_close, rel_err, randomize_

from lasad_engine import LasadConfig, LasadGen
from lasad_engine.ops import persistent as P
from lasad_engine.ops.lasad import lasad_fused_step_
from lasad_engine.ops.lasad.mask import row_start_mask
from lasad_engine.ops.linear import fused_linear

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
# Triton's CPU interpreter truncates fp32 -> bf16 where torch rounds to nearest (tests/test_linear.py):
# bf16 results drift by about one bf16 ulp per rounding, a few hundred roundings deep here.
TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def small_config(**kw) -> LasadConfig:
    """Odd sizes everywhere: width 48 (padded to 64), head dims 24 (32), SwiGLU 72 (128), vocab 97,
    an odd grid width; no dropout."""
    base = dict(vocab_size=97, num_classes=10, n_layer=2, dim=48, n_head=2, head_k_dim=24, ffn_dim=72,
                grid_height=5, grid_width=3, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    return LasadConfig(**{**base, **kw})


def make_model(cfg, dtype=torch.float32, seed=0, device="cpu"):
    return randomize_(LasadGen(cfg), seed=seed).to(device=device, dtype=dtype).eval()


def coarse(model, **kw):
    """Few, large tasks (the interpreter runs each task's ops one by one: keep CPU tests quick)."""
    return P.PersistentStep(model, **{"tile": 1 << 14, "min_tiles": 1, "head_deps": False, "rows_max": 4, **kw})


def reference_rows(model, ids, pos, width, pool, slots):
    """The torch reference one row at a time (it takes one position for all its rows): row r from
    state slot slots[r] of `pool` (updated in place). Returns fp32 logits [R, V]."""
    out = []
    for r in range(ids.shape[0]):
        st = model.allocate_state(1, width=int(width[r]))
        s = int(slots[r])
        st.ssm.copy_(pool[:, s:s + 1])
        out.append(model.step(ids[r:r + 1], pos[r:r + 1], st, backend="torch").clone())
        pool[:, s] = st.ssm[:, 0]
    return torch.cat(out)


def vec(*values, device="cpu"):
    return torch.tensor(values, dtype=torch.int64, device=device)


CASES = [  # (dtype, row_start, output_norm, use_lower_bound, decay, tagged activations)
    ("fp32", "unit", "rms", True, True, False),
    ("fp32", "reset", "group", True, True, False),
    ("fp32", "none", "rms", False, True, False),
    ("fp32", "unit", "group", True, False, False),   # no decay: every image position is a "unit" row start
    ("bf16", "unit", "rms", True, True, False),
    ("bf16", "reset", "group", False, True, False),
    ("fp32", "reset", "rms", True, True, True),
    ("bf16", "unit", "group", True, True, True),
]


@needs_triton
@pytest.mark.parametrize("dtype,mode,norm,lb,decay,tagged", CASES, ids=lambda v: str(v))
def test_steps_match_the_torch_reference(dtype, mode, norm, lb, decay, tagged):
    """Positions 0..3 of two CFG rows (width 2: rows start at 1 and 3) against LasadGen.step."""
    dt = DTYPES[dtype]
    cfg = small_config(row_start=mode, output_norm=norm, use_lower_bound=lb, decay=decay, grid_width=2)
    model = make_model(cfg, dt, seed=len(mode) + 7 * lb)
    ps = coarse(model, tagged=tagged)
    R = 2
    ref_state = model.allocate_state(R, width=2)
    pool = torch.zeros_like(ref_state.ssm)
    logits = torch.full((R, cfg.vocab_size), float("nan"))
    ids = vec(3, cfg.num_classes)
    gen = torch.Generator().manual_seed(1)
    for p in range(4):
        ref = model.step(ids, vec(p), ref_state, backend="torch").clone()
        ps.step(ids, vec(p, p), vec(2, 2), pool, vec(0, 1), logits)
        assert_close(f"logits at p={p}", logits, ref, TOL[dt])
        assert_close(f"state at p={p}", pool, ref_state.ssm, TOL[dt])
        ids = torch.randint(0, cfg.vocab_size, (R,), generator=gen)
    assert not ps.error()


@needs_triton
def test_rows_at_their_own_positions_and_slots():
    """Three rows (padded to four lanes) at positions 0, 4 and 9 with grid widths 3, 4 and 2, in
    slots 4, 0 and 2 of a pool of 5: each row equals the reference run on its own; the other slots
    are untouched. The lower bounds changed in place between the steps are seen."""
    cfg = small_config(row_start="reset")
    model = make_model(cfg, seed=3)
    ps = coarse(model)
    gen = torch.Generator().manual_seed(0)
    pool = 0.3 * torch.randn(cfg.n_layer, 5, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim, generator=gen)
    ref_pool = pool.clone()
    ids, width, slots = vec(4, 50, 96), vec(3, 4, 2), vec(4, 0, 2)
    logits = torch.full((3, cfg.vocab_size), float("nan"))
    for pos in (vec(0, 4, 9), vec(1, 5, 10)):
        ref = reference_rows(model, ids, pos, width, ref_pool, slots)
        ps.step(ids, pos, width, pool, slots, logits)
        assert_close(f"logits at {pos.tolist()}", logits, ref, TOL[torch.float32])
        assert_close("pool", pool, ref_pool, TOL[torch.float32])
        ids = vec(7, 8, 9)
        with torch.no_grad():
            model.lower_bounds.mul_(1.5)
    assert torch.equal(pool[:, [1, 3]], ref_pool[:, [1, 3]])
    assert not ps.lbs.requires_grad


@needs_triton
@pytest.mark.parametrize("norm,tagged", [("rms", False), ("group", True)])
def test_each_task_type_against_the_reference(norm, tagged):
    """Small tiles (many tasks per op, per-head dependencies): every stage's buffer against the torch
    definition applied to the kernel's own inputs of that stage, so each task type is checked alone."""
    cfg = small_config(output_norm=norm, row_start="reset")
    model = make_model(cfg, seed=5)
    ps = P.PersistentStep(model, tile=256, min_tiles=4, block_v=8 if norm == "rms" else None, rows_max=2,
                          tagged=tagged)
    counts = ps.schedule.counts()
    assert all(n > 1 for name, n in counts.items()), counts
    check_task_types(model, ps, TOL[torch.float32])


def check_task_types(model, ps, tol, device="cpu"):
    """One step of two image-token rows (slots swapped, one at a row start), then every stage's
    buffer against the torch definition applied to the kernel's own inputs of that stage."""
    cfg = model.config
    norm = cfg.output_norm
    gen = torch.Generator().manual_seed(2)
    pool = (0.3 * torch.randn(cfg.n_layer, 2, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim, generator=gen)).to(device)
    before = pool.clone()
    ids, pos = vec(5, 6, device=device), vec(1, 4, device=device)
    width, slots = vec(3, 3, device=device), vec(1, 0, device=device)
    logits = torch.full((2, cfg.vocab_size), float("nan"), device=device)
    ps.step(ids, pos, width, pool, slots, logits)
    act = ps.activations()
    x = model.embed_step(ids, vec(1, device=device), backend="torch")   # both rows are image tokens
    start = row_start_mask(pos, width)
    for i, (blk, lb) in enumerate(zip(model.layers, model._lower_bounds())):
        a, f = blk.attention, blk.feed_forward
        qfv = fused_linear(x, a.qfv.weight, norm_weight=blk.attention_norm.weight, eps=cfg.norm_eps, backend="torch")
        assert_close(f"layer {i} qfv", act["qfv"][i, :2], qfv, tol)
        qfv = act["qfv"][i, :2].clone()
        state = before[i, slots].clone()
        o = torch.cat([lasad_fused_step_(qfv[r:r + 1], lb, state[r:r + 1], start[r:r + 1], cfg.row_start,
                                         backend="torch") for r in range(2)])
        assert_close(f"layer {i} state", pool[i, slots], state, tol)
        o = o.flatten(-2)
        if norm == "group":  # the step task applies the per-head norm
            o = a.g_norm(o)
            assert_close(f"layer {i} o", act["o"][i, :2], o, tol)
            h = fused_linear(act["o"][i, :2], a.o_proj.weight, residual=x, backend="torch")
        else:
            assert_close(f"layer {i} o", act["o"][i, :2], o, tol)
            h = fused_linear(act["o"][i, :2], a.o_proj.weight, norm_weight=a.g_norm.weight, eps=a.g_norm.eps,
                             residual=x, backend="torch")
        assert_close(f"layer {i} h", act["h"][i, :2], h, tol)
        u = fused_linear(act["h"][i, :2], f.w13.weight, norm_weight=blk.ffn_norm.weight, eps=cfg.norm_eps,
                         swiglu=True, backend="torch")
        assert_close(f"layer {i} u", act["u"][i, :2], u, tol)
        x = fused_linear(act["u"][i, :2], f.w2.weight, residual=act["h"][i, :2], backend="torch")
        assert_close(f"layer {i} x", act["x"][i, :2], x, tol)
        x = act["x"][i, :2].clone()
    head = fused_linear(x, model.output.weight, norm_weight=model.norm.weight, eps=cfg.norm_eps, backend="torch")
    assert_close("logits", logits, head.float(), tol)
    assert not ps.error()




@needs_triton
def test_bit_identical_across_runs_programs_and_launch_forms():
    """The same inputs give the same bits: run to run, with three programs taking tickets (the
    interpreter runs them one after another), and one launch per layer. The counters advance by
    exactly one launch's worth per step: nothing is reset between steps."""
    cfg = small_config()
    model = make_model(cfg, seed=9)
    gen = torch.Generator().manual_seed(4)
    pool0 = 0.3 * torch.randn(cfg.n_layer, 2, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim, generator=gen)
    ids, width, slots = vec(1, 2), vec(3, 3), vec(0, 1)

    def run(ps, steps=2):
        pool = pool0.clone()
        logits = torch.empty(2, cfg.vocab_size)
        out = []
        for p in range(1, steps + 1):
            out.append(ps.step(ids, vec(p, p), width, pool, slots, logits).clone())
        return torch.stack(out), pool

    base = coarse(model)
    a = run(base)
    b = run(base)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    n = base.schedule.n_tasks
    assert int(base.counters[0]) == 4 * (n + base.programs)           # 4 launches, one ticket range
    producers = torch.bincount(base.schedule.tasks[:, 5].long(), minlength=base.schedule.n_counters)
    assert torch.equal(base.counters[1:].cpu(), 4 * producers)
    for kw in (dict(programs=3), dict(launch="layer"), dict(launch="layer", programs=2), dict(tagged=True),
               dict(tagged=True, launch="layer", programs=2, slack=1)):
        c = run(coarse(model, **kw))
        assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]), kw


@needs_triton
def test_a_wait_that_never_opens_sets_the_error_flag():
    """A dependency that can never be met (a corrupted table) gives up after max_spin polls and
    raises the error flag instead of hanging."""
    model = make_model(small_config(), seed=1)
    ps = coarse(model, max_spin=3)
    ps.tasks[-1, 4] = 10 ** 6                                          # the head waits for 10^6 W_2 tiles
    logits = torch.empty(2, model.config.vocab_size)
    pool = torch.zeros(model.config.n_layer, 2, 2, 24, 24)
    ps.step(vec(1, 2), vec(0, 0), vec(3, 3), pool, vec(0, 1), logits)
    assert ps.error()
    ps.reset()
    assert not ps.error() and int(ps.counters.abs().sum()) == 0


@needs_triton
def test_tags_catch_an_input_that_was_not_written_this_launch():
    """Tagged activations: one W_q|W_f|W_i tile left out of the table. With slack 1 its missing count
    is tolerated, so only the tags can tell that the LASAD task of its head reads columns of another
    launch: it polls them max_spin times and raises the error flag. The full table passes."""
    model = make_model(small_config(n_layer=1), seed=2)
    full = P.build_schedule(model.config, tile=1 << 14, min_tiles=1)        # per-head counters, few tasks
    missing = dataclasses.replace(full, tasks=full.tasks[1:].clone(), ranges=((0, full.n_tasks - 1),))
    logits = torch.empty(2, model.config.vocab_size)
    for sch, broken in ((full, False), (missing, True)):
        ps = P.PersistentStep(model, schedule=sch, tagged=True, slack=1, max_spin=3, rows_max=2)
        pool = torch.zeros(model.config.n_layer, 2, 2, 24, 24)
        ps.step(vec(1, 2), vec(1, 1), vec(3, 3), pool, vec(0, 1), logits)
        assert ps.error() == broken


@pytest.mark.parametrize("preset", ["lasad-tiny", "lasad-B", "lasad-XL"])
@pytest.mark.parametrize("head_deps", [True, False])
@pytest.mark.parametrize("launch", ["step", "layer"])
def test_schedule_is_topological(preset, head_deps, launch):
    """Every task's dependency is produced only by earlier tasks, as many as it waits for; each
    W_q|W_f|W_i tile lies in one head's q, f or v columns when the step waits per head; the launch
    ranges cover the list in order."""
    cfg = LasadConfig.from_preset(preset)
    sch = P.build_schedule(cfg, head_deps=head_deps, launch=launch)
    t = sch.tasks.tolist()
    produced = [0] * sch.n_counters
    last_producer = [-1] * sch.n_counters
    for i, (tt, layer, idx, dep, dn, out, *_) in enumerate(t):
        if dn:
            assert produced[dep] == dn, (i, tt, layer, produced[dep], dn)
        produced[out] += 1
        last_producer[out] = i
    for i, (tt, layer, idx, dep, dn, out, *_) in enumerate(t):
        if dn:
            assert last_producer[dep] < i
    H, K, V = cfg.n_head, cfg.head_k_dim, cfg.head_v_dim
    if head_deps:
        bn = sch.block_n["qfv"]
        for tt, layer, n, *_ in t:
            if tt == P.QFV:
                seg = 0 if n < H * K else 1 if n < 2 * H * K else 2
                width = V if seg == 2 else K
                off = n - seg * H * K
                assert off // width == (off + bn - 1) // width
    flat = [i for lo, hi in sch.ranges for i in range(lo, hi)]
    assert flat == list(range(sch.n_tasks))
    assert (len(sch.ranges) == 1) == (launch == "step")
    assert sch.counts()["head"] * sch.block_n["head"] >= cfg.vocab_size
    for name, bn in sch.block_n.items():
        kp = P._pow2({"qfv": cfg.dim, "o": H * V, "w13": cfg.dim, "w2": cfg.ffn_dim, "head": cfg.dim}[name])
        assert bn * kp * (2 if name == "w13" else 1) <= P.TILE_ELEMS


def test_subset_schedules_for_measurements():
    sch = P.build_schedule(small_config(), tile=256, min_tiles=2)
    nowait = sch.subset(waits=False)
    assert torch.equal(nowait.tasks[:, :4], sch.tasks[:, :4]) and int(nowait.tasks[:, 4].abs().sum()) == 0
    head = sch.subset(["head"], waits=False)
    assert head.n_tasks == sch.counts()["head"] and head.ranges == ((0, head.n_tasks),)
    assert sch.subset().n_tasks == sch.n_tasks
    with pytest.raises(ValueError, match="waits=False"):
        sch.subset(["o"])


@needs_triton
def test_bad_arguments():
    model = make_model(small_config(), seed=1)
    ps = coarse(model, rows_max=2)
    cfg = model.config
    pool = torch.zeros(cfg.n_layer, 2, 2, 24, 24)
    logits = torch.empty(2, cfg.vocab_size)
    ok = dict(ids=vec(1, 2), pos=vec(0, 0), width=vec(3, 3), ssm=pool, slots=vec(0, 1), logits=logits)
    for bad, match in ((dict(ids=vec(1, 2, 3)), "rows"), (dict(pos=vec(0)), "pos"),
                       (dict(width=torch.tensor([3, 3], dtype=torch.int32)), "width"),
                       (dict(ids=torch.tensor([[1, 5], [2, 6]])[:, 0]), "contiguous"),
                       (dict(ssm=pool.double()), "ssm"), (dict(ssm=pool[:, :, :1]), "ssm"),
                       (dict(logits=logits[:, :-1]), "logits")):
        with pytest.raises(ValueError, match=match):
            ps.step(**{**ok, **bad})
    with pytest.raises(ValueError, match="rows_max"):
        P.PersistentStep(model, rows_max=P.ROWS_MAX + 1)
    with pytest.raises(ValueError, match="slack needs tagged"):
        P.PersistentStep(model, slack=2)
    with pytest.raises(ValueError, match="launch"):
        P.build_schedule(cfg, launch="graph")
    with pytest.raises(ValueError, match="whole head"):
        P.build_schedule(small_config(output_norm="group"), block_v=8)


# -- on a GPU ------------------------------------------------------------------------------------

def gpu_config(**kw) -> LasadConfig:
    """Real head sizes (64), a few layers, a small vocabulary: seconds to compile and run."""
    return small_config(**{**dict(n_layer=3, dim=256, n_head=4, head_k_dim=64, ffn_dim=768, vocab_size=1024,
                                  num_classes=10, grid_height=4, grid_width=8), **kw})


def teacher_forced(step, model, tokens, labels):
    """Step logits [B, T, V] with the given tokens forced, through step(ids, pos, logits)."""
    B, T = tokens.shape
    outs = []
    ids = labels.clone()
    for p in range(T):
        outs.append(step(ids, torch.full((B,), p, device=ids.device)).clone())
        ids = tokens[:, p].contiguous()
    return torch.stack(outs, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("mode,norm", [("unit", "rms"), ("reset", "group")])
def test_teacher_forced_logits_equal_the_parallel_forward_fp32(mode, norm):
    cfg = gpu_config(row_start=mode, output_norm=norm)
    model = make_model(cfg, seed=2, device="cuda")
    ps = P.PersistentStep(model)
    gen = torch.Generator().manual_seed(0)
    B, T = 2, cfg.seq_len
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=gen).cuda()
    labels = torch.tensor([3, cfg.num_classes], device="cuda")
    pool = torch.zeros(cfg.n_layer, B, cfg.n_head, 64, 64, device="cuda")
    logits = torch.empty(B, cfg.vocab_size, device="cuda")
    width = torch.full((B,), cfg.grid_width, device="cuda")
    slots = torch.arange(B, device="cuda")
    got = teacher_forced(lambda ids, pos: ps.step(ids, pos, width, pool, slots, logits), model, tokens, labels)
    with torch.no_grad():
        ref = model(tokens, labels, backend="torch")
    assert_close("teacher-forced logits vs forward", got, ref, 1e-5)
    assert not ps.error()


@pytest.mark.gpu
def test_each_task_type_against_the_reference_on_cuda():
    """The CPU test's per-stage check on the GPU, fp32, real head sizes, default tiles (the kernel of
    the teacher-forcing test): every task type against the torch definition on its own inputs."""
    model = make_model(gpu_config(row_start="unit", output_norm="rms"), seed=3, device="cuda")
    check_task_types(model, P.PersistentStep(model), 1e-5, device="cuda")


@pytest.mark.gpu
def test_same_sampled_tokens_as_the_torch_backend_fp32():
    from lasad_engine.sampling import draw_noise, sample
    cfg = gpu_config()
    model = make_model(cfg, seed=4, device="cuda")
    n = 1                                     # one image: rows = the label, then the null class
    labels = torch.tensor([7], device="cuda")
    noise = draw_noise(torch.Generator().manual_seed(11), cfg.seq_len, n, cfg.vocab_size, device="cuda")
    kw = dict(cfg=True, cfg_scale=4.0, top_k=50, backend="torch")

    def generate(step):
        ids = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])
        out = []
        for p in range(cfg.seq_len):
            logits = step(ids, p)
            tok = sample(logits, noise[p], **kw)
            out.append(tok)
            ids = torch.cat([tok, tok])
        return torch.stack(out, 1)

    st = model.allocate_state(2 * n)
    ref = generate(lambda ids, p: model.step(ids, torch.tensor([p], device="cuda"), st, backend="torch"))
    pool = torch.zeros_like(st.ssm)
    logits = torch.empty(2 * n, cfg.vocab_size, device="cuda")
    width = torch.full((2 * n,), cfg.grid_width, device="cuda")
    slots = torch.arange(2 * n, device="cuda")
    ps = P.PersistentStep(model)
    got = generate(lambda ids, p: ps.step(ids, torch.full((2 * n,), p, device="cuda"), width, pool, slots, logits))
    assert torch.equal(got, ref), f"{(got != ref).float().mean().item():.1%} of the tokens differ"


@pytest.mark.gpu
def test_bit_identical_every_launch_form_and_in_a_cuda_graph():
    """bf16: run to run, one launch per step or per layer (with and without PDL), eager and replayed
    from a CUDA graph: the same bits; the graph step allocates nothing."""
    cfg = gpu_config()
    model = make_model(cfg, torch.bfloat16, seed=6, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    pool0 = 0.3 * torch.randn(cfg.n_layer, 3, cfg.n_head, 64, 64, device="cuda", generator=gen)
    ids, width, slots = (torch.tensor(v, device="cuda") for v in ([5, 10], [8, 8], [2, 0]))

    def run(ps, graph=False):
        pool = pool0.clone()
        logits = torch.empty(2, cfg.vocab_size, device="cuda")
        pos = torch.zeros(2, dtype=torch.long, device="cuda")
        outs = []
        if graph:
            ps.step(ids, pos, width, pool.clone(), slots, logits)        # compiled outside the capture
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                ps.step(ids, pos, width, pool, slots, logits)
            pool.copy_(pool0)
            before = torch.cuda.memory_allocated()
            for p in range(4):
                pos.fill_(p)
                g.replay()
                outs.append(logits.clone())
            torch.cuda.synchronize()
            assert torch.cuda.memory_allocated() == before + 4 * logits.numel() * 4
        else:
            for p in range(4):
                pos.fill_(p)
                outs.append(ps.step(ids, pos, width, pool, slots, logits).clone())
        assert not ps.error()
        return torch.stack(outs), pool

    ref = run(P.PersistentStep(model))
    forms = {"again": (P.PersistentStep(model), False), "graph": (P.PersistentStep(model), True),
             "layer": (P.PersistentStep(model, launch="layer"), False),
             "layer-pdl": (P.PersistentStep(model, launch="layer-pdl"), False),
             "layer-pdl graph": (P.PersistentStep(model, launch="layer-pdl"), True),
             "one program per SM": (P.PersistentStep(model, per_sm=1), False),
             "tagged": (P.PersistentStep(model, tagged=True), False),
             "tagged graph, slack 2": (P.PersistentStep(model, tagged=True, slack=2), True)}
    for name, (ps, graph) in forms.items():
        got = run(ps, graph)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), name


@pytest.mark.gpu
def test_lasad_b_shapes_bf16_against_the_kernel_step():
    """lasad-B (random bf16 weights, two CFG rows): the persistent step against the per-op Triton
    step of the cuda backend over a few positions; bf16 roundings in another order (49 GEMM outputs
    per step), hence the bound of the engine's bf16 checks."""
    cfg = LasadConfig.from_preset("lasad-B", token_dropout=0, resid_dropout=0, ffn_dropout=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LasadGen(cfg)
    with torch.no_grad():
        model.output.weight.normal_(std=0.02)
        model.lower_bounds.normal_()
    model = model.bfloat16().eval()
    ps = P.PersistentStep(model)
    st = model.allocate_state(2)
    pool = torch.zeros_like(st.ssm)
    logits = torch.empty(2, cfg.vocab_size, device="cuda")
    ids = torch.tensor([207, cfg.num_classes], device="cuda")
    width = torch.full((2,), 16, device="cuda")
    errs = []
    for p in range(18):
        ref = model.step(ids, torch.tensor([p], device="cuda"), st, backend="triton").clone()
        ps.step(ids, torch.full((2,), p, device="cuda"), width, pool, torch.arange(2, device="cuda"), logits)
        errs.append(rel_err(logits, ref))
        ids = torch.randint(0, cfg.vocab_size, (1,), device="cuda").repeat(2)
    assert max(errs) < 2e-2, errs
    assert rel_err(pool, st.ssm) < 2e-2
    assert not ps.error()
