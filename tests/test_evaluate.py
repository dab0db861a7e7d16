"""lasad-eval: FID and KID against independent computations; the feature extractor's input path;
the command's errors. The real Inception file is used only where it is present."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from lasad_tools.evaluate import main
from lasad_tools.fid import InceptionFeatures, cached_features, fid_from_stats, kid, statistics


def test_fid_against_an_independent_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 6)), rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    mu1, s1 = statistics(a)
    mu2, s2 = statistics(b)
    # tr sqrt(S1 S2) from the eigenvalues of the (non-symmetric) product, computed by numpy
    tr = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
    assert abs(fid_from_stats(mu1, s1, mu1, s1)) < 1e-9
    # diagonal covariances: the closed form
    d1, d2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    assert fid_from_stats(np.zeros(3), d1, np.ones(3), d2) == pytest.approx(3 + 14 + 6 - 2 * (2 + 2 + 3))


def test_kid_against_a_loop():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.3
    k = lambda a, b: (a @ b / 5 + 1) ** 3
    n = 12
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / (n * n)
    mean, std = kid(x, y, subsets=3, subset_size=12)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-9) and std == pytest.approx(0, abs=1e-12)


class PoolNet(torch.nn.Module):
    def forward(self, x):
        return torch.stack([x.mean((2, 3)), x.amin((2, 3)), x.amax((2, 3))], 1).flatten(1)[:, :, None, None]


def test_cached_features_computes_once_and_loads_nothing_after(tmp_path):
    """The first call computes the features (of images given lazily) and writes the cache; the
    second reads them back equal without asking for the images at all; an array works too."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    w = rng.standard_normal((8 * 8 * 3, 4))
    feats = lambda x: x.reshape(len(x), -1).astype(np.float64) @ w  # noqa: E731
    want = images.reshape(6, -1).astype(np.float64) @ w
    calls = []

    def load():
        calls.append(1)
        return images
    cache = tmp_path / "ref.npy"
    assert np.allclose(cached_features(feats, load, cache), want) and calls == [1] and cache.is_file()
    assert np.allclose(cached_features(feats, load, cache), want) and calls == [1]
    assert np.allclose(cached_features(feats, images, None), want)


def test_feature_extractor_input_path(tmp_path):
    """Images reach the network as 299x299 in the TF input range, one feature row per image."""
    torch.jit.save(torch.jit.script(PoolNet()), tmp_path / "net.pt")
    imgs = np.zeros((5, 16, 16, 3), np.uint8)
    imgs[:, :, :, 0] = 255
    f = InceptionFeatures(tmp_path / "net.pt", batch_size=2)(imgs)
    assert f.shape == (5, 9)
    assert np.allclose(f[:, [0, 3, 6]], 0.9921875) and np.allclose(f[:, [1, 4, 7]], -1.0)


def test_fid_command_on_image_sets(tmp_path):
    torch.jit.save(torch.jit.script(PoolNet()), tmp_path / "net.pt")
    rng = np.random.default_rng(0)
    for name, shift in (("ref", 0), ("same", 0), ("other", 80)):
        for c in range(2):
            d = tmp_path / f"{name}-src" / f"c{c}"
            d.mkdir(parents=True)
            for j in range(12):
                a = np.clip(rng.normal(100 + shift, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{j}.png")
        from lasad_train.cli import main as train_main
        r = CliRunner().invoke(train_main, ["data", "folder", str(tmp_path / f"{name}-src"), str(tmp_path / name),
                                            "--size", "8", "--holdout", "0.5"])
        assert r.exit_code == 0, r.output
    scores = {}
    for name in ("same", "other"):
        r = CliRunner().invoke(main, ["fid", "--ref", str(tmp_path / "ref"), "--images", str(tmp_path / name),
                                      "--inception", str(tmp_path / "net.pt"), "--device", "cpu"])
        assert r.exit_code == 0, r.output
        scores[name] = json.loads(r.stdout.strip().splitlines()[-1])
    assert scores["other"]["fid"] > 10 * scores["same"]["fid"] and scores["other"]["kid"] > scores["same"]["kid"]
    # a reference subset, with its features cached and reused
    args = ["fid", "--ref", str(tmp_path / "ref"), "--images", str(tmp_path / "other"), "--num-ref", "6",
            "--ref-features", str(tmp_path / "ref.npy"), "--inception", str(tmp_path / "net.pt"), "--device", "cpu"]
    first = json.loads(CliRunner().invoke(main, args).stdout.strip().splitlines()[-1])
    assert first["num_ref"] == 6 and np.load(tmp_path / "ref.npy").shape == (6, 9)
    again = json.loads(CliRunner().invoke(main, args).stdout.strip().splitlines()[-1])
    assert again["fid"] == first["fid"]


def test_fid_command_errors(tmp_path):
    r = CliRunner().invoke(main, ["fid", "--ref", str(tmp_path), "--inception", str(tmp_path / "x.pt")])
    assert r.exit_code == 2 and "exactly one of --checkpoint and --images" in r.stderr
    r = CliRunner().invoke(main, ["fid", "--ref", str(tmp_path / "nope"), "--images", str(tmp_path)])
    assert r.exit_code == 1 and "no manifest.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not os.environ.get("LASAD_INCEPTION"), reason="set LASAD_INCEPTION to the Inception file "
                    "(lasad-eval fetch-inception) to run the real feature extractor")
def test_real_inception_features():
    imgs = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    f = InceptionFeatures(Path(os.environ["LASAD_INCEPTION"]))(imgs)
    assert f.shape == (4, 2048) and np.isfinite(f).all()


def test_fid_command_generates_from_a_checkpoint(tmp_path):
    """--checkpoint: images drawn with the reference's class mix through the pipeline."""
    from conftest import randomize_

    from lasad_engine import LasadConfig, LasadGen, save_checkpoint
    from lasad_engine.tokenizer import VQ_PRESETS, VQModel, save_tokenizer
    from lasad_train.cli import main as train_main
    torch.jit.save(torch.jit.script(PoolNet()), tmp_path / "net.pt")
    for c in range(2):
        d = tmp_path / "src" / f"c{c}"
        d.mkdir(parents=True)
        for j in range(4):
            Image.fromarray(np.full((8, 8, 3), 60 * c + j, np.uint8)).save(d / f"{j}.png")
    assert CliRunner().invoke(train_main, ["data", "folder", str(tmp_path / "src"), str(tmp_path / "ref"),
                                           "--size", "8", "--holdout", "0.5"]).exit_code == 0
    cfg = LasadConfig.from_preset("lasad-tiny", vocab_size=64, num_classes=2, grid_height=4, grid_width=4)
    save_tokenizer(tmp_path / "vq.pt", VQModel(VQ_PRESETS["vq-tiny"]))
    save_checkpoint(tmp_path / "m.pt", randomize_(LasadGen(cfg), 1), meta={"tokenizer": "vq.pt"})
    r = CliRunner().invoke(main, ["fid", "--ref", str(tmp_path / "ref"), "--checkpoint", str(tmp_path / "m.pt"),
                                  "--label-set", "class", "--num", "6", "--inception", str(tmp_path / "net.pt"),
                                  "--device", "cpu", "-o", str(tmp_path / "fid.json")])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "fid.json").read_text())
    assert result["num_gen"] == 6 and result["num_ref"] == 4 and np.isfinite(result["fid"])
    assert result["grid"] is None and "note" not in r.stderr
    # --grid: another size generated (a model trained at several); against 8x8 references it is noted
    common = ["fid", "--ref", str(tmp_path / "ref"), "--checkpoint", str(tmp_path / "m.pt"), "--label-set", "class",
              "--num", "6", "--inception", str(tmp_path / "net.pt"), "--device", "cpu"]
    r = CliRunner().invoke(main, [*common, "--grid", "2x3", "-o", str(tmp_path / "fid23.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "fid23.json").read_text())["grid"] == [2, 3]
    assert "generated 4x6 images are scored against 8x8 references" in r.stderr and "never trained" in r.stderr
    for bad, text in (("0x4", "grid=0x4"), ("big", "'big'")):
        r = CliRunner().invoke(main, [*common, "--grid", bad])
        assert r.exit_code != 0 and text in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
