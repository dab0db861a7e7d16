"""Issue 28, training that resumes without losing steps: the sharded resumable state of
`lasad-train gpt --resume-format shards` (bounded files, bf16 or fp32 AdamW moments, atomic,
checked on load), the learning-rate cool-down, elapsed time and ETA in the log, the kernel cache.

The key test trains one run uninterrupted and the same run stopped half-way and resumed from its
shards: with fp32 moments the two are bit for bit the same; with bf16 moments they stay within a
stated tolerance; and an old-style restart (the same weights, EMA, RNG and schedule, but a fresh
AdamW) lands measurably outside that tolerance, so the comparison can fail."""

import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lasad_train.cli import main
from lasad_train.state import INDEX, load_state, save_state
from test_gpt_train import COMMON, cli_fails, codes, log, run  # noqa: F401 - codes is a fixture

STEPS, HALF = 12, 6
FLAGS = [*COMMON, "--ema", "0.9", "--warmup", "2", "--cooldown", "5", "--min-lr", "1e-4"]
# With bf16 moments, the weights after the resumed half may differ from the uninterrupted run's
# by this fraction of how far the uninterrupted run moved them in that half, and the losses after
# the resume by this much (nats). Measured here: 0.0011 and 9e-6; a fresh AdamW: 0.77 and 0.086.
WEIGHT_TOL, LOSS_TOL = 0.03, 1e-3


def stop_after(monkeypatch, n):
    """The next training run stops (and saves) after its n-th step, as --time-limit would."""
    from lasad_train import gpt
    calls = []

    def out_of_time(*args):
        calls.append(1)
        return len(calls) == n
    monkeypatch.setattr(gpt, "_out_of_time", out_of_time)
    return lambda: monkeypatch.setattr(gpt, "_out_of_time", lambda *a: False)


def flat(state):
    return torch.cat([state[k].double().flatten() for k in sorted(state)])


def reference_lr(i, steps, lr, warmup, cooldown, min_lr):
    """The rate of step i (from 0), computed independently of lasad_train.gpt.lr_at: the warm-up
    and the cool-down as straight lines through their end points (np.interp), the lower of the two."""
    up = np.interp(i + 1, [0, warmup], [0, lr]) if warmup else lr
    down = np.interp(i, [steps - cooldown, steps], [lr, min_lr]) if cooldown else lr
    return float(min(up, down))


def test_resume_from_shards_continues_the_optimizer(codes, tmp_path, monkeypatch):
    full, exact, compact = tmp_path / "full", tmp_path / "exact", tmp_path / "compact"
    run([codes, full, "--steps", STEPS, *FLAGS])
    for out, moments in ((exact, "fp32"), (compact, "bf16")):
        resume = stop_after(monkeypatch, HALF)
        s = run([codes, out, "--steps", STEPS, *FLAGS, "--resume-format", "shards", "--moments", moments])
        assert s["steps"] == HALF and not s["complete"]
        resume()
        shutil.copytree(out / "state", tmp_path / f"{moments}-at-{HALF}")
        s = run([codes, out, "--steps", STEPS, "--resume", "--device", "cpu", "--no-progress", "--log-every", "1"])
        assert s["resumed_from"] == HALF and s["complete"] and not (out / "last.pt").exists()
    ref = torch.load(full / "last.pt", weights_only=True)
    rows = log(full)

    # (a) fp32 moments: the resumed run is the uninterrupted one, bit for bit
    got = load_state(exact / "state")
    assert [(r["step"], r["loss"], r["lr"]) for r in log(exact)] == [(r["step"], r["loss"], r["lr"]) for r in rows]
    for key in ("model", "ema"):
        assert all(torch.equal(got[key][k], ref[key][k]) for k in ref[key]), key
    for name, entry in ref["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got["optimizer"]["state"][name][k], entry[k]), (name, k)
    assert got["args"]["moments"] == "fp32" and got["step"] == STEPS

    # the schedule: every logged rate, and the rate the optimizer last used, against an independent formula
    expect = [reference_lr(i, STEPS, 3e-3, 2, 5, 1e-4) for i in range(STEPS)]
    np.testing.assert_allclose([r["lr"] for r in rows], expect, rtol=1e-12)
    assert all(g["lr"] == pytest.approx(expect[-1], rel=1e-12) for g in got["optimizer"]["param_groups"])

    # (b) bf16 moments: close to the uninterrupted run, and no jump in the loss after the resume
    start = flat(load_state(tmp_path / f"bf16-at-{HALF}")["model"])
    moved = (flat(ref["model"]) - start).norm()

    def deviation(out):
        return ((flat(load_state(out / "state")["model"]) - flat(ref["model"])).norm() / moved).item(), \
            max(abs(a["loss"] - b["loss"]) for a, b in zip(log(out)[HALF:], rows[HALF:]))
    assert moved > 0
    weights, loss = deviation(compact)
    assert weights < WEIGHT_TOL and loss < LOSS_TOL, (weights, loss)
    assert deviation(exact) == (0.0, 0.0)

    # (c) the same comparison catches an old-style restart: weights, EMA, RNG and schedule kept,
    # AdamW's state dropped (what --init did)
    restart = tmp_path / "restart"
    shutil.copytree(compact, restart)
    obj = load_state(tmp_path / f"bf16-at-{HALF}")
    obj["optimizer"]["state"] = {}
    save_state(restart / "state", obj, moments="fp32")
    (restart / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log(compact)[:HALF]))
    run([codes, restart, "--steps", STEPS, "--resume", "--device", "cpu", "--no-progress", "--log-every", "1"])
    weights_fresh, loss_fresh = deviation(restart)
    assert weights_fresh > 5 * WEIGHT_TOL and weights_fresh > 20 * weights, (weights_fresh, weights)
    assert loss_fresh > 10 * loss, (loss_fresh, loss)


def test_the_cooldown_schedule_against_an_independent_formula():
    """lr_at for random warm-up / cool-down / floor settings equals straight lines through the
    end points; the cool-down's first step takes --lr, its last is above --min-lr, and the rate
    never rises after the warm-up."""
    from lasad_train.gpt import GPTTrainArgs, lr_at
    rng = np.random.default_rng(28)
    for _ in range(200):
        steps = int(rng.integers(1, 300))
        warmup, cooldown = int(rng.integers(0, steps + 1)), int(rng.integers(0, steps + 1))
        lr = float(10 ** rng.uniform(-5, -2))
        min_lr = float(rng.choice([0.0, lr * rng.uniform(0, 1)]))
        args = GPTTrainArgs(codes="", out="", steps=steps, lr=lr, warmup=warmup, cooldown=cooldown, min_lr=min_lr)
        got = [lr_at(i, args) for i in range(steps)]
        want = [reference_lr(i, steps, lr, warmup, cooldown, min_lr) for i in range(steps)]
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=0, err_msg=str((steps, warmup, cooldown, lr, min_lr)))
        if cooldown:
            assert got[-1] > min_lr or lr == min_lr
            if steps - cooldown >= warmup:
                assert got[steps - cooldown] == lr
        assert all(b <= a for a, b in zip(got[warmup:], got[warmup + 1:]))


def test_shards_stay_under_the_size_and_round_trip(tmp_path):
    """Random tensors, some larger than a shard: every file is within the limit, large tensors come
    back from their pieces, everything but the moments bit for bit, bf16 moments as round-to-
    nearest-even of fp32 (computed here on the bits) and back in fp32."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 129, generator=g)  # 155 kB: cut into pieces at 64 KiB
    obj = {"format": "x", "step": 7, "model": {"big": big, "small": torch.randn(5, generator=g),
                                                 "ints": torch.randint(-9, 9, (33, 3), generator=g)},
           "optimizer": {"state": {"big": {"step": torch.tensor(7.0), "exp_avg": torch.randn(300, 129, generator=g),
                                           "exp_avg_sq": torch.rand(300, 129, generator=g) * 1e-12}},
                         "param_groups": [{"params": ["big"], "lr": 1e-3, "betas": (0.9, 0.95)}]},
           "rng": {"torch": torch.get_rng_state(), "python": [3, list(range(5)), None]}, "empty": torch.zeros(0, 4)}
    limit = 64 << 10
    index = save_state(tmp_path / "state", obj, shard_bytes=limit, moments="bf16")
    files = sorted((tmp_path / "state").iterdir())
    assert [p.name for p in files if p.name != INDEX] == [s["file"] for s in index["shards"]]
    assert len(index["shards"]) >= 4 and all(p.stat().st_size <= limit for p in files if p.name != INDEX)
    assert len(index["tensors"]["model/big"]["parts"]) >= 3
    back = load_state(tmp_path / "state")
    assert back["step"] == 7 and back["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.95]
    for k, v in obj["model"].items():
        assert torch.equal(back["model"][k], v) and back["model"][k].dtype == v.dtype
    assert torch.equal(back["rng"]["torch"], obj["rng"]["torch"]) and back["empty"].shape == (0, 4)
    state = back["optimizer"]["state"]["big"]
    assert torch.equal(state["step"], torch.tensor(7.0))
    for key in ("exp_avg", "exp_avg_sq"):
        bits = obj["optimizer"]["state"]["big"][key].numpy().view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
        assert state[key].dtype == torch.float32 and np.array_equal(state[key].numpy(), rounded), key
    assert (state["exp_avg_sq"] > 0).all()  # bf16 keeps fp32's range: tiny second moments do not vanish


def test_the_shards_of_a_run_are_bounded_and_the_form_can_change(codes, tmp_path):
    """Through the CLI: --shard-size bounds every file; a last.pt run resumed with --resume-format
    shards continues in state/ (last.pt goes), a plain --resume keeps the form, and where both
    forms are present (a kill between writing one and removing the other) the later step is read."""
    out = tmp_path / "run"
    run([codes, out, "--steps", 2, *COMMON])
    old = (out / "last.pt").read_bytes()
    run([codes, out, "--steps", 4, "--resume", "--resume-format", "shards", "--shard-size", "64KiB",
         "--device", "cpu", "--no-progress"])
    sizes = [p.stat().st_size for p in (out / "state").glob("shard-*.safetensors")]
    assert len(sizes) > 3 and max(sizes) <= 64 << 10 and not (out / "last.pt").exists()
    assert json.loads((out / "state" / INDEX).read_text())["shard_bytes"] == 64 << 10
    (out / "last.pt").write_bytes(old)  # step 2 beside the state's step 4
    s = run([codes, out, "--steps", 5, "--resume", "--device", "cpu", "--no-progress"])
    assert s["resumed_from"] == 4 and not (out / "last.pt").exists() and (out / "state").is_dir()
    s = run([codes, out, "--steps", 6, "--resume", "--resume-format", "pt", "--device", "cpu", "--no-progress"])
    assert s["resumed_from"] == 5 and (out / "last.pt").exists() and not (out / "state").exists()
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 6
    cli_fails([codes, out, "--steps", 7, "--resume", "--moments", "fp32", "--device", "cpu"],
              "--moments applies to --resume-format shards")


def test_a_damaged_state_is_one_line_naming_the_file(codes, tmp_path):
    from lasad_train.state import remove_state
    good = tmp_path / "good"
    run([codes, good, "--steps", 2, *COMMON, "--resume-format", "shards", "--shard-size", "64KiB"])
    resume = ["--steps", 3, "--resume", "--device", "cpu", "--no-progress"]

    def damaged(name, change):
        out = tmp_path / name
        shutil.copytree(good, out)
        change(out / "state")
        return out

    def edit_index(fn):
        def change(state):
            index = json.loads((state / INDEX).read_text())
            fn(index)
            (state / INDEX).write_text(json.dumps(index))
        return change

    def flip(state):
        p = state / "shard-00001.safetensors"
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x10
        p.write_bytes(bytes(data))

    def cut(state):
        p = state / "shard-00002.safetensors"
        p.write_bytes(p.read_bytes()[:-100])

    def other_model(state):  # a complete, consistent state whose model does not match its config
        obj = load_state(state)
        obj["model"]["output.weight"] = torch.zeros(3, 3)
        remove_state(state)
        save_state(state, obj, moments="fp32")

    def short_moment(state):
        obj = load_state(state)
        entry = obj["optimizer"]["state"]["output.weight"]
        entry["exp_avg"] = entry["exp_avg"][:-1]
        save_state(state, obj, moments="fp32")

    def bad_rng(state):
        obj = load_state(state)
        obj["rng"]["python"]["state"] = obj["rng"]["python"]["state"][:10]
        save_state(state, obj)

    cases = [
        ("missing", lambda s: (s / "shard-00003.safetensors").unlink(),
         ["shard-00003.safetensors: missing", "copy it back"]),
        ("flipped", flip, ["shard-00001.safetensors: sha256", "damaged", "copy it again"]),
        ("cut", cut, ["shard-00002.safetensors:", "bytes, the index says"]),
        ("no-index", lambda s: (s / INDEX).unlink(), [f"{INDEX}: missing"]),
        ("garbage", lambda s: (s / INDEX).write_text("{not json"), [f"{INDEX}: not readable JSON"]),
        ("shape", edit_index(lambda i: i["tensors"]["model/output.weight"].update(shape=[2, 2])),
         [INDEX, "model/output.weight", "elements"]),
        ("entry", edit_index(lambda i: i["tensors"]["model/output.weight"]["parts"][0].__setitem__(1, "nope")),
         ["holds no tensor 'nope'"]),
        ("model", other_model, [INDEX, "model/output.weight is [3, 3], its config's model has"]),
        ("moment", short_moment, [INDEX, "optimizer/state/output.weight/exp_avg is"]),
        ("rng", bad_rng, [INDEX, "damaged RNG state"]),
    ]
    for name, change, texts in cases:
        out = damaged(name, change)
        err = cli_fails([codes, out, *resume], *texts)
        assert str(out / "state") in err, (name, err)
    assert run([codes, good, *resume])["resumed_from"] == 2  # the undamaged copy resumes


def test_a_kill_while_saving_leaves_the_previous_state(codes, tmp_path, monkeypatch):
    """A save interrupted between shards leaves the previous state whole and no staging folder;
    a staging folder a killed process left is removed by the next run; resuming then ends where
    the uninterrupted run ends (fp32 moments: exactly)."""
    import safetensors.torch
    flags = [*COMMON, "--resume-format", "shards", "--moments", "fp32", "--shard-size", "64KiB", "--save-every", "2"]
    whole, out = tmp_path / "whole", tmp_path / "run"
    run([codes, whole, "--steps", 6, *flags])
    real, calls = safetensors.torch.save_file, []

    def dies_in_the_second_save(tensors, path, metadata=None):
        calls.append(metadata["shard"])
        if calls.count("0") == 2 and metadata["shard"] == "2":
            raise KeyboardInterrupt
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", dies_in_the_second_save)
    r = CliRunner().invoke(main, ["gpt", str(codes), str(out), "--steps", "6", *map(str, flags)])
    assert r.exit_code != 0
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert load_state(out / "state")["step"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock"]
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = out / f".state.{dead.pid}.0123abcd.tmp"
    left.mkdir()
    (left / "shard-00000.safetensors").write_bytes(b"half")
    s = run([codes, out, "--steps", 6, "--resume", "--device", "cpu", "--no-progress"])
    assert s["resumed_from"] == 2 and not left.exists()
    a, b = load_state(whole / "state"), load_state(out / "state")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_the_log_has_elapsed_time_and_an_eta_over_pieces(codes, tmp_path, monkeypatch):
    """Each row: elapsed training seconds of the whole run (continuing across a resume) and the
    seconds left at the recent rate (0 at the end); --no-progress prints one line per row."""
    out = tmp_path / "run"
    resume = stop_after(monkeypatch, 3)
    r = CliRunner().invoke(main, ["gpt", str(codes), str(out), "--steps", "6", *map(str, COMMON)])
    assert r.exit_code == 0, r.output
    resume()
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("step ")]
    assert [ln.split(":")[0] for ln in lines] == ["step 1/6", "step 2/6", "step 3/6"]
    assert all("tokens/s, elapsed " in ln and ", eta " in ln for ln in lines)
    run([codes, out, "--steps", 6, "--resume", "--device", "cpu", "--no-progress", "--log-every", "1"])
    rows = log(out)
    elapsed = [r["elapsed_s"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(b >= a for a, b in zip(elapsed, elapsed[1:])) and elapsed[0] > 0
    assert all(r["eta_s"] >= 0 for r in rows) and rows[-1]["eta_s"] == 0
    # the ETA is the steps left at the rate since the previous row
    for a, b in zip(rows[3:], rows[4:]):
        assert b["eta_s"] == pytest.approx((6 - b["step"]) * (b["elapsed_s"] - a["elapsed_s"]), abs=0.2)


def test_the_kernel_cache_is_in_the_run_folder_unless_told():
    from pathlib import Path

    from lasad_train.gpt import GPTTrainArgs, kernel_cache, use_kernel_cache
    out = Path("/somewhere/run")
    args = GPTTrainArgs(codes="", out=str(out))
    assert kernel_cache(args, out, {}) == out / "triton-cache"
    assert kernel_cache(args, out, {"TRITON_CACHE_DIR": "/env/cache"}) == Path("/env/cache")
    given = GPTTrainArgs(codes="", out=str(out), kernel_cache="/given")
    assert kernel_cache(given, out, {"TRITON_CACHE_DIR": "/env/cache"}) == Path("/given")
    env = {"FLA_CACHE_RESULTS": "0"}
    use_kernel_cache(Path("/k"), env)
    assert env == {"TRITON_CACHE_DIR": "/k", "TRITON_CACHE_AUTOTUNING": "1", "FLA_CACHE_RESULTS": "0"}


def test_schedule_and_state_options_are_checked(codes, tmp_path):
    out = tmp_path / "o"
    cli_fails([codes, out, "--steps", 10, "--cooldown", 11, "--device", "cpu"], "--cooldown 11", "--steps 10")
    cli_fails([codes, out, "--lr", "1e-3", "--min-lr", "2e-3", "--cooldown", 2, "--device", "cpu"],
              "--min-lr 0.002", "--lr 0.001")
    cli_fails([codes, out, "--resume-format", "zip"], "'zip' is not one of 'pt', 'shards'", code=2)
    cli_fails([codes, out, "--resume-format", "shards", "--moments", "fp8"], "'fp8' is not one of", code=2)
    for size in ("1KiB", "16MB", "nan", "1.5"):
        cli_fails([codes, out, "--resume-format", "shards", "--shard-size", size], "--shard-size", code=2)
    cli_fails([codes, out, "--moments", "fp32", "--device", "cpu"], "--moments applies to --resume-format shards")
    assert not out.exists()
    # a resumed run keeps its cool-down: another one would change the run
    run([codes, out, "--steps", 3, *COMMON, "--cooldown", 2])
    cli_fails([codes, out, "--steps", 4, "--resume", "--cooldown", 3, "--device", "cpu"], "cooldown=2", "--cooldown 3")
    assert math.isclose(log(out)[-1]["lr"], 3e-3 / 2)


def test_a_full_disk_while_saving_shards_is_one_line(codes, tmp_path, monkeypatch):
    """safetensors reports a failed write as its own error ("... (os error 28)"): it becomes the
    OSError it is, one line with what to change, and no staging folder stays behind."""
    import safetensors.torch

    def full(tensors, path, metadata=None):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "run"
    err = cli_fails([codes, out, "--steps", 1, *COMMON, "--resume-format", "shards"], "No space left on device",
                    "shard-00000.safetensors", "free space on that file system")
    assert err.startswith("lasad-train: error:")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "log.jsonl"]  # no state, no staging folder
