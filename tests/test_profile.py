"""lasad-profile on a CPU: the JSON it writes, its statistics, and its errors."""

import json

from click.testing import CliRunner

from lasad_tools.profile import main
from lasad_tools.profiling import percentiles


def test_percentiles_against_sorted_samples():
    xs = [float(x) for x in range(101)][::-1]
    p = percentiles(xs)
    assert (p["p50"], p["p90"], p["p99"], p["n"]) == (50.0, 90.0, 99.0, 101)


def test_profile_with_kv_baseline(tmp_path):
    out = tmp_path / "p.json"
    r = CliRunner().invoke(main, ["--preset", "lasad-tiny", "--baseline", "kv", "--batches", "1,2",
                                  "--grids", "4x4,6x8", "--iters", "1", "--warmup", "0", "--no-vq",
                                  "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["environment"]["torch"] and d["config"]["n_layer"] == 2 and d["copy_bandwidth_Bps"] > 0
    for name in ("lasad", "kv"):
        s = d["subjects"][name]
        lat = s["latency"]
        assert lat["grid"] == [6, 8] and len(lat["step_ms"]) == 48 == len(lat["floor_step_ms"])
        q = lat["step_ms_percentiles"]
        assert 0 < q["p50"] <= q["p90"] <= q["p99"] <= max(lat["step_ms"])
        assert [t["batch"] for t in s["throughput"]] == [1, 2]
        assert all(t["images_per_s"] <= t["ceiling_images_per_s"] for t in s["throughput"])
    lasad_mem = [m["state_bytes"] for m in d["subjects"]["lasad"]["memory"]]
    kv_mem = [m["state_bytes"] for m in d["subjects"]["kv"]["memory"]]
    assert lasad_mem[0] == lasad_mem[1]            # constant state whatever the grid
    assert kv_mem[1] / kv_mem[0] == (48 + 1) / (16 + 1)  # the KV cache grows with the tokens
    floors = d["subjects"]["kv"]["latency"]["floor_step_ms"]
    assert floors[-1] > floors[0]                  # a KV step reads more as the image grows


def test_profile_errors_are_one_line(tmp_path):
    r = CliRunner().invoke(main, ["--preset", "lasad-Q", "-o", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "lasad-Q" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["--preset", "lasad-tiny", "--grids", "4by4", "--device", "cpu",
                                  "-o", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "grid='4by4'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()


def test_plots_from_a_profile(tmp_path):
    import pytest
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[plot]' in lasad's folder)")
    from lasad_tools.plot_profile import plot
    out = tmp_path / "p.json"
    r = CliRunner().invoke(main, ["--preset", "lasad-tiny", "--baseline", "kv", "--batches", "1",
                                  "--grids", "4x4,5x7", "--iters", "1", "--warmup", "0", "--no-vq",
                                  "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    files = plot([out], tmp_path / "img")
    assert [f.name for f in files] == ["step_latency.png", "memory.png", "throughput.png"]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)


def test_trace_is_written(tmp_path):
    out, trace = tmp_path / "p.json", tmp_path / "trace.json"
    r = CliRunner().invoke(main, ["--preset", "lasad-tiny", "--batches", "1", "--grids", "4x4", "--iters", "1",
                                  "--warmup", "0", "--no-vq", "--device", "cpu", "--trace", str(trace),
                                  "--nvtx", "--no-cuda-graph", "-o", str(out)])
    assert r.exit_code == 0, r.output
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("lasad_step" in str(e.get("name", "")) or "aten::" in str(e.get("name", "")) for e in events)
    assert json.loads(out.read_text())["cuda_graph"] is False
