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
        # float32, in place: with temporaries a 9000x9000 16-bit scan peaked at 0.9 GB, now 0.4 GB.
        arr = np.array(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr *= 255.0 / top
        arr += 0.5
        arr = np.clip(arr, 0, 255, out=arr).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        img = img.convert("RGBA")  # resolve palettes with transparency first
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, RGBA (alpha dropped)


def load(data: bytes, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded bytes -> ((size, size, 3) uint8, original (width, height) after EXIF orientation).

    The centre square of the short side, resized to `size`. Big JPEGs are decoded at a reduced DCT
    scale (Image.draft), still at least `size` on the short side: a 6000x4000 photo decodes at 1/8
    the pixels, which is most of ingest's speed. Memory is bounded whatever the aspect ratio: the
    decoded image by MAX_PIXELS, the output by size x size (the square is cut out inside the resize,
    never resized whole first: a 1x20000 PNG at 256 px would otherwise become 256x5120000, 3.9 GB).
    A MemoryError while decoding one image makes it a reject, not a failed task.
    """
    if not data:
        raise BadImage("empty file: 0 bytes")
    try:
        return _load(data, size)
    except MemoryError:
        raise BadImage("out of memory: decoding this image exhausted the task's memory") from None


def _load(data: bytes, size: int) -> tuple[np.ndarray, tuple[int, int]]:
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
    w, h = img.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    img = img.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8), orig


def encode_png(arr: np.ndarray) -> bytes:
    """Lossless storage: the DiT trains on exactly what was ingested."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Stored PNG bytes -> (H, W, 3) uint8."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)
