"""One GPT trained on code sets of several grid sizes (issue 28): each step's batch comes from one
grid and the forward gets that grid's width; the choice is a pure function of (seed, step); the
model learns a width-dependent pattern at both sizes; mismatched code sets are one line; the
trained grids travel in the checkpoint to lasad-run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from lasad_engine import LasadConfig, LasadGen, load_checkpoint, save_checkpoint
from lasad_train.cli import main
from lasad_train.formats import CODES_FORMAT, VERSION, save_npy, write_manifest
from lasad_train.gpt import (GPTTrainArgs, batch_indices, bucket_batch_sizes, bucket_of_step, step_batch,
                             train_gpt)

NO_DROPOUT = {k: 0 for k in ("token_dropout", "resid_dropout", "ffn_dropout", "class_dropout")}


def write_codes(folder, codes, labels, *, vocab, names, **extra):
    """A code set (one shard) of int codes `[n, h, w]` and labels `[n]`."""
    folder.mkdir(parents=True, exist_ok=True)
    save_npy(folder / "codes-00000.npy", np.asarray(codes, dtype=np.int32))
    save_npy(folder / "labels-00000.npy", np.asarray(labels, dtype=np.int64))
    n, h, w = codes.shape
    write_manifest(folder, {"format": CODES_FORMAT, "version": VERSION, "grid": [h, w], "vocab_size": vocab,
                            "label_set": "class", "num_classes": len(names), "class_names": list(names),
                            "flip": False, "count": n, "tokenizer": None, "images": None,
                            "shards": [{"codes": "codes-00000.npy", "labels": "labels-00000.npy", "count": n}],
                            **extra})
    return folder


def random_codes(folder, grid, n, seed, vocab=32, names=("a", "b", "c", "d"), **extra):
    rng = np.random.default_rng(seed)
    return write_codes(folder, rng.integers(0, vocab, (n, *grid)), rng.integers(0, len(names), n), vocab=vocab,
                       names=names, **extra)


def train(codes, out, **kw):
    base = dict(preset="lasad-tiny", batch_size=16, lr=3e-3, device="cpu", progress=False, log_every=1,
                overrides=dict(NO_DROPOUT), memory_check=False)
    return train_gpt(GPTTrainArgs(codes=[str(c) for c in codes], out=str(out), **{**base, **kw}))


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_each_step_loss_is_its_grids_loss_with_that_grids_width(tmp_path):
    """With the learning rate 0 the weights stay those of --init, so every logged loss is the loss
    of that step's batch under them: computed again here sample by sample with the naive
    recurrence and each sample's own grid width, it matches; with the first grid's width (what a
    trainer that forgot the width would use) the 4x6 steps do not."""
    a = random_codes(tmp_path / "a", (4, 4), 40, 0)
    b = random_codes(tmp_path / "b", (4, 6), 30, 1)
    cfg = LasadConfig.from_preset("lasad-tiny", vocab_size=32, num_classes=4, grid_height=4, grid_width=4,
                                  class_names=["a", "b", "c", "d"], **NO_DROPOUT)
    torch.manual_seed(7)
    model = LasadGen(cfg)
    with torch.no_grad():  # the head starts at zero, which would make every loss log(32) whatever the width
        model.output.weight.normal_(0, 0.5)
        for layer in model.layers:
            layer.attention.qfv.weight.mul_(4)
    save_checkpoint(tmp_path / "init.safetensors", model)
    out = tmp_path / "run"
    train([a, b], out, steps=10, lr=0.0, init=str(tmp_path / "init.safetensors"), seed=3)
    trained = load_checkpoint(out / "model.safetensors")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in trained.state_dict().items())

    sets = [(np.load(f / "codes-00000.npy").astype(np.int64).reshape(len(np.load(f / "labels-00000.npy")), -1),
             np.load(f / "labels-00000.npy")) for f in (a, b)]
    widths, batches = [4, 6], bucket_batch_sizes([(4, 4), (4, 6)], 16)
    assert batches == [16, 8]
    rows, seen = log(out), set()
    assert [r["step"] for r in rows] == list(range(1, 11))
    for step, row in enumerate(rows):
        k, idx = step_batch([40, 30], batches, [40 * 16, 30 * 24], 3, step)
        seen.add(k)
        codes, labels = (torch.as_tensor(x[idx.numpy()]) for x in sets[k])

        def loss_with(width):
            with torch.no_grad():
                per = [F.cross_entropy(model(c[None], l[None], width=width, backend="naive")[0], c)
                       for c, l in zip(codes, labels)]
            return torch.stack(per).mean().item()

        assert row["loss"] == pytest.approx(loss_with(widths[k]), rel=1e-5), step
        if k == 1:
            assert abs(loss_with(4) - row["loss"]) > 1e-3 * row["loss"], step
    assert seen == {0, 1}


def test_the_grid_of_a_step_is_a_pure_function_of_seed_and_step():
    """The grid and the batch of a step depend on (seed, step) alone, not on the order steps are
    asked in or on the number of processes (each rank takes its slice of the same global batch);
    the grids come as often as their weights say; one code set gives the batches of before."""
    sizes, grids = [100, 100, 100], [(16, 16), (24, 24), (32, 32)]
    batches = bucket_batch_sizes(grids, 512)
    assert batches == [512, 224, 128]  # about 131k tokens each: 131072, 129024, 131072
    weights = [1.0, 2.0, 1.0]
    forward = [step_batch(sizes, batches, weights, 5, s) for s in range(300)]
    backward = {s: step_batch(sizes, batches, weights, 5, s) for s in reversed(range(300))}
    for s, (k, idx) in enumerate(forward):
        assert backward[s][0] == k and torch.equal(backward[s][1], idx)
        assert len(idx) == batches[k]
        for world in (2, 4, 8):  # the ranks' slices are the global batch
            local = batches[k] // world
            assert torch.equal(torch.cat([idx[r * local:(r + 1) * local] for r in range(world)]), idx)
    ks = np.array([bucket_of_step(weights, 5, s) for s in range(6000)])
    assert np.allclose(np.bincount(ks, minlength=3) / len(ks), [0.25, 0.5, 0.25], atol=0.025)
    assert [bucket_of_step(weights, 6, s) for s in range(40)] != list(ks[:40])  # the seed matters
    assert all(step_batch([100], [64], [1.0], 5, s)[1].equal(batch_indices(100, 64, 5, s)) for s in range(20))
    assert bucket_batch_sizes([(16, 16), (24, 24)], 16) == [16, 8]
    assert bucket_batch_sizes([(24, 24), (16, 16)], 12) == [4, 12]  # q = gcd(12, 8) = 4; the smallest grid is B


def test_torchrun_two_processes_match_one_with_two_grids(tmp_path):
    """DDP over gloo with 2 processes draws the same grid and batch at every step as 1 process."""
    a, b = random_codes(tmp_path / "a", (4, 4), 48, 0), random_codes(tmp_path / "b", (4, 6), 48, 1)
    args = ["gpt", str(a), str(b), None, "--steps", "4", "--preset", "lasad-tiny", "--batch-size", "16", "--lr",
            "3e-3", "--device", "cpu", "--no-progress", "--log-every", "1", "--save-every", "4", "--seed", "3",
            "--set", "token_dropout=0", "--set", "resid_dropout=0", "--set", "ffn_dropout=0",
            "--set", "class_dropout=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    r = CliRunner().invoke(main, [str(one) if x is None else x for x in args])
    assert r.exit_code == 0, r.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "lasad_train.cli", *[str(two) if x is None else x for x in args]]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {bucket_of_step([48 * 16, 48 * 24], 3, s) for s in range(4)} == {0, 1}  # both grids were trained
    sa, sb = (torch.load(o / "last.pt", weights_only=True) for o in (one, two))
    assert sb["world_size"] == 2
    assert np.allclose([x["loss"] for x in log(one)], [x["loss"] for x in log(two)], rtol=1e-5)
    for k in sa["model"]:
        # Adam turns fp32 rounding of near-zero gradients (summed in another order) into ~1e-5 differences
        torch.testing.assert_close(sb["model"][k], sa["model"][k], rtol=1e-4, atol=5e-5, msg=k)


def marker_codes(folder, grid, n, seed):
    """Tokens 0..7 uniformly at random, except column 1 of every row: the marker 8. Up to the
    first row's end a 4-wide and a 6-wide grid look alike, so whether token 5 is a marker
    (4 wide) or not (6 wide) is known only from the width the row-start rule is given."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 8, (n, *grid))
    x[:, :, 1] = 8
    return write_codes(folder, x, rng.integers(0, 2, n), vocab=16, names=("x", "y")), x


def test_a_pattern_that_depends_on_the_width_is_learned_at_both_grids(tmp_path):
    """After 150 steps on 4x4 and 4x6 code grids the model puts the marker at column 1 of every
    row at both sizes (p > 0.9, given each grid's width) and nowhere else. A trainer that ran
    every batch with the first grid's width fails this (checked by hand: p 0.002 at 4x4)."""
    a, _ = marker_codes(tmp_path / "a", (4, 4), 512, 0)
    b, _ = marker_codes(tmp_path / "b", (4, 6), 512, 1)
    train([a, b], tmp_path / "run", steps=150, batch_size=32, log_every=50)
    model = load_checkpoint(tmp_path / "run" / "model.safetensors")
    for grid, seed in (((4, 4), 5), ((4, 6), 6)):
        h, w = grid
        _, x = marker_codes(tmp_path / f"eval{w}", grid, 200, seed)
        x = torch.as_tensor(x).flatten(1)
        with torch.no_grad():
            p = model(x, torch.zeros(len(x), dtype=torch.long), width=w).softmax(-1)[..., 8]
        col, row = torch.arange(h * w) % w, torch.arange(h * w) // w
        assert p[:, (col == 1) & (row >= 1)].mean() > 0.9, grid  # rows after the first: width needed
        assert p[:, col != 1].mean() < 0.05, grid


def cli_error(args):
    r = CliRunner().invoke(main, ["gpt"] + [str(x) for x in args])
    err = r.stderr.strip()
    assert r.exit_code != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, (r.exit_code, r.output)
    return err


def test_code_sets_that_do_not_belong_together_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short relative paths, as a user types them
    tmp_path = type(tmp_path)(".")
    a = random_codes(tmp_path / "a", (4, 4), 8, 0, tokenizer_sha256="aaaa", split_digest="s1")
    out = tmp_path / "o"
    common = ["--preset", "lasad-tiny", "--device", "cpu", "--steps", "1", "--no-progress"]
    cases = [
        (random_codes(tmp_path / "v", (4, 6), 8, 1, vocab=40), ["v has vocab_size 40, a has 32"]),
        (random_codes(tmp_path / "t", (4, 6), 8, 1, tokenizer_sha256="bbbb"), ["another tokenizer", "'bbbb'"]),
        (random_codes(tmp_path / "n", (4, 6), 8, 1, names=("a", "b", "d", "c")), ["class 2 'd'", "'c'"]),
        (random_codes(tmp_path / "k", (4, 6), 8, 1, names=("a", "b", "c")), ["num_classes 3", "4"]),
        (random_codes(tmp_path / "s", (4, 6), 8, 1, split_digest="s2"), ["held-out split", "'s2'"]),
        (random_codes(tmp_path / "g", (4, 4), 8, 1), ["both hold 4x4", "one code set per grid"]),
    ]
    for other, texts in cases:
        err = cli_error([a, other, out, *common])
        assert all(t in err for t in texts), (texts, err)
    good = random_codes(tmp_path / "ok", (4, 6), 8, 1, tokenizer_sha256="aaaa", split_digest="s1")
    err = cli_error([a, good, out, *common, "--mix", "1,2,3"])
    assert "--mix 1,2,3" in err and "3 weight(s) for 2 code set(s)" in err
    assert "comma-separated" in cli_error([a, good, out, *common, "--mix", "1,-1"])
    assert "processes x --grad-accum" in cli_error([a, good, out, *common, "--batch-size", "16",
                                                    "--grad-accum", "16"])
    assert not out.exists() or not (out / "last.pt").exists()


def test_trained_grids_are_recorded_and_read_back(tmp_path):
    """The deploy checkpoint lists the grids (the first code set's first, the model's default);
    the pipeline's note, lasad-run and the model card read them; a resume with other grids is
    refused; an untrained grid still runs with a one-line note."""
    from lasad_engine import LasadPipeline
    from lasad_engine.checkpoint import trained_grids
    from lasad_engine.cli import run_main
    from lasad_engine.pretrained import model_card
    from lasad_engine.tokenizer import VQModel, save_tokenizer
    save_tokenizer(tmp_path / "vq.safetensors", VQModel("vq-tiny"))  # 64 codes, f = 2
    b, a = random_codes(tmp_path / "b", (4, 6), 16, 1, vocab=64), random_codes(tmp_path / "a", (4, 4), 16, 0, vocab=64)
    out = tmp_path / "run"
    train([b, a], out, steps=2, batch_size=8, mix=[1.0, 1.0])
    model = load_checkpoint(out / "model.safetensors")
    assert model.checkpoint_meta["trained_grids"] == [[4, 6], [4, 4]]
    assert (model.config.grid_height, model.config.grid_width) == (4, 6)
    assert model.checkpoint_meta["codes"] == [str(b), str(a)]
    assert trained_grids(model.config, model.checkpoint_meta) == [(4, 6), (4, 4)]
    assert trained_grids(model.config, {"trained_grids": [[4, "x"]]}) == [(4, 6)]  # damaged: the config's
    assert trained_grids(model.config, {}) == [(4, 6)]
    pipe = LasadPipeline(model)
    assert pipe.grid_note("4x4") is None and pipe.grid_note((4, 6)) is None
    assert "trained at 4x6 and 4x4 tokens; 8x8 runs" in pipe.grid_note("8x8")
    card = model_card(model.config, model.checkpoint_meta, folder="m", n_params=1, dtype="fp32")
    assert "| trained token grids | 4x6, 4x4 |" in card and "Trained at 4x6 and 4x4 tokens" in card
    for grid, noted in (("4x4", False), ("8x8", True)):
        r = CliRunner().invoke(run_main, ["--checkpoint", str(out / "model.safetensors"), "-c", "a", "-n", "1",
                                          "--grid", grid, "--tokenizer", str(tmp_path / "vq.safetensors"),
                                          "--no-progress", "-o", str(tmp_path / f"{grid}.png")])
        assert r.exit_code == 0, r.output
        assert ("was never trained" in r.stderr) == noted, r.stderr
    c = random_codes(tmp_path / "c", (4, 5), 16, 2, vocab=64)  # as many grids, the model's grid first: not the run
    err = cli_error([b, c, out, "--steps", "3", "--resume", "--device", "cpu", "--no-progress"])
    assert "4x6, 4x4 grids" in err and "hold 4x6, 4x5" in err and "resuming would not continue" in err
    assert train([b, a], out, steps=3, resume=True, batch_size=None, overrides=None)["steps"] == 3


def test_emoji5_at_two_sizes_gives_code_sets_of_one_split(tmp_path):
    """`lasad-train data emoji5 --size` at two sizes: the same images, labels and train / held-out
    split; their codes (one tokenizer) are two grids that record the same split and tokenizer, and
    train together; a set built with another split seed is refused."""
    import lasad_train.data as D
    from lasad_engine.tokenizer import VQModel, save_tokenizer
    from lasad_train.codes import extract_codes, load_code_sets
    from lasad_train.formats import DataError, load_images
    from test_data import make_emoji_packages
    sources, emoji_json = make_emoji_packages(tmp_path / "pkgs")
    torch.manual_seed(0)
    save_tokenizer(tmp_path / "vq.safetensors", VQModel("vq-tiny"))  # f = 2
    built = {}
    for size, seed in ((16, 3), (24, 3), (24, 4)):
        out = tmp_path / f"img{size}-{seed}"
        D.build_emoji5(sources, emoji_json, out, size=size, holdout=0.25, seed=seed)
        x, labels, names, m = load_images(out, "identity")
        built[size, seed] = (x, labels, names, np.load(out / "split.npy"))
        extract_codes(out, tmp_path / "vq.safetensors", tmp_path / f"codes{size}-{seed}", label_set="identity",
                      progress=False, device="cpu")
    (x16, l16, n16, s16), (x24, l24, n24, s24) = built[16, 3], built[24, 3]
    assert x16.shape[1:3] == (16, 16) and x24.shape[1:3] == (24, 24)
    assert np.array_equal(l16, l24) and n16 == n24 and np.array_equal(s16, s24) and s16.sum() > 0
    assert not np.array_equal(built[24, 4][3], s16)  # another seed, another split
    sets = load_code_sets([tmp_path / "codes16-3", tmp_path / "codes24-3"])
    assert [list(m["grid"]) for _, _, m in sets] == [[8, 8], [12, 12]]
    assert sets[0][2]["split_digest"] == sets[1][2]["split_digest"] and sets[0][2]["tokenizer_sha256"]
    assert np.array_equal(sets[0][1], sets[1][1])  # the same training images, in the same order
    with pytest.raises(DataError, match="another train / held-out split"):
        load_code_sets([tmp_path / "codes16-3", tmp_path / "codes24-4"])
