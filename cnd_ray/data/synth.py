"""A synthetic stand-in for ISIC 2020, written in its challenge layout so `ingest` reads it as is.

    OUT/train/ISIC_9xxxxxx.jpg               dermoscopy-like images (JPEG, quality 92)
    OUT/ISIC_2020_Training_GroundTruth.csv   the real file's header and value spellings
    OUT/synth_truth.csv                      image_name,ita,skin_tone,fitzpatrick,severity,malignant
    OUT-test/...                             the same layout: a test set with every skin-tone group
                                             equally (`cnd-ray ingest --root OUT --test OUT-test`)

Each image shows skin of one tone per patient, low-frequency texture, often a dermoscope vignette and
a few hairs, and a lesion painted from a severity in [0, 1] (`draw_image`): 0 is the benign prototype
(small, round, evenly brown, smooth border), 1 the malignant one (larger, asymmetric, ragged border,
several colours). Two difficulties (docs/DATA.md, "The synthetic benchmark"):

- `isic` (the default): the classes overlap as on ISIC - each lesion's severity is drawn from its
  class's score distribution, N(-d/2, 1) or N(+d/2, 1) through a sigmoid, so some nevi look atypical
  and some melanomas plain (no classifier can exceed AUROC Phi(d / sqrt 2)); skin tones are as
  imbalanced as in ISIC (ITA around 50 degrees, Fitzpatrick V-VI under 1% of the images), and on
  dark skin the lesion's pigment follows the skin, not the class (DARK_ITA).
- `easy`: every lesion is its class's prototype, painted alike on every skin tone, and the skin tones
  are uniform over the ITA range.

Image i draws only from its own seeded generator, so the output is bit-identical across runs and
does not depend on the order images are made in.
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

from cnd_ray.config import SYNTH_DIFFICULTIES, SynthConfig
from cnd_ray.data import tone
from cnd_ray.errors import UserError

GROUND_TRUTH = "ISIC_2020_Training_GroundTruth.csv"
TRUTH = "synth_truth.csv"
TRUTH_HEADER = ("image_name", "ita", "skin_tone", "fitzpatrick", "severity", "malignant")
HEADER = ("image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
          "diagnosis", "benign_malignant", "target")
FIRST_ID = 9_000_000  # real ISIC ids stay below this, so synthetic ones never collide
MAX_IMAGES = 10_000_000 - FIRST_ID  # ids keep 7 digits
JPEG_QUALITY = 92
ITA_RANGE = (-50.0, 70.0)
# difficulty "isic": the two classes' severity scores are N(-d/2, 1) and N(+d/2, 1), so the best
# possible AUROC is Phi(d / sqrt 2) (0.92 at d = 2); severity = sigmoid(SLOPE * score) keeps most
# lesions near their class's prototype and blends the overlapping ones.
SEPARATION = 2.0
SLOPE = 2.0
# ... and skin tones as in ISIC (ITA estimates of ISIC images centre on light-intermediate skin and
# find dark skin rare): ITA ~ N(50, 12) within ITA_RANGE puts about 0.6% of patients in Fitzpatrick
# V-VI (ITA <= 19; at the default seed, ingest's pixel estimate finds 6 of the quickstart's 1582
# training images there: 2 benign, 4 malignant). N(46, 14) put
# 3-4% there, and a classifier trained on that many dark-skin images lost no clear AUROC on them:
# the real-only light-dark gap's interval held 0 at two of three classifier seeds (docs/DATA.md). At
# N(50, 12) it still did at some seeds, while every tone was painted alike (DARK_ITA changed that).
ISIC_ITA = (50.0, 12.0)
# Pigment on dark skin (draw_image): below DARK_ITA[0] degrees the lesion's pigment cues blend from its
# severity towards a draw from DARK_PIGMENT, fully so at DARK_ITA[1] and darker (V-VI is ITA <= 19).
DARK_ITA = (30.0, 10.0)
DARK_PIGMENT = (0.2, 1.0)
# Fitzpatrick groups of the test set by ITA (data/tone.py's mapping), drawn MARGIN degrees inside
# their bounds so that the ITA ingest estimates from the pixels (mean error ~1.3) keeps the group.
TONE_GROUPS = tuple(zip(tone.GROUPS, (41.0, 19.0, ITA_RANGE[0]), (ITA_RANGE[1], 41.0, 19.0)))
MARGIN = 3.0
DIFFICULTIES = SYNTH_DIFFICULTIES
# Distinct first words keep the layout, patient and image random streams apart.
_LAYOUT, _PATIENT, _IMAGE, _TEST = 1, 2, 3, 4

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


def _ita(rng: np.random.Generator, tones) -> float:
    """A patient's target ITA: "isic" (ISIC_ITA within ITA_RANGE), "uniform" over ITA_RANGE, or
    uniform in the (low, high) range given."""
    if tones == "uniform":
        return float(rng.uniform(*ITA_RANGE))
    if tones == "isic":
        while True:  # truncated normal: redraw the few outside the range
            v = float(rng.normal(*ISIC_ITA))
            if ITA_RANGE[0] <= v <= ITA_RANGE[1]:
                return v
    return float(rng.uniform(*tones))


def _patient(rng: np.random.Generator, tones) -> dict:
    """Patient-level draws from `rng`: skin colour (`_ita`'s tones), sex, age."""
    lab = skin_lab(_ita(rng, tones), rng)
    # The ITA actually painted: the colour after clipping to the sRGB gamut, rounded as written
    # so the skin_tone column is the band of the ita column.
    painted = round(tone.ita(*tone.srgb_to_lab(tone.lab_to_srgb(lab))[[0, 2]]), 2)
    age = float(np.clip(round(rng.normal(50, 14) / 5) * 5, 5, 90))  # steps of 5, like the real file
    age_missing = rng.random() < 0.02
    return {"lab": lab, "ita": painted, "sex": _pick(rng, SEXES),
            "age": "" if age_missing else f"{age}"}


def severity(rng: np.random.Generator, malignant: bool, difficulty: str) -> float:
    """The lesion's severity in [0, 1] (`draw_image`): its class's prototype on the easy set, a draw
    from its class's overlapping score distribution on the isic set (SEPARATION, SLOPE)."""
    if difficulty == "easy":
        return float(malignant)
    score = rng.normal(SEPARATION / 2 if malignant else -SEPARATION / 2)
    return float(_sigmoid(SLOPE * score))


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


def _darkness(ita: float) -> float:
    """0 on skin lighter than DARK_ITA[0] degrees, 1 at DARK_ITA[1] and darker, linear between."""
    return float(np.clip((DARK_ITA[0] - ita) / (DARK_ITA[0] - DARK_ITA[1]), 0.0, 1.0))


def _lerp(a, b, t):
    return a + (b - a) * t


def draw_image(rng: np.random.Generator, skin: np.ndarray, severity: float,
               xx: np.ndarray, yy: np.ndarray, dark_pigment: bool = True) -> np.ndarray:
    """One (size, size, 3) uint8 image; xx, yy are pixel centres in [-1, 1].

    `severity` in [0, 1] sets every class cue at once: 0 paints the benign prototype (a small, round,
    evenly brown nevus with a smooth border, a little darker in the middle), 1 the malignant one
    (larger, asymmetric, shaded along an axis, a ragged border, patches of blue-grey, black or red,
    mottled); values between blend each cue, as atypical nevi and early melanomas do. With
    `dark_pigment` (the isic set) the pigment cues on dark skin (DARK_ITA) take a random severity of
    their own: only size and border follow it.
    """
    size = xx.shape[0]
    fine = rng.standard_normal((size, size), dtype=np.float32)
    lab = np.empty((size, size, 3), np.float32)  # (H, W, 3) L*, a*, b*
    lab[..., 0] = (skin[0] + 2.5 * _lowfreq(rng, size, 6) + 0.8 * _lowfreq(rng, size, 32)
                   + 0.6 * fine)
    lab[..., 1] = skin[1] + 1.5 * _lowfreq(rng, size, 5)
    lab[..., 2] = skin[2] + 1.0 * _lowfreq(rng, size, 5)

    m = float(severity)
    # Pigment cues (the lesion's darkness, its shading and its colour patches) follow the severity on
    # light skin; on dark skin they follow the skin (the benchmark's assumption: nevi there are often
    # as dark and variegated as melanomas), so colour says little about the class and the shape cues
    # (size, border) carry it (DARK_PIGMENT). A classifier that learnt colour on light skin misreads
    # dark skin - the light-dark gap that dark-skin training images close (issue 31). The draw is
    # taken only on dark skin, so every other image stays as it was.
    dark = _darkness(tone.ita(skin[0], skin[2])) if dark_pigment else 0.0
    mc = _lerp(m, rng.uniform(*DARK_PIGMENT), dark) if dark > 0 else m
    # Lesion near the centre, so the border band the ITA estimator reads is mostly skin.
    c = rng.uniform(-0.08, 0.08, 2)
    dx, dy = xx - c[0], yy - c[1]
    L = skin[0]
    # In half-image units: 8-14% of the width (benign) to 16-26% (malignant), before the wobble.
    radius = _lerp(rng.uniform(0.16, 0.28), rng.uniform(0.32, 0.52), m)
    # Border: harmonics 2-12 with amplitudes falling as 1/k, in all a slight wobble (benign) to
    # lobes plus a ragged fine scale (malignant; the total keeps the border off the image edge).
    ks = np.arange(2, 13)
    amps = rng.uniform(0.2, 1.0, ks.size) / ks
    amps *= _lerp(rng.uniform(0.02, 0.06), rng.uniform(0.25, 0.4), m) / amps.sum()
    mask = _lesion_mask(rng, dx, dy, radius, list(zip(ks, amps)),
                        _lerp(rng.uniform(0.012, 0.025), rng.uniform(0.006, 0.014), m))
    # Brown, darker with severity; a benign one darkens towards the middle, a malignant one is
    # shaded along a random axis: the colour is asymmetric too.
    axis = rng.uniform(0, 2 * np.pi)
    slope = (dx * math.cos(axis) + dy * math.sin(axis)) / radius
    centre = np.clip(1 - np.hypot(dx, dy) / radius, 0, 1)
    base = lab.copy()
    base[..., 0] = (max(L - _lerp(rng.uniform(18, 30), rng.uniform(25, 40), mc), _lerp(0.55, 0.45, mc) * L)
                    - 4 * (1 - mc) * centre + 6 * mc * slope)
    base[..., 1] = skin[1] + _lerp(rng.uniform(4, 10), rng.uniform(3, 10), mc)
    base[..., 2] = skin[2] + _lerp(rng.uniform(4, 12), rng.uniform(2, 10), mc)
    lab += mask[..., None] * (base - lab)
    colours = {"blue-grey": (min(L - 10, 50), 0.0, -6.0), "black": (10.0, 2.0, 3.0),
               "red": (min(L - 5, 50), 30.0, 18.0)}
    for name in rng.permutation(list(colours))[:rng.integers(2, 4)]:
        field = _lowfreq(rng, size, 5)
        _blend(lab, colours[name], mc * mask * _sigmoid((field - rng.uniform(0.2, 0.7)) / 0.25))
    # Mottled pigment inside the lesion.
    lab[..., 0] -= 4 * mc * mask * np.abs(_lowfreq(rng, size, 20))

    hair = _hairs(rng, size)
    if hair is not None:
        _blend(lab, (rng.uniform(8, 22), rng.uniform(0, 4), rng.uniform(0, 6)), hair)

    rgb = tone.lab_to_srgb(lab)
    if rng.random() < 0.6:
        # Dermoscope vignette: the round field of view leaves the corners near black.
        radius, soft = rng.uniform(1.0, 1.35), rng.uniform(0.01, 0.03)
        rgb *= (0.03 + 0.97 * _sigmoid((radius - np.hypot(xx, yy)) / soft))[..., None]
    return (rgb * 255 + 0.5).astype(np.uint8)


def _check_args(num_images, image_size, malignant_fraction, seed, difficulty, test_per_tone) -> None:
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
    if difficulty not in DIFFICULTIES:
        raise UserError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    if not whole(test_per_tone) or not 0 <= test_per_tone <= (MAX_IMAGES - num_images) // len(TONE_GROUPS):
        raise UserError(f"test_per_tone must be an integer >= 0 (0: no test set) with every id below "
                        f"{FIRST_ID + MAX_IMAGES}, got {test_per_tone!r}")


def _fresh(out: Path, what: str) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"{what} {out} already exists and is not an empty folder; "
                        "give a new path or remove it")


def _write(out: Path, items: list[dict], image_size: int, dark_pigment: bool, bar) -> None:
    """Paint `items` (name, patient, rng, severity, malignant) into the new folder `out`, built beside
    it and renamed into place: an interrupted run never leaves a set that looks complete under the
    real name."""
    half = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size * 2 - 1
    xx, yy = np.meshgrid(half, half)  # (H, W) pixel centres in [-1, 1]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a data set is read like any folder
        (tmp / "train").mkdir()
        gt_rows, truth_rows = [], []
        for it in items:
            pat, rng, malignant = it["patient"], it["rng"], it["malignant"]
            Image.fromarray(draw_image(rng, pat["lab"], it["severity"], xx, yy, dark_pigment)).save(
                tmp / "train" / f"{it['name']}.jpg", quality=JPEG_QUALITY)
            site = _pick(rng, SITES)
            diagnosis = "melanoma" if malignant else _pick(rng, BENIGN_DIAGNOSES)
            gt_rows.append((it["name"], pat["id"], pat["sex"], pat["age"], site, diagnosis,
                            "malignant" if malignant else "benign", int(malignant)))
            truth_rows.append((it["name"], f"{pat['ita']:.2f}", tone.band(pat["ita"]),
                               tone.fitzpatrick(pat["ita"]), f"{it['severity']:.4f}", int(malignant)))
            if bar is not None:
                bar.update()
        for fname, header, rows in ((GROUND_TRUTH, HEADER, gt_rows),
                                    (TRUTH, TRUTH_HEADER, truth_rows)):
            with open(tmp / fname, "w", newline="") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(header)
                w.writerows(rows)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _training_items(num_images, malignant_fraction, seed, difficulty) -> list[dict]:
    patient_of = _patients(num_images, seed)
    labels = _labels(num_images, malignant_fraction, seed)
    tones = "uniform" if difficulty == "easy" else "isic"
    patients = []
    for p in range(int(patient_of[-1]) + 1):
        patients.append({**_patient(np.random.default_rng((seed, _PATIENT, p)), tones),
                         "id": f"IP_{FIRST_ID + p:07d}"})
    items = []
    for i in range(num_images):
        rng = np.random.default_rng((seed, _IMAGE, i))
        malignant = bool(labels[i])
        items.append({"name": f"ISIC_{FIRST_ID + i:07d}", "patient": patients[patient_of[i]], "rng": rng,
                      "malignant": malignant, "severity": severity(rng, malignant, difficulty)})
    return items


def _test_items(per_tone, malignant_fraction, seed, difficulty, first_image, first_patient) -> list[dict]:
    """`per_tone` images for every TONE_GROUPS group, one per patient, round(per_tone * fraction)
    malignant in each; ids continue after the training set's, so both ingest together."""
    items = []
    for g, (_, lo, hi) in enumerate(TONE_GROUPS):
        labels = _labels(per_tone, malignant_fraction, seed + 7919 * (g + 1))
        for j in range(per_tone):
            k = g * per_tone + j
            rng = np.random.default_rng((seed, _TEST, k))
            pat = {**_patient(rng, (lo + MARGIN, hi - MARGIN)), "id": f"IP_{first_patient + k:07d}"}
            malignant = bool(labels[j])
            items.append({"name": f"ISIC_{first_image + k:07d}", "patient": pat, "rng": rng,
                          "malignant": malignant, "severity": severity(rng, malignant, difficulty)})
    return items


def test_folder(out) -> Path:
    """Where `run` writes the test set of `out`: beside it, so ingesting `out` never takes it in."""
    out = Path(out).absolute()
    return out.with_name(out.name + "-test")


def run(out, num_images: int = SynthConfig.num_images, image_size: int = SynthConfig.image_size,
        malignant_fraction: float = SynthConfig.malignant_fraction, seed: int = SynthConfig.seed,
        difficulty: str = SynthConfig.difficulty, test_per_tone: int = SynthConfig.test_per_tone,
        progress: bool = True) -> dict:
    """Write a synthetic ISIC 2020 set into the new folder `out` and, with test_per_tone > 0, a test
    set with that many images per skin-tone group into `test_folder(out)`; return a summary dict."""
    _check_args(num_images, image_size, malignant_fraction, seed, difficulty, test_per_tone)
    out = Path(out).absolute()
    _fresh(out, "out")
    test_out = test_folder(out) if test_per_tone else None
    if test_out is not None:
        _fresh(test_out, "the test set's folder")
    start = time.perf_counter()
    items = _training_items(num_images, malignant_fraction, seed, difficulty)
    n_patients = len({it["patient"]["id"] for it in items})
    tests = (_test_items(test_per_tone, malignant_fraction, seed, difficulty, FIRST_ID + num_images,
                         FIRST_ID + n_patients) if test_out is not None else [])
    bar = None
    if progress:
        from tqdm import tqdm  # only needed when someone watches

        bar = tqdm(total=len(items) + len(tests), desc="synth", unit="img")
    try:
        _write(out, items, image_size, difficulty == "isic", bar)
        if test_out is not None:
            _write(test_out, tests, image_size, difficulty == "isic", bar)
    finally:
        if bar is not None:
            bar.close()
    n_mal = sum(it["malignant"] for it in items)
    groups = [tone.group_from_ita(it["patient"]["ita"]) for it in items]
    summary = {"out": str(out), "num_images": num_images, "benign": num_images - n_mal,
               "malignant": n_mal, "patients": n_patients, "difficulty": difficulty,
               "tone_groups": {g: groups.count(g) for g in tone.GROUPS},
               "test_out": str(test_out) if test_out is not None else None, "test_images": len(tests),
               "seconds": round(time.perf_counter() - start, 3)}
    return summary
