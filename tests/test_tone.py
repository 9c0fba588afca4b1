import ast
import math
from pathlib import Path

import numpy as np
import pytest

from cnd_ray.data import tone


def skin_image(target_ita, size=256, b=15.0, a=10.0):
    """A flat uint8 skin image of the given ITA, and the ITA its quantised colour really has."""
    lab = [50 + b * math.tan(math.radians(target_ita)), a, b]
    rgb = np.round(tone.lab_to_srgb(lab) * 255).astype(np.uint8)
    L, _, b_q = tone.srgb_to_lab(rgb)
    return np.broadcast_to(rgb, (size, size, 3)).copy(), tone.ita(L, b_q)


def test_srgb_lab_round_trip():
    rgb = np.random.default_rng(0).random((1000, 3))
    np.testing.assert_allclose(tone.lab_to_srgb(tone.srgb_to_lab(rgb)), rgb, atol=1e-9)
    u8 = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    back = np.round(tone.lab_to_srgb(tone.srgb_to_lab(u8)) * 255)
    np.testing.assert_array_equal(back, u8)


def test_known_colours():
    np.testing.assert_allclose(tone.srgb_to_lab(np.array([255, 255, 255], np.uint8)), [100, 0, 0],
                               atol=1e-3)
    np.testing.assert_allclose(tone.srgb_to_lab([0.0, 0.0, 0.0]), [0, 0, 0], atol=1e-9)
    grey = tone.srgb_to_lab(np.array([128, 128, 128], np.uint8))
    assert grey[0] == pytest.approx(53.59, abs=0.01) and abs(grey[1]) < 1e-3 and abs(grey[2]) < 1e-3
    # Published CIELAB (D65) of sRGB red.
    np.testing.assert_allclose(tone.srgb_to_lab(np.array([255, 0, 0], np.uint8)),
                               [53.24, 80.09, 67.20], atol=0.02)


def test_lab_to_srgb_clips_out_of_gamut():
    rgb = tone.lab_to_srgb([[50, 120, -120], [110, 0, 0], [-5, 0, 0]])
    assert rgb.min() >= 0 and rgb.max() <= 1


def test_ita_values():
    assert tone.ita(70, 20) == pytest.approx(45)
    assert tone.ita(30, 20) == pytest.approx(-45)
    assert tone.ita(60, 0) == 90 and tone.ita(40, 0) == -90 and tone.ita(50, 0) == 0
    assert tone.ita(60, -10) == pytest.approx(math.degrees(math.atan(10 / -10)))  # atan semantics
    assert math.isnan(tone.ita(math.nan, 10)) and math.isnan(tone.ita(60, math.nan))
    np.testing.assert_allclose(tone.ita(np.array([70, 30]), np.array([20, 20])), [45, -45])


@pytest.mark.parametrize("value,band,fitz", [
    (70, "very_light", 1), (55.01, "very_light", 1), (55, "light", 2), (41.01, "light", 2),
    (41, "intermediate", 3), (28.01, "intermediate", 3), (28, "tan", 4), (19.01, "tan", 4),
    (19, "tan", 5), (10.01, "tan", 5), (10, "brown", 6), (-29.99, "brown", 6), (-30, "dark", 6),
    (-90, "dark", 6), (-math.inf, "dark", 6), (math.inf, "very_light", 1),
    (math.nan, "unknown", 0),
])
def test_band_and_fitzpatrick_boundaries(value, band, fitz):
    assert tone.band(value) == band
    assert tone.fitzpatrick(value) == fitz


def test_band_names():
    assert [n for n, _ in tone.BANDS] == ["very_light", "light", "intermediate", "tan", "brown",
                                          "dark"]


@pytest.mark.parametrize("target", [-50, -30, -10, 0, 10, 30, 50, 65])
def test_estimate_ita_on_flat_skin(target):
    img, truth = skin_image(target)
    assert truth == pytest.approx(target, abs=1.5)
    assert tone.estimate_ita(img) == pytest.approx(truth, abs=1e-6)


def _dermoscopy(img, rng):
    """Add what the estimator must ignore: a dark central lesion, black corners and hairs."""
    size = img.shape[0]
    yy, xx = np.mgrid[:size, :size] / (size / 2) - 1
    out = img.astype(np.float64)
    out[np.hypot(xx - 0.15, yy) < 0.65] = [60, 35, 25]  # large dark-brown lesion, off centre
    for _ in range(10):  # straight hairs crossing the image, 2 px wide
        (x0, y0), (x1, y1) = rng.uniform(0, size, (2, 2))
        t = np.linspace(0, 1, 4 * size)
        xs, ys = (x0 + t * (x1 - x0)).astype(int), (y0 + t * (y1 - y0)).astype(int)
        for d in (0, 1):
            out[np.clip(ys + d, 0, size - 1), xs] = [40, 30, 25]
    # Dermoscope field of view: a soft-edged circle, near black in the corners and mid-edges.
    out *= np.clip((1.02 - np.hypot(xx, yy)) / 0.12, 0.02, 1)[..., None]
    out += rng.normal(0, 2, out.shape)  # sensor noise
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("target", [-45, -15, 5, 25, 45, 65])
def test_estimate_ita_ignores_lesion_vignette_and_hairs(target):
    img, truth = skin_image(target)
    noisy = _dermoscopy(img, np.random.default_rng(target + 100))
    assert tone.estimate_ita(noisy) == pytest.approx(truth, abs=2.0)


def test_estimate_ita_without_skin_is_nan():
    assert math.isnan(tone.estimate_ita(np.zeros((256, 256, 3), np.uint8)))
    assert math.isnan(tone.estimate_ita(np.full((8, 8, 3), 200, np.uint8)))  # too small for patches


@pytest.mark.parametrize("rgb", [(128, 128, 128), (200, 200, 200), (255, 255, 255), (40, 40, 40),
                                 (255, 0, 0), (0, 0, 255), (0, 200, 0), (255, 255, 0)])
def test_images_without_skin_pixels_have_unknown_tone(rgb):
    """Flat grey had ITA 90 ("very_light"); saturated colours are no skin either."""
    img = np.broadcast_to(np.array(rgb, np.uint8), (64, 64, 3)).copy()
    value = tone.estimate_ita(img)
    assert math.isnan(value) and tone.band(value) == "unknown" and tone.fitzpatrick(value) == 0


def test_a_dark_frame_around_grey_is_unknown_and_skin_inside_a_frame_is_measured():
    grey = np.full((128, 128, 3), 150, np.uint8)
    yy, xx = np.mgrid[:128, :128] / 64 - 1
    grey[np.hypot(xx, yy) > 0.9] = 5  # dermoscope frame
    assert tone.band(tone.estimate_ita(grey)) == "unknown"
    img, truth = skin_image(20, size=128)
    img[np.hypot(xx, yy) > 0.9] = 5
    assert tone.estimate_ita(img) == pytest.approx(truth, abs=1e-6)


def test_estimate_ita_any_size():
    img, truth = skin_image(30, size=200)
    assert tone.estimate_ita(img[:, :150]) == pytest.approx(truth, abs=1e-6)


def test_tone_needs_numpy_only():
    tree = ast.parse(Path(tone.__file__).read_text())
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert mods <= {"__future__", "math", "numpy"}  # ingest workers import it per image batch
