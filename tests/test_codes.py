"""`lasad-train codes`: code extraction against direct `encode`, mirrors, labels, shards, manifest,
the readers (load_codes, CodeDataset) and one-line CLI errors. CPU only, vq-tiny, tiny images."""

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lasad_engine.tokenizer import VQModel, save_tokenizer
from lasad_train.cli import main
from lasad_train.codes import CodeDataset, extract_codes, load_codes
from lasad_train.formats import DataError, save_npy, write_manifest

NAMES = ["red", "green", "blue", "yellow"]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (200, 200, 20)]


def make_image_set(folder, n=32, size=16, unlabelled=()):
    """Random noisy coloured blocks (so codes vary); label i % 4 (-1 at `unlabelled`); every 8th
    image held out; a second label set "parity" (i % 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8)
    labels = (np.arange(n) % 4).astype(np.int64)
    for i in range(n):
        y, x = rng.integers(0, size // 2, 2)
        images[i, y:y + size // 2, x:x + size // 2] = COLOURS[labels[i]]
    labels[list(unlabelled)] = -1
    split = np.zeros(n, np.uint8)
    split[::8] = 1
    save_npy(folder / "images.npy", images)
    save_npy(folder / "labels-class.npy", labels)
    (folder / "classes-class.json").write_text(json.dumps(NAMES))
    save_npy(folder / "labels-parity.npy", (np.arange(n) % 2).astype(np.int64))
    (folder / "classes-parity.json").write_text(json.dumps(["even", "odd"]))
    save_npy(folder / "split.npy", split)
    write_manifest(folder, {"format": "lasad-images", "version": 1, "source": "synthetic", "count": n,
                            "size": [size, size], "label_sets": ["class", "parity"], "sources": {}})
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_set(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def vq(tmp_path_factory):
    torch.manual_seed(0)
    model = VQModel("vq-tiny")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # spread the codebook so that many codes are in use
        model.quantize.embedding.weight.copy_(torch.randn(model.quantize.embedding.weight.shape, generator=g))
    path = tmp_path_factory.mktemp("vq") / "vq.safetensors"
    save_tokenizer(path, model)
    return path, model.eval()


def pixels(u8):
    return torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_codes_equal_direct_encode_with_mirrors(images, vq, tmp_path):
    path, model = vq
    out = tmp_path / "codes"
    m = extract_codes(images, path, out, shard_size=20, batch_size=64, progress=False, device="cpu")

    all_u8 = np.load(images / "images.npy")
    train = all_u8[np.load(images / "split.npy") == 0]  # 28 images
    with torch.no_grad():
        direct = model.encode(pixels(train)).numpy()
        mirrored = model.encode(pixels(train[:, :, ::-1])).numpy()
    assert len(np.unique(direct)) > 8  # a meaningful comparison

    # shards of at most 20 rows: 56 rows -> 20 + 20 + 16
    assert [s["count"] for s in m["shards"]] == [20, 20, 16]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [f"codes-{k:05d}.npy" for k in range(3)] + [f"labels-{k:05d}.npy" for k in range(3)])
    shards = [np.load(out / s["codes"]) for s in m["shards"]]
    labels = [np.load(out / s["labels"]) for s in m["shards"]]
    assert all(c.dtype == np.int32 and c.shape[1:] == (8, 8) for c in shards)
    assert all(lab.dtype == np.int64 for lab in labels)
    codes, labels = np.concatenate(shards), np.concatenate(labels)
    assert np.array_equal(codes[0::2], direct) and np.array_equal(codes[1::2], mirrored)
    train_labels = np.load(images / "labels-class.npy")[np.load(images / "split.npy") == 0]
    assert np.array_equal(labels, np.repeat(train_labels, 2))

    assert m == json.loads((out / "manifest.json").read_text())
    assert m["format"] == "lasad-codes" and m["version"] == 1
    assert m["grid"] == [8, 8] and m["vocab_size"] == 64 and m["count"] == 56
    assert m["label_set"] == "class" and m["num_classes"] == 4 and m["class_names"] == NAMES
    assert m["flip"] is True and m["dropped_unlabelled"] == 0 and m["images_encoded"] == 28
    assert m["tokenizer"] == str(path.resolve()) and m["images"] == str(images.resolve())
    assert m["split"] == "train"


def test_no_flip_splits_label_sets_and_readers(images, vq, tmp_path):
    path, model = vq
    m = extract_codes(images, path, tmp_path / "c", flip=False, split="all", label_set="parity",
                      batch_size=5, progress=False, device="cpu")
    assert m["count"] == 32 and len(m["shards"]) == 1 and m["flip"] is False
    assert m["num_classes"] == 2 and m["class_names"] == ["even", "odd"]

    codes, labels, m2 = load_codes(tmp_path / "c")
    assert m2 == m and codes.dtype == np.int64 and codes.shape == (32, 8, 8) and labels.dtype == np.int64
    with torch.no_grad():
        direct = model.encode(pixels(np.load(images / "images.npy"))).numpy()
    assert np.array_equal(codes, direct)  # batch size 5 vs all at once: same codes
    assert np.array_equal(labels, np.arange(32) % 2)

    ds = CodeDataset(tmp_path / "c")
    assert len(ds) == 32 and ds.grid == (8, 8) and ds.vocab_size == 64 and ds.num_classes == 2
    x, y = ds[3]
    assert x.dtype == torch.int64 and x.shape == (64,) and y.dtype == torch.int64 and y.shape == ()
    assert torch.equal(x, torch.from_numpy(codes[3].reshape(-1))) and int(y) == 1
    assert torch.equal(ds[-1][0], torch.from_numpy(codes[31].reshape(-1)))
    with pytest.raises(IndexError):
        ds[32]

    held = extract_codes(images, path, tmp_path / "h", split="holdout", progress=False, device="cpu")
    assert held["count"] == 8 and held["images_encoded"] == 4


def test_dataset_across_shards_and_dataloader(images, vq, tmp_path):
    path, _ = vq
    extract_codes(images, path, tmp_path / "c", shard_size=7, progress=False, device="cpu")
    codes, labels, m = load_codes(tmp_path / "c")
    assert [s["count"] for s in m["shards"]] == [7] * 8
    ds = CodeDataset(tmp_path / "c")
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    assert torch.equal(torch.stack(xs), torch.from_numpy(codes.reshape(len(ds), -1)))
    assert torch.equal(torch.stack(ys), torch.from_numpy(labels))
    bx, by = next(iter(torch.utils.data.DataLoader(ds, batch_size=16)))
    assert bx.shape == (16, 64) and by.shape == (16,)

    # a smaller re-extraction into the same folder leaves no stale shards behind
    extract_codes(images, path, tmp_path / "c", shard_size=100, progress=False, device="cpu")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["codes-00000.npy", "labels-00000.npy",
                                                                  "manifest.json"]


def test_unlabelled_images_are_dropped_and_counted(vq, tmp_path):
    path, _ = vq
    imgs = make_image_set(tmp_path / "img", unlabelled=(1, 2, 8))  # 8 is held out
    m = extract_codes(imgs, path, tmp_path / "c", progress=False, device="cpu")
    assert m["dropped_unlabelled"] == 2 and m["images_encoded"] == 26 and m["count"] == 52
    assert m["images_considered"] == 28
    _, labels, _ = load_codes(tmp_path / "c")
    assert labels.min() >= 0 and len(labels) == 52


def test_load_codes_checks_the_files(images, vq, tmp_path):
    path, _ = vq
    extract_codes(images, path, tmp_path / "c", shard_size=30, progress=False, device="cpu")
    (tmp_path / "c" / "labels-00001.npy").unlink()
    with pytest.raises(DataError, match="missing shard"):
        load_codes(tmp_path / "c")
    with pytest.raises(DataError, match="no manifest.json"):
        CodeDataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="expected 'lasad-codes'"):
        load_codes(images)


def cli(*args):
    return CliRunner().invoke(main, ["codes", *[str(a) for a in args], "--device", "cpu", "--no-progress"])


def test_cli_writes_code_set(images, vq, tmp_path):
    r = cli(images, vq[0], tmp_path / "c", "--no-flip", "--shard-size", "10")
    assert r.exit_code == 0, r.output + r.stderr
    assert "wrote 28 code grids" in r.stdout and len(r.stdout.strip().splitlines()) == 1
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["count"] == 28


@pytest.mark.parametrize("args,code,text", [
    (["{img}", "{vq}", "{tmp}/o", "--label-set", "colour"], 1, "'colour' is not one of class, parity"),
    (["{img}", "{tmp}/missing.safetensors", "{tmp}/o"], 1, "no such tokenizer file"),
    (["{tmp}/nowhere", "{vq}", "{tmp}/o"], 1, "no manifest.json"),
    (["{img}", "{vq}", "{img}"], 1, "choose another output folder"),
    (["{img}", "{vq}", "{tmp}/o", "--split", "test"], 2, "--split"),
    (["{img}", "{vq}", "{tmp}/o", "--shard-size", "0"], 2, "--shard-size"),
])
def test_cli_errors_are_one_line(images, vq, tmp_path, args, code, text):
    r = cli(*[a.format(tmp=tmp_path, img=images, vq=vq[0]) for a in args])
    assert r.exit_code == code, r.output + r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and text in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_tokenizer_file_is_one_line(images, tmp_path):
    bad = tmp_path / "vq.pt"
    bad.write_bytes(b"not a checkpoint")
    r = cli(images, bad, tmp_path / "o")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "not a readable tokenizer checkpoint" in r.stderr


def test_limit_encodes_the_spread_images(images, vq, tmp_path):
    from lasad_train.formats import spread
    path, model = vq
    m = extract_codes(images, path, tmp_path / "c", limit=10, flip=False, progress=False, device="cpu")
    train = np.load(images / "images.npy")[np.load(images / "split.npy") == 0]
    picked = train[spread(len(train), 10)]
    codes, labels, _ = load_codes(tmp_path / "c")
    with torch.no_grad():
        assert np.array_equal(codes, model.encode(pixels(picked)).numpy())
    train_labels = np.load(images / "labels-class.npy")[np.load(images / "split.npy") == 0]
    assert np.array_equal(labels, train_labels[spread(28, 10)])
    assert m["images_encoded"] == 10 and m["limit"] == 10


def _codes_with(folder, src, **change):
    import shutil
    shutil.copytree(src, folder)
    m = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**m, **change}))
    return folder


@pytest.mark.parametrize("change,text", [
    ({"count": "lots"}, "count is 'lots'"),
    ({"count": True}, "count is True"),
    ({"shards": "all"}, "shards is 'all'"),
    ({"shards": [{"codes": "../../etc/passwd", "labels": "labels-00000.npy", "count": 56}]}, "expected a file name"),
    ({"shards": [{"codes": "codes-00000.npy", "labels": "labels-00000.npy", "count": "56"}]}, "shard 0's count"),
    ({"grid": ["8", 8]}, "grid is '8'"),
    ({"grid": [8]}, "grid is [8]"),
    ({"vocab_size": 2.5}, "vocab_size is 2.5"),
    ({"num_classes": None}, "num_classes is None"),
    ({"class_names": "red"}, "class_names must be null or a list of 4 strings"),
    ({"count": 57}, "count 57 does not match its shards (56)"),
])
def test_malformed_code_manifests_are_one_line(images, vq, tmp_path, change, text):
    """load_codes and `lasad-train gpt` on a damaged code set: one line naming the field."""
    extract_codes(images, vq[0], tmp_path / "good", shard_size=100, progress=False, device="cpu")
    bad = _codes_with(tmp_path / "bad", tmp_path / "good", **change)
    with pytest.raises(DataError, match=re.escape(text)):
        load_codes(bad)
    r = CliRunner().invoke(main, ["gpt", str(bad), str(tmp_path / "run"), "--device", "cpu"])
    err = r.stderr.strip()
    assert r.exit_code == 1 and len(err.splitlines()) == 1 and text in err and "Traceback" not in err


def test_damaged_shard_is_one_line(images, vq, tmp_path):
    extract_codes(images, vq[0], tmp_path / "c", shard_size=100, progress=False, device="cpu")
    (tmp_path / "c" / "codes-00000.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match="codes-00000.npy: not a readable .npy array"):
        load_codes(tmp_path / "c")


def test_out_is_replaced_whole_and_other_folders_are_refused(images, vq, tmp_path, monkeypatch):
    """A re-extraction is written beside OUT and swapped in; an error half-way leaves the earlier
    code set as it was; a folder holding other files is never written into."""
    from lasad_train import codes as C
    path, _ = vq
    out = tmp_path / "c"
    extract_codes(images, path, out, flip=False, shard_size=10, progress=False, device="cpu")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = C.save_npy, []

    def failing(p, a):
        calls.append(p)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(p, a)

    monkeypatch.setattr(C, "save_npy", failing)
    with pytest.raises(OSError, match="No space"):
        extract_codes(images, path, out, flip=True, shard_size=10, progress=False, device="cpu")
    monkeypatch.setattr(C, "save_npy", real)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]

    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    r = cli(images, path, user)
    assert r.exit_code == 1 and "choose another output folder" in r.stderr
    assert [p.name for p in user.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("flag,value", [("--limit", 0), ("--batch-size", 10**9), ("--shard-size", 2**40)])
def test_cli_numbers_are_bounded(images, vq, tmp_path, flag, value):
    r = cli(images, vq[0], tmp_path / "o", flag, value)
    assert r.exit_code == 2 and flag in r.stderr and len(r.stderr.strip().splitlines()) == 1
