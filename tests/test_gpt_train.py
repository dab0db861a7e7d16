"""lasad-train gpt on a CPU: the loss falls, resume is exact, torchrun (gloo, 2 processes) takes
the same steps as one process, and the deploy checkpoint serves."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lasad_engine import load_checkpoint
from lasad_engine.engine import LasadEngine, SamplingParams
from lasad_train.cli import main
from lasad_train.formats import CODES_FORMAT, VERSION, DataError, save_npy, write_manifest

NO_DROPOUT = ["--set", "token_dropout=0", "--set", "resid_dropout=0", "--set", "ffn_dropout=0",
              "--set", "class_dropout=0"]


@pytest.fixture
def codes(tmp_path):
    """A code set with structure to learn: each class has its own token pattern, plus noise."""
    rng = np.random.default_rng(0)
    n, h, w, V, C = 96, 4, 5, 32, 4
    labels = rng.integers(0, C, n)
    base = (labels[:, None] * 7 + np.arange(h * w)[None] * 3) % V
    noise = rng.random((n, h * w)) < 0.1
    grid = np.where(noise, rng.integers(0, V, (n, h * w)), base).reshape(n, h, w).astype(np.int32)
    folder = tmp_path / "codes"
    folder.mkdir()
    shards = []
    for k, sl in enumerate((slice(0, 60), slice(60, n))):
        save_npy(folder / f"codes-{k:05d}.npy", grid[sl])
        save_npy(folder / f"labels-{k:05d}.npy", labels[sl].astype(np.int64))
        shards.append({"codes": f"codes-{k:05d}.npy", "labels": f"labels-{k:05d}.npy", "count": len(labels[sl])})
    write_manifest(folder, {"format": CODES_FORMAT, "version": VERSION, "grid": [h, w], "vocab_size": V,
                            "label_set": "class", "num_classes": C, "class_names": [f"c{i}" for i in range(C)],
                            "flip": False, "shards": shards, "count": n, "tokenizer": None, "images": None})
    return folder


def run(args):
    r = CliRunner().invoke(main, ["gpt"] + [str(a) for a in args])
    assert r.exit_code == 0, r.output + str(r.exception)
    return json.loads(r.stdout.strip().splitlines()[-1])


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


COMMON = ["--preset", "lasad-tiny", "--batch-size", "16", "--lr", "3e-3", "--device", "cpu", "--no-progress",
          "--log-every", "1"]


def test_loss_falls_and_the_deploy_checkpoint_serves(codes, tmp_path):
    out = tmp_path / "run"
    summary = run([codes, out, "--steps", "40", *COMMON])
    losses = [r["loss"] for r in log(out)]
    assert losses[0] > np.log(32) - 0.3       # starts near uniform (zero head)
    assert np.mean(losses[-5:]) < 0.7 * losses[0], losses
    assert summary["steps"] == 40 and all(r["tokens_per_s"] > 0 for r in log(out))
    obj = torch.load(out / "last.pt", weights_only=True)
    assert obj["step"] == 40 and {"model", "optimizer", "rng", "config", "args"} <= set(obj)
    model = load_checkpoint(out / "model.safetensors")
    assert model.config.class_names == ["c0", "c1", "c2", "c3"] and model.config.grid_width == 5
    toks = LasadEngine(model, max_batch=2).generate([0, 3], params=SamplingParams(temperature=0.0, cfg_scale=1.0))
    assert toks.shape == (2, 4, 5)


def test_weight_decay_only_on_matrices():
    from lasad_engine import LasadConfig, LasadGen
    from lasad_train.gpt import param_groups
    groups = param_groups(LasadGen(LasadConfig.from_preset("lasad-tiny")), 0.05)
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.05
    assert all(p.dim() < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_optimizer_state_by_name_moves_between_parameter_orders():
    """Checkpoints key the optimizer state by parameter name (FSDP's form): the state of one
    optimizer loads into another that orders the same parameters differently, and each
    parameter gets back its own moments; another model's state is refused in one line."""
    from lasad_engine import LasadConfig, LasadGen
    from lasad_train.formats import DataError
    from lasad_train.gpt import _param_names, optim_state_by_index, optim_state_by_name, param_groups
    torch.manual_seed(1)
    model = LasadGen(LasadConfig.from_preset("lasad-tiny"))
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    x = torch.randint(0, 97, (3, 35))
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x, torch.tensor([1, 2, 3])).flatten(0, 1), x.flatten()).backward()
        opt.step()
    named = optim_state_by_name(opt.state_dict(), _param_names(opt, model))
    assert all(isinstance(k, str) for k in named["state"])
    groups = [{**g, "params": list(reversed(g["params"]))} for g in param_groups(model, 0.05)]
    other = torch.optim.AdamW(groups, lr=1e-3)
    other.load_state_dict(optim_state_by_index(named, _param_names(other, model)))
    by_param = {n: opt.state[p] for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(other.state[p][key], by_param[n][key]), (n, key)
    bigger = LasadGen(LasadConfig.from_preset("lasad-tiny", n_layer=3))
    opt3 = torch.optim.AdamW(param_groups(bigger, 0.05), lr=1e-3)
    with pytest.raises(DataError, match="other parameters"):
        optim_state_by_index(named, _param_names(opt3, bigger))


@pytest.mark.gpu
def test_fsdp_keeps_weight_decay_and_its_checkpoint_resumes_without_fsdp(codes, tmp_path):
    """FSDP (here alone on one GPU, a process group in memory) flattens every parameter into a shard
    view: the weight-decay groups must still be the matrices, and its checkpoint (full weights,
    name-keyed optimizer) must continue without FSDP, as a two-GPU FSDP run's does on one GPU."""
    from lasad_engine import LasadConfig, LasadGen
    common = [("cuda" if a == "cpu" else a) for a in COMMON] + [*NO_DROPOUT, "--chunk-backend", "torch"]
    fsdp, plain = tmp_path / "fsdp", tmp_path / "plain"
    run([codes, fsdp, "--steps", "3", *common, "--fsdp"])
    run([codes, plain, "--steps", "3", *common])
    saved = torch.load(fsdp / "last.pt", weights_only=True)
    model = LasadGen(LasadConfig.from_dict(saved["config"]))
    matrices = {n for n, p in model.named_parameters() if p.dim() >= 2}
    decayed = [g for g in saved["optimizer"]["param_groups"] if g["weight_decay"] > 0]
    assert len(decayed) == 1 and set(decayed[0]["params"]) == matrices
    # bf16 parameters under FSDP vs bf16 autocast: the same steps up to rounding, not bit for bit
    np.testing.assert_allclose([r["loss"] for r in log(fsdp)], [r["loss"] for r in log(plain)], rtol=2e-2)
    ref = torch.load(plain / "last.pt", weights_only=True)["model"]
    flat = lambda sd: torch.cat([sd[k].float().flatten() for k in sorted(ref)])  # noqa: E731
    assert (flat(saved["model"]) - flat(ref)).norm() < 0.05 * flat(ref).norm()
    run([codes, fsdp, "--steps", "5", "--resume", *common])
    rows = log(fsdp)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["world_size"] == 1
    assert np.isfinite([r["loss"] for r in rows]).all()
    served = load_checkpoint(fsdp / "model.safetensors")
    toks = LasadEngine(served, max_batch=1).generate([1], params=SamplingParams(temperature=0.0, cfg_scale=1.0))
    assert toks.shape == (1, 4, 5)


def test_no_save_writes_the_log_only_and_takes_the_same_steps(codes, tmp_path):
    saved, bare = tmp_path / "saved", tmp_path / "bare"
    run([codes, saved, "--steps", "4", *COMMON])
    run([codes, bare, "--steps", "4", "--no-save", *COMMON])
    assert not (bare / "last.pt").exists() and not (bare / "model.safetensors").exists()
    assert [r["loss"] for r in log(bare)] == [r["loss"] for r in log(saved)]


def test_gradient_accumulation_takes_the_same_steps(codes, tmp_path):
    """--grad-accum 4 (micro-batches of 4) gives the update of one batch of 16 (fp32, no dropout)."""
    one, acc = tmp_path / "one", tmp_path / "acc"
    run([codes, one, "--steps", "4", *COMMON, *NO_DROPOUT, "--save-every", "4"])
    run([codes, acc, "--steps", "4", "--grad-accum", "4", *COMMON, *NO_DROPOUT, "--save-every", "4"])
    assert np.allclose([r["loss"] for r in log(acc)], [r["loss"] for r in log(one)], rtol=1e-5)
    a, b = torch.load(one / "last.pt", weights_only=True), torch.load(acc / "last.pt", weights_only=True)
    for k in a["model"]:
        # Adam turns fp32 rounding of near-zero gradients into ~1e-5 weight differences (lr 3e-3)
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=5e-5, msg=k)
    r = CliRunner().invoke(main, ["gpt", str(codes), str(tmp_path / "bad"), "--steps", "1", "--grad-accum", "3", *COMMON])
    assert r.exit_code != 0 and "--grad-accum 3" in r.output and len(r.output.strip().splitlines()) == 1


def test_resume_is_exact(codes, tmp_path):
    full, parts = tmp_path / "full", tmp_path / "parts"
    run([codes, full, "--steps", "10", *COMMON, "--ema", "0.9"])
    run([codes, parts, "--steps", "6", "--save-every", "3", *COMMON, "--ema", "0.9"])
    run([codes, parts, "--steps", "10", "--resume", *COMMON, "--ema", "0.9"])
    a, b = log(full), log(parts)
    assert [r["loss"] for r in a] == [r["loss"] for r in b if r["step"] <= 10][-10:]
    sa = torch.load(full / "last.pt", weights_only=True)
    sb = torch.load(parts / "last.pt", weights_only=True)
    for key in ("model", "ema"):
        for k in sa[key]:
            assert torch.equal(sa[key][k], sb[key][k]), (key, k)


def test_torchrun_two_processes_match_one(codes, tmp_path):
    """DDP over gloo with 2 processes takes the same steps as 1 process with the same global batch."""
    args = ["gpt", str(codes), None, "--steps", "3", *COMMON, *NO_DROPOUT, "--save-every", "3"]
    one = tmp_path / "one"
    run([a for a in args[1:2]] + [one] + args[3:])
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "lasad_train.cli", *[str(two) if a is None else a for a in args]]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = torch.load(one / "last.pt", weights_only=True), torch.load(two / "last.pt", weights_only=True)
    assert b["world_size"] == 2
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    la, lb = log(one), log(two)
    assert np.allclose([r["loss"] for r in la], [r["loss"] for r in lb], rtol=1e-5)


def test_errors_are_one_line(codes, tmp_path):
    cases = [
        ([tmp_path / "nope", tmp_path / "o"], "no manifest.json"),
        ([codes, tmp_path / "o", "--preset", "lasad-Q"], "lasad-Q"),
        ([codes, tmp_path / "o", "--set", "row_start=sideways", "--device", "cpu"], "row_start='sideways'"),
        ([codes, tmp_path / "o", "--batch-size", "0"], "--batch-size"),
        ([codes, tmp_path / "o", "--fsdp", "--device", "cpu"], "--fsdp needs CUDA devices"),
    ]
    for args, message in cases:
        r = CliRunner().invoke(main, ["gpt"] + [str(a) for a in args])
        assert r.exit_code != 0 and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_folder_to_picture_end_to_end(tmp_path):
    """data folder -> tokenizer -> codes -> gpt -> lasad-run, through the command lines."""
    from PIL import Image

    from lasad_engine.cli import run_main
    rng = np.random.default_rng(1)
    for c, colour in enumerate([(255, 0, 0), (0, 160, 0), (0, 0, 255)]):
        d = tmp_path / "src" / f"class{c}"
        d.mkdir(parents=True)
        for j in range(6):
            a = np.full((24, 24, 3), 255, np.uint8)
            y, x = rng.integers(0, 12, 2)
            a[y:y + 10, x:x + 10] = colour
            Image.fromarray(a).save(d / f"{j}.png")
    t = tmp_path
    steps = [["data", "folder", t / "src", t / "imgs", "--size", "16"],
             ["tokenizer", t / "imgs", t / "vq", "--preset", "vq-tiny", "--steps", "5", "--batch-size", "4",
              "--device", "cpu", "--no-progress"],
             ["codes", t / "imgs", t / "vq" / "vq.safetensors", t / "codes", "--device", "cpu", "--no-progress"],
             ["gpt", t / "codes", t / "gpt", "--preset", "lasad-tiny", "--steps", "5", "--batch-size", "4",
              "--device", "cpu", "--no-progress"]]
    for args in steps:
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 0, (args[0], r.output)
    # the checkpoint names its tokenizer outside its folder (the codes' absolute path): lasad opens
    # only tokenizers inside a checkpoint's folder unless told (README, "What you can rely on")
    r = CliRunner().invoke(run_main, ["--checkpoint", str(t / "gpt" / "model.safetensors"), "-c", "class2", "-n", "2",
                                      "--tokenizer", str(t / "vq" / "vq.safetensors"), "--no-progress",
                                      "-o", str(t / "out.png")])
    assert r.exit_code == 0, r.output
    assert Image.open(t / "out.png").size == (2 * 16 + 3 * 2, 16 + 2 * 2)


def test_training_in_pieces_with_a_time_limit(codes, tmp_path):
    """--time-limit stops after the step that crosses it and saves; resuming piece by piece ends
    where one uninterrupted run ends."""
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    run([codes, whole, "--steps", "5", *COMMON])
    first = run([codes, pieces, "--steps", "5", "--time-limit", "1e-6", *COMMON])
    assert first["steps"] == 1 and not first["complete"]
    for _ in range(10):
        s = run([codes, pieces, "--steps", "5", "--time-limit", "1e-6", "--resume", *COMMON])
        if s["complete"]:
            break
    assert s["steps"] == 5
    a, b = torch.load(whole / "last.pt", weights_only=True), torch.load(pieces / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_tokenizer_training_in_pieces(tmp_path):
    from lasad_train.formats import IMAGES_FORMAT, VERSION, save_npy, write_manifest
    from lasad_train.tokenizer_train import train_tokenizer
    rng = np.random.default_rng(0)
    images = tmp_path / "imgs"
    images.mkdir()
    save_npy(images / "images.npy", rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    save_npy(images / "split.npy", np.zeros(16, np.uint8))
    write_manifest(images, {"format": IMAGES_FORMAT, "version": VERSION, "count": 16, "size": [8, 8],
                            "label_sets": []})
    kw = dict(preset="vq-tiny", batch_size=4, device="cpu", progress=False, log_every=1)
    whole = train_tokenizer(images, tmp_path / "whole", steps=4, **kw)
    s = train_tokenizer(images, tmp_path / "pieces", steps=4, time_limit=1e-6, **kw)
    assert s["steps"] == 1 and not s["complete"]
    while not s["complete"]:
        s = train_tokenizer(images, tmp_path / "pieces", steps=4, time_limit=1e-6, resume=True, **kw)
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "pieces" / "last.pt", weights_only=True)["model"]
    assert whole["complete"] and all(torch.equal(a[k], b[k]) for k in a)


def test_optimizer_state_of_separate_projections_converts_to_the_fused_names():
    """A last.pt from before the model fused q|f|i and w1|w3 keys AdamW's moments by the old names:
    converted, each fused moment is the concatenation of its parts (dim 0, q, f, i / w1, w3 order),
    `step` is kept once, and AdamW on the fused matrix then takes exactly the steps it takes on the
    separate matrices (AdamW is elementwise)."""
    from lasad_train.formats import DataError
    from lasad_train.gpt import fuse_optimizer_state
    torch.manual_seed(0)
    d, hk, hv, f = 6, 4, 5, 7
    parts = {"attention.q_proj.weight": hk, "attention.f_proj.weight": hk, "attention.i_proj.weight": hv,
             "feed_forward.w1.weight": f, "feed_forward.w3.weight": f}
    old = {f"layers.{i}.{k}": torch.nn.Parameter(torch.randn(rows, d)) for i in range(2) for k, rows in parts.items()}
    norm = torch.nn.Parameter(torch.randn(d))
    opt = torch.optim.AdamW([{"params": list(old.values()), "weight_decay": 0.05},
                             {"params": [norm], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95))
    for _ in range(3):
        opt.zero_grad()
        (sum((p ** 2).sum() * (k + 1) for k, p in enumerate(old.values())) + norm.sin().sum()).backward()
        opt.step()
    names = [list(old), ["norm.weight"]]
    state = {"state": {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in [*old.items(), ("norm.weight", norm)]},
             "param_groups": [{**g, "params": group} for g, group in zip(opt.state_dict()["param_groups"], names)]}
    fused_names = ["norm.weight"] + [f"layers.{i}.{n}" for i in range(2) for n in ("attention.qfv.weight", "feed_forward.w13.weight")]
    new = fuse_optimizer_state(state, fused_names)
    assert sorted(new["state"]) == sorted(fused_names)
    assert sorted(new["param_groups"][0]["params"]) == sorted(n for n in fused_names if n != "norm.weight")
    for i in range(2):
        q, fg, v = (opt.state[old[f"layers.{i}.attention.{n}_proj.weight"]] for n in "qfi")
        got = new["state"][f"layers.{i}.attention.qfv.weight"]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got[key], torch.cat([q[key], fg[key], v[key]]))
        assert torch.equal(got["step"], q["step"]) and got["exp_avg"].shape == (2 * hk + hv, d)
    assert fuse_optimizer_state(new, fused_names) is new  # already fused: unchanged
    assert fuse_optimizer_state(state, list(old) + ["norm.weight"]) is state  # model not fused: unchanged

    # AdamW on the fused matrices continues exactly as on the separate ones
    fused = {n: torch.nn.Parameter(torch.cat([old[f"layers.{i}.{p}"].detach() for p in parts_of]))
             for i in range(2) for n, parts_of in
             ((f"layers.{i}.attention.qfv.weight", ["attention.q_proj.weight", "attention.f_proj.weight",
                                                     "attention.i_proj.weight"]),
              (f"layers.{i}.feed_forward.w13.weight", ["feed_forward.w1.weight", "feed_forward.w3.weight"]))}
    order = new["param_groups"][0]["params"]
    opt2 = torch.optim.AdamW([{"params": [fused[n] for n in order], "weight_decay": 0.05},
                              {"params": [norm], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95))
    from lasad_train.gpt import optim_state_by_index
    opt2.load_state_dict(optim_state_by_index(new, [order, ["norm.weight"]]))
    grads = {n: torch.randn_like(p) for n, p in old.items()}
    opt.zero_grad()
    for n, p in old.items():
        p.grad = grads[n]
    opt.step()
    for i in range(2):
        fused[f"layers.{i}.attention.qfv.weight"].grad = torch.cat(
            [grads[f"layers.{i}.attention.{n}_proj.weight"] for n in "qfi"])
        fused[f"layers.{i}.feed_forward.w13.weight"].grad = torch.cat(
            [grads[f"layers.{i}.feed_forward.{n}.weight"] for n in ("w1", "w3")])
    opt2.step()
    for i in range(2):
        torch.testing.assert_close(fused[f"layers.{i}.attention.qfv.weight"],
                                   torch.cat([old[f"layers.{i}.attention.{n}_proj.weight"] for n in "qfi"]),
                                   rtol=0, atol=0)
    partial = {"state": {k: v for k, v in state["state"].items() if "w3" not in k},
               "param_groups": [{**g, "params": [n for n in g["params"] if "w3" not in n]} for g in state["param_groups"]]}
    with pytest.raises(DataError, match="w3"):
        fuse_optimizer_state(partial, fused_names)


def cli_fails(args, *texts, code=None):
    """Run `lasad-train gpt ARGS`, expect a non-zero exit with one line on stderr holding `texts`
    (beside the progress lines of the steps taken before it)."""
    from test_faults import error_lines
    r = CliRunner().invoke(main, ["gpt"] + [str(a) for a in args])
    assert r.exit_code != 0 and (code is None or r.exit_code == code), (r.exit_code, r.output)
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    err = lines[0]
    for text in texts:
        assert text in err, (text, err)
    return err


RUN_FLAGS = ["--preset", "lasad-tiny", "--batch-size", "8", "--lr", "8e-4", "--warmup", "3", "--weight-decay", "0.1",
             "--beta1", "0.8", "--beta2", "0.9", "--grad-clip", "0.5", "--ema", "0.9", "--seed", "5",
             "--precision", "fp32", "--set", "n_layer=1", "--device", "cpu", "--no-progress", "--log-every", "1"]


def test_resume_is_the_same_run_without_repeating_the_flags(codes, tmp_path):
    """--resume alone restores every hyper-parameter and the EMA from last.pt: the log (lr
    included) and the weights equal those of one uninterrupted run, and model.safetensors keeps
    holding the EMA weights."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run([codes, whole, "--steps", "6", *RUN_FLAGS])
    run([codes, parts, "--steps", "3", *RUN_FLAGS])
    s = run([codes, parts, "--steps", "6", "--resume", "--device", "cpu", "--no-progress", "--log-every", "1"])
    assert s["resumed_from"] == 3 and s["complete"]
    a, b = log(whole), log(parts)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [(r["loss"], r["lr"]) for r in a] == [(r["loss"], r["lr"]) for r in b]
    assert b[-1]["lr"] == 8e-4 and b[0]["lr"] == pytest.approx(8e-4 / 3)
    sa, sb = (torch.load(p / "last.pt", weights_only=True) for p in (whole, parts))
    for key in ("model", "ema"):
        assert all(torch.equal(sa[key][k], sb[key][k]) for k in sa[key]), key
    assert sb["args"]["lr"] == 8e-4 and sb["args"]["ema"] == 0.9 and sb["args"]["overrides"] == {"n_layer": 1}
    deploy = load_checkpoint(parts / "model.safetensors")
    assert deploy.checkpoint_meta["ema"] is True and deploy.checkpoint_meta["step"] == 6
    assert all(torch.equal(v, sb["ema"][k]) for k, v in deploy.state_dict().items())


def test_resume_refuses_what_would_change_the_run(codes, tmp_path):
    out = tmp_path / "run"
    cli_fails([codes, out, "--resume", *COMMON], "nothing to resume")
    assert not (out / "last.pt").exists()
    run([codes, out, "--steps", "2", *COMMON, "--set", "n_layer=1"])
    cli_fails([codes, out, "--steps", "3", "--resume", "--lr", "1e-3", *COMMON[:4], "--device", "cpu"],
              "lr=0.003", "--lr 0.001")
    cli_fails([codes, out, "--steps", "3", "--resume", "--preset", "lasad-S", "--device", "cpu"], "preset='lasad-tiny'")
    cli_fails([codes, out, "--steps", "3", "--resume", "--set", "n_layer=2", "--device", "cpu"], "n_layer=1", "n_layer=2")
    cli_fails([codes, out, "--steps", "3", "--resume", "--row-start", "reset", "--device", "cpu"], "row_start")
    cli_fails([codes, out, "--steps", "1", "--resume", "--device", "cpu"], "past --steps 1")
    other = tmp_path / "other-codes"
    shutil.copytree(codes, other)
    m = json.loads((other / "manifest.json").read_text())
    write_manifest(other, {**m, "vocab_size": 40})
    cli_fails([other, out, "--steps", "3", "--resume", "--device", "cpu"], "vocab_size=32", "vocab_size=40")
    fewer = tmp_path / "fewer"
    shutil.copytree(codes, fewer)
    write_manifest(fewer, {**m, "shards": m["shards"][:1], "count": m["shards"][0]["count"]})
    cli_fails([fewer, out, "--steps", "3", "--resume", "--device", "cpu"], "96 code grids", "holds 60")
    # the same values given again are no change: the run continues
    assert run([codes, out, "--steps", "3", "--resume", *COMMON, "--set", "n_layer=1"])["steps"] == 3


def test_an_existing_run_is_kept_unless_resumed_or_overwritten(codes, tmp_path):
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    run([codes, out, "--steps", "3", *COMMON])
    before = (out / "last.pt").read_bytes()
    cli_fails([codes, out, "--steps", "2", *COMMON], "already holds a run", "--resume", "--overwrite")
    (out / "last.pt").rename(out / "kept.pt")  # a folder with the deploy file alone is a run too
    cli_fails([codes, out, "--steps", "2", *COMMON], "already holds a run (model.safetensors)")
    cli_fails([codes, out, "--steps", "2", "--resume", *COMMON], "nothing to resume", "model.safetensors only")
    (out / "kept.pt").rename(out / "last.pt")
    assert (out / "last.pt").read_bytes() == before
    cli_fails([codes, out, "--resume", "--overwrite", *COMMON], "pass one")
    run([codes, out, "--steps", "2", "--overwrite", *COMMON, "--seed", "3"])
    run([codes, fresh, "--steps", "2", *COMMON, "--seed", "3"])
    assert [r["step"] for r in log(out)] == [1, 2] and log(out) != [] and \
        [r["loss"] for r in log(out)] == [r["loss"] for r in log(fresh)]
    a, b = (torch.load(p / "last.pt", weights_only=True)["model"] for p in (out, fresh))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_between_the_two_saves_is_repaired_on_resume(codes, tmp_path, monkeypatch):
    """last.pt is written first, model.safetensors is derived from it; a run killed between the two
    leaves an older deploy file, and --resume (even with no step left to take) writes it again."""
    from lasad_train import gpt
    out = tmp_path / "run"
    real, calls = gpt.write_deploy, []

    def killed_on_the_second(path, checkpoint):
        calls.append(checkpoint["step"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies here: last.pt is at step 4, the deploy file at 2
        real(path, checkpoint)

    monkeypatch.setattr(gpt, "write_deploy", killed_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        train_gpt_args(codes, out, steps=4, save_every=2)
    monkeypatch.setattr(gpt, "write_deploy", real)
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4
    assert load_checkpoint(out / "model.safetensors").checkpoint_meta["step"] == 2
    assert not list(out.glob(".*.tmp"))
    train_gpt_args(codes, out, steps=4, resume=True)
    saved = torch.load(out / "last.pt", weights_only=True)
    deploy = load_checkpoint(out / "model.safetensors")
    assert deploy.checkpoint_meta["step"] == 4
    assert all(torch.equal(v, saved["ema"][k]) for k, v in deploy.state_dict().items())


def train_gpt_args(codes, out, **kw):
    from lasad_train.gpt import GPTTrainArgs, train_gpt
    base = dict(preset="lasad-tiny", batch_size=8, lr=3e-3, ema=0.9, device="cpu", progress=False, log_every=1)
    if kw.get("resume"):
        base = dict(device="cpu", progress=False, log_every=1)
    return train_gpt(GPTTrainArgs(codes=str(codes), out=str(out), **{**base, **kw}))


def test_stale_temporaries_go_and_a_second_process_is_refused(codes, tmp_path):
    from lasad_train.folders import FolderLock
    out = tmp_path / "run"
    run([codes, out, "--steps", "2", *COMMON])
    ours = [".last.pt.a1b2c3d4.tmp", ".model.safetensors.x_y_z_12.tmp", ".log.jsonl.00000000.tmp"]
    theirs = ["notes.tmp", ".last.pt.tmp", ".mine.abcdefgh.tmp", ".last.pt.toolongname.tmp", "last.pt.a1b2c3d4.tmp"]
    for name in ours + theirs:
        (out / name).write_text("x")
    with FolderLock(out / ".lock", str(out)):
        cli_fails([codes, out, "--steps", "3", "--resume", "--device", "cpu"], "in use by another lasad-train process")
        assert all((out / n).exists() for n in ours)
    run([codes, out, "--steps", "3", "--resume", "--device", "cpu", "--no-progress"])
    assert not any((out / n).exists() for n in ours) and all((out / n).exists() for n in theirs)


def test_sigterm_is_handled_like_ctrl_c(codes, tmp_path):
    """SIGTERM while last.pt is being written: the temporary file goes, exit code 143, one line."""
    import signal
    import time
    out = tmp_path / "run"
    child = (
        "import sys, time, torch\n"
        "real = torch.save\n"
        "def slow(obj, f, *a, **k):\n"
        "    real(obj, f, *a, **k)\n"
        "    print('SAVING', file=sys.stderr, flush=True)\n"
        "    time.sleep(60)\n"
        "torch.save = slow\n"
        "from lasad_train.cli import main\n"
        f"main(['gpt', {str(codes)!r}, {str(out)!r}, '--steps', '50', '--save-every', '1', "
        "'--preset', 'lasad-tiny', '--batch-size', '4', '--device', 'cpu', '--no-progress'])\n")
    p = subprocess.Popen([sys.executable, "-c", child], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    t0 = time.time()
    for line in p.stderr:
        if "SAVING" in line:
            break
        assert time.time() - t0 < 240
    assert list(out.glob(".last.pt.*.tmp")), "the temporary file is there while saving"
    p.send_signal(signal.SIGTERM)
    rest = p.stderr.read()
    assert p.wait(60) == 143, rest
    assert rest.strip() == "lasad-train: terminated" and not list(out.glob(".*.tmp"))
    assert not (out / "last.pt").exists()


def test_numeric_options_are_bounded(codes, tmp_path):
    out = tmp_path / "o"
    for flag, value in [("--seed", 2**64), ("--seed", -1), ("--batch-size", 10**9), ("--lr", "nan"),
                        ("--lr", "inf"), ("--ema", "nan"), ("--weight-decay", "inf"), ("--steps", 10**13),
                        ("--grad-accum", 0), ("--time-limit", "nan")]:
        cli_fails([codes, out, flag, value, "--device", "cpu"], flag, code=2)
    assert not out.exists()


def test_memory_estimate_counts_what_autograd_keeps():
    """The estimate runs the training forward on the meta device; a real CPU forward under the same
    kind of hook (real storages, deduplicated by address) keeps the same bytes, at any batch."""
    from lasad_engine import LasadConfig, LasadGen
    from lasad_train.memory import estimate
    cfg = LasadConfig.from_preset("lasad-tiny", vocab_size=300, num_classes=7, grid_height=6, grid_width=5)
    mem = estimate(cfg)
    torch.manual_seed(0)
    model = LasadGen(cfg).train()
    n = sum(p.numel() for p in model.parameters())
    assert mem.fixed == 16 * n and estimate(cfg, ema=True).fixed == 20 * n
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for batch in (1, 3, 8):
        seen = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = s.nbytes()
            return t
        x = torch.randint(0, 300, (batch, 30))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch.nn.functional.cross_entropy(model(x, torch.randint(0, 7, (batch,))).flatten(0, 1), x.flatten())
        real = sum(seen.values())
        assert abs(mem.base + mem.per_sequence * batch - real) <= 0.02 * real, (batch, real, mem)


def test_a_run_that_cannot_fit_is_refused_before_it_allocates(tmp_path, monkeypatch):
    """lasad-train gpt with its defaults (lasad-B, batch 256) on a 16-GiB CPU: one line with
    advice instead of an out-of-memory kill; the advised --grad-accum passes the same check."""
    from lasad_engine import LasadConfig
    from lasad_train import memory
    rng = np.random.default_rng(0)
    folder = tmp_path / "codes"
    folder.mkdir()
    save_npy(folder / "codes-00000.npy", rng.integers(0, 16384, (8, 16, 16)).astype(np.int32))
    save_npy(folder / "labels-00000.npy", rng.integers(0, 1000, 8).astype(np.int64))
    write_manifest(folder, {"format": CODES_FORMAT, "version": VERSION, "grid": [16, 16], "vocab_size": 16384,
                            "num_classes": 1000, "class_names": None, "count": 8,
                            "shards": [{"codes": "codes-00000.npy", "labels": "labels-00000.npy", "count": 8}]})
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 16 << 30)
    err = cli_fails([folder, tmp_path / "run", "--device", "cpu"], "lasad-B", "--batch-size 256", "GiB",
                    "--grad-accum", "16.0 GiB are available")
    assert not (tmp_path / "run" / "last.pt").exists()
    accum = int(err.split("--grad-accum ")[1].split()[0])
    cfg = LasadConfig.from_preset("lasad-B", vocab_size=16384, num_classes=1000, grid_height=16, grid_width=16)
    kw = dict(preset="lasad-B", batch_size=256, world=1, device=torch.device("cpu"), ema=False, fsdp=False)
    memory.check_training_memory(cfg, grad_accum=accum, **kw)
    with pytest.raises(DataError, match="needs about"):
        memory.check_training_memory(cfg, grad_accum=accum // 2, **kw)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1 << 30)
    with pytest.raises(DataError, match="smaller --preset"):
        memory.check_training_memory(cfg, grad_accum=256, **kw)


def test_running_out_of_gpu_memory_in_a_step_is_one_line_with_advice(codes, tmp_path, monkeypatch):
    """On CUDA the activations are not estimated (the kernels decide them): a step that runs out
    of memory ends as one line suggesting --grad-accum; the allocator's error is simulated here."""
    from lasad_train import gpt

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(gpt, "_train_step", oom)
    cli_fails([codes, tmp_path / "run", "--steps", "2", *COMMON], "out of GPU memory at step 1",
              "micro-batches of 16", "--grad-accum")


@pytest.mark.gpu
def test_on_cuda_resume_is_the_same_run_and_the_memory_check_uses_free_memory(codes, tmp_path, monkeypatch):
    """On a GPU (bf16 autocast): --resume alone restores the hyper-parameters
    and the EMA (the lr column equals an uninterrupted run's, the losses agree up to the GPU's
    nondeterminism); a GPU whose free memory cannot hold the weights and AdamW state is refused."""
    from lasad_engine import LasadConfig
    from lasad_train import memory
    flags = [("cuda" if a == "cpu" else a) for a in RUN_FLAGS if a not in ("--precision", "fp32")]
    flags += ["--chunk-backend", "torch"]  # flash-linear-attention may be missing
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run([codes, whole, "--steps", "6", *flags])
    run([codes, parts, "--steps", "3", *flags])
    run([codes, parts, "--steps", "6", "--resume", "--device", "cuda", "--no-progress", "--log-every", "1",
         "--chunk-backend", "torch"])
    a, b = log(whole), log(parts)
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-2)
    assert load_checkpoint(parts / "model.safetensors").checkpoint_meta["ema"] is True
    cfg = LasadConfig.from_preset("lasad-XXL", vocab_size=16384, num_classes=1000, grid_height=16, grid_width=16)
    free = memory.available_bytes(torch.device("cuda"))
    assert free is not None and free > 0
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 8 << 30)
    with pytest.raises(DataError, match="GPU memory for its weights"):
        memory.check_training_memory(cfg, preset="lasad-XXL", batch_size=8, grad_accum=1, world=1,
                                     device=torch.device("cuda"), ema=False, fsdp=False)


def test_init_starts_a_new_run_from_given_weights(codes, tmp_path):
    """--init: the new run's step-0 weights are the given checkpoint's (a step with a vanishing
    learning rate changes them by far less than the tolerance), its log starts at step 1, and a
    model of another shape or --init with --resume is one line."""
    from lasad_engine.checkpoint import read_checkpoint
    first = tmp_path / "a"
    run([codes, first, "--steps", "30", *COMMON])
    _, trained, _ = read_checkpoint(first / "model.safetensors")
    second = tmp_path / "b"
    args = [a if a != "3e-3" else "1e-30" for a in COMMON]
    summary = run([codes, second, "--steps", "1", "--init", first / "model.safetensors", "--weight-decay", "0", *args])
    assert summary["steps"] == 1 and [r["step"] for r in log(second)] == [1]
    _, started, meta = read_checkpoint(second / "model.safetensors")
    assert meta["init"] == str(first / "model.safetensors")
    fresh = torch.load(second / "last.pt", weights_only=True)["model"]
    assert set(started) == set(trained)
    for k in trained:
        torch.testing.assert_close(started[k], trained[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(fresh[k].float(), trained[k].float(), rtol=0, atol=1e-6)
    # a random initialisation is far from the trained weights: the comparison can fail
    run([codes, tmp_path / "c", "--steps", "1", *args])
    _, random_init, _ = read_checkpoint(tmp_path / "c" / "model.safetensors")
    assert max((random_init[k] - trained[k]).abs().max().item() for k in trained) > 1e-3
    r = CliRunner().invoke(main, ["gpt", str(codes), str(tmp_path / "d"), "--init", str(first / "model.safetensors"),
                                  "--set", "n_layer=3", *map(str, COMMON)])
    assert r.exit_code != 0 and len(r.stderr.strip().splitlines()) == 1 and "n_layer" in r.stderr, r.output
    r = CliRunner().invoke(main, ["gpt", str(codes), str(first), "--resume", "--steps", "40",
                                  "--init", str(first / "model.safetensors"), "--no-progress", "--device", "cpu"])
    assert r.exit_code != 0 and "--init" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
