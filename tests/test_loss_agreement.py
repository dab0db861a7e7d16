"""benchmarks/loss_agreement.py (the multi-GPU loss comparison) against numpy on random logs."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def la():
    spec = importlib.util.spec_from_file_location("loss_agreement", ROOT / "benchmarks" / "loss_agreement.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_run(folder: Path, steps, losses):
    folder.mkdir(parents=True)
    with open(folder / "log.jsonl", "w") as f:
        f.writelines(json.dumps({"step": int(s), "loss": float(v), "lr": 1e-4}) + "\n" for s, v in zip(steps, losses))


def test_pair_stats_and_window_means_match_numpy(la, tmp_path):
    rng = np.random.default_rng(7)
    steps = np.arange(1, 201)
    base = 8 - 4 * (1 - np.exp(-steps / 60))
    runs = {n: base + rng.normal(0, 0.02, steps.size) * (steps > 20) for n in ("n1", "n1-accum2", "n2")}
    for n, v in runs.items():
        _write_run(tmp_path / n, steps, v)
    out = tmp_path / "r.json"
    assert la.main([str(tmp_path), "--one-gpu", "n1,n1-accum2", "--two-gpu", "n2", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    d = runs["n2"] - runs["n1"]
    p = r["pairs"]["n2 - n1"]
    late = (steps > 40) & (steps <= 200)
    assert p["mean_diff_steps_41_200"] == pytest.approx(d[late].mean(), rel=1e-9)
    assert p["mean_abs_diff_steps_41_200"] == pytest.approx(np.abs(d[late]).mean(), rel=1e-9)
    assert p["max_abs_diff_steps_le_20"] == pytest.approx(np.abs(d[steps <= 20]).max(), abs=1e-12)
    for n, v in runs.items():
        assert r["mean_loss_steps_101_200"][n] == pytest.approx(v[(steps >= 101)].mean(), rel=1e-12)
    lo, hi = sorted(r["mean_loss_steps_101_200"][n] for n in ("n1", "n1-accum2"))
    m2 = r["mean_loss_steps_101_200"]["n2"]
    assert r["verdict"]["within"]["n2"] == (2 * lo - hi <= m2 <= 2 * hi - lo)


def test_verdict_flags_a_shifted_run(la):
    rng = np.random.default_rng(3)
    steps = range(1, 201)
    one = {f"a{i}": {s: 5 + rng.normal(0, 1e-3) for s in steps} for i in range(3)}
    shifted = {s: 5.5 + rng.normal(0, 1e-3) for s in steps}
    r = la.agreement({**one, "b": shifted}, list(one), ["b"])
    assert r["verdict"]["all_within"] is False
    r = la.agreement({**one, "b": one["a0"]}, list(one), ["b"])
    assert r["verdict"]["all_within"] is True
    assert r["pairs"]["b - a0"]["identical_steps"] == 200


def test_missing_logs_exit_1(la, tmp_path, capsys):
    assert la.main([str(tmp_path)]) == 1
    assert "no run of" in capsys.readouterr().err
