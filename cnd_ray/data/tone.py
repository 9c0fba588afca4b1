"""Skin tone from the Individual Typology Angle (ITA) of the skin around a lesion.

ITA = atan((L* - 50) / b*) in degrees, from CIELAB (D65). Dermoscopy sets carry no skin-tone
label, so we estimate it from skin patches in a band along the image border, away from the
(roughly central) lesion, after dropping the dark dermoscope vignette, hairs and lesion pixels.
Bands follow Chardon/Del Bino; the Fitzpatrick mapping is the one in DATA.md.
numpy only: it runs once per image during ingest (about 1 ms for 256 x 256).
"""
from __future__ import annotations

import math

import numpy as np

# (name, exclusive lower bound in degrees), lightest first; nan falls into UNKNOWN.
BANDS = (("very_light", 55.0), ("light", 41.0), ("intermediate", 28.0), ("tan", 10.0),
         ("brown", -30.0), ("dark", -math.inf))
UNKNOWN = "unknown"
# (Fitzpatrick type, exclusive lower bound); 0 means unknown.
FITZPATRICK = ((1, 55.0), (2, 41.0), (3, 28.0), (4, 19.0), (5, 10.0), (6, -math.inf))
GROUPS = ("I-II", "III-IV", "V-VI")  # Fitzpatrick types in pairs, as DDI labels them; lightest first

# sRGB primaries to XYZ (D65), rows divided by the reference white so white maps to (1, 1, 1).
_WHITE = np.array([0.95047, 1.0, 1.08883])
_RGB2XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                     [0.2126729, 0.7151522, 0.0721750],
                     [0.0193339, 0.1191920, 0.9503041]]) / _WHITE[:, None]
_XYZ2RGB = np.linalg.inv(_RGB2XYZ)
_DELTA = 6.0 / 29.0

# Estimator geometry: the outer RING rings of a GRID x GRID patch grid (the outer quarter of the
# image on each side), every STRIDE-th pixel. One ring is too little skin: texture dominates.
GRID = 8
RING = 2
STRIDE = 2
BLACK_L = 10.0  # L* below this is vignette or hair, never skin, even the darkest
SHADE_L = 10.0  # pixels this much darker than the bright skin are lesion, hair or vignette edge
MIN_SKIN = 0.5  # a patch needs this share of skin pixels to count
# Skin is yellowish-red at any depth of tone: b* of real skin is about 5-30 and its chroma below
# ~40. A neutral pixel (grey, white, a flat or blown-out frame; b* ~ 0, whose ITA would be 90, "very
# light") or a saturated one (a pure red, blue or green; chroma 80-130) is not skin.
MIN_B = 4.0
MAX_CHROMA = 50.0


def _decode(c: np.ndarray) -> np.ndarray:
    """sRGB-encoded [0, 1] -> linear light."""
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _encode(c: np.ndarray) -> np.ndarray:
    """Linear light [0, 1] -> sRGB-encoded."""
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)


# Decoding a uint8 image is a table lookup: much faster than the power per pixel.
_DECODE_U8 = _decode(np.arange(256) / 255.0)


def _f(t: np.ndarray) -> np.ndarray:
    return np.where(t > _DELTA ** 3, np.cbrt(t), t / (3 * _DELTA ** 2) + 4.0 / 29.0)


def _finv(t: np.ndarray) -> np.ndarray:
    return np.where(t > _DELTA, t ** 3, 3 * _DELTA ** 2 * (t - 4.0 / 29.0))


def _linear(rgb) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        return _DECODE_U8[rgb]
    if np.issubdtype(rgb.dtype, np.integer):
        return _decode(rgb / 255.0)
    return _decode(rgb.astype(np.float64))


def srgb_to_lab(rgb) -> np.ndarray:
    """sRGB (..., 3), uint8 0-255 or float 0-1, to CIELAB D65 float64 (..., 3)."""
    fx, fy, fz = np.moveaxis(_f(_linear(rgb) @ _RGB2XYZ.T), -1, 0)
    return np.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], axis=-1)


def lab_to_srgb(lab) -> np.ndarray:
    """CIELAB D65 (..., 3) to float sRGB in [0, 1] (out-of-gamut colours clipped)."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16) / 116
    xyz = np.stack([_finv(fy + lab[..., 1] / 500), _finv(fy), _finv(fy - lab[..., 2] / 200)], -1)
    return np.clip(_encode(np.clip(xyz @ _XYZ2RGB.T, 0.0, 1.0)), 0.0, 1.0)


def ita(L, b):
    """ITA in degrees, atan((L - 50) / b); at b == 0 it is +-90 (0 at L == 50); nan stays nan."""
    L, b = np.asarray(L, dtype=np.float64), np.asarray(b, dtype=np.float64)
    # atan2 on (sign(b) * (L - 50), |b|) equals atan((L - 50) / b) for b != 0, without the division.
    s = np.where(b < 0, -1.0, 1.0)
    out = np.degrees(np.arctan2(s * (L - 50), np.abs(b)))
    return float(out) if out.ndim == 0 else out


def estimate_ita(rgb: np.ndarray) -> float:
    """ITA of the skin around the lesion in an (H, W, 3) uint8 image; nan when no skin is usable."""
    sub = rgb[::STRIDE, ::STRIDE]
    h, w = sub.shape[0] // GRID, sub.shape[1] // GRID
    if h == 0 or w == 0:
        return math.nan
    # (GRID, GRID, h, w, 3): patches on a grid; then keep the outer rings.
    grid = sub[:h * GRID, :w * GRID].reshape(GRID, h, GRID, w, 3)
    ring = np.ones((GRID, GRID), bool)
    ring[RING:-RING, RING:-RING] = False
    px = grid.transpose(0, 2, 1, 3, 4)[ring].reshape(int(ring.sum()), -1, 3)  # (P, n, 3)
    xyz = _f(_DECODE_U8[px] @ _RGB2XYZ.T)  # (P, n, 3)
    L = 116 * xyz[..., 1] - 16
    a = 500 * (xyz[..., 0] - xyz[..., 1])
    b = 200 * (xyz[..., 1] - xyz[..., 2])
    skin = (L >= BLACK_L) & (b >= MIN_B) & (np.hypot(a, b) <= MAX_CHROMA)
    if not skin.any():
        return math.nan
    # The brightest pixels are skin (lesion, hair and vignette only darken): measure from them.
    skin &= L >= np.percentile(L[skin], 90) - SHADE_L
    usable = skin.mean(axis=1) >= MIN_SKIN
    if not usable.any():
        return math.nan
    # Median per patch, then over patches: nan marks the pixels dropped above.
    L_med = np.nanmedian(np.where(skin, L, np.nan)[usable], axis=1)
    b_med = np.nanmedian(np.where(skin, b, np.nan)[usable], axis=1)
    return float(np.median(ita(L_med, b_med)))


def band(value: float) -> str:
    """Chardon/Del Bino band name of an ITA, "unknown" for nan."""
    if math.isnan(value):
        return UNKNOWN
    return next((name for name, lo in BANDS if value > lo), BANDS[-1][0])


def fitzpatrick(value: float) -> int:
    """Fitzpatrick type 1-6 from an ITA (DATA.md mapping), 0 for nan."""
    if math.isnan(value):
        return 0
    return next((t for t, lo in FITZPATRICK if value > lo), FITZPATRICK[-1][0])


def group_of(fitzpatrick: int) -> str:
    """Fitzpatrick type 1-6 -> its group (GROUPS)."""
    return GROUPS[(fitzpatrick - 1) // 2]


def group_from_ita(ita: float) -> str | None:
    """The Fitzpatrick group of an ITA estimate (DATA.md mapping); None for nan."""
    t = fitzpatrick(ita)
    return group_of(t) if t else None
