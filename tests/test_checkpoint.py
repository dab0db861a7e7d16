"""The checkpoint formats: round trips, strictness, wrapper prefixes, damaged and foreign files."""

import json
import os

import pytest
import torch
from conftest import randomize_

from lasad_engine import CheckpointError, LasadConfig, LasadGen, load_checkpoint, save_checkpoint
from lasad_engine.checkpoint import clean_state_dict, read_checkpoint


@pytest.fixture
def model():
    cfg = LasadConfig.from_preset("lasad-tiny", row_start="reset", output_norm="group")
    return randomize_(LasadGen(cfg), seed=3).eval()


def logits_of(m):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, m.config.vocab_size, (2, 9), generator=gen)
    with torch.no_grad():
        return m(tokens, torch.tensor([1, 4]))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip(tmp_path, model, suffix):
    path = save_checkpoint(tmp_path / f"ckpt{suffix}", model, meta={"tokenizer": "vq.pt", "step": 7})
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    assert loaded.checkpoint_meta == {"tokenizer": "vq.pt", "step": 7}
    assert len(loaded.checkpoint_id) == 16
    for (k1, v1), (k2, v2) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items())):
        assert k1 == k2 and torch.equal(v1, v2)
    assert torch.equal(logits_of(loaded), logits_of(model))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_pt_is_readable_with_weights_only(tmp_path, model):
    path = save_checkpoint(tmp_path / "ckpt.pt", model, extra={"step": 100, "optimizer": {"lr": 1e-4}})
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == "lasad" and obj["format_version"] == 1 and obj["step"] == 100
    assert LasadConfig.from_dict(obj["config"]) == model.config
    json.dumps(obj["config"])


def test_wrapper_prefixes_are_handled(tmp_path, model):
    wrapped = {f"_orig_mod.module.{k}": v for k, v in model.state_dict().items()}
    assert clean_state_dict(wrapped).keys() == model.state_dict().keys()
    compiled = torch.nn.Module()
    compiled._orig_mod = model  # what torch.compile's wrapper looks like
    path = save_checkpoint(tmp_path / "c.pt", compiled)
    assert torch.equal(logits_of(load_checkpoint(path)), logits_of(model))
    # a checkpoint written by hand with prefixed keys loads too
    obj = torch.load(path, weights_only=True)
    obj["model"] = {f"_orig_mod.{k}": v for k, v in obj["model"].items()}
    torch.save(obj, tmp_path / "p.pt")
    assert torch.equal(logits_of(load_checkpoint(tmp_path / "p.pt")), logits_of(model))


def test_strict_keys_are_named(tmp_path, model):
    path = save_checkpoint(tmp_path / "ckpt.pt", model)
    obj = torch.load(path, weights_only=True)
    del obj["model"]["norm.weight"]
    obj["model"]["layers.0.attention.wqkv.weight"] = torch.zeros(3)
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "bad.pt")
    msg = str(e.value)
    assert "1 missing: norm.weight" in msg and "1 unexpected: layers.0.attention.wqkv.weight" in msg
    assert "\n" not in msg
    # a shape that does not match the config
    obj = torch.load(path, weights_only=True)
    obj["config"]["vocab_size"] += 1
    torch.save(obj, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"tok_embeddings.weight is \(97, 64\), the config needs .* shape \(98, 64\)"):
        load_checkpoint(tmp_path / "shape.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", os.urandom(4096)])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_files_give_one_line(tmp_path, content, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_truncated_checkpoint(tmp_path, model):
    path = save_checkpoint(tmp_path / "ckpt.pt", model)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_foreign_and_future_files(tmp_path, model):
    torch.save({"model": model.state_dict()}, tmp_path / "llamagen_style.pt")  # no lasad config
    with pytest.raises(CheckpointError, match="not a lasad checkpoint"):
        load_checkpoint(tmp_path / "llamagen_style.pt")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a lasad checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")
    path = save_checkpoint(tmp_path / "ckpt.pt", model)
    obj = torch.load(path, weights_only=True)
    obj["format_version"] = 99
    torch.save(obj, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_failed_save_keeps_the_old_file(tmp_path, model):
    path = save_checkpoint(tmp_path / "ckpt.pt", model)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_checkpoint(path, model, meta={"bad": object()})  # not JSON-compatible
    with pytest.raises(TypeError):
        save_checkpoint(path, torch.nn.Linear(2, 2))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_read_checkpoint_without_building(tmp_path, model):
    cfg, state, meta = read_checkpoint(save_checkpoint(tmp_path / "m.safetensors", model, meta={"a": 1}))
    assert cfg == model.config and meta == {"a": 1} and state.keys() == model.state_dict().keys()
