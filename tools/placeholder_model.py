"""Write the bundled default model: an UNTRAINED placeholder with the demo model's interface.

    python -m lasad_tools.placeholder_model lasad_engine/assets

The demo-model issue replaces it with a LASADGen trained on Emoji-5 (recipe in docs/). Until
then the default checkpoint exercises the whole path (checkpoint -> engine -> VQ decoder -> PNG)
with seeded random weights (LlamaGen initialisation: the zero head gives uniform token
distributions, so the pictures are noise). Its meta says so, and lasad-run prints it.
"""

import sys
from pathlib import Path

import torch

from lasad_engine import LasadConfig, LasadGen, save_checkpoint
from lasad_engine.tokenizer import VQConfig, VQModel, save_tokenizer

PLACEHOLDER_NOTE = "untrained placeholder (random weights): pictures are noise until the demo model ships"


def main(folder: str) -> None:
    folder = Path(folder)
    torch.manual_seed(0)
    vq_cfg = VQConfig(codebook_size=1024, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2),
                      z_channels=32, base_ch=32, num_res_blocks_enc=1, num_res_blocks_dec=1)
    vq = VQModel(vq_cfg)
    cfg = LasadConfig(vocab_size=1024, num_classes=1000, n_layer=2, dim=128, n_head=2,
                      grid_height=16, grid_width=16)
    model = LasadGen(cfg)
    with torch.no_grad():  # a little structure instead of exactly uniform tokens
        model.output.weight.normal_(std=0.02)
    save_tokenizer(folder / "default-vq.safetensors", vq.half())
    save_checkpoint(folder / "default.safetensors", model.half(),
                    meta={"tokenizer": "default-vq.safetensors", "note": PLACEHOLDER_NOTE})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "lasad_engine/assets")
