"""`lasad-run --class 207` reads straight through (docs/design.md): each value is validated once,
the checkpoint read and hashed once, and the model and tokenizer built on their device without
a second move."""

import torch
from click.testing import CliRunner

import lasad_engine.checkpoint as checkpoint_mod
import lasad_engine.engine as engine_mod
import lasad_engine.params as params_mod
import lasad_engine.pipeline as pipeline_mod
from lasad_engine.cli import run_main
from lasad_engine.model import LasadGen
from lasad_engine.tokenizer import VQModel


def test_lasad_run_validates_hashes_and_moves_each_thing_once(tmp_path, monkeypatch):
    calls = {}

    def bump(key):
        calls[key] = calls.get(key, 0) + 1

    def count(modules, name, key=None, when=lambda *a, **k: True):
        original = getattr(modules[0], name)

        def wrapper(*args, **kwargs):
            if when(*args, **kwargs):
                bump(key or name)
            return original(*args, **kwargs)
        for m in modules:
            if name in vars(m):
                monkeypatch.setattr(m, name, wrapper)

    count([checkpoint_mod], "file_fingerprint")
    count([checkpoint_mod], "read_checkpoint")
    count([pipeline_mod], "load_checkpoint")
    # a grid that is not yet a Grid is parsed (validated); a Grid passes through
    count([params_mod, pipeline_mod, engine_mod], "parse_grid", "grid parsed",
          when=lambda grid, default: not isinstance(grid, params_mod.Grid))
    of = params_mod.ClassLabels.of
    monkeypatch.setattr(params_mod.ClassLabels, "of", lambda labels, *a, **k: (
        isinstance(labels, params_mod.ClassLabels) or bump("labels validated"), of(labels, *a, **k))[1])
    post_init = params_mod.SamplingParams.__post_init__
    monkeypatch.setattr(params_mod.SamplingParams, "__post_init__", lambda self: (bump("sampling validated"),
                                                                                   post_init(self))[1])
    moved = []
    original_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        if isinstance(self, (LasadGen, VQModel)):
            moved.append(type(self).__name__)
        return original_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(run_main, ["--class", "207", "-n", "1", "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lasad_207_seed0.png").is_file()
    assert calls == {"file_fingerprint": 1, "read_checkpoint": 1, "load_checkpoint": 1, "grid parsed": 1,
                     "labels validated": 1, "sampling validated": 1}, calls
    assert moved == [], f"moved after loading: {moved}"
