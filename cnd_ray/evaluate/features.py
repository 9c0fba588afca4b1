"""Feature extractors for FID/KID and friends: clean-fid's Inception-v3, any timm model, a trained
classifier. Each maps uint8 images (N, 3, H, W) to float features and describes its own protocol.

Weights load only from local files: nothing here ever downloads (there may be no network).
"""
from __future__ import annotations

import hashlib
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cnd_ray.errors import UserError

INCEPTION_FILE = "inception-2015-12-05.pt"
# The same string as cleanfid.downloads_helper.inception_url (a test checks it); hard-coded so that
# an error message does not need to import clean-fid.
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 "inception-2015-12-05.pt")


@dataclass
class Extractor:
    """A named feature function with the provenance of its weights."""

    name: str  # used in metric names: "inception" is clean-fid's Inception-v3
    dim: int
    weights: str  # a file path, "random-init" or "trained:<name>"
    sha256: str  # first 16 hex chars of the weights file's sha256; "" when not from a file
    fn: Callable[[torch.Tensor], torch.Tensor]  # uint8 (N, 3, H, W) -> float (N, dim)
    preprocess: str = ""  # what happens to the pixels before the network, for the protocol

    def features(self, images: torch.Tensor, batch: int = 64, progress=None) -> np.ndarray:
        """float64 (N, dim) features of uint8 (N, 3, H, W) images, in batches, without grad."""
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3, images.shape
        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch):
                out.append(self.fn(images[i:i + batch]).double().cpu().numpy())  # (B, dim)
                if progress is not None:
                    progress(min(i + batch, len(images)))
        return np.concatenate(out) if out else np.zeros((0, self.dim))

    @property
    def is_inception(self) -> bool:
        """True for clean-fid's Inception-v3, the feature space FID numbers are comparable in."""
        return self.name == "inception"

    def protocol(self) -> dict:
        """What a number computed in this feature space must carry (GUARANTEES.md 14)."""
        return {"extractor": self.name, "dim": self.dim, "weights": self.weights,
                "sha256": self.sha256, "preprocess": self.preprocess}


def sha256(path: str | Path) -> str:
    """First 16 hex chars of a file's sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [-1, 1], the convention of the project's pixel space."""
    return images.float() / 127.5 - 1.0


def inception_path(weights: str = "") -> str:
    """The Inception file: `weights` (a file, or a folder holding INCEPTION_FILE), else clean-fid's
    own cache, so a file clean-fid downloaded once is found."""
    if weights:
        return os.path.join(weights, INCEPTION_FILE) if os.path.isdir(weights) else weights
    # clean-fid 0.1.35 hard-codes these folders (cleanfid.features.feature_extractor).
    return os.path.join("./" if platform.system() == "Windows" else "/tmp", INCEPTION_FILE)


def inception(weights: str = "", device="cpu") -> Extractor:
    """clean-fid's Inception-v3 (2048-d pool features) with its "clean" preprocessing."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import make_resizer

    path = inception_path(weights)
    if not os.path.isfile(path):
        raise UserError(f"eval.inception_weights: no Inception weights at {path}; download "
                        f"{INCEPTION_URL} on a machine with internet and set "
                        "eval.inception_weights=FILE_OR_FOLDER (nothing is downloaded here)")
    device = torch.device(device)
    # InceptionV3W takes a folder and appends INCEPTION_FILE. A file under another name is linked
    # into a temporary folder under that name: torch.jit.load reads it whole, so the folder can go
    # right after, and we still use clean-fid's own class (its forward normalises (x - 128) / 128).
    if os.path.basename(path) == INCEPTION_FILE:
        model = InceptionV3W(os.path.dirname(path) or ".", download=False, resize_inside=False)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            os.symlink(os.path.abspath(path), os.path.join(tmp, INCEPTION_FILE))
            model = InceptionV3W(tmp, download=False, resize_inside=False)
    model = model.to(device).eval()
    # clean-fid's "clean" mode (cleanfid.resize.build_resizer): per image and channel, a PIL bicubic
    # resize of the float image to 299x299, clipped to [0, 255], no re-quantisation.
    resize = make_resizer("PIL", False, "bicubic", (299, 299))

    def fn(images: torch.Tensor) -> torch.Tensor:
        x = np.stack([resize(img) for img in images.permute(0, 2, 3, 1).numpy()])  # (N, 299, 299, 3)
        # As cleanfid.utils.ResizeDataset: ToTensor of a float32 HWC array = a CHW view, no scaling.
        x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)  # (N, 3, 299, 299) in [0, 255]
        return model(x)  # (N, 2048)

    return Extractor("inception", 2048, os.path.abspath(path), sha256(path), fn,
                     "clean-fid clean: PIL bicubic float resize to 299x299, [0, 255], (x - 128) / 128")


def timm_model(name: str, weights: str, device="cpu") -> Extractor:
    """Pooled features of a timm model, weights from a local file or, with weights == "random",
    a seeded random initialisation (for tests: its numbers mean nothing)."""
    import timm

    from cnd_ray.models.classifier import read_state_dict

    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(0)
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0)
        except RuntimeError as e:  # timm's "Unknown model"
            raise UserError(f"feature extractor timm-{name}: {e}") from None
    sha = ""
    if weights != "random":
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"feature extractor timm-{name}: weights file {path} does not exist "
                            "(weights load only from a local file; download them beforehand)")
        own = model.state_dict()
        sd = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
        usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
        # A half-loaded extractor would give numbers that look valid but are not: all or nothing.
        missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
        if missing:
            what = "no tensor" if not usable else f"{len(missing)} of {len(own)} tensors (first {missing[0]})"
            raise UserError(f"feature extractor timm-{name}: {what} of the model found with the "
                            f"right shape in {path}; is it the right model?")
        model.load_state_dict(usable, strict=False)
        sha = sha256(path)
    device = torch.device(device)
    model = model.to(device).eval()
    cfg = model.pretrained_cfg
    size = tuple(cfg["input_size"][1:])
    mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1)

    def fn(images: torch.Tensor) -> torch.Tensor:
        x = images.to(device).float() / 255  # (N, 3, H, W) in [0, 1]
        if tuple(x.shape[-2:]) != size:  # the size the model was trained at, whatever ours is
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return model((x - mean) / std)  # (N, D)

    dim = getattr(model, "head_hidden_size", None) or model.num_features
    return Extractor(f"timm-{name}", dim, os.path.abspath(weights) if sha else "random-init", sha, fn,
                     f"[0, 1], bilinear antialiased resize to {size[0]}x{size[1]}, "
                     f"mean {tuple(cfg['mean'])} std {tuple(cfg['std'])}")


def classifier_features(model, name: str) -> Extractor:
    """Pooled backbone features (before the head) of a trained pixel-space Classifier."""
    model.eval()
    device = next(model.parameters()).device

    def fn(images: torch.Tensor) -> torch.Tensor:
        return model.backbone(model.adapter(signed(images).to(device)))  # (N, D)

    return Extractor(name, model.backbone.num_features, f"trained:{name}", "", fn,
                     "x / 127.5 - 1 at the images' own size")
