"""A synthetic stand-in for ISIC 2020, written in its challenge layout so `ingest` reads it as is.

    OUT/train/ISIC_9xxxxxx.jpg               dermoscopy-like images (JPEG, quality 92)
    OUT/ISIC_2020_Training_GroundTruth.csv   the real file's header and value spellings
    OUT/synth_truth.csv                      image_name,ita,skin_tone,malignant: what was painted

Each image shows skin of one tone per patient (ITA drawn uniformly over the full range, so every
skin-tone group is populated, unlike the real set), low-frequency texture, often a dermoscope
vignette and a few hairs, and a lesion whose class is visible: benign lesions are small, round,
evenly brown with a smooth border; malignant ones are larger, asymmetric, with an irregular border
and several colours. Image i draws only from its own seeded generator, so the output is
bit-identical across runs and does not depend on the order images are made in.
"""
from __future__ import annotations

import csv
import math
import numbers
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cnd_ray.config import SynthConfig
from cnd_ray.data import tone
from cnd_ray.errors import UserError

GROUND_TRUTH = "ISIC_2020_Training_GroundTruth.csv"
TRUTH = "synth_truth.csv"
HEADER = ("image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
          "diagnosis", "benign_malignant", "target")
FIRST_ID = 9_000_000  # real ISIC ids stay below this, so synthetic ones never collide
MAX_IMAGES = 10_000_000 - FIRST_ID  # ids keep 7 digits
JPEG_QUALITY = 92
ITA_RANGE = (-50.0, 70.0)
# Distinct first words keep the layout, patient and image random streams apart.
_LAYOUT, _PATIENT, _IMAGE = 1, 2, 3

# Roughly the real file's proportions; "" is an empty cell, as in the real file.
SEXES = (("male", 0.52), ("female", 0.46), ("", 0.02))
SITES = (("torso", 0.50), ("lower extremity", 0.25), ("upper extremity", 0.15),
         ("head/neck", 0.055), ("palms/soles", 0.01), ("oral/genital", 0.005), ("", 0.03))
BENIGN_DIAGNOSES = (("nevus", 0.85), ("unknown", 0.12), ("seborrheic keratosis", 0.03))


def _pick(rng: np.random.Generator, table) -> str:
    names, p = zip(*table)
    return names[rng.choice(len(names), p=np.asarray(p) / sum(p))]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)  # tanh form: no overflow for large |x|


def _lowfreq(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field (size, size): a cells x cells normal grid upsampled bicubically."""
    z = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(z).resize((size, size), Image.BICUBIC))


def skin_lab(target_ita: float, rng: np.random.Generator) -> np.ndarray:
    """A plausible skin colour (L*, a*, b*) whose ITA is `target_ita`."""
    t = math.tan(math.radians(target_ita))
    b = rng.uniform(12.0, 22.0)
    # Cap b* so L* stays in the range of real skin (about 22-85) at the extremes of the range.
    if t > 0:
        b = min(b, 33.0 / t)
    elif t < 0:
        b = min(b, 28.0 / -t)
    L = 50.0 + b * t
    return np.array([L, rng.uniform(8.0, 14.0) + 0.1 * (60.0 - L), b])  # darker skin is redder


def _patients(num_images: int, seed: int) -> np.ndarray:
    """Patient index of each image: consecutive runs of 1-4 images."""
    rng = np.random.default_rng((seed, _LAYOUT, 0))
    sizes = rng.integers(1, 5, size=num_images)  # at least enough runs to cover every image
    return np.repeat(np.arange(num_images), sizes)[:num_images]


def _labels(num_images: int, malignant_fraction: float, seed: int) -> np.ndarray:
    """0/1 per image: exactly round(n * fraction) ones, in a seeded shuffled order."""
    labels = np.zeros(num_images, np.int64)
    labels[:round(num_images * malignant_fraction)] = 1
    return np.random.default_rng((seed, _LAYOUT, 1)).permutation(labels)


def _patient(seed: int, p: int) -> dict:
    """Patient-level draws: skin colour, sex, age."""
    rng = np.random.default_rng((seed, _PATIENT, p))
    lab = skin_lab(rng.uniform(*ITA_RANGE), rng)
    # The ITA actually painted: the colour after clipping to the sRGB gamut, rounded as written
    # so the skin_tone column is the band of the ita column.
    painted = round(tone.ita(*tone.srgb_to_lab(tone.lab_to_srgb(lab))[[0, 2]]), 2)
    age = float(np.clip(round(rng.normal(50, 14) / 5) * 5, 5, 90))  # steps of 5, like the real file
    age_missing = rng.random() < 0.02
    return {"lab": lab, "ita": painted, "sex": _pick(rng, SEXES),
            "age": "" if age_missing else f"{age}"}


def _lesion_mask(rng, dx, dy, radius, harmonics, softness) -> np.ndarray:
    """Soft lesion mask in [0, 1]: radius(angle) = radius * (1 + sum of random cosines)."""
    phi = np.linspace(-np.pi, np.pi, 512, endpoint=False)
    wobble = np.zeros_like(phi)
    for k, amp in harmonics:
        wobble += amp * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    edge = radius * (1 + wobble)
    # Look the radius up by angle: cheaper than evaluating the cosines at every pixel.
    idx = ((np.arctan2(dy, dx) + np.pi) * (512 / (2 * np.pi))).astype(np.int64) % 512
    return _sigmoid((edge[idx] - np.hypot(dx, dy)) / softness)


def _blend(lab: np.ndarray, colour, weight: np.ndarray) -> None:
    """lab <- lab * (1 - weight) + colour * weight, in place."""
    lab += weight[..., None] * (np.asarray(colour, np.float32) - lab)


def _hairs(rng: np.random.Generator, size: int) -> np.ndarray | None:
    """Opacity (size, size) of a few thin dark curves, or None for a hairless image."""
    n = min(int(rng.poisson(1.5)), 6)
    if n == 0:
        return None
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    t = np.linspace(0, 1, 24)[:, None]
    for _ in range(n):
        p0 = rng.uniform(-0.2, 1.2, 2) * size
        angle = rng.uniform(0, 2 * np.pi)
        direction = np.array([math.cos(angle), math.sin(angle)])
        length = rng.uniform(0.4, 1.2) * size
        p2 = p0 + direction * length
        bend = np.array([-direction[1], direction[0]]) * rng.uniform(-0.3, 0.3) * length
        p1 = (p0 + p2) / 2 + bend
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2  # quadratic Bezier (24, 2)
        width = max(1, round(size * rng.uniform(0.003, 0.008)))
        draw.line([tuple(q) for q in curve], fill=int(255 * rng.uniform(0.7, 0.95)), width=width)
    canvas = canvas.filter(ImageFilter.GaussianBlur(0.5))  # PIL lines have hard, aliased edges
    return np.asarray(canvas, np.float32) / 255


def draw_image(rng: np.random.Generator, skin: np.ndarray, malignant: bool,
           xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """One (size, size, 3) uint8 image; xx, yy are pixel centres in [-1, 1]."""
    size = xx.shape[0]
    fine = rng.standard_normal((size, size), dtype=np.float32)
    lab = np.empty((size, size, 3), np.float32)  # (H, W, 3) L*, a*, b*
    lab[..., 0] = (skin[0] + 2.5 * _lowfreq(rng, size, 6) + 0.8 * _lowfreq(rng, size, 32)
                   + 0.6 * fine)
    lab[..., 1] = skin[1] + 1.5 * _lowfreq(rng, size, 5)
    lab[..., 2] = skin[2] + 1.0 * _lowfreq(rng, size, 5)

    # Lesion near the centre, so the border band the ITA estimator reads is mostly skin.
    c = rng.uniform(-0.08, 0.08, 2)
    dx, dy = xx - c[0], yy - c[1]
    L = skin[0]
    if not malignant:
        radius = rng.uniform(0.16, 0.28)  # in half-image units: 8-14% of the width
        mask = _lesion_mask(rng, dx, dy, radius, [(2, rng.uniform(0, 0.06)),
                                                  (3, rng.uniform(0, 0.02))],
                            rng.uniform(0.012, 0.025))
        # Evenly brown, a little darker towards the middle.
        centre = np.clip(1 - np.hypot(dx, dy) / radius, 0, 1)
        brown = lab.copy()
        brown[..., 0] = max(L - rng.uniform(18, 30), 0.55 * L) - 4 * centre
        brown[..., 1] = skin[1] + rng.uniform(4, 10)
        brown[..., 2] = skin[2] + rng.uniform(4, 12)
        lab += mask[..., None] * (brown - lab)
    else:
        radius = rng.uniform(0.32, 0.52)  # 16-26% of the width, before the border's wobble
        # Harmonics 2-12 with amplitudes falling as 1/k: lobes plus a ragged fine scale.
        ks = np.arange(2, 13)
        amps = rng.uniform(0.2, 1.0, ks.size) / ks
        amps *= rng.uniform(0.25, 0.4) / amps.sum()  # keeps the border off the image edge
        mask = _lesion_mask(rng, dx, dy, radius, list(zip(ks, amps)), rng.uniform(0.006, 0.014))
        # Dark brown, shaded unevenly along a random axis: the colour is asymmetric too.
        axis = rng.uniform(0, 2 * np.pi)
        slope = (dx * math.cos(axis) + dy * math.sin(axis)) / radius
        base = lab.copy()
        base[..., 0] = max(L - rng.uniform(25, 40), 0.45 * L) + 6 * slope
        base[..., 1] = skin[1] + rng.uniform(3, 10)
        base[..., 2] = skin[2] + rng.uniform(2, 10)
        lab += mask[..., None] * (base - lab)
        colours = {"blue-grey": (min(L - 10, 50), 0.0, -6.0), "black": (10.0, 2.0, 3.0),
                   "red": (min(L - 5, 50), 30.0, 18.0)}
        for name in rng.permutation(list(colours))[:rng.integers(2, 4)]:
            field = _lowfreq(rng, size, 5)
            _blend(lab, colours[name], mask * _sigmoid((field - rng.uniform(0.2, 0.7)) / 0.25))
        # Mottled pigment inside the lesion.
        lab[..., 0] -= 4 * mask * np.abs(_lowfreq(rng, size, 20))

    hair = _hairs(rng, size)
    if hair is not None:
        _blend(lab, (rng.uniform(8, 22), rng.uniform(0, 4), rng.uniform(0, 6)), hair)

    rgb = tone.lab_to_srgb(lab)
    if rng.random() < 0.6:
        # Dermoscope vignette: the round field of view leaves the corners near black.
        radius, soft = rng.uniform(1.0, 1.35), rng.uniform(0.01, 0.03)
        rgb *= (0.03 + 0.97 * _sigmoid((radius - np.hypot(xx, yy)) / soft))[..., None]
    return (rgb * 255 + 0.5).astype(np.uint8)


def _check_args(num_images, image_size, malignant_fraction, seed) -> None:
    """Raise a one-line UserError (a ValueError the CLI prints) for the first bad argument."""
    def whole(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if not whole(num_images) or not 1 <= num_images <= MAX_IMAGES:
        raise UserError(f"num_images must be an integer from 1 to {MAX_IMAGES}, "
                         f"got {num_images!r}")
    if not whole(image_size) or image_size < 16:
        raise UserError(f"image_size must be an integer >= 16, got {image_size!r}")
    if (isinstance(malignant_fraction, bool) or not isinstance(malignant_fraction, numbers.Real)
            or not 0 <= malignant_fraction <= 1):  # nan fails the range test too
        raise UserError(f"malignant_fraction must be a number from 0 to 1, "
                         f"got {malignant_fraction!r}")
    if not whole(seed) or seed < 0:
        raise UserError(f"seed must be an integer >= 0, got {seed!r}")


def run(out, num_images: int = SynthConfig.num_images, image_size: int = SynthConfig.image_size,
        malignant_fraction: float = SynthConfig.malignant_fraction, seed: int = SynthConfig.seed,
        progress: bool = True) -> dict:
    """Write a synthetic ISIC 2020 set into the new folder `out`; return a summary dict."""
    _check_args(num_images, image_size, malignant_fraction, seed)
    out = Path(out).absolute()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"out {out} already exists and is not an empty folder; "
                         "give a new path or remove it")
    start = time.perf_counter()
    patient_of = _patients(num_images, seed)
    labels = _labels(num_images, malignant_fraction, seed)
    patients = [_patient(seed, p) for p in range(int(patient_of[-1]) + 1)]
    half = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size * 2 - 1
    xx, yy = np.meshgrid(half, half)  # (H, W) pixel centres in [-1, 1]

    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside `out` and renamed into place: an interrupted run never leaves a set that
    # looks complete under the real name.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a data set is read like any folder
        (tmp / "train").mkdir()
        gt_rows, truth_rows = [], []
        bar = None
        if progress:
            from tqdm import tqdm  # only needed when someone watches

            bar = tqdm(total=num_images, desc="synth", unit="img")
        for i in range(num_images):
            name = f"ISIC_{FIRST_ID + i:07d}"
            pat = patients[patient_of[i]]
            malignant = bool(labels[i])
            rng = np.random.default_rng((seed, _IMAGE, i))
            Image.fromarray(draw_image(rng, pat["lab"], malignant, xx, yy)).save(
                tmp / "train" / f"{name}.jpg", quality=JPEG_QUALITY)
            site = _pick(rng, SITES)
            diagnosis = "melanoma" if malignant else _pick(rng, BENIGN_DIAGNOSES)
            gt_rows.append((name, f"IP_{FIRST_ID + int(patient_of[i]):07d}", pat["sex"],
                            pat["age"], site, diagnosis,
                            "malignant" if malignant else "benign", int(malignant)))
            truth_rows.append((name, f"{pat['ita']:.2f}", tone.band(pat["ita"]), int(malignant)))
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        for fname, header, rows in ((GROUND_TRUTH, HEADER, gt_rows),
                                    (TRUTH, ("image_name", "ita", "skin_tone", "malignant"),
                                     truth_rows)):
            with open(tmp / fname, "w", newline="") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(header)
                w.writerows(rows)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_mal = int(labels.sum())
    return {"out": str(out), "num_images": num_images, "benign": num_images - n_mal,
            "malignant": n_mal, "patients": len(patients),
            "seconds": round(time.perf_counter() - start, 3)}
