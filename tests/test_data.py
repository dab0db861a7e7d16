"""lasad-train data: the Emoji-5, Fashion-MNIST and folder builders on tiny generated fixtures
(package layouts, idx files, class folders), the formats.py layout they write, the split, and
one-line errors through `lasad-train`. No network: the CLI tests pre-fill the download cache."""

import gzip
import json
import os
import re
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lasad_train import data as D
from lasad_train import formats
from lasad_train.cli import main
from lasad_train.formats import DataError, load_images

# Emoji-5 fixture: 6 emoji (3 categories, 4 subcategories) + 1 Component entry, five fake packages.

EMOJI = [  # (unified, non_qualified, short_name, category, subcategory, sort_order), listed out of order
    ("1F642", None, "slightly_smiling_face", "Smileys & Emotion", "face-smiling", 2),
    ("1F1EB-1F1F7", None, "flag-fr", "Flags", "country-flag", 6),
    ("1F600", None, "grinning", "Smileys & Emotion", "face-smiling", 1),
    ("2639-FE0F", "2639", "white_frowning_face", "Smileys & Emotion", "face-concerned", 3),
    ("1F3F4-E0067-E0062-E0065-E006E-E0067-E007F", None, "flag-england", "Flags", "country-flag", 5),
    ("1F44B", None, "wave", "People & Body", "hand-fingers-open", 4),
    ("1F3FB", None, "skin-tone-2", "Component", "skin-tone", 7),
]
ORDER = ["grinning", "slightly_smiling_face", "white_frowning_face", "wave", "flag-england", "flag-fr"]
WAVE_TONE = "1F44B-1F3FB"
# style -> emoji (short names) that have a picture in that package
HAVE = {
    "noto": ORDER + ["skin-tone-2"],
    "twemoji": ["grinning", "white_frowning_face", "wave"],
    "fluent3d": ["grinning", "flag-england"],
    "openmoji": ["grinning"],
    "emojione2": ["white_frowning_face", "wave"],
}
ALL_STYLES = list(HAVE)


def colour(style, name):
    """A distinct solid colour for every (style, emoji) picture, to recognise it after the build."""
    si = ALL_STYLES.index(style) if style in ALL_STYLES else 5
    ei = (ORDER + ["skin-tone-2", "wave-tone"]).index(name)
    return (20 + 40 * si, 10 + 25 * ei, 200)


def rgba_picture(style, name, size, transparent_corner=True):
    im = Image.new("RGBA", (size, size), colour(style, name) + (255,))
    if transparent_corner:  # top-left quarter fully transparent: must come out white
        im.paste((0, 0, 0, 0), (0, 0, size // 2, size // 2))
    return im


def make_emoji_packages(root):
    """Unpacked-package folders as npm pack / dpkg -x lay them out; returns (sources, emoji.json)."""
    meta = {e[2]: e for e in EMOJI}
    entries = []
    for unified, nq, short, cat, sub, order in EMOJI:
        e = {"unified": unified, "non_qualified": nq, "short_name": short, "category": cat,
             "subcategory": sub, "sort_order": order, "image": unified.lower() + ".png"}
        if short == "wave":
            e["skin_variations"] = {"1F3FB": {"unified": WAVE_TONE, "non_qualified": None,
                                              "image": WAVE_TONE.lower() + ".png"}}
        entries.append(e)
    npm = {"noto": ("emoji-datasource-google", "img/google/64"),
           "twemoji": ("emoji-datasource-twitter", "img/twitter/64"),
           "fluent3d": ("@lobehub/fluent-emoji-3d", "assets"), "openmoji": ("openmoji", "color/svg")}
    sources = {}
    for style, (package, sub) in npm.items():
        pkg = root / D._slug(package) / "package"
        (pkg / sub).mkdir(parents=True)
        (pkg / "package.json").write_text(json.dumps({"name": package, "version": D.EMOJI5_STYLES[style]["version"]}))
        sources[style] = pkg
    gem = root / "ruby-gemojione" / "usr/share/rubygems-integration/all/gems/gemojione-3.3.0/assets/png"
    gem.mkdir(parents=True)
    sources["emojione2"] = root / "ruby-gemojione"
    (sources["noto"] / "emoji.json").write_text(json.dumps(entries))

    for name in HAVE["noto"]:  # 64x64 RGBA, file name = emoji.json "image"
        rgba_picture("noto", name, 64).save(sources["noto"] / "img/google/64" / (meta[name][0].lower() + ".png"))
    rgba_picture("noto", "wave-tone", 64).save(sources["noto"] / "img/google/64" / (WAVE_TONE.lower() + ".png"))
    for name in HAVE["twemoji"]:  # palette images with a transparent index
        im = Image.new("P", (64, 64), 1)
        im.putpalette([0, 0, 0, *colour("twemoji", name)] + [0] * 762)
        im.paste(0, (0, 0, 32, 32))
        im.save(sources["twemoji"] / "img/twitter/64" / (meta[name][0].lower() + ".png"), transparency=0)
    for name, stem in (("grinning", "1f600"), ("flag-england", "1f3f4-e0067_e0062_e0065_e006e_e0067")):
        rgba_picture("fluent3d", name, 128).save(sources["fluent3d"] / "assets" / f"{stem}.webp", lossless=True)
    (sources["openmoji"] / "color/svg/1F600.svg").write_text(  # right half red, left half transparent
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">'
        '<rect x="36" y="0" width="36" height="72" fill="#ff0000"/></svg>')
    for name, stem in (("white_frowning_face", "2639"), ("wave", "1F44B")):  # upper case, no FE0F
        rgba_picture("emojione2", name, 64).save(gem / f"{stem}.png")
    (gem / "1F3FB.png").write_bytes(b"")  # the dropped Component: never opened
    return sources, sources["noto"] / "emoji.json"


def fill_emoji_cache(cache):
    """A --cache folder laid out as fetch_emoji5 leaves it, so the CLI needs no network."""
    sources, _ = make_emoji_packages(cache / "src")
    for style, spec in D.EMOJI5_STYLES.items():
        if spec["registry"] == "npm":
            os.rename(sources[style].parent, cache / f"{D._slug(spec['package'])}-{spec['version']}")
        else:
            os.rename(sources[style], cache / f"{spec['package']}_{spec['version']}")
    return cache


def centre(img):
    return img[img.shape[0] * 3 // 4, img.shape[1] * 3 // 4].astype(int)


@pytest.fixture
def emoji_pkgs(tmp_path):
    return make_emoji_packages(tmp_path / "pkgs")


@pytest.fixture
def no_cairosvg(monkeypatch):
    monkeypatch.setattr(D, "_svg_module", lambda: None)


def test_emoji5_build_labels_styles_and_files(emoji_pkgs, tmp_path, no_cairosvg, capsys):
    sources, emoji_json = emoji_pkgs
    out = tmp_path / "emoji5"
    m = D.build_emoji5(sources, emoji_json, out, size=32, holdout=0.25, seed=3)
    assert "cairosvg is not importable" in capsys.readouterr().err  # openmoji skipped with a warning

    styles = [s for s in ALL_STYLES if s != "openmoji"]
    expect = [(s, n) for s in styles for n in ORDER if n in HAVE[s]]
    x, ident, id_names, man = load_images(out, "identity")
    assert x.shape == (len(expect), 32, 32, 3) and x.dtype == np.uint8
    assert id_names == ORDER  # emoji.json sort order, Component dropped
    for label_set in ("identity", "subgroup", "group", "style"):
        labels = np.load(out / f"labels-{label_set}.npy")
        assert labels.dtype == np.int64 and labels.shape == (len(expect),)
    _, sub, sub_names, _ = load_images(out, "subgroup")
    _, grp, grp_names, _ = load_images(out, "group")
    _, sty, sty_names, _ = load_images(out, "style")
    assert sub_names == ["face-smiling", "face-concerned", "hand-fingers-open", "country-flag"]
    assert grp_names == ["Smileys & Emotion", "People & Body", "Flags"]
    assert sty_names == styles
    meta = {e[2]: e for e in EMOJI}
    for i, (style, name) in enumerate(expect):
        assert (id_names[ident[i]], sty_names[sty[i]]) == (name, style)
        assert (sub_names[sub[i]], grp_names[grp[i]]) == (meta[name][4], meta[name][3])
        assert np.abs(centre(x[i]) - colour(style, name)).max() <= 2, (style, name)
        assert (x[i, 0, 0] == 255).all(), (style, name)  # transparent corner composited on white

    assert man["count"] == len(expect) and man["size"] == [32, 32]
    assert man["label_sets"] == ["identity", "subgroup", "group", "style"]
    assert man["num_classes"] == {"identity": 6, "subgroup": 4, "group": 3, "style": 4}
    assert man["sources"]["noto"]["package"] == "npm:emoji-datasource-google@16.0.0"
    assert man["sources"]["fluent3d"]["package"] == "npm:@lobehub/fluent-emoji-3d@1.1.0"
    assert {s: v["images"] for s, v in man["sources"].items() if s != "labels"} == \
        {s: len([n for n in HAVE[s] if n in ORDER]) for s in styles}
    split = np.load(out / "split.npy")
    assert split.dtype == np.uint8 and man["splits"] == {"train": int((split == 0).sum()), "heldout": int(split.sum())}
    for k in range(len(ORDER)):  # every identity keeps a training image
        assert (split[ident == k] == 0).any()
    attribution = (out / "ATTRIBUTION.md").read_text()
    for text in ("Apache-2.0", "CC-BY-4.0", "Twitter", "MIT", "CC-BY-SA-4.0", "EmojiOne"):
        assert text in attribution
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emoji5", "pkgs"]  # no temp folders left


def test_emoji5_openmoji_svg_and_skin_tones(emoji_pkgs, tmp_path):
    pytest.importorskip("cairosvg")
    sources, emoji_json = emoji_pkgs
    out = tmp_path / "e"
    m = D.build_emoji5(sources, emoji_json, out, size=16, skin_tones=True, holdout=0)
    x, ident, names, _ = load_images(out, "identity")
    sty = np.load(out / "labels-style.npy")
    om = np.flatnonzero(sty == ALL_STYLES.index("openmoji"))
    assert len(om) == 1 and names[ident[om[0]]] == "grinning"
    assert (x[om[0], 8, 1] == 255).all() and tuple(x[om[0], 8, 14]) == (255, 0, 0)  # white | red
    # the skin-tone picture joins its base emoji's identity
    wave = np.flatnonzero((np.array(names)[ident] == "wave") & (sty == 0))
    assert len(wave) == 2 and m["skin_tones"] is True
    assert sorted(tuple(centre(x[i])) for i in wave) == sorted([colour("noto", "wave"), colour("noto", "wave-tone")])
    assert m["splits"] == {"train": len(x), "heldout": 0}


def test_emoji5_style_subset_and_unknown_style(emoji_pkgs, tmp_path):
    sources, emoji_json = emoji_pkgs
    m = D.build_emoji5({"twemoji": sources["twemoji"]}, emoji_json, tmp_path / "t")
    assert m["num_classes"] == {"identity": 3, "subgroup": 3, "group": 2, "style": 1}  # only emoji with images
    with pytest.raises(DataError, match="unknown emoji5 style 'apple'; choose from noto, twemoji"):
        D.build_emoji5({"apple": sources["noto"]}, emoji_json, tmp_path / "a")
    with pytest.raises(DataError, match="no img/twitter/64"):
        D.build_emoji5({"twemoji": sources["noto"].parent.parent}, emoji_json, tmp_path / "b")


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"unified": "1F600"}', "expected a non-empty JSON list"),
    ('[{"unified": "1F600", "short_name": "grinning", "category": "Smileys"}]', "entry 0 has no 'subcategory'"),
])
def test_emoji5_bad_emoji_json(emoji_pkgs, tmp_path, content, message):
    sources, emoji_json = emoji_pkgs
    emoji_json.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        D.build_emoji5(sources, emoji_json, tmp_path / "out")
    assert str(emoji_json) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_emoji5_cli_with_filled_cache(tmp_path):
    cache = fill_emoji_cache(tmp_path / "cache")
    r = CliRunner().invoke(main, ["data", "emoji5", str(tmp_path / "out"), "--cache", str(cache),
                                  "--size", "16", "--style", "noto", "--style", "emojione2", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "per style: noto 6, emojione2 2" in r.stdout
    _, y, names, man = load_images(tmp_path / "out", "group", split=0)
    assert names == ["Smileys & Emotion", "People & Body", "Flags"] and man["count"] == 8
    assert man["sources"]["emojione2"]["package"] == "deb:ruby-gemojione@3.3.0-1"


def test_emoji5_cli_corrupt_emoji_json_is_one_line(tmp_path):
    cache = fill_emoji_cache(tmp_path / "cache")
    bad = cache / "emoji-datasource-google-16.0.0/package/emoji.json"
    bad.write_text("[{]")
    r = CliRunner().invoke(main, ["data", "emoji5", str(tmp_path / "out"), "--cache", str(cache), "--style", "noto"])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and f"{bad}: not valid JSON" in r.stderr
    assert not (tmp_path / "out").exists()


# Fashion-MNIST on synthetic idx files.

def idx_bytes(array, magic):
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def make_idx_folder(folder, train=6, test=4, gz_train=True):
    """Four idx files (train gzipped, t10k raw, as both occur); returns the ground truth."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for split, n, gz in ((0, train, gz_train), (1, test, False)):
        img_name, lab_name = D.FASHION_FILES[split]
        x = rng.integers(1, 256, (n, 28, 28), dtype=np.uint8)
        y = np.arange(n) % 10
        for name, blob in ((img_name, idx_bytes(x, D.IDX_IMAGES)), (lab_name, idx_bytes(y, D.IDX_LABELS))):
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
            else:
                (folder / name).write_bytes(blob)
        truth[split] = (x, y)
    return truth


def test_fashion_mnist_build(tmp_path):
    truth = make_idx_folder(tmp_path / "idx")
    m = D.build_fashion_mnist(tmp_path / "idx", tmp_path / "fm")
    x, y, names, man = load_images(tmp_path / "fm", "class")
    assert x.shape == (10, 32, 32, 3) and x.dtype == np.uint8 and names == D.FASHION_CLASSES
    assert (np.load(tmp_path / "fm/split.npy") == [0] * 6 + [1] * 4).all()
    grey = np.concatenate([truth[0][0], truth[1][0]])
    assert (x[:, 2:30, 2:30] == grey[..., None]).all()  # padded by 2, grey repeated to RGB
    assert (x[:, :2] == 0).all() and (x[:, :, 30:] == 0).all()
    assert (y == np.concatenate([truth[0][1], truth[1][1]])).all()
    assert man["splits"] == {"train": 6, "heldout": 4} and man["label_sets"] == ["class"]
    assert man["source"] == "fashion-mnist" and "MIT" in (tmp_path / "fm/ATTRIBUTION.md").read_text()
    xt, yt, _, _ = load_images(tmp_path / "fm", "class", split=1)
    assert len(xt) == 4 and (yt == truth[1][1]).all()
    m = D.build_fashion_mnist(tmp_path / "idx", tmp_path / "fm16", size=16)  # other sizes resize
    assert m["size"] == [16, 16] and np.load(tmp_path / "fm16/images.npy").shape == (10, 16, 16, 3)


@pytest.mark.parametrize("damage, message", [
    ("magic", "magic number 0x00000801, expected 0x00000803 (idx3 images)"),
    ("truncated", "header says 4x28x28 = 3136 bytes of data, found 3000"),
    ("count", "3 labels for 4 images"),
    ("label", "label 12 out of range 0..9"),
    ("missing", "no t10k-labels-idx1-ubyte[.gz]"),
])
def test_fashion_mnist_bad_idx(tmp_path, damage, message):
    truth = make_idx_folder(tmp_path / "idx")
    images, labels = tmp_path / "idx" / D.FASHION_FILES[1][0], tmp_path / "idx" / D.FASHION_FILES[1][1]
    if damage == "magic":
        images.write_bytes(idx_bytes(truth[1][1], D.IDX_LABELS))
    elif damage == "truncated":
        images.write_bytes(images.read_bytes()[:16 + 3000])
    elif damage == "count":
        labels.write_bytes(idx_bytes(truth[1][1][:3], D.IDX_LABELS))
    elif damage == "label":
        labels.write_bytes(idx_bytes(np.array([1, 2, 12, 3]), D.IDX_LABELS))
    else:
        labels.unlink()
    with pytest.raises(DataError, match=re.escape(message)):
        D.build_fashion_mnist(tmp_path / "idx", tmp_path / "fm")
    assert not (tmp_path / "fm").exists()


def test_fashion_mnist_cli_wrong_magic_is_one_line(tmp_path):
    ver = D.FASHION_DEB["version"]
    folder = tmp_path / "cache" / f"dataset-fashion-mnist_{ver}" / D.FASHION_DEB["folder"]
    make_idx_folder(folder)
    args = ["data", "fashion-mnist", str(tmp_path / "fm"), "--cache", str(tmp_path / "cache")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "10 images 32x32 (train 6, held out 4)" in r.stdout
    bad = folder / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 2, 2)), D.IDX_IMAGES)))
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and r.stdout == "" and r.stderr.count("\n") == 1
    assert f"{bad}: magic number 0x00000803, expected 0x00000801 (idx1 labels)" in r.stderr
    assert load_images(tmp_path / "fm")[3]["count"] == 10  # the earlier set is untouched


# Folder per class.

def make_class_folder(src):
    """cat: 3 images (RGBA with transparency, grey 16-bit, wide RGB), dog: 2 (palette, CMYK JPEG),
    zebra: 1 nested image; plus hidden files, a hidden folder and a text file to ignore."""
    for c in ("cat", "dog", "zebra/stripes", "cat/.thumbs"):
        (src / c).mkdir(parents=True)
    im = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    im.paste((0, 0, 255, 0), (0, 0, 20, 20))  # transparent blue: white after compositing
    im.save(src / "cat/a.png")
    Image.fromarray(np.full((30, 30), 65535, np.uint16)).save(src / "cat/b.png")  # 16-bit white
    wide = Image.new("RGB", (60, 20), (0, 0, 255))
    wide.paste((0, 255, 0), (20, 0, 40, 20))  # centre square green, sides blue: crop keeps green
    wide.save(src / "cat/c.bmp")
    p = Image.new("P", (25, 25), 0)
    p.putpalette([10, 200, 30] + [0] * 765)
    p.save(src / "dog/a.gif")
    Image.new("CMYK", (20, 20), (0, 0, 0, 0)).save(src / "dog/b.jpg")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(src / "zebra/stripes/z.png")
    (src / "cat/.hidden.png").write_bytes(b"junk")
    (src / "cat/.thumbs/t.png").write_bytes(b"junk")
    (src / "cat/notes.txt").write_text("not an image")
    (src / ".git").mkdir()
    return {"cat": 3, "dog": 2, "zebra": 1}


def test_folder_build(tmp_path):
    make_class_folder(tmp_path / "src")
    m = D.build_folder(tmp_path / "src", tmp_path / "out", size=8, holdout=0.5, seed=1)
    x, y, names, man = load_images(tmp_path / "out", "class")
    assert names == ["cat", "dog", "zebra"] and (y == [0, 0, 0, 1, 1, 2]).all()
    assert x.shape == (6, 8, 8, 3) and x.dtype == np.uint8
    assert tuple(x[0, 0, 0]) == (255, 255, 255) and tuple(x[0, 7, 7]) == (255, 0, 0)  # composited on white
    assert (x[1] == 255).all()  # 16-bit grey scaled to 8 bits
    assert (x[2] == (0, 255, 0)).all()  # centre crop of the wide image
    assert (x[3] == (10, 200, 30)).all() and (x[4] == 255).all() and (x[5] == 9).all()
    split = np.load(tmp_path / "out/split.npy")
    assert split.sum() == 3 and all((split[y == c] == 0).any() for c in range(3))
    assert man["source"] == "folder" and man["sources"]["folder"]["per_class"] == {"cat": 3, "dog": 2, "zebra": 1}
    assert man["sources"]["folder"]["path"] == str((tmp_path / "src").resolve())
    assert (tmp_path / "out/ATTRIBUTION.md").is_file()
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    Image.new("L", (5, 9), 0).save(one / "only/x.png")
    assert D.build_folder(one, tmp_path / "one_out")["num_classes"] == {"class": 1}  # one class is allowed


def test_folder_workers_match_single_process(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(70):
        (tmp_path / "src" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / f"src/c{i % 3}/{i}.png")
    D.build_folder(tmp_path / "src", tmp_path / "a", size=8, workers=1)
    D.build_folder(tmp_path / "src", tmp_path / "b", size=8, workers=2)
    for f in ("images.npy", "labels-class.npy", "split.npy"):
        assert (np.load(tmp_path / "a" / f) == np.load(tmp_path / "b" / f)).all()


def run_cli(args):
    r = CliRunner().invoke(main, ["data", *map(str, args)])
    return r


@pytest.mark.parametrize("case, message", [
    ("missing", "{src}: no such folder"),
    ("empty", "{src}: no class sub-folders"),
    ("no-images", "{src}/dog: class folder has no images"),
    ("corrupt", "{src}/cat/bad.png: cannot read image"),
    ("truncated", "{src}/cat/cut.png: cannot read image"),
    ("out-foreign", "{out}: exists and is not a lasad image set"),
    ("out-file", "{out}: exists and is not a folder"),
])
def test_folder_errors_are_one_line(tmp_path, case, message):
    src, out = tmp_path / "src", tmp_path / "out"
    if case != "missing":
        src.mkdir()
    if case in ("no-images", "corrupt", "truncated", "out-foreign", "out-file"):
        (src / "cat").mkdir()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(src / "cat/ok.png")
    if case == "no-images":
        (src / "dog").mkdir()
        (src / "dog/readme.txt").write_text("x")
    if case == "corrupt":
        (src / "cat/bad.png").write_bytes(b"this is not a png")
    if case == "truncated":
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(src / "cat/cut.png")
        (src / "cat/cut.png").write_bytes((src / "cat/cut.png").read_bytes()[:3000])
    if case == "out-foreign":
        out.mkdir()
        (out / "thesis.tex").write_text("precious")
    if case == "out-file":
        out.write_text("precious")
    r = run_cli(["folder", src, out])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("lasad-train: error: ")
    assert message.format(src=src, out=out) in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"src", "out"} & {p.name for p in tmp_path.iterdir()})
    if case.startswith("out-"):
        assert "precious" in ((out / "thesis.tex") if out.is_dir() else out).read_text()


@pytest.mark.parametrize("args, message", [
    (["--holdout", "1.5"], "Invalid value for '--holdout'"),
    (["--size", "0"], "Invalid value for '--size'"),
])
def test_folder_usage_errors(tmp_path, args, message):
    make_class_folder(tmp_path / "src")
    r = run_cli(["folder", tmp_path / "src", tmp_path / "out", *args])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and message in r.stderr


def test_out_is_replaced_atomically(tmp_path, monkeypatch):
    make_class_folder(tmp_path / "src")
    out = tmp_path / "out"
    r = run_cli(["folder", tmp_path / "src", out, "--size", "8"])
    assert r.exit_code == 0, r.output
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    calls = []
    real_save = formats.save_npy

    def failing_save(path, array):  # images.npy and labels are written, then the build dies
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_save(path, array)

    monkeypatch.setattr(formats, "save_npy", failing_save)
    r = run_cli(["folder", tmp_path / "src", out, "--size", "16"])
    assert r.exit_code == 1 and "No space left on device" in r.stderr and len(calls) == 3
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old set, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp folders left

    monkeypatch.setattr(formats, "save_npy", real_save)
    r = run_cli(["folder", tmp_path / "src", out, "--size", "16"])
    assert r.exit_code == 0, r.output
    assert load_images(out)[0].shape == (6, 16, 16, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert D.build_folder(tmp_path / "src", empty, size=8)["count"] == 6  # an empty OUT folder is fine


def test_load_images_round_trip_and_label_set_errors(tmp_path):
    make_class_folder(tmp_path / "src")
    D.build_folder(tmp_path / "src", tmp_path / "out", size=8, holdout=0.5, seed=2)
    x_all, _, _, _ = load_images(tmp_path / "out")
    x0, y0, names, _ = load_images(tmp_path / "out", "class", split=0)
    x1, y1, _, _ = load_images(tmp_path / "out", "class", split=1)
    split = np.load(tmp_path / "out/split.npy")
    assert (x0 == x_all[split == 0]).all() and (x1 == x_all[split == 1]).all()
    assert len(y0) + len(y1) == 6 and names == ["cat", "dog", "zebra"]
    with pytest.raises(DataError, match="label set 'identity' is not one of class"):
        load_images(tmp_path / "out", "identity")


# The split.

def test_holdout_split_fractions_coverage_and_determinism():
    labels = np.repeat(np.arange(6), [1, 2, 3, 5, 10, 100])  # 121 images
    a = D.holdout_split(labels, 0.1, seed=0)
    assert a.dtype == np.uint8 and a.sum() == round(121 * 0.1)
    assert all((a[labels == c] == 0).any() for c in range(6))  # a training image for every class
    assert a[labels == 5].sum() == 10 and a[labels == 0].sum() == 0
    assert (D.holdout_split(labels, 0.1, seed=0) == a).all()
    assert any((D.holdout_split(labels, 0.1, seed=s) != a).any() for s in range(1, 5))
    assert D.holdout_split(labels, 0.0).sum() == 0
    b = D.holdout_split(labels, 0.9, seed=1)
    assert all((b[labels == c] == 0).sum() >= 1 for c in range(6))
    c = D.holdout_split(np.repeat(np.arange(400), 5), 0.1, seed=0)  # 0.5 per class on average
    assert c.sum() == 200 and c.reshape(400, 5).sum(1).max() == 1


# Fetching, with stand-ins for npm and apt-get (no network).

def fake_tool(bin_dir, name, script):
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text("#!/bin/sh\n" + script)
    (bin_dir / name).chmod(0o755)


def test_fetch_npm_packs_unpacks_and_reuses(tmp_path, monkeypatch):
    (tmp_path / "pkg/package").mkdir(parents=True)
    (tmp_path / "pkg/package/package.json").write_text('{"name": "@x/fake", "version": "1.0.0"}')
    fake_tool(tmp_path / "bin", "npm", f'echo "$@" >> {tmp_path}/calls\ntar czf x-fake-1.0.0.tgz -C {tmp_path}/pkg package\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    root = D.fetch_npm("@x/fake", "1.0.0", tmp_path / "cache")
    assert root == tmp_path / "cache/x-fake-1.0.0/package" and (root / "package.json").is_file()
    assert (tmp_path / "cache/x-fake-1.0.0.tgz").is_file()
    assert D.fetch_npm("@x/fake", "1.0.0", tmp_path / "cache") == root  # reused: npm not run again
    assert (tmp_path / "calls").read_text() == "pack --silent @x/fake@1.0.0\n"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["x-fake-1.0.0", "x-fake-1.0.0.tgz"]


def test_fetch_failures_are_data_errors(tmp_path, monkeypatch):
    fake_tool(tmp_path / "bin", "npm", 'echo "npm error 404 Not Found - GET https://registry.npmjs.org/nope" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(DataError, match="npm pack --silent nope@1 failed \\(exit 1\\): npm error 404 Not Found"):
        D.fetch_npm("nope", "1", tmp_path / "cache")
    with pytest.raises(DataError, match="apt-get not found: it is needed to download the Debian package ruby-gemojione"):
        D.fetch_deb("ruby-gemojione", "3.3.0-1", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no staging folders left


def test_emoji5_cli_without_cairosvg(tmp_path, no_cairosvg):
    cache = fill_emoji_cache(tmp_path / "cache")
    r = CliRunner().invoke(main, ["data", "emoji5", str(tmp_path / "out"), "--cache", str(cache), "--size", "8"])
    assert r.exit_code == 0, r.output
    assert "openmoji style is skipped" in r.stderr
    assert load_images(tmp_path / "out", "style")[2] == ["noto", "twemoji", "fluent3d", "emojione2"]
    r = CliRunner().invoke(main, ["data", "emoji5", str(tmp_path / "o2"), "--cache", str(cache), "--style", "openmoji"])
    assert r.exit_code == 1 and "no emoji5 style left to build (openmoji needs cairosvg)" in r.stderr


def test_pack_and_unpack_an_image_set(tmp_path):
    """The compressed single-file form of an image set (for carrying it to an offline machine)."""
    from lasad_train.formats import load_images, pack_image_set, unpack_image_set
    src = tmp_path / "src"
    for c in range(2):
        (src / f"c{c}").mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * c + j, np.uint8)).save(src / f"c{c}" / f"{j}.png")
    r = CliRunner().invoke(main, ["data", "folder", str(src), str(tmp_path / "set"), "--size", "8"])
    assert r.exit_code == 0, r.output
    npz = pack_image_set(tmp_path / "set", tmp_path / "set.npz")
    unpack_image_set(npz, tmp_path / "copy")
    a = load_images(tmp_path / "set", "class")
    b = load_images(tmp_path / "copy", "class")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]


@pytest.mark.parametrize("size", [0, 1, 10, 11, 30])
def test_split_and_join_files(tmp_path, size):
    from lasad_train.formats import join_files, split_file
    data = os.urandom(size)
    (tmp_path / "ckpt.pt").write_bytes(data)
    parts = split_file(tmp_path / "ckpt.pt", tmp_path / "out", max_bytes=10)
    assert all(p.stat().st_size <= 10 for p in parts) and len(parts) == max(1, -(-size // 10))
    assert join_files(parts[0], tmp_path / "back.pt").read_bytes() == data


def test_subset_keeps_the_classes_with_enough_images(tmp_path):
    """`data subset`: the images of the classes with >= min_count images (both splits), that
    label set alone renumbered in the source's order, the source's split; checked image by image
    against a selection made here on random data."""
    rng = np.random.default_rng(3)
    n = 60
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    sub = rng.choice(5, n, p=[0.45, 0.05, 0.3, 0.05, 0.15])
    sub[:3] = [1, 3, 3]  # small classes, below the threshold
    grp = rng.integers(0, 2, n)
    split = (rng.random(n) < 0.3).astype(np.uint8)
    D.write_image_set(tmp_path / "src", images, {"subgroup": (sub, [f"s{i}" for i in range(5)]),
                                                   "group": (grp, ["g0", "g1"])}, split, {}, "licence text\n")
    counts = np.bincount(sub, minlength=5)
    min_count = int(np.sort(counts)[2])  # keeps the three largest classes (ties included)
    keep_classes = [c for c in range(5) if counts[c] >= min_count]
    r = run_cli(["subset", tmp_path / "src", tmp_path / "out", "--label-set", "subgroup", "--min-count", min_count])
    assert r.exit_code == 0, r.output
    imgs, labels, names, m = load_images(tmp_path / "out", "subgroup")
    want = np.flatnonzero(np.isin(sub, keep_classes))
    assert names == [f"s{c}" for c in keep_classes]
    assert np.array_equal(np.asarray(imgs), images[want])
    assert np.array_equal(labels, np.searchsorted(keep_classes, sub[want]))
    assert np.array_equal(np.load(tmp_path / "out" / "split.npy"), split[want])
    assert m["label_sets"] == ["subgroup"] and m["source"]["min_count"] == min_count
    assert (tmp_path / "out" / "ATTRIBUTION.md").read_text() == "licence text\n"
    r = run_cli(["subset", tmp_path / "src", tmp_path / "none", "--label-set", "subgroup", "--min-count", n + 1])
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1
    assert f"no class of label set 'subgroup' has {n + 1} or more images" in r.output
    r = run_cli(["subset", tmp_path / "src", tmp_path / "none", "--label-set", "identity"])
    assert r.exit_code != 0 and "label set 'identity' is not one of subgroup, group" in r.output


KILLED_BUILD = """
import os, sys
from lasad_train import data, folders
point, fallback, src, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4]
if fallback:
    folders._RENAMEAT2 = None  # a system without renameat2(RENAME_EXCHANGE): two renames
folders._fault = lambda at: os._exit(9) if at == point else None
data.build_folder(src, out, size=16)
"""


@pytest.mark.parametrize("point,fallback,leftovers", [("exchanged", False, [".tmp"]), ("backed-up", True, [".old", ".tmp"]),
                                                      ("replaced", True, [".old"])])
def test_a_kill_while_replacing_an_image_set_loses_nothing(tmp_path, point, fallback, leftovers):
    """The process dies (os._exit, no clean-up) at each step of the swap: OUT is there (old or new
    set) or, on the two-rename fallback only, restored by the next run; the next run leaves no
    temporary folders behind."""
    import subprocess
    import sys
    make_class_folder(tmp_path / "src")
    out = tmp_path / "out"
    D.build_folder(tmp_path / "src", out, size=8)
    p = subprocess.run([sys.executable, "-c", KILLED_BUILD, point, "1" if fallback else "0",
                        str(tmp_path / "src"), str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 9, p.stderr
    left = sorted(q.suffix for q in tmp_path.iterdir() if q.name.startswith(".out."))
    assert left == leftovers
    if point == "backed-up":  # between the two renames: OUT is missing, its old set beside it
        assert not out.exists()
        with pytest.raises(DataError, match="run the same lasad-train data command again"):
            load_images(out)
    else:
        assert load_images(out)[0].shape == (6, 16, 16, 3)
    D.build_folder(tmp_path / "src", out, size=12, holdout=0.5)
    assert load_images(out)[0].shape == (6, 12, 12, 3)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out", "src"]


def test_the_next_run_restores_a_set_a_kill_left_as_backup_before_building(tmp_path, monkeypatch):
    """Recovery comes first: even a next run that fails on its input leaves OUT restored."""
    make_class_folder(tmp_path / "src")
    out = tmp_path / "out"
    D.build_folder(tmp_path / "src", out, size=8)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    os.rename(out, tmp_path / ".out.999999999.0123abcd.old")  # a dead process's backup
    (tmp_path / ".out.999999999.89abcdef.tmp").mkdir()  # and its half-written set
    (tmp_path / ".out.backup").mkdir()  # the user's: not our pattern
    with pytest.raises(DataError, match="no such folder"):
        D.build_folder(tmp_path / "missing", out, size=8)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(q.name for q in tmp_path.iterdir()) == [".out.backup", "out", "src"]


def test_limit_takes_images_spread_over_the_source(tmp_path):
    make_class_folder(tmp_path / "src")
    m = D.build_folder(tmp_path / "src", tmp_path / "out", size=8, holdout=0.0, limit=3)
    x, y, names, _ = load_images(tmp_path / "out", "class")
    full = D.build_folder(tmp_path / "src", tmp_path / "all", size=8, holdout=0.0)
    xa, ya, _, _ = load_images(tmp_path / "all", "class")
    keep = formats.spread(6, 3)
    assert list(keep) == [0, 2, 4] and m["count"] == 3 and m["limit"] == 3 and full["count"] == 6
    assert np.array_equal(x, xa[keep]) and list(y) == [0, 0, 1] and names == ["cat", "dog", "zebra"]
    r = run_cli(["folder", tmp_path / "src", tmp_path / "cli", "--size", "8", "--limit", "2"])
    assert r.exit_code == 0 and load_images(tmp_path / "cli")[0].shape[0] == 2


@pytest.mark.parametrize("args", [["--size", "100000"], ["--size", "3"], ["--workers", "100000"],
                                  ["--holdout", "nan"], ["--seed", str(2**64)], ["--limit", "0"]])
def test_folder_numbers_are_bounded(tmp_path, args):
    make_class_folder(tmp_path / "src")
    r = run_cli(["folder", tmp_path / "src", tmp_path / "out", *args])
    assert r.exit_code == 2 and args[0] in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_an_image_array_that_cannot_fit_is_refused_before_decoding(tmp_path, monkeypatch):
    from lasad_train import memory
    make_class_folder(tmp_path / "src")
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 10_000)
    r = run_cli(["folder", tmp_path / "src", tmp_path / "out", "--size", "64"])
    assert r.exit_code == 1 and "6 images of 64x64 need about" in r.stderr and r.stderr.count("\n") == 1
