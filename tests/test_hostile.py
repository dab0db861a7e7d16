"""Fault cases of issue 26 ("What a new user and a hostile one still hit"), beside
tests/test_faults.py: bad LasadStep nodes, output names under concurrency, every checkpoint field
checked where it is read, out of memory and a full disk, exit codes.

Every case runs on the CPU with the tiny preset and files in tmp_path. A case that aborted the
process before the fix (SIGABRT from inside onnxruntime) runs in a subprocess, so that it fails
instead of ending the suite.
"""

import errno
import io
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lasad_engine import save_checkpoint
from lasad_engine.cli import run_main
from lasad_engine.tokenizer import VQ_PRESETS, VQModel, save_tokenizer
from test_faults import _default_signals, assert_one_line, ckpt, invoke, snapshot, tiny_model  # noqa: F401
from test_gpt_train import COMMON as TRAIN_COMMON, codes  # noqa: F401 - a code set to train on

HERE = Path(__file__).resolve().parent


def _run_script(script: str, cwd, timeout=300) -> subprocess.CompletedProcess:
    """`script` in a fresh Python (an abort there fails the test instead of ending the suite)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(HERE)}, preexec_fn=_default_signals)


# 1. A bad LasadStep node never aborts the process.

@pytest.fixture(scope="module")
def step(tmp_path_factory):
    """The tiny model's custom-node step (one LasadStep node per layer), its checkpoint and tokenizer."""
    pytest.importorskip("onnxruntime_extensions")
    from lasad_tools.onnx_export import export_step
    folder = tmp_path_factory.mktemp("step")
    save_tokenizer(folder / "vq.pt", VQModel(VQ_PRESETS["vq-tiny"]))
    model = tiny_model()
    ckpt_path = save_checkpoint(folder / "m.pt", model, meta={"tokenizer": "vq.pt"})
    path = export_step(model, folder / "step.onnx", max_batch=2, meta={"tokenizer": "vq.pt"})
    return path, ckpt_path


def _edited(step_path: Path, out: Path, edit) -> Path:
    """A copy of the step with `edit(proto)` applied, saved to `out`."""
    import onnx
    proto = onnx.load(str(step_path))
    edit(proto)
    onnx.save(proto, str(out))
    return out


def _set_attr(name, value, layer=0):
    """An edit that sets attribute `name` of the layer-th LasadStep node (an INT or FLOAT, or, for
    a str/bytes value, replaces it with a STRING attribute)."""
    from onnx import helper

    def edit(proto):
        node = [n for n in proto.graph.node if n.op_type == "LasadStep"][layer]
        keep = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(keep)
        if value is not None:
            node.attribute.append(helper.make_attribute(name, value))
    return edit


def _drop(kind, name):
    def edit(proto):
        values = getattr(proto.graph, kind)
        values.remove(next(v for v in values if v.name == name))
    return edit


def _domain_version(version):
    def edit(proto):
        for imp in proto.opset_import:
            if imp.domain == "ai.lasad":
                imp.version = version
    return edit


def _node_domain(domain):
    def edit(proto):
        next(n for n in proto.graph.node if n.op_type == "LasadStep").domain = domain
    return edit


# (name, edit, words of the one line)
BAD_NODES = [
    ("num_heads 0", _set_attr("num_heads", 0), "num_heads=0 is out of range"),
    ("num_heads -3", _set_attr("num_heads", -3), "num_heads=-3 is out of range"),
    ("num_heads 2**40", _set_attr("num_heads", 2**40), "num_heads=1099511627776 is out of range"),
    ("head_k_dim 10**9", _set_attr("head_k_dim", 10**9), "head_k_dim=1000000000 is out of range"),
    ("head_v_dim 0", _set_attr("head_v_dim", 0, layer=1), "head_v_dim=0 is out of range"),
    ("row_start 77", _set_attr("row_start", 77), "row_start=77 is not one of"),
    ("has_lower_bound 5", _set_attr("has_lower_bound", 5), "has_lower_bound=5 is not 0 or 1"),
    ("scale NaN", _set_attr("scale", float("nan")), "scale=nan is not a finite number"),
    ("scale 0.3", _set_attr("scale", 0.3), "is not head_k_dim ** -0.5"),
    ("num_heads 3 (not the model's 2)", _set_attr("num_heads", 3), "num_heads=3, but the model's metadata says 2"),
    ("row_start 2 (the model's is unit)", _set_attr("row_start", 2), "row_start=2, but the model's metadata says 1"),
    ("num_heads a string", _set_attr("num_heads", "2"), "attribute 'num_heads' is of type STRING"),
    ("num_heads missing", _set_attr("num_heads", None), "no attribute num_heads"),
    ("an unknown attribute", _set_attr("evil", 1), "unknown attribute 'evil'"),
    ("plugin_version 2", _set_attr("plugin_version", "2"), "plugin_version='2'"),
    ("ai.lasad version 3", _domain_version(3), "imports ai.lasad version 3; this lasad implements version 2"),
    ("ai.lasad version 0", _domain_version(0), "imports ai.lasad version 0"),
    ("LasadStep in another domain", _node_domain("com.evil"), "the ai.lasad domain has one op"),
    ("no width input", _drop("input", "width"), "the graph has no input width"),
    ("no past_state.1 input", _drop("input", "past_state.1"), "the graph has no input past_state.1"),
    ("no logits output", _drop("output", "logits"), "the graph has no output logits"),
]


@pytest.mark.parametrize("command", ["run", "check"])
def test_bad_step_nodes_end_in_one_line(step, tmp_path, command):
    """Each bad node through lasad-run --checkpoint x.onnx and lasad-check x.onnx CKPT: one line,
    exit 1, no traceback, nothing written; before the fix several aborted the whole process from
    inside onnxruntime (SIGABRT), so all cases run in one subprocess."""
    step_path, ckpt_path = step
    files = [_edited(step_path, tmp_path / f"bad{i}.onnx", edit) for i, (_, edit, _) in enumerate(BAD_NODES)]
    (tmp_path / "work").mkdir()
    if command == "run":
        args = [["--checkpoint", f, "--tokenizer", ckpt_path.parent / "vq.pt", "-c", "1", "-n", "1", "--no-progress"]
                for f in files]
        cmd = "from lasad_engine.cli import run_main as cmd"
    else:
        args = [[f, ckpt_path, "--steps", "2", "--images", "1"] for f in files]
        cmd = "from lasad_tools.check import main as cmd"
    script = f"""
    import json
    {cmd}
    from test_faults import invoke
    for args in {json.dumps([[str(a) for a in x] for x in args])}:
        r = invoke(cmd, args, {str(tmp_path / "work")!r})
        print(json.dumps({{"code": r.exit_code, "err": r.stderr, "exc": repr(r.exception)}}), flush=True)
    """
    before = snapshot(tmp_path)
    p = _run_script(script, tmp_path)
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert p.returncode == 0 and len(rows) == len(BAD_NODES), \
        f"exit {p.returncode} after {len(rows)} of {len(BAD_NODES)} cases: {p.stderr[-1500:]}"
    for (name, _, words), row in zip(BAD_NODES, rows):
        assert row["code"] == 1, (name, row)
        line = assert_one_line(row["err"])
        assert words in line, (name, line)
    assert snapshot(tmp_path) == before


def test_node_attribute_check_matches_an_independent_rule():
    """check_node_attributes on random attribute sets (valid ones, and each field pushed out of
    its range or to another type) against the rule written out here from the contract's table."""
    from lasad_plugins import contract as C
    rng = random.Random(26)
    limit = 4096  # lasad_engine/config.py LIMITS of n_head, head_k_dim, head_v_dim

    def valid(a):
        ints = all(type(a[n]) is int for n in ("num_heads", "head_k_dim", "head_v_dim", "row_start", "has_lower_bound"))
        if not ints or type(a["scale"]) is not float or not math.isfinite(a["scale"]):
            return False
        in_range = all(1 <= a[n] <= limit for n in ("num_heads", "head_k_dim", "head_v_dim"))
        return (in_range and a["row_start"] in (0, 1, 2) and a["has_lower_bound"] in (0, 1)
                and abs(a["scale"] - a["head_k_dim"] ** -0.5) <= 1e-6 * a["head_k_dim"] ** -0.5)

    bad_values = [0, -1, limit + 1, 2**40, -2**63, 3, 1.5, True, "2", None, float("nan"), float("inf"), 2.0]
    accepted = refused = 0
    for _ in range(600):
        k = rng.randint(1, 200)
        a = dict(num_heads=rng.randint(1, 64), head_k_dim=k, head_v_dim=rng.randint(1, 300), row_start=rng.randint(0, 2),
                 has_lower_bound=rng.randint(0, 1), scale=float(k ** -0.5))
        if rng.random() < 0.7:
            a[rng.choice(list(a))] = rng.choice(bad_values)
        try:
            got = C.check_node_attributes(a)
        except C.ContractError as e:
            assert "\n" not in str(e) and len(str(e)) < 300
            assert not valid(a), (a, str(e))
            refused += 1
        else:
            assert valid(a), a
            assert got == a
            accepted += 1
    assert accepted > 50 and refused > 300


def test_plugin_creator_refuses_bad_attributes_in_one_line():
    """The TensorRT plugin's creator path (node_settings, which lasad_step_desc and lasad_step_aot
    call with the parser's 1-element arrays) goes through the same check."""
    import numpy as np

    from lasad_plugins.contract import ContractError
    from lasad_plugins.lasad_step.defs import node_settings
    i = lambda v: np.array([v], np.int64)  # noqa: E731
    f = np.array([0.125], np.float32)
    for args, words in (((i(0), i(64), i(64), i(1), i(1), f), "num_heads=0"),
                        ((i(2**40), i(64), i(64), i(1), i(1), f), "num_heads=1099511627776"),
                        ((i(4), i(10**9), i(64), i(1), i(1), f), "head_k_dim=1000000000"),
                        ((i(4), i(64), i(64), i(77), i(1), f), "row_start=77"),
                        ((i(4), i(64), i(64), np.array([1, 2], np.int32), i(1), f), "holds 2 values")):
        with pytest.raises(ContractError, match=words.replace("*", r"\*")) as e:
            node_settings(*args)
        assert "\n" not in str(e.value)


def test_tensorrt_build_checks_the_nodes_before_compiling(step, tmp_path):
    """compile_nodes (the TensorRT build's first look at the file) refuses a bad node before any
    kernel is compiled (no Triton needed to reach the refusal)."""
    from lasad_plugins.contract import ContractError
    from lasad_plugins.lasad_step import defs
    bad = _edited(step[0], tmp_path / "bad.onnx", _set_attr("head_k_dim", 10**9))
    with pytest.raises(ContractError, match="head_k_dim=1000000000 is out of range"):
        defs.compile_nodes(bad)


def test_onnxruntime_backend_checks_the_nodes_against_the_model(step, tmp_path):
    """A step whose nodes match its own metadata, run with a model of another row-start mode:
    the backend refuses it before a session is made (lasad-check's shape comparison does not
    look at the row-start mode)."""
    from lasad_plugins.contract import ContractError
    from lasad_tools.onnx_export import export_step

    from lasad_engine.engine import LasadEngine
    unit = export_step(tiny_model(), tmp_path / "unit.onnx", max_batch=2)
    with pytest.raises(ContractError, match="row_start=1, but the model's metadata says 0"):
        LasadEngine(tiny_model(row_start="none"), backend="onnxruntime", max_batch=2, artifact=unit)


OP_FAILURE = """
import sys
import lasad_engine.ops.lasad as ops
MODE, calls, real = sys.argv[1], [0], ops.fused_gates

def failing(*a, **k):  # the torch op fails on its 6th call, inside onnxruntime's Python op
    calls[0] += 1
    if calls[0] > 5:
        raise KeyboardInterrupt if MODE == "interrupt" else RuntimeError("injected failure in the op")
    return real(*a, **k)

ops.fused_gates = failing
from lasad_engine.cli import run_main
sys.argv = ["lasad-run", "--checkpoint", sys.argv[2], "-c", "1", "-n", "1", "--no-progress", "-o", "x.png"]
run_main()
"""


@pytest.mark.parametrize("mode, code, words", [("error", 1, "the LasadStep node failed inside onnxruntime: "
                                                "RuntimeError: injected failure in the op"),
                                               ("interrupt", 130, "interrupted; no half-written file is left")])
def test_an_error_inside_the_python_op_ends_the_run_not_the_process(step, tmp_path, mode, code, words):
    """Whatever the custom op raises inside onnxruntime (an error, a Ctrl-C) is an error of that
    run: one line and its exit code, never SIGABRT (-6)."""
    p = subprocess.run([sys.executable, "-c", OP_FAILURE, mode, str(step[0])], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, preexec_fn=_default_signals)
    assert p.returncode == code, (p.returncode, p.stderr[-2000:])
    assert words in assert_one_line(p.stderr)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name, make, words", [
    ("random bytes", lambda p: p.write_bytes(random.Random(1).randbytes(3000)), "not a readable ONNX file"),
    ("truncated", None, "not a readable ONNX file"),
    ("empty", lambda p: p.write_bytes(b""), "not a lasad decode step"),
])
def test_check_on_a_damaged_onnx_is_one_line(step, tmp_path, name, make, words):
    """lasad-check on a random, truncated or empty .onnx: one line, as lasad-run gives (it read
    the file with onnx.load before any check, a traceback)."""
    from lasad_tools.check import main as check_main
    path = tmp_path / "x.onnx"
    if make is None:  # the real step cut at a random place inside its graph
        data = step[0].read_bytes()
        path.write_bytes(data[:random.Random(2).randrange(100, len(data) // 2)])
    else:
        make(path)
    r = invoke(check_main, [path, step[1]], tmp_path)
    assert r.exit_code == 1
    assert words in assert_one_line(r)


# 2. Two runs never lose each other's files.

RACE = [sys.executable, "-c", "import sys; from lasad_engine.cli import run_main; sys.exit(run_main())"]


def test_two_runs_started_together_keep_both_files(ckpt, tmp_path):
    """Two `lasad-run -c 1 --seed 3` started at the same moment in one folder: both exit 0 and
    both runs' files remain (two PNGs, two JSON records), each JSON beside its own PNG."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["--checkpoint", str(ckpt), "-c", "1", "--seed", "3", "-n", "2", "--grid", "16x16", "--no-progress"]
    procs = [subprocess.Popen(RACE + args, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=_default_signals) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["lasad_1_seed3_16x16-2.png", "lasad_1_seed3_16x16.png"], (pngs, results)
    for png in pngs:
        assert json.loads((out / png).with_suffix(".json").read_text())["output"] == png
    assert sorted(p.name for p in out.iterdir()) == sorted(pngs + [p.replace(".png", ".json") for p in pngs])


def test_a_held_default_name_is_skipped_and_a_held_output_refused(ckpt, tmp_path, monkeypatch):
    """While another process holds a name (io.hold_output, as a running lasad-run does), a
    default name moves on to -2 and says why; an explicit -o is refused before any model is
    loaded; after the holder ends, the name is free again and no lock file is left."""
    from lasad_engine.io import hold_output
    from lasad_engine.pipeline import LasadPipeline
    loads = []
    real = LasadPipeline.from_checkpoint.__func__
    monkeypatch.setattr(LasadPipeline, "from_checkpoint",
                        classmethod(lambda cls, *a, **k: loads.append(1) or real(cls, *a, **k)))
    base = ["--checkpoint", ckpt, "-c", "1", "-n", "1", "--no-progress"]
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lasad_engine.io import hold_output; "
                               "h = hold_output(sys.argv[1]); print(h is not None, flush=True); time.sleep(60)",
                               str(tmp_path / "lasad_1_seed0.png")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        r = invoke(run_main, base, tmp_path)
        assert r.exit_code == 0, r.output
        assert "lasad_1_seed0.png is being written by another running lasad-run: writing lasad_1_seed0-2.png" in r.stderr
        assert (tmp_path / "lasad_1_seed0-2.png").is_file() and not (tmp_path / "lasad_1_seed0.png").exists()
        before, loads[:] = snapshot(tmp_path), []
        r = invoke(run_main, base + ["-o", "lasad_1_seed0.png"], tmp_path)
        assert r.exit_code == 1 and loads == []
        assert f"is being written by another running lasad-run (pid {holder.pid})" in assert_one_line(r)
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    r = invoke(run_main, base + ["-o", "lasad_1_seed0.png"], tmp_path)
    assert r.exit_code == 0 and (tmp_path / "lasad_1_seed0.png").is_file()
    assert not list(tmp_path.glob(".*.lock")), "the killed holder's lock file is removed by the next run"
    with hold_output(tmp_path / "again.png") as lock:  # a lock that is released leaves nothing behind
        assert lock is not None and lock.lock.exists()
    assert not lock.lock.exists()


def test_output_collisions_are_refused_before_loading(ckpt, tmp_path, monkeypatch):
    """-o out.png with a folder named like its JSON record (out.json/), or a file where its
    --save-individual folder goes: refused in one line before the model is loaded."""
    from lasad_engine.pipeline import LasadPipeline
    monkeypatch.setattr(LasadPipeline, "from_checkpoint", classmethod(lambda *a, **k: pytest.fail("loaded")))
    (tmp_path / "out.json").mkdir()
    (tmp_path / "ind").write_text("a file where the per-image folder goes")
    before = snapshot(tmp_path)
    for args, words in ((["-o", "out.png"], "the file 'out.json' is a folder"),
                        (["-o", "ind.png", "--save-individual"], "'ind' is not a folder")):
        r = invoke(run_main, ["--checkpoint", ckpt, "-c", "1", "--no-progress", *args], tmp_path)
        assert r.exit_code == 1
        assert words in assert_one_line(r)
    assert snapshot(tmp_path) == before and (tmp_path / "out.json").is_dir()


# 3. Every checkpoint field is checked where it is read.

@pytest.fixture
def folder(tmp_path):
    """A model folder as save_pretrained writes it (config.json, model.safetensors, vq.safetensors)."""
    from lasad_engine.pretrained import write_pretrained
    return write_pretrained(tmp_path / "model", tiny_model(), VQModel(VQ_PRESETS["vq-tiny"]))


def _config_json(folder, **fields):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _link_config(folder, target):
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(target)


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


FOLDER_CASES = [  # (name, damage(folder, tmp_path), words)
    ("format_version 99", lambda f, t: _config_json(f, format_version=99), "format_version 99; this lasad reads versions 1 to 1"),
    ("format_version 0", lambda f, t: _config_json(f, format_version=0), "format_version 0"),
    ("format_version '1'", lambda f, t: _config_json(f, format_version="1"), "format_version '1'"),
    ("format_version true", lambda f, t: _config_json(f, format_version=True), "format_version True"),
    ("nested 100,000 deep", lambda f, t: (f / "config.json").write_text("[" * 100_000 + "]" * 100_000),
     "nested too deeply"),
    ("a link out of the folder", lambda f, t: _link_config(f, _copy(f / "config.json", t / "elsewhere.json")),
     "config.json: a link to"),
    ("a link to /dev/zero", lambda f, t: _link_config(f, "/dev/zero"), "config.json: is a character device, not a file"),
    ("a link to /dev/urandom", lambda f, t: _link_config(f, "/dev/urandom"), "is a character device"),
    ("a FIFO", lambda f, t: (f / "config.json").unlink() or os.mkfifo(f / "config.json"), "config.json: is a FIFO"),
    ("a link to nothing", lambda f, t: _link_config(f, t / "gone.json"), "config.json: is a link to nothing"),
]


@pytest.mark.parametrize("name, damage, words", FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_model_folder_config_is_checked_where_it_is_read(folder, tmp_path, name, damage, words):
    """A model folder's config.json: its format_version (99 loaded without a word), its depth (a
    RecursionError traceback), and what it is (a link out of the folder or to a device was read
    or silently skipped): one line, exit 1, in a subprocess (a device read would never end)."""
    if "/dev/" in name and not Path(name.split()[-1]).exists():
        pytest.skip(f"no {name.split()[-1]} here")
    damage(folder, tmp_path)
    p = subprocess.run(RACE + ["--checkpoint", str(folder), "-c", "1", "-n", "1", "--no-progress"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, preexec_fn=_default_signals)
    assert p.returncode == 1, (p.returncode, p.stderr[-1500:])
    assert words in assert_one_line(p.stderr)
    assert not list(tmp_path.glob("*.png"))


def test_a_device_as_checkpoint_or_tokenizer_is_named(ckpt, tmp_path):
    """/dev/zero given as the checkpoint or the tokenizer is a device, not "no such file"."""
    for args, words in ((["--checkpoint", "/dev/zero"], "/dev/zero: is a character device, not a checkpoint"),
                        (["--checkpoint", ckpt, "--tokenizer", "/dev/zero"], "'/dev/zero' is a character device")):
        r = invoke(run_main, [*args, "-c", "1"], tmp_path)
        assert r.exit_code == 1 and words in assert_one_line(r)


def _set_metadata(**props):
    import onnx

    def edit(proto):
        for p in proto.metadata_props:
            if p.key in props:
                p.value = props.pop(p.key)
        for k, v in props.items():
            proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    return edit


STEP_METADATA = [
    ("lasad.max_batch 10**8", {"lasad.max_batch": str(10**8)}, "lasad.max_batch='100000000' is out of range; allowed 1..65536"),
    ("lasad.max_batch 0", {"lasad.max_batch": "0"}, "lasad.max_batch='0' is out of range"),
    ("lasad.rows abc", {"lasad.rows": "abc"}, "lasad.rows='abc' is out of range"),
    ("lasad.rows 17 with max_batch 2", {"lasad.rows": "17"}, "lasad.rows=17 is more than 2 x lasad.max_batch=2"),
    ("lasad.dtype fp8", {"lasad.dtype": "fp8"}, "lasad.dtype='fp8' is not one of fp32, fp16, bf16"),
    ("lasad.form other", {"lasad.form": "other"}, "lasad.form='other' is not one of custom, portable"),
]


@pytest.mark.parametrize("name, props, words", STEP_METADATA, ids=[c[0] for c in STEP_METADATA])
def test_exported_step_metadata_is_checked(step, tmp_path, name, props, words):
    from lasad_engine.checkpoint import CheckpointError  # noqa: F401 - the family of the error below
    from lasad_engine.io import UserError
    from lasad_engine.pipeline import LasadPipeline
    bad = _edited(step[0], tmp_path / "meta.onnx", _set_metadata(**props))
    with pytest.raises(UserError) as e:
        LasadPipeline.from_checkpoint(bad)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("rows", [10**9, 0, "8", True])
def test_plan_record_max_rows_is_checked(tmp_path, rows):
    """engine.json's max_rows (the plan's largest row count) is checked where it is read."""
    (tmp_path / "x.plan").write_bytes(b"plan")
    (tmp_path / "x.json").write_text(json.dumps({"opset": 17, "config": tiny_model().config.to_dict(),
                                                 "max_rows": rows}))
    r = invoke(run_main, ["--checkpoint", tmp_path / "x.plan", "-c", "1"], tmp_path)
    assert r.exit_code == 1
    assert "not a lasad plan record (max_rows=" in assert_one_line(r)


@pytest.mark.parametrize("command, args, words", [
    ("run", ["-c", "1", "--device", "cpu:99"], "device=cpu:99: there is one cpu device"),
    ("run", ["-c", "1", "--device", "cpu:1"], "device=cpu:1"),
    ("export", ["--rows", "17", "--max-batch", "8"], "--rows 17 is more than 2 x --max-batch 8"),
    ("export", ["--rows", str(10**9)], "--rows"),
])
def test_devices_and_row_counts_out_of_range_exit_2(ckpt, tmp_path, command, args, words):
    """--device cpu:99 (taken for the CPU today) and --rows beyond 2 x --max-batch (exported today)."""
    if command == "export":
        pytest.importorskip("onnx")
        from lasad_tools.export import main as cmd
        argv = [ckpt, tmp_path / "x.onnx", *args]
    else:
        cmd, argv = run_main, ["--checkpoint", ckpt, "--no-progress", *args]
    before = snapshot(tmp_path)
    r = invoke(cmd, argv, tmp_path)
    assert r.exit_code == 2, r.output
    assert words in assert_one_line(r)
    assert snapshot(tmp_path) == before


PROFILE = [sys.executable, "-c", "import sys; from lasad_tools.profile import main; sys.exit(main())"]


def test_profile_of_a_huge_grid_is_refused_before_it_runs(tmp_path):
    """lasad-profile --grids 1024x1024 ran until killed; now it is refused within seconds from
    a step timed here (in a subprocess with a time limit: before the fix it never ends)."""
    try:
        p = subprocess.run(PROFILE + ["--preset", "lasad-tiny", "--device", "cpu", "--grids", "1024x1024", "--no-vq",
                                      "-o", str(tmp_path / "p.json")], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("lasad-profile --grids 1024x1024 was still running after 120 s")
    assert p.returncode == 1, p.stderr[-1500:]
    assert "this profile would run for at least" in assert_one_line(p.stderr)
    assert not (tmp_path / "p.json").exists()


def test_profile_estimate_counts_the_steps_it_runs(tmp_path, monkeypatch):
    """The estimate's step count against the steps a real (small) profile runs, counted at the
    engine; and the refusal's arithmetic with a random per-step time."""
    from click.testing import CliRunner

    from lasad_engine.engine import LasadEngine
    from lasad_tools import profiling
    from lasad_tools.profile import main as profile_main
    counted, planned = [], []
    real_generate, real_plan = LasadEngine.generate, profiling.planned_steps

    def counting(self, labels, grid=None, **kw):
        g = grid or (self.model.config.grid_height, self.model.config.grid_width)
        counted.append(g[0] * g[1])
        return real_generate(self, labels, grid=grid, **kw)
    monkeypatch.setattr(LasadEngine, "generate", counting)
    monkeypatch.setattr(profiling, "planned_steps", lambda *a: planned.append(real_plan(*a)) or planned[-1])
    args = ["--preset", "lasad-tiny", "--batches", "1,2", "--grids", "3x4,5x2", "--iters", "2", "--warmup", "1",
            "--no-vq", "--device", "cpu", "-o", str(tmp_path / "p.json")]
    r = CliRunner().invoke(profile_main, args)
    assert r.exit_code == 0, r.output
    probe = 2 * profiling.PROBE_TOKENS  # the probe's own two short generations
    assert planned == [sum(counted) - probe]
    rate = random.Random(5).uniform(0.01, 0.05)
    monkeypatch.setattr(profiling, "probe_step_seconds", lambda *a: rate)
    r = CliRunner().invoke(profile_main, args[:-2] + ["--grids", "300x300", "--max-minutes", "1", "-o",
                                                      str(tmp_path / "q.json")])
    steps = 2 * 300 * 300 + 2 * 3 * 5 * 7  # (warmup + 1) x the latency grid + batches x (iters + 1) x 5x7
    assert r.exit_code == 1 and f"at least {rate * steps / 3600:.1f} hours here ({steps} decode steps" in r.stderr


# 4. Out of memory and a full disk say so.

def _oom(*a, **k):
    """A real out-of-memory error from torch's CPU allocator (an allocation no machine has)."""
    torch.empty(1 << 60, dtype=torch.uint8)


def test_out_of_memory_at_start_up_and_in_the_vq_decode(ckpt, tmp_path, monkeypatch):
    """torch running out of memory while the engine's buffers are allocated, and while the VQ
    decoder runs: one line naming the stage, what was asked and what to change; exit 1."""
    from lasad_engine.engine import LasadEngine
    real_init = LasadEngine.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        _oom()
    monkeypatch.setattr(LasadEngine, "__init__", init)
    r = invoke(run_main, ["--checkpoint", ckpt, "-c", "1", "--no-progress"], tmp_path)
    assert r.exit_code == 1
    line = assert_one_line(r)
    assert "out of memory while loading the model and allocating its decode buffers" in line
    assert "torch asked the CPU for 1073741824.0 GiB more" in line and "smaller --max-batch" in line
    monkeypatch.setattr(LasadEngine, "__init__", real_init)
    monkeypatch.setattr(VQModel, "decode_code", _oom)
    r = invoke(run_main, ["--checkpoint", ckpt, "-c", "1", "-n", "3", "--no-progress"], tmp_path)
    assert r.exit_code == 1
    line = assert_one_line(r)
    assert "out of memory while VQ-decoding 3 image(s) of 4x4 tokens" in line and "fewer images" in line
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.json"))


def test_out_of_memory_in_the_decode_loop(ckpt, tmp_path, monkeypatch):
    """torch running out of memory inside a decode step (on the scheduler's thread) reaches lasad-run
    as what it is: one line naming the generation and what to change, exit 1, not a generic
    "the decode loop failed"."""
    from lasad_engine.backends.base import ModelBackend
    monkeypatch.setattr(ModelBackend, "decode", _oom)
    r = invoke(run_main, ["--checkpoint", ckpt, "-c", "1", "-n", "2", "--no-progress"], tmp_path)
    assert r.exit_code == 1
    line = assert_one_line(r)
    assert "out of memory while generating 2 image(s)" in line and "smaller --max-batch" in line
    assert "decode loop failed" not in line
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.json"))


def test_out_of_memory_during_export(ckpt, tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    from lasad_tools import onnx_export
    from lasad_tools.export import main as export_main
    monkeypatch.setattr(onnx_export, "export_step", _oom)
    r = invoke(export_main, [ckpt, tmp_path / "x.onnx", "--max-batch", "2"], tmp_path)
    assert r.exit_code == 1
    line = assert_one_line(r)
    assert "out of memory while exporting the step for --max-batch 2" in line and "smaller --max-batch" in line
    assert not (tmp_path / "x.onnx").exists()


class _FullDisk(io.RawIOBase):
    """A file that takes `room` bytes and then fails as a full disk does (ENOSPC)."""

    def __init__(self, path, room: int):
        self.f, self.room = open(path, "wb"), room

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return self.f.write(b)

    def close(self):
        self.f.close()
        super().close()


def test_a_full_disk_while_training_saves_is_one_line(codes, tmp_path, monkeypatch):
    """lasad-train gpt's checkpoint written onto a full disk: torch's own writer gets ENOSPC after
    a few KiB (and, as a real writer would, swallows it into "unexpected pos ..."), and the file
    system reports 1 MiB free. One line that names the cause and what to change, exit 1, no temp
    file left (torch's RuntimeError was a traceback)."""
    import shutil
    from collections import namedtuple

    from click.testing import CliRunner

    from lasad_train.cli import main as train_main
    real_save = torch.save

    def save(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)) and Path(f).name.startswith(".last.pt."):
            with _FullDisk(f, 4096) as full:
                return real_save(obj, full, *a, **k)
        return real_save(obj, f, *a, **k)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, (10 << 30) - (1 << 20), 1 << 20))
    out = tmp_path / "run"
    r = CliRunner().invoke(train_main, ["gpt", str(codes), str(out), "--steps", "2", *TRAIN_COMMON])
    assert r.exit_code == 1, r.output
    line = assert_one_line(r)
    assert "No space left on device (1 MiB free) writing" in line and "last.pt" in line
    assert "free space on that file system" in line
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")] and not (out / "last.pt").exists()


# 5. Exit codes as documented: a value out of range exits 2.

@pytest.mark.parametrize("command, args, words", [
    ("run", ["-c", "99"], "class 99 is out of range: this model has classes 0..9"),
    ("run", ["-c", "no-such-class"], "class 'no-such-class' is not an id"),
    ("run", ["-c", "1", "--grid", "2000x4"], "grid=2000x4: each side must be in 1..1024"),
    ("run", ["-c", "1", "--grid", "0x4"], "grid=0x4"),
    ("run", ["-c", "1", "--grid", "4by4"], "grid='4by4' is not of the form HxW"),
    ("run", ["-c", "1", "--device", "tpu"], "device='tpu' is not a torch device"),
    ("profile", ["--grids", "4x2000"], "grid=4x2000"),
])
def test_values_out_of_range_exit_2(ckpt, tmp_path, command, args, words):
    if command == "profile":
        from lasad_tools.profile import main as cmd
        argv = ["--preset", "lasad-tiny", "--device", "cpu", "-o", tmp_path / "p.json", *args]
    else:
        cmd, argv = run_main, ["--checkpoint", ckpt, "--no-progress", *args]
    r = invoke(cmd, argv, tmp_path)
    assert r.exit_code == 2, r.output
    assert words in assert_one_line(r)
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "p.json").exists()


# 6. Benchmarks a user can run; 7. the README tells the truth about them.

ROOT = HERE.parent
README = (ROOT / "README.md").read_text()


def test_readme_sends_users_to_no_internal_harness():
    """The GPU machine's harness ($OUT, .carry/, wheels in parts) lives in benchmarks/device/; the
    README names none of it, and its speed section's command is a script a user runs."""
    harness = ["gpu_call.sh", "h200_session.sh", "demo_call.sh", "multi_gpu.sh", "pack_ort_gpu.py", "ort_cli_check.sh"]
    assert all((ROOT / "benchmarks" / "device" / name).is_file() for name in harness)
    assert not any((ROOT / "benchmarks" / name).exists() for name in harness)
    for needle in ["benchmarks/device", "$OUT", ".carry"] + harness:
        assert needle not in README, needle
    speed = README[README.index("## Speed"):README.index("## What you can rely on")]
    assert "python benchmarks/engine_bench.py --out bench --llamagen ../LlamaGen" in speed
    assert "git clone https://github.com/FoundationVision/LlamaGen" in speed


def test_readme_speed_table_is_what_engine_bench_prints_for_the_recorded_run():
    """engine_bench.summary on the recorded H200 run (benchmarks/results/2026-12-02-h200-engine.json:
    the engine rows and LlamaGen's, measured in one call) gives the README's rows, each naming the GPU."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import engine_bench
    record = json.loads((ROOT / "benchmarks/results/2026-12-02-h200-engine.json").read_text())["results"]
    results = {"environment": record["anatomy"]["environment"], "engine_bench": record["engine"]["engine_bench"],
               "copy_bandwidth_Bps": record["anatomy"]["copy_bandwidth_Bps"]}
    table = engine_bench.summary(results, record["llamagen_compile"])
    speed = README[README.index("## Speed"):README.index("### int8 and fp8 weights")]
    first = speed[speed.index("\n|"):]
    first = first[:first.index("\n\n")]  # the section's first table: the bf16 one (the int8 rows follow apart)
    rows = [line for line in first.splitlines() if line.startswith("| lasad-")]
    assert len(rows) == 3
    for row in rows:
        assert row in table.splitlines(), (row, table)
        assert row.endswith("| NVIDIA H200 |")


def test_engine_bench_runs_on_a_cpu(tmp_path):
    """The benchmark's CPU path (the torch backend, a tiny preset) runs and records its machine;
    without a GPU the default run says so in one line."""
    script = str(ROOT / "benchmarks" / "engine_bench.py")
    p = subprocess.run([sys.executable, script, "--out", str(tmp_path), "--device", "cpu", "--presets", "lasad-tiny",
                        "--batches", "1", "--quick"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads((tmp_path / "engine.json").read_text())
    assert d["environment"]["device"] == "cpu" and d["copy_bandwidth_Bps"] > 0
    (row,) = d["engine_bench"]
    assert row["preset"] == "lasad-tiny" and row["eager_torch_ms_per_step"] > 0
    if not torch.cuda.is_available():
        p = subprocess.run([sys.executable, script, "--out", str(tmp_path / "gpu")], capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 1 and "no CUDA GPU is visible to torch" in assert_one_line(p.stderr)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llamagen_bench.py"), "--llamagen", str(tmp_path),
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "is not a LlamaGen checkout" in assert_one_line(p.stderr)


def test_model_in_one_screen_writes_a_git_ignored_checkpoint():
    """The README's "model in one screen" block saves ckpt.pt in the folder it runs in (a clone):
    .gitignore keeps it out of git."""
    block = README[README.index("## The model in one screen"):README.index("## Checkpoints")]
    assert 'save_checkpoint("ckpt.pt", model)' in block
    ignored = subprocess.run(["git", "check-ignore", "-q", "ckpt.pt"], cwd=ROOT)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0
