"""The Hugging Face-style model folder (save_pretrained / from_pretrained / lasad-run --checkpoint DIR),
the checkpoint resolver ("default", folders, files), `.to(device, dtype)`, the progress switch, and
the note for a grid the model was not trained at."""

import io
import json
import os

import pytest
import torch
from click.testing import CliRunner
from conftest import randomize_
from safetensors import safe_open

from lasad_engine import CheckpointError, LasadConfig, LasadGen, LasadPipeline, save_checkpoint
from lasad_engine.checkpoint import DEFAULT_CARD, DEFAULT_CHECKPOINT, resolve_checkpoint
from lasad_engine.cli import run_main
from lasad_engine.params import EngineError
from lasad_engine.pretrained import PretrainedError
from lasad_engine.tokenizer import VQ_PRESETS, VQModel, save_tokenizer

NAMES = [f"class {i}" for i in range(9)] + ["golden retriever"]


@pytest.fixture
def checkpoint(tmp_path):
    cfg = LasadConfig.from_preset("lasad-tiny", vocab_size=64, grid_height=4, grid_width=4, class_names=NAMES)
    vq = VQModel(VQ_PRESETS["vq-tiny"])
    randomize_(vq, 3, std=0.1)
    save_checkpoint(tmp_path / "m.pt", randomize_(LasadGen(cfg), 2), meta={
        "tokenizer": "vq.pt", "step": 17, "card": {"license": "apache-2.0", "metrics": [
            {"name": "held-out loss", "value": "3.21 nats/token", "how": "a made-up test value"}]}})
    save_tokenizer(tmp_path / "vq.pt", vq)
    return tmp_path / "m.pt"


def draw(pipe, labels=(9, 3, 3), seed=0, **kw):
    return pipe(list(labels), generator=torch.Generator().manual_seed(seed), output_type="np", **kw)


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_round_trip_tiny(checkpoint, tmp_path):
    folder = tmp_path / "hub" / "my-model"
    with LasadPipeline.from_checkpoint(checkpoint, device="cpu") as pipe:
        before = draw(pipe)
        assert pipe.save_pretrained(folder) == folder
        state = {k: v.clone() for k, v in pipe.model.state_dict().items()}
        vq_state = {k: v.clone() for k, v in pipe.tokenizer.state_dict().items()}
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors", "vq.safetensors"]
    assert sorted(os.listdir(folder.parent)) == ["my-model"]  # no temporary folder left beside it
    config = json.loads((folder / "config.json").read_text())
    assert config.pop("model_type") == "lasad" and config.pop("format_version") == 1 and config.pop("lasad_version")
    assert config == LasadConfig.from_dict(config).to_dict() and config["class_names"] == NAMES
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        assert all(torch.equal(f.get_tensor(k), v) for k, v in state.items()) and set(f.keys()) == set(state)
    assert meta["tokenizer"] == "vq.safetensors" and meta["step"] == 17
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n") and "| held-out loss | 3.21 nats/token |" in card
    assert "Trained at 4x4 tokens" in card and "Steps: 17." in card
    with LasadPipeline.from_pretrained(folder, device="cpu") as pipe:
        after = draw(pipe)
        assert all(torch.equal(v, vq_state[k]) for k, v in pipe.tokenizer.state_dict().items())
        pipe.save_pretrained(tmp_path / "again")  # the card's facts travel with the weights
    again = (tmp_path / "again" / "README.md").read_text()
    assert again == card.replace(str(folder), str(tmp_path / "again")).replace("# my-model", "# again")
    assert torch.equal(before.tokens, after.tokens)
    assert (before.images == after.images).all()


@pytest.mark.slow
def test_round_trip_bundled_model(tmp_path):
    """The bundled model through its folder: the same tokens for the same seed, and its card."""
    with LasadPipeline.from_pretrained("default", device="cpu") as pipe:
        before = pipe(["handshake"], generator=torch.Generator().manual_seed(0), output_type="tokens")
        pipe.save_pretrained(tmp_path / "demo")
    card = (tmp_path / "demo" / "README.md").read_text()
    # the card's facts come from the bundled card file, whatever the current measurements say
    fids = [m for m in json.loads(DEFAULT_CARD.read_text())["metrics"] if m["name"].startswith("FID / KID vs held-out")]
    assert fids
    for fact in ("license: mit", "Emoji-5", "CC-BY-SA-4.0", *(f"| {m['name']} | {m['value']} |" for m in fids),
                 "29.56 dB", "Trained at 16x16 and 24x24 tokens"):
        assert fact in card, fact
    with LasadPipeline.from_pretrained(tmp_path / "demo", device="cpu") as pipe:
        after = pipe([207], generator=torch.Generator().manual_seed(0), output_type="tokens")
        assert pipe.checkpoint_path == tmp_path / "demo" / "model.safetensors"
    assert torch.equal(before.tokens, after.tokens)


def test_resolver_names_and_folders(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint(None) == DEFAULT_CHECKPOINT == resolve_checkpoint("default")
    assert resolve_checkpoint(checkpoint) == checkpoint
    with LasadPipeline.from_checkpoint(checkpoint) as pipe:
        pipe.save_pretrained("default")  # a local folder of that name wins, as in Hugging Face
    assert resolve_checkpoint("default").resolve() == tmp_path / "default" / "model.safetensors"
    assert resolve_checkpoint(tmp_path / "default") == tmp_path / "default" / "model.safetensors"
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("no-such-model")
    assert "no-such-model: no such checkpoint file or folder; give 'default' (the bundled model)" in one_line(e)


def test_training_run_folder_without_config_json(checkpoint, tmp_path):
    """A folder with model.safetensors only (what lasad-train writes beside last.pt) loads too."""
    run = tmp_path / "run"
    run.mkdir()
    with LasadPipeline.from_checkpoint(checkpoint) as pipe:
        model = pipe.model
    save_checkpoint(run / "model.safetensors", model, meta={"tokenizer": "../vq.pt"})
    with LasadPipeline.from_pretrained(run) as pipe:
        assert pipe.model.config == model.config


@pytest.mark.parametrize("damage,message", [
    ("no-weights", "a folder without model.safetensors (it holds README.md, config.json, vq.safetensors)"),
    ("empty", "a folder without model.safetensors (it is empty)"),
    ("config-disagrees", "config.json and model.safetensors disagree on dim (96 vs 64)"),
    ("config-garbage", "config.json: not a lasad config"),
    ("config-foreign", "model_type 'llama', not 'lasad'"),
    ("config-unknown-field", "unknown LasadConfig fields: hidden_size"),
    ("weights-garbage", "model.safetensors: not a readable safetensors file"),
])
def test_bad_folders_are_one_line(checkpoint, tmp_path, damage, message):
    folder = tmp_path / "f"
    with LasadPipeline.from_checkpoint(checkpoint) as pipe:
        pipe.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    if damage == "no-weights":
        (folder / "model.safetensors").unlink()
    elif damage == "empty":
        for p in folder.iterdir():
            p.unlink()
    elif damage == "config-disagrees":
        (folder / "config.json").write_text(json.dumps({**config, "dim": 96}))
    elif damage == "config-garbage":
        (folder / "config.json").write_text("{not json")
    elif damage == "config-foreign":
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    elif damage == "config-unknown-field":
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 4}))
    elif damage == "weights-garbage":
        (folder / "model.safetensors").write_bytes(b"\x00garbage" * 32)
    with pytest.raises(CheckpointError) as e:
        LasadPipeline.from_pretrained(folder)
    assert message in one_line(e)
    r = CliRunner().invoke(run_main, ["--checkpoint", str(folder), "-c", "1", "--no-progress",
                                      "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.output
    assert not (tmp_path / "x.png").exists()


def test_save_refuses_to_overwrite_and_writes_whole_folders(checkpoint, tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("user's file")
    (tmp_path / "a-file").write_text("x")
    with LasadPipeline.from_checkpoint(checkpoint) as pipe:
        with pytest.raises(PretrainedError) as e:
            pipe.save_pretrained(folder)
        assert "folder exists and is not empty; pass overwrite=True" in one_line(e)
        with pytest.raises(PretrainedError, match="exists and is not a folder"):
            pipe.save_pretrained(tmp_path / "a-file")
        with pytest.raises(EngineError, match="card: unknown entries licence; use name, license"):
            pipe.save_pretrained(tmp_path / "c", card={"licence": "mit"})
        (tmp_path / "empty").mkdir()
        pipe.save_pretrained(tmp_path / "empty")  # an empty folder is filled
        assert (tmp_path / "empty" / "model.safetensors").is_file()
        import lasad_engine.tokenizer as tok_mod

        def broken(path, model):
            with open(path, "wb") as f:
                f.write(b"half")
            raise OSError("disk full")
        monkeypatch.setattr(tok_mod, "save_tokenizer", broken)
        with pytest.raises(OSError, match="disk full"):
            pipe.save_pretrained(folder, overwrite=True)
        assert sorted(os.listdir(folder)) == ["keep.txt"]  # the old folder as it was
        with pytest.raises(OSError, match="disk full"):
            pipe.save_pretrained(tmp_path / "new")
        monkeypatch.undo()
        pipe.save_pretrained(folder, overwrite=True)
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors", "vq.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["a-file", "empty", "m.pt", "out", "vq.pt"]  # no temporaries


def test_to_dtype_equals_loading_in_that_dtype(checkpoint):
    with LasadPipeline.from_checkpoint(checkpoint, precision="bf16") as ref:
        want = draw(ref)
        want_state = ref.model.state_dict()
    with LasadPipeline.from_checkpoint(checkpoint) as pipe:
        fp32 = draw(pipe)
        engine = pipe.engine
        assert pipe.to(torch.bfloat16) is pipe and pipe.engine is not engine and engine.buffers is None
        assert all(torch.equal(v, want_state[k]) for k, v in pipe.model.state_dict().items())
        assert next(pipe.tokenizer.parameters()).dtype == torch.float32
        got = draw(pipe)
        pipe.to("cpu", "fp32")
        assert torch.equal(draw(pipe).tokens, fp32.tokens)
        with pytest.raises(EngineError, match="precision='fp8' is not one of fp32, bf16, fp16"):
            pipe.to(dtype="fp8")
        if not torch.cuda.is_available():
            with pytest.raises(EngineError, match="CUDA is not available"):
                pipe.to("cuda")
            assert torch.equal(draw(pipe).tokens, fp32.tokens)  # a failed move leaves it working
    assert torch.equal(got.tokens, want.tokens)


@pytest.mark.gpu
def test_to_cuda_equals_loading_on_cuda(checkpoint):
    with LasadPipeline.from_checkpoint(checkpoint, device="cuda", precision="fp32") as ref:
        want = ref([9, 3], generator=torch.Generator("cuda").manual_seed(0), output_type="tokens")
    with LasadPipeline.from_checkpoint(checkpoint, device="cpu") as pipe:
        pipe.to("cuda")
        assert pipe.backend == "cuda" and next(pipe.tokenizer.parameters()).is_cuda
        got = pipe([9, 3], generator=torch.Generator("cuda").manual_seed(0), output_type="tokens")
        pipe.to("cpu")
        assert pipe.backend == "torch"
    assert torch.equal(got.tokens, want.tokens)


def test_progress_bar_switch(checkpoint, capsys):
    with LasadPipeline.from_checkpoint(checkpoint) as pipe:
        draw(pipe, labels=(1,))
        assert capsys.readouterr().err == ""  # off by default in the API
        buf = io.StringIO()
        pipe.set_progress_bar_config(file=buf, desc="emoji", leave=True)  # leave: the bar's last state stays
        draw(pipe, labels=(1, 2))
        assert "emoji" in buf.getvalue() and "32/32" in buf.getvalue()  # 2 images of 4x4 tokens
        n = len(buf.getvalue())
        draw(pipe, labels=(1,), progress=False)
        assert len(buf.getvalue()) == n
        pipe.set_progress_bar_config(disable=True)
        draw(pipe, labels=(1,))
        assert capsys.readouterr().err == ""
        draw(pipe, labels=(1,), progress=True)
        assert "/16 [" in capsys.readouterr().err


def test_lasad_run_reads_folders_and_notes_untrained_grids(checkpoint, tmp_path):
    with LasadPipeline.from_checkpoint(checkpoint) as pipe:
        pipe.save_pretrained(tmp_path / "folder")
        want = draw(pipe, labels=(9,), grid=(3, 5))
    args = ["--checkpoint", str(tmp_path / "folder"), "-c", "golden retriever", "-n", "1", "--no-progress",
            "--json", "--seed", "0"]
    r = CliRunner().invoke(run_main, args + ["-o", str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    assert "note: this model was trained" not in r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["checkpoint"] == str(tmp_path / "folder" / "model.safetensors")
    r = CliRunner().invoke(run_main, args + ["--grid", "3x5", "-o", str(tmp_path / "b.png")])
    assert r.exit_code == 0, r.output
    assert ("note: this model was trained at 4x4 tokens; 3x5 runs (constant memory) but was never trained"
            in r.stderr)
    from PIL import Image
    import numpy as np
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png"))[2:-2, 2:-2], want.images[0])


def test_export_and_check_default_to_the_bundled_model(tmp_path):
    from lasad_tools.check import main as check_main
    from lasad_tools.export import main as export_main
    pytest.importorskip("onnxruntime")
    out = tmp_path / "step.onnx"
    r = CliRunner().invoke(export_main, [str(out), "--portable", "--no-sampler"])
    assert r.exit_code == 0, r.output
    import onnx
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    from lasad_engine.checkpoint import file_fingerprint
    assert json.loads(props["lasad.meta"])["checkpoint_sha256"] == file_fingerprint(DEFAULT_CHECKPOINT)
    r = CliRunner().invoke(check_main, [str(out), "--steps", "3"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.splitlines()[-1])["pass"] is True
    r = CliRunner().invoke(export_main, [])
    assert r.exit_code == 2 and "give OUT, or CHECKPOINT and OUT (0 paths given)" in r.stderr
    r = CliRunner().invoke(export_main, ["nope", str(tmp_path / "x.onnx")])
    assert r.exit_code == 1 and "nope: no such checkpoint file or folder" in r.stderr


def test_a_model_recommends_its_sampling_settings(tmp_path):
    """meta["sampling"] (a generation config) fills what a call leaves out: tokens equal those of
    the same settings passed explicitly, a given keyword wins, lasad-run records what it used,
    save_pretrained keeps it, and a damaged one is one line."""
    import random
    rng = random.Random(7)
    recommended = {"cfg_scale": rng.choice([1.5, 2.0, 3.0]), "top_k": rng.choice([5, 20]),
                   "temperature": rng.choice([0.7, 0.9])}
    cfg = LasadConfig.from_preset("lasad-tiny", vocab_size=64, grid_height=4, grid_width=4, class_names=NAMES)
    vq = VQModel(VQ_PRESETS["vq-tiny"])
    save_tokenizer(tmp_path / "vq.pt", randomize_(vq, 3, std=0.1))
    ckpt = save_checkpoint(tmp_path / "m.pt", randomize_(LasadGen(cfg), 2),
                           meta={"tokenizer": "vq.pt", "sampling": recommended})
    with LasadPipeline.from_checkpoint(ckpt, device="cpu", max_batch=4) as pipe:
        assert pipe.sampling_defaults.cfg_scale == recommended["cfg_scale"]
        assert pipe.sampling_defaults.top_p == 1.0  # not recommended: the class default
        implicit = pipe([1, 2, 3], generator=torch.Generator().manual_seed(0), output_type="tokens").tokens
        explicit = pipe([1, 2, 3], generator=torch.Generator().manual_seed(0), output_type="tokens",
                        **recommended).tokens
        plain = pipe([1, 2, 3], generator=torch.Generator().manual_seed(0), output_type="tokens",
                     cfg_scale=4.0, top_k=2000, temperature=1.0).tokens
        assert torch.equal(implicit, explicit) and not torch.equal(implicit, plain)
        saved = pipe.save_pretrained(tmp_path / "folder")
    with LasadPipeline.from_pretrained(saved, device="cpu", max_batch=4) as pipe:
        assert pipe.sampling_defaults.top_k == recommended["top_k"]
    r = CliRunner().invoke(run_main, ["--checkpoint", str(ckpt), "-c", "1", "-n", "2", "--no-progress", "--top-k", "3",
                                      "-o", str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "a.json").read_text())
    assert (record["cfg_scale"], record["top_k"], record["temperature"]) == (
        recommended["cfg_scale"], 3, recommended["temperature"])
    for damaged in ({"cfg_scale": "strong"}, {"beam": 4}, [1.0], {"top_k": -1}):
        bad = save_checkpoint(tmp_path / "bad.pt", randomize_(LasadGen(cfg), 2), meta={"sampling": damaged})
        with pytest.raises(EngineError) as e:
            with LasadPipeline.from_checkpoint(bad, device="cpu", max_batch=2) as pipe:
                pipe([1], output_type="tokens")
        assert "bad.pt" in str(e.value) and "sampling" in str(e.value) and "\n" not in str(e.value)


def test_diffusers_keywords(checkpoint):
    """torch_dtype= (diffusers' name) loads as precision= does; pipe.dtype and pipe.device say
    where the weights are; both names at once is one line."""
    with LasadPipeline.from_pretrained(checkpoint, precision="bf16") as ref:
        want = draw(ref)
    with LasadPipeline.from_pretrained(checkpoint, torch_dtype=torch.bfloat16, device="cpu") as pipe:
        assert pipe.dtype == torch.bfloat16 and pipe.device == torch.device("cpu")
        assert torch.equal(draw(pipe).tokens, want.tokens)
        pipe.to(torch.float32)
        assert pipe.dtype == torch.float32
    with pytest.raises(EngineError) as e:
        LasadPipeline.from_pretrained(checkpoint, torch_dtype=torch.float16, precision="bf16")
    assert "torch_dtype= or precision=" in one_line(e)
