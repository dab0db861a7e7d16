"""`lasad-train tokenizer`: training lowers the loss, PSNR, exact resume, checkpoints, CLI errors.
CPU only, vq-tiny on a tiny synthetic image set (32 images of 16x16, 4 coloured-shape classes)."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lasad_engine.io import UserError
from lasad_engine.tokenizer import load_tokenizer
from lasad_train.cli import main
from lasad_train.formats import DataError, save_npy, write_manifest
from lasad_train.tokenizer_train import StepSampler, psnr_db, train_tokenizer

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (200, 200, 20)]
NAMES = ["square-red", "disc-green", "square-blue", "disc-yellow"]


def make_image_set(folder, n=32, size=16, holdout_every=8):
    """Coloured squares / discs on white; label = i % 4; every `holdout_every`-th image held out."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = np.full((n, size, size, 3), 255, np.uint8)
    labels = (np.arange(n) % 4).astype(np.int64)
    s = size // 2
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        y, x = rng.integers(0, size - s + 1, 2)
        if labels[i] % 2 == 0:
            images[i, y:y + s, x:x + s] = COLOURS[labels[i]]
        else:
            images[i][(yy - y - s / 2) ** 2 + (xx - x - s / 2) ** 2 < (s / 2) ** 2] = COLOURS[labels[i]]
    split = np.zeros(n, np.uint8)
    if holdout_every:
        split[::holdout_every] = 1
    save_npy(folder / "images.npy", images)
    save_npy(folder / "labels-class.npy", labels)
    (folder / "classes-class.json").write_text(json.dumps(NAMES))
    save_npy(folder / "split.npy", split)
    write_manifest(folder, {"format": "lasad-images", "version": 1, "source": "synthetic", "count": n,
                            "size": [size, size], "label_sets": ["class"], "sources": {}})
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_set(tmp_path_factory.mktemp("images"))


FAST = dict(preset="vq-tiny", batch_size=8, lr=1e-3, log_every=1, progress=False, device="cpu")  # CPU: bitwise resume


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_training_lowers_loss_and_writes_files(images, tmp_path):
    out = tmp_path / "run"
    s = train_tokenizer(images, out, steps=30, **FAST)
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    losses = [r["loss"] for r in log]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    assert log[-1]["psnr"] > log[0]["psnr"]
    for key in ("rec_loss", "vq_loss", "commit_loss", "codebook_usage", "images_per_s", "psnr"):
        assert math.isfinite(log[-1][key])
    assert 0 < log[-1]["codebook_usage"] <= 1

    # summary: held-out split is every 8th image -> 4 images
    assert s["steps"] == 30 and s["holdout_images"] == 4 and s["images"] == 28
    assert 5 < s["holdout_psnr"] < 60 and 0 < s["holdout_codebook_usage"] <= 1
    assert s["grid"] == [8, 8] and s["final_loss"] == pytest.approx(losses[-1])

    # resumable checkpoint loads with weights_only and carries everything resume needs
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 30 and ckpt["config"]["codebook_size"] == 64
    assert {"model", "optimizer", "rng", "train"} <= set(ckpt) and "discriminator" not in ckpt
    assert {"torch", "numpy", "python"} <= set(ckpt["rng"])
    assert ckpt["train"]["beta1"] == 0.9 and ckpt["train"]["beta2"] == 0.95

    # deploy tokenizer: same weights, decodes, and its reconstructions match the summary's PSNR
    vq = load_tokenizer(out / "vq.safetensors")
    for k, v in vq.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    held = np.load(images / "images.npy")[np.load(images / "split.npy") == 1]
    x = torch.from_numpy(held).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        codes = vq.encode(x)
        rec = vq.decode_code(codes)
    assert codes.shape == (4, 8, 8) and rec.shape == x.shape
    got = psnr_db((rec.clamp(-1, 1) + 1) / 2, (x + 1) / 2).item()
    assert got == pytest.approx(s["holdout_psnr"], abs=1e-4)


def test_psnr_matches_float64_formula():
    rng = np.random.default_rng(1)
    a = rng.random((5, 3, 7, 9))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    ref = np.mean([10 * np.log10(1.0 / np.mean((a[i] - b[i]) ** 2)) for i in range(5)])
    got = psnr_db(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)).item()
    assert got == pytest.approx(ref, abs=1e-4)
    assert psnr_db(torch.tensor(a), torch.tensor(b)).item() == pytest.approx(ref, rel=1e-12)
    # 255-scale images: same number with max_val=255
    assert psnr_db(torch.tensor(a * 255), torch.tensor(b * 255), max_val=255).item() == pytest.approx(ref, rel=1e-9)
    assert psnr_db(torch.tensor(a), torch.tensor(a)).item() == pytest.approx(100.0)


def test_sampler_is_a_function_of_seed_and_step():
    s = StepSampler(10, 4, seed=3)
    idx = torch.cat([s(k)[0] for k in range(5)])  # 20 samples = 2 epochs
    assert sorted(idx[:10].tolist()) == list(range(10)) and sorted(idx[10:].tolist()) == list(range(10))
    fresh = StepSampler(10, 4, seed=3)
    for k in (4, 0, 2):  # any order, no state
        assert torch.equal(fresh(k)[0], s(k)[0]) and torch.equal(fresh(k)[1], s(k)[1])
    assert not torch.equal(StepSampler(10, 4, seed=4)(0)[0], s(0)[0]) or \
        not torch.equal(StepSampler(10, 4, seed=4)(1)[0], s(1)[0])


@pytest.mark.parametrize("gan,total,split", [(False, 10, 5), (True, 4, 2)])
def test_resume_is_exact(images, tmp_path, gan, total, split):
    kw = dict(FAST, gan=gan, disc_start=1)
    train_tokenizer(images, tmp_path / "a", steps=total, **kw)
    train_tokenizer(images, tmp_path / "b", steps=split, **kw)
    train_tokenizer(images, tmp_path / "b", steps=total, resume=True, log_every=1, progress=False, device="cpu")
    la, lb = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["step"] for r in lb] == list(range(1, total + 1))
    assert la[-1]["loss"] == lb[-1]["loss"]
    if gan:
        assert la[-1]["disc_loss"] is not None and la[-1]["disc_loss"] == lb[-1]["disc_loss"]
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert b["step"] == total
    for part in ("model",) + (("discriminator",) if gan else ()):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_resume_checks(images, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(DataError, match="nothing to resume"):
        train_tokenizer(images, out, steps=2, resume=True, **FAST)
    train_tokenizer(images, out, steps=2, **FAST)
    with pytest.raises(DataError, match="already holds a run"):
        train_tokenizer(images, out, steps=3, **FAST)
    with pytest.raises(ValueError, match="lr=0.001"):
        train_tokenizer(images, out, steps=3, resume=True, lr=0.5, progress=False, device="cpu")
    with pytest.raises(ValueError, match="past --steps"):
        train_tokenizer(images, out, steps=1, resume=True, progress=False, device="cpu")


def test_images_not_a_multiple_of_the_downsample_factor(tmp_path):
    odd = make_image_set(tmp_path / "odd", n=4, size=15, holdout_every=0)
    with pytest.raises(DataError, match="downsample factor 2"):
        train_tokenizer(odd, tmp_path / "o", steps=1, **FAST)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_trains_and_prints_one_line_summary(images, tmp_path):
    r = cli("tokenizer", images, tmp_path / "c", "--preset", "vq-tiny", "--steps", "2", "--batch-size", "4",
            "--device", "cpu", "--no-progress")
    assert r.exit_code == 0, r.output + r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "held-out PSNR" in lines[0] and "codebook usage" in lines[0]
    assert (tmp_path / "c" / "vq.safetensors").is_file() and (tmp_path / "c" / "last.pt").is_file()


@pytest.mark.parametrize("args,code,text", [
    (["{tmp}/nowhere", "{tmp}/o"], 1, "no manifest.json"),
    (["{img}", "{tmp}/o", "--preset", "vq-huge"], 2, "vq-huge"),
    (["{img}", "{tmp}/o", "--steps", "0"], 2, "--steps"),
    (["{img}", "{tmp}/o", "--resume"], 1, "nothing to resume"),
    (["{img}", "{tmp}/o", "--device", "cuda:7"] if not torch.cuda.is_available() else
     ["{img}", "{tmp}/o", "--device", "bogus"], 1, "--device"),
])
def test_cli_errors_are_one_line(images, tmp_path, args, code, text):
    r = cli("tokenizer", *[a.format(tmp=tmp_path, img=images) for a in args], "--no-progress")
    assert r.exit_code == code, r.output + r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and text in err and "Traceback" not in err
    assert not (tmp_path / "o" / "last.pt").exists()


def test_held_out_evaluation_is_capped_and_shows_progress(images, tmp_path, capsys):
    """eval_limit held-out images spread over the split (the summary's PSNR is that of exactly
    those images), a progress bar on stderr while they are evaluated; 0 evaluates none."""
    from lasad_train.formats import spread
    s = train_tokenizer(images, tmp_path / "a", steps=2, eval_limit=2, **{**FAST, "progress": True})
    err = capsys.readouterr().err
    assert "held-out" in err and "2/2" in err
    assert s["holdout_images"] == 2 and s["holdout_images_total"] == 4
    held = np.load(images / "images.npy")[np.load(images / "split.npy") == 1][spread(4, 2)]
    vq = load_tokenizer(tmp_path / "a" / "vq.safetensors")
    x = torch.from_numpy(held).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec = vq.decode_code(vq.encode(x))
    assert psnr_db((rec.clamp(-1, 1) + 1) / 2, (x + 1) / 2).item() == pytest.approx(s["holdout_psnr"], abs=1e-4)
    none = train_tokenizer(images, tmp_path / "b", steps=1, eval_limit=0, **FAST)
    assert none["holdout_psnr"] is None and none["holdout_images"] == 0
    assert "held-out" not in capsys.readouterr().err  # progress=False: no bar


def test_limit_trains_on_the_spread_images_and_belongs_to_the_run(images, tmp_path):
    """limit=12 trains exactly as a run on an image set made of those 12 training images; a resume
    keeps the limit and refuses another."""
    from lasad_train.formats import spread
    train_tokenizer(images, tmp_path / "lim", steps=3, limit=12, **FAST)
    split = np.load(images / "split.npy")
    picked = np.flatnonzero(split == 0)[spread(int((split == 0).sum()), 12)]
    small = tmp_path / "small"
    small.mkdir()
    save_npy(small / "images.npy", np.load(images / "images.npy")[picked])
    save_npy(small / "split.npy", np.zeros(12, np.uint8))
    write_manifest(small, {"format": "lasad-images", "version": 1, "count": 12, "size": [16, 16], "label_sets": []})
    train_tokenizer(small, tmp_path / "ref", steps=3, **FAST)
    a = torch.load(tmp_path / "lim" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    assert a["train"]["limit"] == 12 and a["train"]["train_images"] == 12
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    with pytest.raises(DataError, match="limit=12"):
        train_tokenizer(images, tmp_path / "lim", steps=4, resume=True, limit=8, device="cpu", progress=False)
    s = train_tokenizer(images, tmp_path / "lim", steps=4, resume=True, device="cpu", progress=False)
    assert s["images"] == 12 and s["steps"] == 4


def test_checkpoint_writes_format_version_and_a_legacy_one_still_resumes(images, tmp_path):
    kw = dict(FAST, eval_limit=0)
    train_tokenizer(images, tmp_path / "whole", steps=4, **kw)
    train_tokenizer(images, tmp_path / "old", steps=2, **kw)
    path = tmp_path / "old" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format_version"] == 1 and "version" not in ckpt
    del ckpt["format_version"]
    torch.save({**ckpt, "version": 1}, path)  # as lasad wrote it before the key was unified
    train_tokenizer(images, tmp_path / "old", steps=4, resume=True, device="cpu", progress=False, eval_limit=0)
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model"]
    b = torch.load(path, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.save({**ckpt, "version": 7}, path)
    with pytest.raises(UserError, match="version 7; this lasad reads versions 1 to 1"):
        train_tokenizer(images, tmp_path / "old", steps=5, resume=True, device="cpu", progress=False)


def test_overwrite_starts_again(images, tmp_path):
    out = tmp_path / "r"
    train_tokenizer(images, out, steps=3, **FAST)
    s = train_tokenizer(images, out, steps=2, overwrite=True, **FAST)
    assert s["steps"] == 2 and [r["step"] for r in read_log(out)] == [1, 2]
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("flag,value", [("--seed", 2**40), ("--lr", "nan"), ("--beta1", "inf"),
                                        ("--batch-size", 10**8), ("--eval-limit", -1), ("--limit", 0)])
def test_cli_numbers_are_bounded(images, tmp_path, flag, value):
    r = cli("tokenizer", images, tmp_path / "o", flag, value, "--device", "cpu", "--no-progress")
    assert r.exit_code == 2 and flag in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_init_starts_from_a_tokenizer_at_another_size(images, tmp_path):
    """--init: a new run whose weights at step 0 are the given tokenizer's (with a learning rate
    too small to move them, the result equals it; a seeded run lands far away), at another image
    size (here 24 px for a tokenizer trained at 16, as the bundled one at 96 for 64 px); the preset
    comes from the file, and the run records where it started."""
    train_tokenizer(images, tmp_path / "a", steps=6, **FAST)
    start = load_tokenizer(tmp_path / "a" / "vq.safetensors").state_dict()
    bigger = make_image_set(tmp_path / "img24", n=16, size=24, holdout_every=8)
    still = dict(FAST, lr=1e-12, preset=None)
    s = train_tokenizer(bigger, tmp_path / "b", steps=2, init=tmp_path / "a" / "vq.safetensors", **still)
    assert s["preset"] == "vq-tiny" and s["grid"] == [12, 12]
    got = load_tokenizer(tmp_path / "b" / "vq.safetensors").state_dict()
    seeded = load_tokenizer(train_tokenizer(bigger, tmp_path / "c", steps=2, **dict(still, preset="vq-tiny"))
                            ["tokenizer"]).state_dict()
    moved = [k for k, _ in load_tokenizer(tmp_path / "a" / "vq.safetensors").named_parameters()]  # not usage counts
    assert all(torch.allclose(got[k], start[k], atol=1e-8, rtol=0) for k in moved)
    assert not all(torch.allclose(seeded[k], start[k], atol=1e-3) for k in moved)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["train"]["init"].endswith("vq.safetensors")
    # it goes on as a run of its own: resumable, and it still says where it started
    train_tokenizer(bigger, tmp_path / "b", steps=3, resume=True, progress=False, device="cpu")
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["train"]["init"].endswith("vq.safetensors")


@pytest.mark.parametrize("extra,text", [
    (["--init", "{tmp}/none.safetensors"], "--init {tmp}/none.safetensors: no such file"),
    (["--init", "{tmp}/junk.safetensors"], "not a tokenizer"),
    (["--init", "{tmp}/a/vq.safetensors", "--preset", "vq-f4-demo"], "is a vq-tiny tokenizer, not --preset vq-f4-demo"),
])
def test_init_errors_are_one_line(images, tmp_path, extra, text):
    train_tokenizer(images, tmp_path / "a", steps=1, **FAST)
    (tmp_path / "junk.safetensors").write_bytes(np.random.default_rng(0).bytes(300))
    r = cli("tokenizer", images, tmp_path / "o", *[a.format(tmp=tmp_path) for a in extra], "--steps", "1",
            "--device", "cpu", "--no-progress")
    err = r.stderr.strip()
    assert r.exit_code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, r.output + r.stderr
    assert text.format(tmp=tmp_path) in err
    assert not (tmp_path / "o" / "last.pt").exists()
    with pytest.raises(DataError, match="pass one"):
        train_tokenizer(images, tmp_path / "a", steps=2, resume=True, init=tmp_path / "a" / "vq.safetensors",
                        progress=False, device="cpu")
