import ast
import csv
import inspect
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cnd_ray.data import synth, tone
from cnd_ray.errors import UserError
from cnd_ray.evaluate.metrics import auroc

GT_HEADER = ("image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,"
             "benign_malignant,target")
SITES = {"head/neck", "upper extremity", "lower extremity", "torso", "palms/soles", "oral/genital",
         ""}


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load(out):
    """Ground-truth rows joined with the truth rows, by image name."""
    truth = {r["image_name"]: r for r in read_csv(out / synth.TRUTH)}
    return [{**r, **truth[r["image_name"]]} for r in read_csv(out / synth.GROUND_TRUTH)]


def files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


SMALL = {"num_images": 40, "image_size": 32, "malignant_fraction": 0.25, "seed": 3, "test_per_tone": 6,
         "progress": False}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "isic2020"
    summary = synth.run(out, **SMALL)
    return out, summary


def test_defaults_are_the_documented_ones():
    params = inspect.signature(synth.run).parameters
    assert {k: p.default for k, p in params.items() if k != "out"} == {
        "num_images": 2000, "image_size": 256, "malignant_fraction": 0.1, "seed": 0,
        "difficulty": "isic", "test_per_tone": 400, "progress": True}


def test_synth_imports_neither_torch_nor_ray():
    tree = ast.parse(Path(synth.__file__).read_text())
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m.split(".")[0] for m in mods} & {"torch", "ray", "mlflow"}


def test_layout_header_and_values(small):
    out, summary = small
    assert sorted(p.name for p in out.iterdir()) == sorted(["train", synth.GROUND_TRUTH,
                                                            synth.TRUTH])
    assert (out / synth.GROUND_TRUTH).read_text().split("\n", 1)[0] == GT_HEADER
    assert (out / synth.TRUTH).read_text().split("\n", 1)[0] == \
        "image_name,ita,skin_tone,fitzpatrick,severity,malignant"
    rows = load(out)
    names = [r["image_name"] for r in rows]
    assert names == [f"ISIC_{9000000 + i}" for i in range(40)]
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"{n}.jpg" for n in names]
    for r in rows:
        assert re.fullmatch(r"IP_\d{7}", r["patient_id"])
        assert r["sex"] in {"male", "female", ""}
        assert r["age_approx"] == "" or re.fullmatch(r"\d{1,2}\.0", r["age_approx"])
        assert r["anatom_site_general_challenge"] in SITES
        assert r["target"] == r["malignant"]
        if r["target"] == "1":
            assert (r["diagnosis"], r["benign_malignant"]) == ("melanoma", "malignant")
        else:
            assert r["benign_malignant"] == "benign"
            assert r["diagnosis"] in {"nevus", "unknown", "seborrheic keratosis"}
        assert r["skin_tone"] == tone.band(float(r["ita"]))
        assert int(r["fitzpatrick"]) == tone.fitzpatrick(float(r["ita"])) and 0 <= float(r["severity"]) <= 1
    with Image.open(out / "train" / f"{names[0]}.jpg") as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 32))
    assert summary["out"] == str(out) and summary["num_images"] == 40


def test_counts_and_malignant_fraction(small):
    out, summary = small
    targets = [int(r["target"]) for r in load(out)]
    assert sum(targets) == summary["malignant"] == 10 and summary["benign"] == 30
    assert targets != sorted(targets) and targets != sorted(targets, reverse=True)  # shuffled


@pytest.mark.parametrize("n,fraction,expect", [(7, 0.5, 4), (5, 0.0, 0), (5, 1.0, 5), (1, 0.3, 0),
                                               (3, 0.34, 1)])
def test_exact_malignant_count(tmp_path, n, fraction, expect):
    s = synth.run(tmp_path / "o", num_images=n, image_size=16, malignant_fraction=fraction,
                  test_per_tone=0, progress=False)
    assert (s["malignant"], s["benign"]) == (expect, n - expect)


def test_patients_share_one_tone(small):
    out, summary = small
    by_patient = defaultdict(list)
    for r in load(out):
        by_patient[r["patient_id"]].append(r)
    assert len(by_patient) == summary["patients"]
    assert all(1 <= len(v) <= 4 for v in by_patient.values())
    assert any(len(v) > 1 for v in by_patient.values())
    for rows in by_patient.values():
        assert len({(r["ita"], r["skin_tone"], r["sex"], r["age_approx"]) for r in rows}) == 1
    assert len({v[0]["ita"] for v in by_patient.values()}) == len(by_patient)


def test_same_seed_same_bytes_other_seed_differs(tmp_path, small):
    out, _ = small
    again = tmp_path / "again"
    synth.run(again, **SMALL)
    assert files(again) == files(out)
    assert files(synth.test_folder(again)) == files(synth.test_folder(out))
    other = tmp_path / "other"
    synth.run(other, **{**SMALL, "seed": 4})
    a, b = files(out), files(other)
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a if k.endswith(".jpg")) == 40


def test_refuses_non_empty_out(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an empty folder"):
        synth.run(out, num_images=2, image_size=16, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        synth.run(tmp_path / "file", num_images=2, image_size=16, progress=False)
    (tmp_path / "fresh-test").mkdir()
    (tmp_path / "fresh-test" / "keep.txt").write_text("mine")  # where the test set would go
    with pytest.raises(UserError, match="test set's folder .* not an empty folder"):
        synth.run(tmp_path / "fresh", num_images=2, image_size=16, test_per_tone=1, progress=False)
    assert not (tmp_path / "fresh").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert synth.run(empty, num_images=2, image_size=16, progress=False)["num_images"] == 2


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    make, calls = synth.draw_image, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return make(*args)

    monkeypatch.setattr(synth, "draw_image", failing)
    with pytest.raises(KeyboardInterrupt):
        synth.run(tmp_path / "out", num_images=5, image_size=16, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither `out` nor the temporary folder


@pytest.mark.parametrize("kwargs,name", [
    ({"num_images": 0}, "num_images"), ({"num_images": 2.5}, "num_images"),
    ({"num_images": True}, "num_images"), ({"num_images": 10**7}, "num_images"),
    ({"image_size": 15}, "image_size"), ({"image_size": 64.0}, "image_size"),
    ({"malignant_fraction": -0.1}, "malignant_fraction"),
    ({"malignant_fraction": 1.5}, "malignant_fraction"),
    ({"malignant_fraction": math.nan}, "malignant_fraction"),
    ({"malignant_fraction": "0.5"}, "malignant_fraction"), ({"seed": -1}, "seed"),
    ({"difficulty": "hard"}, "difficulty"), ({"test_per_tone": -1}, "test_per_tone"),
    ({"test_per_tone": 1.5}, "test_per_tone"),
])
def test_bad_arguments(tmp_path, kwargs, name):
    with pytest.raises(UserError, match=f"^{name} ") as e:  # a ValueError the CLI prints
        synth.run(tmp_path / "out", progress=False, **kwargs)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def _ranks(x):
    """Ranks 0..n-1, ties sharing their mean rank (for Spearman's rho)."""
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    _, inv = np.unique(x, return_inverse=True)
    return (np.bincount(inv, r) / np.bincount(inv))[inv]


def test_estimated_ita_tracks_painted_ita(tmp_path):
    out = tmp_path / "tones"
    synth.run(out, num_images=150, image_size=128, seed=1, difficulty="easy", test_per_tone=0, progress=False)
    rows = read_csv(out / synth.TRUTH)
    painted = np.array([float(r["ita"]) for r in rows])
    paths = [out / "train" / f"{r['image_name']}.jpg" for r in rows]
    est = np.array([tone.estimate_ita(np.asarray(Image.open(path))) for path in paths])
    assert painted.min() < -40 and painted.max() > 60  # the full range of skin tones is there
    assert not np.isnan(est).any()
    err = est - painted
    # Measured here: rho 0.998, mean |error| 1.3 degrees, bias -0.3, worst 4.9 (400 images at
    # 256 px: 1.1, -0.1, 6.9). The worst are near ITA 0, where the skin texture's L* swings move
    # ITA the most (about 4 degrees per unit of L*).
    assert np.corrcoef(_ranks(est), _ranks(painted))[0, 1] > 0.99
    assert np.abs(err).mean() < 2.0 and abs(err.mean()) < 1.0 and np.abs(err).max() < 12
    assert np.mean([tone.band(e) == tone.band(p) for e, p in zip(est, painted)]) > 0.85


@pytest.fixture
def one_thread():
    """Torch on one thread: for this tiny CNN two threads only add barrier waits, and on a busy
    2-core machine they made the test 6-20x slower (3 s -> 18-63 s, measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _held_out_auroc(out) -> float:
    """A tiny CNN trained 20 epochs on a synth set at 32 px; its AUROC on the fifth of patients held out."""
    rows = read_csv(out / synth.GROUND_TRUTH)
    x = np.stack([np.asarray(Image.open(out / "train" / f"{r['image_name']}.jpg")
                             .resize((32, 32), Image.BILINEAR)) for r in rows])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 32, 32)
    y = np.array([int(r["target"]) for r in rows])
    # Held out by patient, as a real split must be: a patient's images share a skin tone.
    test = np.array([int(r["patient_id"][3:]) % 5 == 0 for r in rows])
    train_idx = torch.from_numpy(np.flatnonzero(~test))
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 1))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    targets = torch.from_numpy(y).float()
    for _ in range(20):  # about 2 s
        for batch in train_idx[torch.randperm(len(train_idx))].split(32):
            loss = nn.functional.binary_cross_entropy_with_logits(net(x[batch]).squeeze(1),
                                                                  targets[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        scores = net(x[torch.from_numpy(np.flatnonzero(test))]).squeeze(1).numpy()
    assert 0.3 < y[test].mean() < 0.7
    return auroc(y[test], scores)


def test_classes_are_learnable(tmp_path, one_thread):
    """A tiny CNN tells the easy set's melanomas from its nevi at 32 px (held-out AUROC 0.998 when
    measured): the stand-in carries the label."""
    out = tmp_path / "learn"
    synth.run(out, num_images=600, image_size=64, malignant_fraction=0.5, seed=0, difficulty="easy",
              test_per_tone=0, progress=False)
    assert _held_out_auroc(out) >= 0.9


def test_the_default_benchmark_overlaps_the_classes_as_isic_does(tmp_path, one_thread):
    """The default set leaves a classifier headroom, as ISIC does (AUROC ~0.85-0.92): the lesions'
    severity, which paints every class cue, overlaps between the classes, so no classifier can beat
    the AUROC of the severity itself (Phi(SEPARATION / sqrt 2) = 0.92), and a small one learns most
    of it. (The project's judge on the quickstart data: held-out AUROC 0.888, docs/DATA.md.)"""
    out = tmp_path / "isic"
    synth.run(out, num_images=600, image_size=64, malignant_fraction=0.5, seed=0, test_per_tone=0,
              progress=False)
    truth = read_csv(out / synth.TRUTH)
    y = np.array([int(r["malignant"]) for r in truth])
    ceiling = auroc(y, np.array([float(r["severity"]) for r in truth]))
    assert 0.88 <= ceiling <= 0.95, ceiling
    learnt = _held_out_auroc(out)
    assert 0.7 <= learnt <= ceiling + 0.05, (learnt, ceiling)


def test_on_dark_skin_the_pigment_follows_the_skin_and_only_the_shape_the_class():
    """The benchmark's light-dark gap (issue 31): the same random draws painted as the benign and the
    malignant prototype differ in colour at the lesion's centre on light skin, not on dark skin
    (synth.DARK_ITA), where only size and border tell them apart."""
    half = (np.arange(64, dtype=np.float32) + 0.5) / 64 * 2 - 1
    xx, yy = np.meshgrid(half, half)
    centre = (slice(30, 34), slice(30, 34))  # inside every lesion: it lies within 0.08 of the middle
    centre_gap, area_gap = {}, {}
    for name, ita in (("light", 55.0), ("dark", synth.DARK_ITA[1] - 5)):
        skin = synth.skin_lab(ita, np.random.default_rng(1))
        for seed in range(8):
            benign, malignant = (synth.draw_image(np.random.default_rng(seed), skin, m, xx, yy).astype(int)
                                 for m in (0.0, 1.0))
            centre_gap.setdefault(name, []).append(np.abs(benign[centre] - malignant[centre]).mean())
            skin_rgb = np.median(benign[:8, 24:40].reshape(-1, 3), 0)  # a border band of skin
            dark_px = [(np.abs(im - skin_rgb).sum(-1) > 60).mean() for im in (benign, malignant)]
            area_gap.setdefault(name, []).append(dark_px[1] - dark_px[0])
    # Mean |RGB difference| over the centre: 16-80 on light skin, 0.2-3.3 on dark skin when measured
    # (the shading's scale is the lesion's radius, which differs).
    assert min(centre_gap["light"]) > 10 and max(centre_gap["dark"]) < 5, centre_gap
    assert min(area_gap["dark"]) > 0.02, area_gap  # the malignant lesion still the larger one
    # The easy set paints every tone alike: its prototypes differ in colour on dark skin too.
    easy = [synth.draw_image(np.random.default_rng(0), skin, m, xx, yy, dark_pigment=False).astype(int)
            for m in (0.0, 1.0)]
    assert np.abs(easy[0][centre] - easy[1][centre]).mean() > 10


def test_skin_tones_are_imbalanced_as_in_isic_and_the_test_set_holds_every_group_alike(tmp_path):
    s = synth.run(tmp_path / "t", num_images=2000, image_size=16, malignant_fraction=0.3, test_per_tone=20,
                  progress=False)
    shares = {g: n / 2000 for g, n in s["tone_groups"].items()}
    # Dark skin about as rare as ITA estimates find it on ISIC (under 1%); never absent, never the 3-4% at
    # which a real-only classifier showed no clear gap (synth.ISIC_ITA).
    assert 0.002 < shares["V-VI"] <= 0.015 and shares["I-II"] > 0.6, shares
    test = read_csv(synth.test_folder(tmp_path / "t") / synth.TRUTH)
    by_group = defaultdict(list)
    for r in test:
        by_group[tone.group_of(int(r["fitzpatrick"]))].append(int(r["malignant"]))
    assert {g: (len(v), sum(v)) for g, v in by_group.items()} == {g: (20, 6) for g in tone.GROUPS}
    train_ids = {r["image_name"] for r in read_csv(tmp_path / "t" / synth.TRUTH)}
    train_patients = {r["patient_id"] for r in read_csv(tmp_path / "t" / synth.GROUND_TRUTH)}
    gt = read_csv(synth.test_folder(tmp_path / "t") / synth.GROUND_TRUTH)
    assert not train_ids & {r["image_name"] for r in gt}  # ids continue: both ingest together
    assert not train_patients & {r["patient_id"] for r in gt} and len({r["patient_id"] for r in gt}) == 60
    easy = synth.run(tmp_path / "e", num_images=600, image_size=16, difficulty="easy", test_per_tone=0,
                     progress=False)
    assert min(easy["tone_groups"].values()) > 100  # the easy set spreads tones evenly
