"""Decode any image file into the training resolution (PIL + numpy; no torch, no ray)."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL warns above ~89M pixels and refuses above twice that; we refuse at its warning, because a
# real dermoscope photo is at most ~36M pixels (6000x6000) and a bigger one is a hostile file.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


class BadImage(ValueError):
    """An input that cannot be ingested; the message is `category: detail` for rejects.csv."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, keeping 16-bit and float images' full range."""
    if img.mode in ("RGB",):
        return img
    if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit integer or float greyscale
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        img = img.convert("RGBA")  # resolve palettes with transparency first
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, RGBA (alpha dropped)


def load(data: bytes, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded bytes -> ((size, size, 3) uint8, original (width, height) after EXIF orientation).

    Resize the short side to `size` and centre-crop. Big JPEGs are decoded at a reduced DCT scale
    (Image.draft), still at least `size` on the short side: a 6000x4000 photo decodes at 1/8 the
    pixels, which is most of ingest's speed.
    """
    if not data:
        raise BadImage("empty file: 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise BadImage(f"too large: {w}x{h} pixels exceeds {MAX_PIXELS} (decompression bomb guard)")
            orientation = img.getexif().get(0x0112, 1)
            if img.format == "JPEG":
                img.draft("RGB", (size, size))
            img.load()
            img = ImageOps.exif_transpose(img)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image: no decoder recognises the file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"too large: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports truncated data as OSError
        kind = "truncated image" if "truncated" in str(e).lower() else "not an image"
        raise BadImage(f"{kind}: {e}") from None
    orig = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    img = _to_rgb(img)
    scale = size / min(img.size)
    new = (max(size, round(img.size[0] * scale)), max(size, round(img.size[1] * scale)))
    img = img.resize(new, Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8), orig


def encode_png(arr: np.ndarray) -> bytes:
    """Lossless storage: the DiT trains on exactly what was ingested."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Stored PNG bytes -> (H, W, 3) uint8."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)
