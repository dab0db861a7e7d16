"""lasad-train gpt on a CPU: the loss falls, resume is exact, torchrun (gloo, 2 processes) takes
the same steps as one process, and the deploy checkpoint serves."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lasad_engine import load_checkpoint
from lasad_engine.engine import LasadEngine, SamplingParams
from lasad_train.cli import main
from lasad_train.formats import CODES_FORMAT, VERSION, save_npy, write_manifest

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
