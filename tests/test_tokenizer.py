"""Tests for lasad_engine.tokenizer (LlamaGen-compatible VQ tokenizer). CPU only, fast."""

import collections
import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F

from lasad_engine.tokenizer import VQ_PRESETS, VQConfig, VQModel, load_tokenizer, save_tokenizer

TINY = VQ_PRESETS["vq-tiny"]


def _tiny(seed=0):
    torch.manual_seed(seed)
    return VQModel(TINY).eval()


def _randomize(model, seed=1, scale=0.02):
    """Perturb every float parameter so norms/biases are not at their trivial init values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


# ------------------------------------------------------------------ config


def test_config_defaults_and_json_round_trip():
    cfg = VQConfig()
    assert cfg == VQ_PRESETS["vq-16"]
    assert cfg.downsample_factor == 16
    assert (cfg.codebook_size, cfg.codebook_embed_dim, cfg.z_channels, cfg.base_ch) == (16384, 8, 256, 128)
    assert (cfg.num_res_blocks_enc, cfg.num_res_blocks_dec) == (2, 3)
    assert VQ_PRESETS["vq-f4-demo"].downsample_factor == 4
    for cfg in VQ_PRESETS.values():
        d = json.loads(json.dumps(cfg.to_dict()))
        assert VQConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="bogus"):
        VQConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError):
        VQConfig(encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2, 2))


# ------------------------------------------------------------------ 1. shapes


@pytest.mark.parametrize("preset,size,grid", [("vq-tiny", 32, 16), ("vq-f4-demo", 64, 16)])
def test_encode_decode_shapes(preset, size, grid):
    torch.manual_seed(0)
    model = VQModel(preset).eval()
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        codes = model.encode(x)
        assert codes.shape == (2, grid, grid) and codes.dtype == torch.int64
        assert int(codes.min()) >= 0 and int(codes.max()) < model.config.codebook_size
        img = model.decode_code(codes)
    assert img.shape == (2, 3, size, size) and img.dtype == torch.float32
    with pytest.raises(ValueError, match="multiple"):
        model.encode(torch.zeros(1, 3, size + 1, size))


# ------------------------------------------------------------------ 2. LlamaGen layout


def _llamagen_vq16_layout():
    """All state-dict names and shapes of LlamaGen's VQ-16, written out from its architecture
    (independently of lasad_engine.tokenizer)."""
    keys = {}

    def conv(name, cout, cin, k):
        keys[f"{name}.weight"] = (cout, cin, k, k)
        keys[f"{name}.bias"] = (cout,)

    def norm(name, c):
        keys[f"{name}.weight"] = (c,)
        keys[f"{name}.bias"] = (c,)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    widths = [128, 128, 256, 256, 512]
    # encoder: 2 res blocks per level, attention (2 blocks) at the last level, no downsample there
    conv("encoder.conv_in", 128, 3, 3)
    cin = 128
    for i, w in enumerate(widths):
        for j in range(2):
            res(f"encoder.conv_blocks.{i}.res.{j}", cin, w)
            cin = w
            if i == 4:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", w)
        if i != 4:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", w, w, 3)
    res("encoder.mid.0", 512, 512)
    attn("encoder.mid.1", 512)
    res("encoder.mid.2", 512, 512)
    norm("encoder.norm_out", 512)
    conv("encoder.conv_out", 256, 512, 3)
    # decoder: lowest resolution first, 3 res blocks per level, attention (3 blocks) in block 0
    conv("decoder.conv_in", 512, 256, 3)
    res("decoder.mid.0", 512, 512)
    attn("decoder.mid.1", 512)
    res("decoder.mid.2", 512, 512)
    cin = 512
    for i, w in enumerate(reversed(widths)):
        for j in range(3):
            res(f"decoder.conv_blocks.{i}.res.{j}", cin, w)
            cin = w
            if i == 0:
                attn(f"decoder.conv_blocks.{i}.attn.{j}", w)
        if i != 4:
            conv(f"decoder.conv_blocks.{i}.upsample.conv", w, w, 3)
    norm("decoder.norm_out", 128)
    conv("decoder.conv_out", 3, 128, 3)
    keys["quantize.embedding.weight"] = (16384, 8)
    keys["quantize.codebook_used"] = (65536,)
    conv("quant_conv", 8, 256, 1)
    conv("post_quant_conv", 256, 8, 1)
    return keys


# Hand-checked entries (names and shapes as in LlamaGen's vq_ds16_c2i.pt).
_SPOT_CHECKS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.conv_blocks.0.res.0.conv1.weight": (128, 128, 3, 3),
    "encoder.conv_blocks.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.conv_blocks.4.attn.0.q.weight": (512, 512, 1, 1),
    "encoder.conv_blocks.4.attn.1.proj_out.bias": (512,),
    "encoder.mid.1.k.weight": (512, 512, 1, 1),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (256, 512, 3, 3),
    "decoder.conv_in.weight": (512, 256, 3, 3),
    "decoder.conv_blocks.0.attn.2.proj_out.weight": (512, 512, 1, 1),
    "decoder.conv_blocks.0.res.2.conv2.weight": (512, 512, 3, 3),
    "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.conv_blocks.3.upsample.conv.weight": (128, 128, 3, 3),
    "decoder.conv_out.weight": (3, 128, 3, 3),
    "quantize.embedding.weight": (16384, 8),
    "quantize.codebook_used": (65536,),
    "quant_conv.weight": (8, 256, 1, 1),
    "post_quant_conv.weight": (256, 8, 1, 1),
}
# Counted from LlamaGen's vq_model.py: encoder 144 + decoder 194 + quantizer 2 + quant convs 4.
_LLAMAGEN_VQ16_NUM_KEYS = 344


def test_vq16_state_dict_matches_llamagen_layout_and_loads(tmp_path):
    torch.manual_seed(0)
    model = _randomize(VQModel("vq-16")).eval()
    sd = model.state_dict()

    layout = _llamagen_vq16_layout()
    assert len(layout) == _LLAMAGEN_VQ16_NUM_KEYS
    for name, shape in _SPOT_CHECKS.items():
        assert layout[name] == shape, name
    assert {k: tuple(v.shape) for k, v in sd.items()} == layout
    assert sum(v.numel() for k, v in sd.items() if k != "quantize.codebook_used") == 71_883_403
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in sd
    assert "encoder.conv_blocks.4.downsample.conv.weight" not in sd

    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": sd}, path)
    del sd
    loaded = load_tokenizer(path)
    assert not loaded.training and loaded.config == VQConfig()

    codes = torch.randint(0, 16384, (1, 2, 2), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model.decode_code(codes)
        # LlamaGen call style: flat codes + (b, c, h, w) shape.
        got = loaded.decode_code(codes.view(1, -1), shape=(1, 8, 2, 2))
    assert want.shape == (1, 3, 32, 32)
    assert torch.equal(want, got)


def test_checkpoint_variants_prefixes_and_ema(tmp_path):
    model = _randomize(_tiny())
    sd = model.state_dict()
    codes = torch.randint(0, TINY.codebook_size, (1, 4, 4))
    with torch.no_grad():
        want = model.decode_code(codes)
    variants = {
        "ema.pt": {"ema": {f"module.{k}": v for k, v in sd.items()}, "steps": 10},
        "sd.pt": {"state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}},
        "cfg.pt": {"model": sd, "config": TINY.to_dict()},
    }
    with torch.no_grad():  # LlamaGen call styles: flat codes + shape, channel-first or last
        assert torch.equal(model.decode_code(codes.view(-1), shape=(1, 8, 4, 4)), want)
        assert torch.equal(model.decode_code(codes.view(1, -1), shape=(1, 4, 4, 8), channel_first=False), want)
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        cfg = None if name == "cfg.pt" else TINY
        loaded = load_tokenizer(tmp_path / name, config=cfg)
        with torch.no_grad():
            assert torch.equal(loaded.decode_code(codes), want), name


# ------------------------------------------------------------------ 3. quantizer vs reference


def test_quantizer_picks_max_cosine_similarity():
    torch.manual_seed(0)
    model = VQModel(TINY).eval()
    q = model.quantize
    with torch.no_grad():
        q.embedding.weight.copy_(torch.randn_like(q.embedding.weight) * 3)  # un-normalised rows
    z = torch.randn(3, 8, 5, 7)
    with torch.no_grad():
        z_q, _, idx = q(z)

    # naive float64 reference
    zf = z.permute(0, 2, 3, 1).reshape(-1, 8).double()
    e = q.embedding.weight.detach().double()
    sims = torch.empty(zf.shape[0], e.shape[0], dtype=torch.float64)
    for i in range(zf.shape[0]):
        for j in range(e.shape[0]):
            sims[i, j] = (zf[i] @ e[j]) / (zf[i].norm() * e[j].norm())
    best = sims.argmax(dim=1)
    top2 = sims.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5
    assert clear.sum() > 0.9 * len(clear)
    assert torch.equal(idx[clear], best[clear])
    # where the float64 winner is a near-tie, the pick is still (numerically) a maximiser
    assert torch.all(sims.gather(1, idx[:, None]).squeeze(1) >= top2[:, 0] - 1e-5)

    # quantised vectors are the normalised codebook rows, channel-first
    expected = (e / e.norm(dim=1, keepdim=True))[idx].view(3, 5, 7, 8).permute(0, 3, 1, 2)
    assert torch.allclose(z_q.double(), expected, atol=1e-6)
    entry = q.get_codebook_entry(idx, shape=(3, 8, 5, 7))
    assert torch.allclose(entry.double(), expected, atol=1e-6)
    assert q.get_codebook_entry(idx[:4]).shape == (4, 8)


# ------------------------------------------------------------------ 4. codes path == forward path


def test_decode_of_codes_matches_forward_and_straight_through_grad():
    model = _randomize(_tiny())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        recon, _ = model(x)
        via_codes = model.decode_code(model.encode(x))
    assert torch.allclose(recon, via_codes, atol=1e-5, rtol=0)

    model.train()
    recon, losses = model(x)
    assert set(losses._fields) == {"vq_loss", "commit_loss", "entropy_loss", "codebook_usage"}
    assert torch.isfinite(losses.vq_loss) and torch.isfinite(losses.commit_loss)
    assert 0.0 < losses.codebook_usage <= 1.0
    F.mse_loss(recon, x).backward()  # reconstruction only: encoder grads come via straight-through
    g = model.encoder.conv_in.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert model.quant_conv.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None  # codebook is moved only by vq_loss

    model.zero_grad(set_to_none=True)
    recon, losses = model(x)
    losses.vq_loss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.encoder.conv_in.weight.grad is None
    # in training mode every lookup is appended to the 65536-entry usage window
    used = model.quantize.codebook_used
    latest = model.encode(x).flatten().float()
    assert used.shape == (65536,) and torch.equal(used[-latest.numel():], latest)


def test_entropy_loss_term_and_llamagen_namespace_checkpoint(tmp_path):
    import argparse

    cfg = dataclasses.replace(TINY, entropy_loss_ratio=0.1)
    torch.manual_seed(0)
    model = VQModel(cfg).train()
    _, losses = model(torch.rand(2, 3, 8, 8) * 2 - 1)
    assert torch.isfinite(losses.entropy_loss) and losses.entropy_loss.requires_grad
    losses.entropy_loss.backward()
    assert model.encoder.conv_in.weight.grad is not None

    # LlamaGen's training script also pickles its argparse Namespace next to the weights
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(vq_model="VQ-16"), "steps": 5},
               tmp_path / "train_ckpt.pt")
    assert load_tokenizer(tmp_path / "train_ckpt.pt", config=cfg).config == cfg


# ------------------------------------------------------------------ 5. strictness and file formats


def test_strict_missing_and_unexpected_keys(tmp_path):
    sd = _tiny().state_dict()
    missing = dict(sd)
    del missing["decoder.conv_out.bias"]
    torch.save({"model": missing}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"1 missing: decoder\.conv_out\.bias") as exc:
        load_tokenizer(tmp_path / "missing.pt", config=TINY)
    assert "\n" not in str(exc.value)

    extra = dict(sd)
    extra["encoder.extra_head.weight"] = torch.zeros(3)
    torch.save({"model": extra}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"1 unexpected: encoder\.extra_head\.weight") as exc:
        load_tokenizer(tmp_path / "extra.pt", config=TINY)
    assert "\n" not in str(exc.value)

    # a tiny checkpoint read with the default (vq-16) config fails loudly, not silently
    torch.save({"model": sd}, tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match="does not match"):
        load_tokenizer(tmp_path / "tiny.pt")


class _Opaque:
    pass


def test_corrupt_file_is_one_line_value_error(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not a readable tokenizer checkpoint") as exc:
        load_tokenizer(bad)
    assert "\n" not in str(exc.value) and str(bad) in str(exc.value)
    assert exc.value.__suppress_context__

    bad_st = tmp_path / "garbage.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match="not a readable tokenizer checkpoint") as exc:
        load_tokenizer(bad_st)
    assert "\n" not in str(exc.value)

    torch.save({"model": {}, "x": collections.OrderedDict, "y": _Opaque()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="not a readable tokenizer checkpoint") as exc:
        load_tokenizer(tmp_path / "pickled.pt")
    assert "\n" not in str(exc.value) and "_Opaque" in str(exc.value)

    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a readable tokenizer checkpoint"):
        load_tokenizer(tmp_path / "list.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_round_trip(tmp_path, suffix):
    cfg = dataclasses.replace(TINY, commit_loss_beta=0.5)
    torch.manual_seed(0)
    model = _randomize(VQModel(cfg)).eval()
    path = tmp_path / f"tok{suffix}"
    save_tokenizer(path, model)
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temp file left behind
    if suffix == ".pt":
        raw = torch.load(path, map_location="cpu", weights_only=True)
        assert raw["format"] == "lasad-vq" and raw["format_version"] == 1
    loaded = load_tokenizer(path)
    assert loaded.config == cfg
    codes = torch.randint(0, cfg.codebook_size, (2, 4, 4))
    with torch.no_grad():
        assert torch.equal(loaded.decode_code(codes), model.decode_code(codes))
    # overwriting an existing file works too
    save_tokenizer(path, loaded)
    assert load_tokenizer(path).config == cfg


# ------------------------------------------------------------------ 6. training lowers the loss


def test_few_training_steps_lower_loss():
    torch.manual_seed(0)
    model = VQModel(TINY).train()
    # structured images: smooth colour gradients plus a bright square
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    imgs = []
    for b in range(4):
        img = torch.stack([xx * (b + 1) / 4, yy * (1 - b / 4), (xx * yy)])
        img[:, 4 + b:8 + b, 4:8] = 0.9
        imgs.append(img)
    x = torch.stack(imgs).clamp(-1, 1)

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(20):
        recon, losses = model(x)
        loss = F.mse_loss(recon, x) + losses.vq_loss + losses.commit_loss + losses.entropy_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert all(map(lambda v: v == v, history))
    assert history[-1] < 0.5 * history[0], history
