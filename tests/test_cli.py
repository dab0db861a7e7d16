"""lasad-run through click's CliRunner: every option, every error, the files it writes."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import randomize_
from PIL import Image

from lasad_engine import LasadConfig, LasadGen, __version__, save_checkpoint
from lasad_engine.cli import image_grid, run_main
from lasad_engine.tokenizer import VQ_PRESETS, VQModel, save_tokenizer


@pytest.fixture
def ckpt(tmp_path):
    names = [f"class {i}" for i in range(9)] + ["golden retriever"]
    cfg = LasadConfig.from_preset("lasad-tiny", vocab_size=64, grid_height=4, grid_width=4, class_names=names)
    save_checkpoint(tmp_path / "m.pt", randomize_(LasadGen(cfg), 2), meta={"tokenizer": "vq.pt"})
    save_tokenizer(tmp_path / "vq.pt", VQModel(VQ_PRESETS["vq-tiny"]))
    return tmp_path / "m.pt"


def run(args, cwd):
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=cwd):
        result = runner.invoke(run_main, [str(a) for a in args])
        files = {}
        import os
        for root, _, names in os.walk("."):
            for n in names:
                files[os.path.join(root, n)[2:]] = open(os.path.join(root, n), "rb").read()
    return result, files


def test_default_run_writes_grid_and_sidecar(ckpt, tmp_path):
    r, files = run(["--checkpoint", ckpt, "-c", "3", "--no-progress"], tmp_path)
    assert r.exit_code == 0, r.output
    assert sorted(files) == ["lasad_3_seed0.json", "lasad_3_seed0.png"]
    side = json.loads(files["lasad_3_seed0.json"])
    assert side["seed"] == 0 and side["classes"] == [3] and side["num_samples"] == 4
    assert side["cfg_scale"] == 4.0 and side["grid"] == [4, 4] and side["backend"] == "torch"
    assert len(side["checkpoint_sha256"]) == 16
    import io
    img = Image.open(io.BytesIO(files["lasad_3_seed0.png"]))
    assert img.size == (4 * 8 + 5 * 2, 8 + 2 * 2)  # 4 images of 8x8 (4x4 tokens, f=2), 2 px padding


def test_every_option(ckpt, tmp_path):
    args = ["--checkpoint", ckpt, "-c", "golden retriever", "--class", "2", "--num-samples", "3",
            "--seed", "11", "--cfg-scale", "2.5", "--cfg-interval", "5", "--temperature", "0.8",
            "--top-k", "10", "--top-p", "0.9", "--grid", "3x5", "--backend", "torch", "--device", "cpu",
            "--precision", "fp32", "--max-batch", "2", "--no-cuda-graph", "-o", "out/grid.png",
            "--nrow", "2", "--save-individual", "--json", "--no-progress"]
    r, files = run(args, tmp_path)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["classes"] == [9, 2] and summary["class_names"] == ["golden retriever", "class 2"]
    assert summary["grid"] == [3, 5] and summary["top_k"] == 10 and summary["max_batch"] == 2
    assert sorted(files) == ["out/grid.json", "out/grid.png"] + [f"out/grid/{i:06d}.png" for i in range(6)]
    import io
    assert Image.open(io.BytesIO(files["out/grid.png"])).size == (2 * 10 + 3 * 2, 3 * 6 + 4 * 2)  # vq-tiny: 2 px per token
    assert Image.open(io.BytesIO(files["out/grid/000000.png"])).size == (10, 6)
    # same seed, same images
    r2, files2 = run(args, tmp_path)
    assert files2["out/grid.png"] == files["out/grid.png"]


def test_list_classes_and_version(ckpt, tmp_path):
    r, _ = run(["--checkpoint", ckpt, "--list-classes"], tmp_path)
    assert r.exit_code == 0 and r.output.splitlines()[9] == "9\tgolden retriever"
    r, _ = run(["--version"], tmp_path)
    assert r.exit_code == 0 and __version__ in r.output


@pytest.mark.parametrize("args,code,message", [
    (["-c", "99"], 2, "class 99 is out of range: this model has classes 0..9"),
    (["-c", "golden retreiver"], 2, "did you mean 'golden retriever'"),
    (["-c", "1", "--backend", "jax"], 2, "'jax' is not one of 'torch', 'cuda', 'onnxruntime', 'tensorrt'"),
    (["-c", "1", "--top-p", "0"], 2, "--top-p"),
    (["-c", "1", "--grid", "big"], 2, "grid='big' is not of the form HxW"),
    (["-c", "1", "-o", "x.jpg"], 2, "must end in .png"),
    (["-c", "1", "--device", "cuda"], 1, "CUDA is not available on this machine"),
    (["-c", "1", "--device", "tpu9"], 2, "is not a torch device"),
    (["-c", "1", "--backend", "tensorrt"], 1, "backend 'tensorrt' needs tensorrt: NVIDIA TensorRT"),
    (["--no-progress"], 2, "no class given"),
    (["-c", "1", "--precision", "fp8"], 2, "'fp8' is not one of"),
])
def test_errors_are_one_line(ckpt, tmp_path, args, code, message):
    if "--device" in args and args[args.index("--device") + 1] == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    r, files = run(["--checkpoint", ckpt] + args, tmp_path)
    assert r.exit_code == code, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith(("note:", "seed:"))]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.output
    assert not any(f.endswith(".png") for f in files)


def test_missing_and_corrupt_checkpoints(tmp_path):
    r, _ = run(["--checkpoint", tmp_path / "nope.pt", "-c", "1"], tmp_path)
    assert r.exit_code == 1 and "no such checkpoint file or folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage" * 100)
    r, _ = run(["--checkpoint", bad, "-c", "1"], tmp_path)
    assert r.exit_code == 1 and "not a readable checkpoint" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_existing_output_is_replaced_atomically(ckpt, tmp_path, monkeypatch):
    """A failure while writing leaves the user's previous file as it was, and no temp files."""
    out = tmp_path / "keep.png"
    out.write_bytes(b"user's picture")
    import lasad_engine.cli as cli

    def broken_save(self, fp, format=None, **kw):
        with open(fp, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(Image.Image, "save", broken_save)
    r = CliRunner().invoke(cli.run_main, ["--checkpoint", str(ckpt), "-c", "1", "-o", str(out), "--no-progress"])
    assert r.exit_code == 1 and "disk full" in r.stderr
    assert out.read_bytes() == b"user's picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png", "m.pt", "vq.pt"]


def test_image_grid_layout():
    imgs = np.random.default_rng(0).integers(0, 255, (5, 3, 4, 3), dtype=np.uint8)
    g = image_grid(imgs, nrow=2, pad=1)
    assert g.shape == (3 * 4 + 1, 2 * 5 + 1, 3)
    assert np.array_equal(g[1:4, 6:10], imgs[1]) and np.array_equal(g[9:12, 1:5], imgs[4])
    assert (g[9:12, 6:10] == 255).all()  # the empty cell stays white


def test_bundled_default_model_runs(tmp_path):
    """The README's first command: lasad-run --class 207 with the model inside the package."""
    r, files = run(["--class", "207", "-n", "1", "--no-progress"], tmp_path)
    assert r.exit_code == 0, r.output
    assert "lasad_207_seed0.png" in files


def test_default_names_never_replace_an_earlier_run(ckpt, tmp_path, monkeypatch):
    """The README's rule: a default name carries classes, seed and a grid other than the trained
    one; when its PNG, JSON or folder exists, -2, -3, ... is added and said on stderr; only a
    name given with -o is replaced."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def go(*args):
        r = runner.invoke(run_main, ["--checkpoint", str(ckpt), "-c", "3", "-n", "1", "--no-progress", *args])
        assert r.exit_code == 0, r.output
        return r

    go()
    first = (tmp_path / "lasad_3_seed0.png").read_bytes()
    r = go("--cfg-scale", "1.5")
    assert "lasad_3_seed0.png is from an earlier run: writing lasad_3_seed0-2.png" in r.stderr
    assert json.loads((tmp_path / "lasad_3_seed0-2.json").read_text())["cfg_scale"] == 1.5
    assert json.loads((tmp_path / "lasad_3_seed0.json").read_text())["cfg_scale"] == 4.0
    assert (tmp_path / "lasad_3_seed0.png").read_bytes() == first
    go("--grid", "3x5")
    assert json.loads((tmp_path / "lasad_3_seed0_3x5.json").read_text())["grid"] == [3, 5]
    go("--grid", "4x4")  # the trained grid: not named, so numbered
    assert json.loads((tmp_path / "lasad_3_seed0-3.json").read_text())["grid"] == [4, 4]
    (tmp_path / "lasad_3_seed1").mkdir()  # a --save-individual folder alone also takes the name
    go("--seed", "1")
    assert (tmp_path / "lasad_3_seed1-2.png").is_file() and not (tmp_path / "lasad_3_seed1.png").exists()
    r = go("--cfg-scale", "2.5", "-o", "lasad_3_seed0.png")  # a name you give is replaced
    assert "earlier run" not in r.stderr
    assert json.loads((tmp_path / "lasad_3_seed0.json").read_text())["cfg_scale"] == 2.5
    assert sorted(p.name for p in tmp_path.glob("lasad_3_seed0*.png")) == [
        "lasad_3_seed0-2.png", "lasad_3_seed0-3.png", "lasad_3_seed0.png", "lasad_3_seed0_3x5.png"]
