"""Feature extractors (our clean-fid preprocessing equals clean-fid's own) and the fidelity classifier."""
from __future__ import annotations

import hashlib
import shutil
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cnd_ray.errors import UserError
from cnd_ray.evaluate import features, fidelity
from cnd_ray.models.classifier import Classifier
from cnd_ray.evaluate.metrics import auroc


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any download attempt (clean-fid uses urllib) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


class _Layers(nn.Module):
    """Cheap stand-in for Inception's layers: (N, 3, 299, 299) -> (N, 2048)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 2048, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(2048, 3, 1, 1, generator=g))
            self.conv.bias.copy_(torch.randn(2048, generator=g))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(x, 8)  # (N, 3, 8, 8)
        return torch.relu(self.conv(x)).mean((2, 3))  # (N, 2048)


class _Base(nn.Module):
    """The interface clean-fid's InceptionV3W uses: a `layers` submodule and forward(x, return_features)."""

    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """A folder holding a TorchScript stand-in saved as inception-2015-12-05.pt."""
    folder = tmp_path_factory.mktemp("inception")
    torch.jit.save(torch.jit.script(_Base()), str(folder / features.INCEPTION_FILE))
    return folder


def _images(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size) images with structure (a gradient plus noise)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 200, size).view(1, 1, 1, size)
    x = ramp * torch.rand(n, 3, 1, 1, generator=g) + 55 * torch.rand(n, 3, size, size, generator=g)
    return x.round().clamp(0, 255).to(torch.uint8)


def test_inception_url_is_clean_fids():
    from cleanfid import downloads_helper

    assert features.INCEPTION_URL == downloads_helper.inception_url


def test_inception_features_equal_clean_fids_folder_features(stand_in, tmp_path):
    from cleanfid import fid
    from cleanfid.inception_torchscript import InceptionV3W

    ex = features.inception(str(stand_in))
    file = stand_in / features.INCEPTION_FILE
    assert (ex.name, ex.dim, ex.is_inception) == ("inception", 2048, True)
    assert ex.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    assert ex.protocol()["sha256"] == ex.sha256 and ex.protocol()["weights"] == str(file)

    images = _images(8)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(img).save(tmp_path / f"{i:03d}.png")
    theirs = fid.get_folder_features(str(tmp_path), model=InceptionV3W(str(stand_in), download=False),
                                     mode="clean", num_workers=0, batch_size=8,
                                     device=torch.device("cpu"), verbose=False)
    seen = []
    ours = ex.features(images, batch=8, progress=seen.append)
    assert ours.dtype == np.float64 and ours.shape == (8, 2048) and seen == [8]
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    assert np.array_equal(ex.features(images, batch=8), ours)  # deterministic
    assert np.std(ours, axis=0).max() > 0  # images differ, so must their features

    # A file under another name loads the same weights.
    other = tmp_path / "my-inception.pt"
    shutil.copy(file, other)
    np.testing.assert_array_equal(features.inception(str(other)).features(images, batch=8), ours)


def test_missing_inception_file_is_one_line_naming_path_key_and_url(tmp_path):
    with pytest.raises(UserError) as e:
        features.inception(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / features.INCEPTION_FILE) in msg
    assert "eval.inception_weights" in msg and features.INCEPTION_URL in msg
    assert features.inception_path() in (f"/tmp/{features.INCEPTION_FILE}", f"./{features.INCEPTION_FILE}")


def test_timm_extractor_random_and_from_file(tmp_path):
    images = _images(4, size=16)
    ex = features.timm_model("test_resnet", "random")
    assert (ex.name, ex.dim, ex.weights, ex.sha256) == ("timm-test_resnet", 96, "random-init", "")
    f = ex.features(images)
    assert f.shape == (4, 96) and np.array_equal(features.timm_model("test_resnet", "random").features(images), f)

    # A state dict file with a classifier head (which the extractor drops): pooled features of those
    # weights on [0, 1] pixels resized to timm's 160 px and normalised with test_resnet's mean/std.
    import timm

    torch.manual_seed(1)
    full = timm.create_model("test_resnet", pretrained=False)
    file = tmp_path / "test_resnet.pth"
    torch.save(full.state_dict(), file)
    loaded = features.timm_model("test_resnet", str(file))
    assert loaded.weights == str(file) and loaded.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    full.reset_classifier(0)
    x = F.interpolate(images.float() / 255, size=(160, 160), mode="bilinear", antialias=True)
    with torch.no_grad():
        want = full.eval()((x - 0.5) / 0.5).double().numpy()  # (4, 96)
    np.testing.assert_allclose(loaded.features(images), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(want, f)

    with pytest.raises(UserError, match="does not exist"):
        features.timm_model("test_resnet", str(tmp_path / "nope.pth"))
    torch.save({"w": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="wrong.pth"):
        features.timm_model("test_resnet", str(tmp_path / "wrong.pth"))


def test_classifier_features_are_the_pooled_backbone_on_signed_pixels():
    torch.manual_seed(0)
    model = Classifier("test_resnet", 3, 64, 0.5)
    images = _images(3, size=16)
    ex = features.classifier_features(model, "fidelity-test_resnet")
    assert (ex.name, ex.dim, ex.weights, ex.is_inception) == ("fidelity-test_resnet", 96,
                                                              "trained:fidelity-test_resnet", False)
    with torch.no_grad():
        want = model.backbone(images.float() / 127.5 - 1).double().numpy()
    np.testing.assert_allclose(ex.features(images), want, rtol=1e-6, atol=1e-6)
    assert set(ex.protocol()) == {"extractor", "dim", "weights", "sha256", "preprocess"}


def _lesions(n: int, seed: int):
    """16x16 noisy images where the class shows in the centre: a bright blob for malignant (~10% of
    them), a dark one for benign. An untrained classifier scores AUROC ~0.25-0.6 on them."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.1).astype(np.int64)
    y[:2] = [0, 1]  # both classes always present
    yy, xx = np.mgrid[:16, :16]
    blob = np.exp(-((yy - 7.5) ** 2 + (xx - 7.5) ** 2) / 12)  # (16, 16)
    x = 100 + 40 * rng.standard_normal((n, 3, 16, 16)) + 30 * (2 * y[:, None, None, None] - 1) * blob
    return torch.from_numpy(np.clip(x, 0, 255).astype(np.uint8)), y


def test_fidelity_classifier_learns_saves_and_is_deterministic(tmp_path):
    images, labels = _lesions(200, seed=1)
    held, held_y = _lesions(200, seed=2)
    steps = []
    model = fidelity.train(images, labels, "test_resnet", steps=60, progress=steps.append)
    assert steps == list(range(1, 61)) and not model.training
    s = fidelity.scores(model, held)
    assert s.dtype == np.float64 and s.shape == (200,)
    val = auroc(held_y, s)
    assert val > 0.9

    path = tmp_path / "fid" / "fidelity.pt"
    fidelity.save(model, path, {"backbone": "test_resnet", "steps": 60, "lr": 1e-2, "seed": 0,
                                "val_auroc": np.float64(val)})
    again, meta = fidelity.load(path)
    assert meta["backbone"] == "test_resnet" and meta["val_auroc"] == val
    assert np.array_equal(fidelity.scores(again, held), s)

    twin = fidelity.train(images, labels, "test_resnet", steps=60)
    assert np.array_equal(fidelity.scores(twin, held), s)


def test_fidelity_needs_both_classes():
    images, labels = _lesions(10, seed=0)
    with pytest.raises(UserError, match="both classes"):
        fidelity.train(images, np.zeros(10), "test_resnet", steps=1)
    with pytest.raises(UserError, match="does not exist"):
        fidelity.load("/nonexistent/fidelity.pt")
