"""Miniature copies of the ISIC training-set layouts described in docs/DATA.md.

``build(root)`` writes one small copy of every layout of DATA.md's section
"Training sets: ISIC challenge archives" (ISIC 2016, 2017, 2018 Task 3, the
HAM10000 release, 2019, 2020 in the challenge and the Kaggle layout, and an
ISIC Archive export) under ``root`` and returns an ``Expected`` describing what
a correct ingest must produce from it.  The file is an independent reading of
DATA.md: the ingest (cnd_ray/data) is tested against it, it is not derived from
the ingest.

Layout on disk (pass ``Expected.roots`` -- or ``root`` itself -- to the ingest;
it searches each root recursively):

    root/a/ISIC2016/...      2016 Part 3 (training + test)
    root/a/ISIC2017/...      2017 Part 3 (training + validation + test_v2)
    root/a/ISIC2018/...      2018 Task 3 (training + validation + test)
    root/a/HAM10000/...      HAM10000 release (same images as 2018 training)
    root/b/ISIC2019/...      2019 training
    root/b/ISIC2020/...      2020 challenge layout (train/ + GroundTruth + Duplicates)
    root/c/siim-isic-melanoma-classification/...   2020 Kaggle layout (train.csv + jpeg/train/)
    root/d/isic-archive-export/...                 ISIC Archive export (metadata.csv + images)

Resolution of DATA.md ambiguities (see also the module-level constants):

* "Highest resolution" = largest width * height.  Copies with equal pixel
  counts (HAM10000 vs 2018 Task 3 vs 2019, which are byte-identical) are a tie;
  ``kept`` resolves a tie by SOURCE_ORDER (the earlier source wins, so 2018
  beats ham10000 and isic2019) and ``Expected.ties`` lists every copy that is
  tied at the top, so a test may accept any of them.  All other multi-source
  ids have strictly different sizes (larger in both width and height).
* Rejections are the same in every label mode in this fixture (UNK, plain
  indeterminate and unknown diagnoses have no label in any mode); only the 0/1
  values differ between modes.
* A row with an unrecognised diagnosis spelling is rejected as "unknown
  diagnosis" in every mode, even where benign_malignant/target would give a
  label (2020 ``melanomaa`` is written with benign_malignant=malignant and
  target=1; the Archive row ``basal cell carcinomaa`` with malignant).
* Plain ``indeterminate`` Archive rows are dropped ("no label") in every mode,
  even in melanoma mode where their diagnosis alone would say "not melanoma".
* Archive: melanoma mode labels by ``diagnosis == melanoma``, the malignant
  modes by ``benign_malignant`` (the fixture keeps both consistent).
* Every bad file (empty / text / truncated) has a ground-truth row, so its
  category is unambiguous (the file problem wins over the row).
* The 2018 ground-truth CSVs sit in their own ``..._GroundTruth/`` folders and
  the 2017 metadata CSV inside ``ISIC-2017_Training_Data/``, as in the real
  archives; the search is recursive.
* The HAM10000 metadata carries the optional ``dataset`` column of newer
  releases (DATA.md: "newer releases add a `dataset` column").
* The P / RGBA / I;16 images are PNGs, placed in the Archive export (the only
  layout whose file names DATA.md does not pin to ``.jpg``).
* ``groups`` holds only ids that are ingested (labelled) and only groups of two
  or more; the 2020 ``image_name_2`` files are merged away, so they are in no
  group.  Patient/lesion ids of different sources never collide, except the
  same HAM lesion id written for the same image by HAM10000 and 2019.
* ``origin_split`` is "train" for HAM10000, 2019, 2020 and the Archive.
"""
from __future__ import annotations

import csv
import io
import os
import random
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

MODES = ("melanoma", "malignant", "malignant_ak")
SOURCE_ORDER = ("isic2016", "isic2017", "isic2018", "ham10000", "isic2019", "isic2020", "isic_archive")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
CATEGORIES = {
    "empty file", "not an image", "truncated image", "listed but missing",
    "present but unlabelled", "unknown diagnosis", "no label", "superpixel mask",
}
# Diagnosis codes used internally; label per mode.
_MALIGNANT = {"MEL", "BCC", "SCC"}
_DX_CODES = {"MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "BEN"}  # BEN = benign, unspecified


def _label(dx: str, mode: str) -> int:
    if mode == "melanoma":
        return int(dx == "MEL")
    if mode == "malignant":
        return int(dx in _MALIGNANT)
    return int(dx in _MALIGNANT or dx == "AK")


@dataclass
class Expected:
    roots: list[str]                                   # folders to hand to the ingest
    image_files: set[str]                              # every image-extension file written
    labels: dict[str, dict[str, int]]                  # mode -> canonical id -> 0/1
    kept: dict[str, str]                               # multi-copy canonical id -> kept path
    rejects: dict[str, dict[str, str]]                 # mode -> key -> category
    duplicates: set[str]                               # valid files merged into another copy
    groups: list[set[str]]                             # ids sharing patient_id / lesion_id
    sources: dict[str, str]                            # canonical id -> source of kept copy
    origin_split: dict[str, str]                       # canonical id -> train/val/test of kept copy
    modes: dict[str, str]                              # path -> PIL mode written (odd modes)
    exif_rotated: str                                  # path of the EXIF-oriented JPEG
    exif_size: tuple[int, int]                         # its (width, height) after exif_transpose
    # Extras (not required by the brief, useful for tests):
    paths: dict[str, str] = field(default_factory=dict)          # every labelled id -> ingested path
    ties: dict[str, set[str]] = field(default_factory=dict)      # id -> copies tied at max resolution
    all_sources: dict[str, set[str]] = field(default_factory=dict)  # id -> every source holding it
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # labelled id -> stored (w, h) of kept copy
    gt_rows: dict[str, str | None] = field(default_factory=dict)  # "csv#raw_id" -> image path or None


@dataclass
class _Copy:
    cid: str
    path: str
    source: str
    split: str
    dx: str
    size: tuple[int, int]


class _Builder:
    """Accumulates what each layout writes; ``finish`` turns it into an Expected."""

    def __init__(self, root: Path):
        self.root = root
        self.files: set[str] = set()
        self.copies: list[_Copy] = []
        self.rejects: dict[str, str] = {}
        self.forced_dups: set[str] = set()
        self.links: list[tuple[str, str]] = []  # (canonical id, "patient:..." / "lesion:...")
        self.modes: dict[str, str] = {}
        self.gt_rows: dict[str, str | None] = {}
        self.exif: tuple[str, tuple[int, int]] | None = None

    # -- files ---------------------------------------------------------------
    def image(self, path: Path, size: tuple[int, int], seed: str, mode: str = "RGB",
              base: tuple[int, int] | None = None) -> str:
        """Write a lesion-like picture.  ``base``: draw at that size and resize
        (so lower-resolution copies of one image really are the same image)."""
        im = _lesion(base or size, seed)
        if base and base != size:
            im = im.resize(size, Image.Resampling.LANCZOS)
        path.parent.mkdir(parents=True, exist_ok=True)
        if mode == "RGB":
            pass
        elif mode == "L":
            im = im.convert("L")
        elif mode == "CMYK":
            im = im.convert("CMYK")
        elif mode == "P":
            im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        elif mode == "RGBA":
            im = im.convert("RGBA")
            im.putalpha(Image.linear_gradient("L").resize(size))
        elif mode == "I;16":
            gray = im.convert("L")
            im = Image.frombytes("I;16", size, b"".join(
                (v * 257).to_bytes(2, "little") for v in gray.tobytes()))
        else:
            raise ValueError(mode)
        if mode != "RGB":
            self.modes[str(path)] = mode
        fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
        im.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        return self._add(path)

    def same_bytes(self, src: str, path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)
        return self._add(path)

    def raw(self, path: Path, data: bytes) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return self._add(path) if path.suffix.lower() in IMAGE_EXTS else str(path)

    def _add(self, path: Path) -> str:
        self.files.add(str(path))
        return str(path)

    # -- bookkeeping ----------------------------------------------------------
    def copy(self, cid: str, path: str, source: str, split: str, dx: str, size) -> None:
        assert dx in _DX_CODES, dx
        self.copies.append(_Copy(cid, path, source, split, dx, tuple(size)))

    def row(self, csv_path: Path, raw_id: str, path: str | None) -> None:
        key = f"{csv_path}#{raw_id}"
        assert key not in self.gt_rows, key
        self.gt_rows[key] = path
        if path is None:
            # DATA.md fact: a ground-truth row may name an image that is not on disk.
            self.rejects[key] = "listed but missing"

    def reject(self, key: str, category: str) -> None:
        assert category in CATEGORIES and key not in self.rejects, (key, category)
        self.rejects[key] = category

    def link(self, cid: str, kind: str, value: str) -> None:
        if value:
            self.links.append((cid, f"{kind}:{value}"))

    # -- result ---------------------------------------------------------------
    def finish(self, roots: list[Path]) -> Expected:
        by_id: dict[str, list[_Copy]] = {}
        for c in self.copies:
            by_id.setdefault(c.cid, []).append(c)
        paths, kept, ties, all_sources, sources, origin, sizes = {}, {}, {}, {}, {}, {}, {}
        duplicates = set(self.forced_dups)
        labels = {m: {} for m in MODES}
        for cid, cs in sorted(by_id.items()):
            # Sources agree on the label in every mode (2016 "benign" = BEN vs 2019 NV is fine).
            assert all(len({_label(c.dx, m) for c in cs}) == 1 for m in MODES), (cid, [c.dx for c in cs])
            best = max(c.size[0] * c.size[1] for c in cs)
            top = [c for c in cs if c.size[0] * c.size[1] == best]
            win = min(top, key=lambda c: SOURCE_ORDER.index(c.source))
            paths[cid] = win.path
            sources[cid] = win.source
            origin[cid] = win.split
            sizes[cid] = win.size
            all_sources[cid] = {c.source for c in cs}
            if len(cs) > 1:
                kept[cid] = win.path
                duplicates |= {c.path for c in cs if c is not win}
            if len(top) > 1:
                ties[cid] = {c.path for c in top}
            for m in MODES:
                labels[m][cid] = _label(win.dx, m)
        groups = _union_groups(self.links, set(paths))
        assert self.exif is not None
        return Expected(
            roots=[str(r) for r in roots],
            image_files=set(self.files),
            labels=labels,
            kept=kept,
            rejects={m: dict(self.rejects) for m in MODES},
            duplicates=duplicates,
            groups=groups,
            sources=sources,
            origin_split=origin,
            modes=dict(self.modes),
            exif_rotated=self.exif[0],
            exif_size=self.exif[1],
            paths=paths,
            ties=ties,
            all_sources=all_sources,
            sizes=sizes,
            gt_rows=dict(self.gt_rows),
        )


def _union_groups(links: list[tuple[str, str]], ingested: set[str]) -> list[set[str]]:
    parent: dict[str, str] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for cid, key in links:
        if cid in ingested:
            parent[find("id:" + cid)] = find(key)
    comps: dict[str, set[str]] = {}
    for cid in ingested:
        if "id:" + cid in parent:
            comps.setdefault(find("id:" + cid), set()).add(cid)
    return sorted((g for g in comps.values() if len(g) > 1), key=lambda g: sorted(g))


def _lesion(size: tuple[int, int], seed: str) -> Image.Image:
    """Deterministic skin-coloured picture with a dark blob and speckle."""
    rnd = random.Random(zlib.crc32(seed.encode()))
    w, h = size
    skin = (rnd.randint(170, 235), rnd.randint(120, 185), rnd.randint(95, 150))
    im = Image.new("RGB", size, skin)
    d = ImageDraw.Draw(im)
    cx, cy = w / 2 + rnd.uniform(-w / 8, w / 8), h / 2 + rnd.uniform(-h / 8, h / 8)
    rx, ry = w * rnd.uniform(0.15, 0.3), h * rnd.uniform(0.15, 0.3)
    dark = tuple(int(c * rnd.uniform(0.25, 0.55)) for c in skin)
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=dark)
    d.ellipse([cx - rx / 2, cy - ry / 3, cx + rx / 3, cy + ry / 2], fill=tuple(c // 2 for c in dark))
    for _ in range(w * h // 12):
        v = rnd.randint(-25, 25)
        d.point((rnd.randrange(w), rnd.randrange(h)), fill=tuple(max(0, min(255, c + v)) for c in skin))
    return im


def _noise_jpeg(size: tuple[int, int], seed: str) -> bytes:
    rnd = random.Random(zlib.crc32(seed.encode()))
    im = Image.frombytes("RGB", size, rnd.randbytes(size[0] * size[1] * 3))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _write_csv(path: Path, header: list[str] | None, rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        if header is not None:
            w.writerow(header)
        w.writerows(rows)
    return path


def one_hot(cols: list[str], hot: str) -> list[str]:
    return ["1.0" if c == hot else "0.0" for c in cols]


# Sizes of the images shared between 2016, 2017 and 2019 (2019 copies are the
# "_downsampled" ones: always smaller; for 0000006 the 2017 copy beats 2016).
_SHARED = {
    # id:          (2016 size,  2017 size,  2019 size)
    "ISIC_0000001": ((100, 80), (90, 70), (50, 40)),
    "ISIC_0000003": ((88, 66), None, (44, 33)),
    "ISIC_0000006": ((60, 45), (110, 82), (55, 41)),
    "ISIC_0000010": (None, (100, 75), (50, 37)),
}


def _base(cid: str) -> tuple[int, int]:
    return max((s for s in _SHARED[cid] if s), key=lambda s: s[0] * s[1])


# ---------------------------------------------------------------------------
# ISIC 2016
# ---------------------------------------------------------------------------
def _isic2016(b: _Builder, top: Path) -> None:
    tr, te = top / "ISBI2016_ISIC_Part3_Training_Data", top / "ISBI2016_ISIC_Part3_Test_Data"
    # DATA.md: training GT has no header and labels as words benign/malignant
    # ("malignant" means melanoma in 2016).
    train = [("ISIC_0000000", "benign", (96, 72)), ("ISIC_0000001", "malignant", None),
             ("ISIC_0000002", "benign", (80, 60)), ("ISIC_0000004", "malignant", (70, 90)),
             ("ISIC_0000006", "benign", None)]
    gt = top / "ISBI2016_ISIC_Part3_Training_GroundTruth.csv"
    for cid, word, size in train:
        if size is None:  # shared with 2017/2019: drawn from the common base image
            size = _SHARED[cid][0]
            p = b.image(tr / f"{cid}.jpg", size, cid, base=_base(cid))
        else:
            p = b.image(tr / f"{cid}.jpg", size, cid)
        b.copy(cid, p, "isic2016", "train", "MEL" if word == "malignant" else "BEN", size)
        b.row(gt, cid, p)
    _write_csv(gt, None, [[cid, word] for cid, word, _ in train])
    # Non-image file in an image folder: must simply be ignored.
    b.raw(tr / "README.txt", b"ISBI 2016 Part 3 training images\n")

    # DATA.md: test GT is headerless too but writes the label as a float string.
    test = [("ISIC_0000003", "0.0", None), ("ISIC_0000005", "1.0", (64, 48))]
    gt = top / "ISBI2016_ISIC_Part3_Test_GroundTruth.csv"
    for cid, val, size in test:
        if size is None:
            size = _SHARED[cid][0]
            p = b.image(te / f"{cid}.jpg", size, cid, base=_base(cid))
        else:
            p = b.image(te / f"{cid}.jpg", size, cid)
        b.copy(cid, p, "isic2016", "test", "MEL" if val == "1.0" else "BEN", size)
        b.row(gt, cid, p)
    _write_csv(gt, None, [[cid, val] for cid, val, _ in test])


# ---------------------------------------------------------------------------
# ISIC 2017
# ---------------------------------------------------------------------------
def _isic2017(b: _Builder, top: Path) -> None:
    header = ["image_id", "melanoma", "seborrheic_keratosis"]
    # DATA.md: float values; melanoma=1.0 -> MEL, seborrheic_keratosis=1.0 -> SK, both 0 -> nevus.
    dx_of = {("1.0", "0.0"): "MEL", ("0.0", "1.0"): "BKL", ("0.0", "0.0"): "NV"}
    splits = {
        "Training": ("train", [("ISIC_0000001", "1.0", "0.0", None),
                               ("ISIC_0000006", "0.0", "0.0", None),
                               ("ISIC_0000010", "0.0", "1.0", None),
                               ("ISIC_0000011", "1.0", "0.0", (84, 63)),
                               ("ISIC_0000012", "0.0", "0.0", (76, 57))]),
        "Validation": ("val", [("ISIC_0001769", "0.0", "0.0", (72, 54)),
                               ("ISIC_0001852", "1.0", "0.0", (80, 60))]),
        "Test_v2": ("test", [("ISIC_0012086", "0.0", "1.0", (90, 68)),
                             ("ISIC_0012092", "0.0", "0.0", (66, 50))]),
    }
    for name, (split, rows) in splits.items():
        folder = top / f"ISIC-2017_{name}_Data"
        gt = top / f"ISIC-2017_{name}_Part3_GroundTruth.csv"
        for cid, mel, sk, size in rows:
            if size is None:
                size = _SHARED[cid][1]
                p = b.image(folder / f"{cid}.jpg", size, cid, base=_base(cid))
            else:
                p = b.image(folder / f"{cid}.jpg", size, cid)
            b.copy(cid, p, "isic2017", split, dx_of[(mel, sk)], size)
            b.row(gt, cid, p)
        _write_csv(gt, header, [[cid, mel, sk] for cid, mel, sk, _ in rows])

    tr = top / "ISIC-2017_Training_Data"
    # DATA.md: the training folder also holds ISIC_xxxxxxx_superpixels.png (not lesion images).
    for cid in ("ISIC_0000001", "ISIC_0000010", "ISIC_0000011"):
        size = _SHARED[cid][1] if cid in _SHARED else (84, 63)
        p = tr / f"{cid}_superpixels.png"
        rnd = random.Random(zlib.crc32(p.name.encode()))
        im = Image.frombytes("RGB", (size[0] // 8, size[1] // 8), rnd.randbytes((size[0] // 8) * (size[1] // 8) * 3))
        im.resize(size, Image.Resampling.NEAREST).save(p, "PNG")
        b.reject(b._add(p), "superpixel mask")
    # An image in an image folder with no ground-truth row anywhere.
    p = b.image(tr / "ISIC_0000013.jpg", (70, 52), "ISIC_0000013")
    b.reject(p, "present but unlabelled")
    # DATA.md: metadata image_id,age_approximate,sex with `unknown` allowed
    # (the real archive ships it inside the training folder).
    _write_csv(tr / "ISIC-2017_Training_Data_metadata.csv", ["image_id", "age_approximate", "sex"],
               [["ISIC_0000001", "60", "female"], ["ISIC_0000006", "unknown", "unknown"],
                ["ISIC_0000010", "45", "male"], ["ISIC_0000011", "unknown", "female"],
                ["ISIC_0000012", "35", "unknown"]])


# ---------------------------------------------------------------------------
# ISIC 2018 Task 3 and the HAM10000 release (the same images)
# ---------------------------------------------------------------------------
_T3_COLS = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
_T3_DX = {"MEL": "MEL", "NV": "NV", "BCC": "BCC", "AKIEC": "AK", "BKL": "BKL", "DF": "DF", "VASC": "VASC"}
# id, 2018 column, HAM lesion_id, dx_type, age, sex, localization, dataset, HAM part
_HAM = [
    ("ISIC_0024306", "NV", "HAM_0000118", "follow_up", "45.0", "male", "trunk", "vidir_molemax", 1),
    ("ISIC_0024307", "NV", "HAM_0000118", "follow_up", "45.0", "male", "trunk", "vidir_molemax", 1),
    ("ISIC_0024308", "MEL", "HAM_0002730", "histo", "70.0", "female", "back", "vidir_modern", 1),
    ("ISIC_0024309", "AKIEC", "HAM_0005132", "histo", "", "unknown", "face", "rosendahl", 1),
    ("ISIC_0024310", "BCC", "HAM_0002761", "histo", "65.0", "male", "unknown", "rosendahl", 2),
    ("ISIC_0024311", "BKL", "HAM_0000550", "consensus", "80.0", "female", "scalp", "vidir_modern", 2),
    ("ISIC_0024312", "DF", "HAM_0001466", "consensus", "50.0", "female", "lower extremity", "vidir_modern", 2),
    ("ISIC_0024313", "VASC", "HAM_0003033", "confocal", "35.0", "male", "abdomen", "vienna_dog", 2),
]
_T3_SIZE = (80, 60)  # the real 600x450, scaled: all Task 3 / HAM images share one size


def _isic2018(b: _Builder, top: Path) -> dict[str, str]:
    """Returns id -> path of the training images (HAM10000 and 2019 copy them)."""
    header = ["image"] + _T3_COLS
    out = {}
    splits = {
        "Training": ("train", [(cid, col) for cid, col, *_ in _HAM]),
        "Validation": ("val", [("ISIC_0034321", "NV"), ("ISIC_0034322", "BKL"),
                               ("ISIC_0034323", "MEL")]),
        "Test": ("test", [("ISIC_0034524", "BCC"), ("ISIC_0034525", "NV")]),
    }
    missing = {"ISIC_0034323"}  # listed in the validation GT, no file anywhere
    for name, (split, rows) in splits.items():
        folder = top / f"ISIC2018_Task3_{name}_Input"
        # The real ground truth unpacks into its own folder of the same name.
        gt = top / f"ISIC2018_Task3_{name}_GroundTruth" / f"ISIC2018_Task3_{name}_GroundTruth.csv"
        for cid, col in rows:
            if cid in missing:
                b.row(gt, cid, None)
                continue
            p = b.image(folder / f"{cid}.jpg", _T3_SIZE, cid)
            b.copy(cid, p, "isic2018", split, _T3_DX[col], _T3_SIZE)
            b.row(gt, cid, p)
            out[cid] = p
        # DATA.md: one-hot floats, header image,MEL,NV,BCC,AKIEC,BKL,DF,VASC.
        _write_csv(gt, header, [[cid] + one_hot(_T3_COLS, col) for cid, col in rows])
        # DATA.md: the image folder also holds ATTRIBUTION.txt and LICENSE.txt.
        b.raw(folder / "ATTRIBUTION.txt", b"Tschandl P., Rosendahl C. & Kittler H. (2018)\n")
        b.raw(folder / "LICENSE.txt", b"CC BY-NC 4.0\n")
    return out


def _ham10000(b: _Builder, top: Path, t3: dict[str, str]) -> None:
    meta = top / "HAM10000_metadata.csv"
    rows = []
    for cid, col, lesion, dx_type, age, sex, loc, dataset, part in _HAM:
        # Same data set as 2018 Task 3 training: byte-identical copies, same ids.
        p = b.same_bytes(t3[cid], top / f"HAM10000_images_part_{part}" / f"{cid}.jpg")
        b.copy(cid, p, "ham10000", "train", _T3_DX[col], _T3_SIZE)
        b.row(meta, cid, p)
        # Two images of lesion HAM_0000118: must stay in the same split.
        b.link(cid, "lesion", lesion)
        # DATA.md: dx lowercase (akiec, bcc, bkl, df, mel, nv, vasc).
        rows.append([lesion, cid, col.lower(), dx_type, age, sex, loc, dataset])
    # DATA.md: lesion_id,image_id,dx,dx_type,age,sex,localization (+ `dataset` in newer releases).
    _write_csv(meta, ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"], rows)


# ---------------------------------------------------------------------------
# ISIC 2019
# ---------------------------------------------------------------------------
def _isic2019(b: _Builder, top: Path, t3: dict[str, str]) -> None:
    cols = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    folder = top / "ISIC_2019_Training_Input"
    gt = top / "ISIC_2019_Training_GroundTruth.csv"
    gt_rows, meta_rows = [], []
    # DATA.md: 2016/2017 images appear downsampled and renamed ISIC_xxxxxxx_downsampled
    # in both the CSV and the file name; they must merge with (and lose to) the originals.
    for cid, col in (("ISIC_0000001", "MEL"), ("ISIC_0000003", "NV"),
                     ("ISIC_0000006", "NV"), ("ISIC_0000010", "BKL")):
        raw, size = f"{cid}_downsampled", _SHARED[cid][2]
        p = b.image(folder / f"{raw}.jpg", size, cid, base=_base(cid))
        b.copy(cid, p, "isic2019", "train", col, size)
        b.row(gt, raw, p)
        gt_rows.append([raw] + one_hot(cols, col))
        meta_rows.append([raw, "", "anterior torso", "", ""])  # empty cells allowed
    # DATA.md: 2019 contains all of HAM10000 (same file, same size as 2018/HAM).
    p = b.same_bytes(t3["ISIC_0024310"], folder / "ISIC_0024310.jpg")
    b.copy("ISIC_0024310", p, "isic2019", "train", "BCC", _T3_SIZE)
    b.row(gt, "ISIC_0024310", p)
    gt_rows.append(["ISIC_0024310"] + one_hot(cols, "BCC"))
    meta_rows.append(["ISIC_0024310", "65.0", "", "HAM_0002761", "male"])
    # New 2019 (BCN) images: AK (grayscale L JPEG), two SCC of one lesion, UNK.
    new = [("ISIC_0053454", "AK", (64, 64), "L", "75.0", "head/neck", "BCN_0000002", "male"),
           ("ISIC_0053455", "SCC", (70, 70), "RGB", "80.0", "", "BCN_0000019", "female"),
           ("ISIC_0053458", "SCC", (72, 72), "RGB", "80.0", "", "BCN_0000019", "female"),
           ("ISIC_0053456", "UNK", (66, 66), "RGB", "", "lower extremity", "", "")]
    for cid, col, size, mode, age, site, lesion, sex in new:
        p = b.image(folder / f"{cid}.jpg", size, cid, mode=mode)
        b.row(gt, cid, p)
        if col == "UNK":
            b.reject(p, "no label")  # DATA.md: UNK dropped
        else:
            b.copy(cid, p, "isic2019", "train", col, size)
            b.link(cid, "lesion", lesion)
        gt_rows.append([cid] + one_hot(cols, col))
        meta_rows.append([cid, age, site, lesion, sex])
    # Bad input: a 0-byte .jpg with a ground-truth row.
    p = b.raw(folder / "ISIC_0053460.jpg", b"")
    b.reject(p, "empty file")
    b.row(gt, "ISIC_0053460", p)
    gt_rows.append(["ISIC_0053460"] + one_hot(cols, "NV"))
    meta_rows.append(["ISIC_0053460", "40.0", "posterior torso", "BCN_0000077", "male"])
    # Bad input: a GT row (with the _downsampled spelling) whose image is absent.
    b.row(gt, "ISIC_0000099_downsampled", None)
    gt_rows.append(["ISIC_0000099_downsampled"] + one_hot(cols, "NV"))
    meta_rows.append(["ISIC_0000099_downsampled", "", "", "", ""])
    # DATA.md headers; one-hot floats.
    _write_csv(gt, ["image"] + cols, gt_rows)
    _write_csv(top / "ISIC_2019_Training_Metadata.csv",
               ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"], meta_rows)


# ---------------------------------------------------------------------------
# ISIC 2020: challenge layout and Kaggle layout
# ---------------------------------------------------------------------------
_2020_HEADER = ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
                "diagnosis", "benign_malignant", "target"]
# Ids in both 2020 layouts: one picture, drawn at the larger of the two sizes.
_KAGGLE_BASE = {"ISIC_2637011": (120, 80), "ISIC_0015719": (96, 64)}
_2020_DX = {"nevus": "NV", "melanoma": "MEL", "unknown": "BEN", "seborrheic keratosis": "BKL"}


def _isic2020(b: _Builder, top: Path) -> None:
    folder = top / "train"
    gt = top / "ISIC_2020_Training_GroundTruth.csv"
    # name, patient, sex, age, site, diagnosis, benign_malignant, target, size, special
    rows = [
        ("ISIC_2637011", "IP_7279968", "male", "45.0", "head/neck", "unknown", "benign", "0", (120, 80), ""),
        ("ISIC_0015719", "IP_3075186", "female", "45.0", "upper extremity", "unknown", "benign", "0", (60, 40), ""),
        ("ISIC_0052212", "IP_2842074", "female", "50.0", "lower extremity", "nevus", "benign", "0", (90, 60), ""),
        ("ISIC_0068279", "IP_7279968", "", "45.0", "torso", "melanoma", "malignant", "1", (84, 56), ""),
        ("ISIC_0074268", "IP_7279968", "male", "45.0", "", "seborrheic keratosis", "benign", "0", (75, 50), "CMYK"),
        ("ISIC_0074311", "IP_2842074", "female", "50.0", "", "unknown", "benign", "0", (100, 60), "exif"),
        ("ISIC_0074542", "IP_4698288", "male", "", "torso", "melanomaa", "malignant", "1", (78, 52), ""),
        ("ISIC_0075663", "IP_4698288", "male", "60.0", "torso", "nevus", "benign", "0", (120, 100), "truncated"),
        ("ISIC_0076262", "IP_2842074", "female", "50.0", "lower extremity", "nevus", "benign", "0", (90, 60), "dup2"),
        ("ISIC_0084086", "IP_7279968", "", "45.0", "torso", "melanoma", "malignant", "1", (84, 56), "dup2"),
    ]
    for name, patient, _s, _a, _site, dx, _bm, target, size, special in rows:
        path = folder / f"{name}.jpg"
        if special == "truncated":
            # Bad input: the first half of a valid JPEG's bytes.
            data = _noise_jpeg(size, name)
            p = b.raw(path, data[: len(data) // 2])
            b.reject(p, "truncated image")
        elif special == "exif":
            # EXIF orientation 6 (rotate 90 CW to display) on a non-square image.
            im = _lesion(size, name)
            exif = im.getexif()
            exif[0x0112] = 6
            path.parent.mkdir(parents=True, exist_ok=True)
            im.save(path, "JPEG", quality=90, exif=exif.tobytes())
            p = b._add(path)
            b.exif = (p, (size[1], size[0]))
        else:
            p = b.image(path, size, name, mode="CMYK" if special == "CMYK" else "RGB",
                        base=_KAGGLE_BASE.get(name))
        b.row(gt, name, p)
        if special == "truncated":
            continue
        if dx not in _2020_DX:
            # Unknown diagnosis spelling (benign_malignant/target still say malignant).
            b.reject(p, "unknown diagnosis")
            continue
        assert (target == "1") == (dx == "melanoma")  # DATA.md: target=1 only for melanoma
        if special == "dup2":
            # DATA.md: standard practice drops every image_name_2 of the duplicates list.
            b.forced_dups.add(p)
            continue
        # The Kaggle copy of ISIC_0015719 is larger; the challenge copy of ISIC_2637011 is.
        b.copy(name, p, "isic2020", "train", _2020_DX[dx], size)
        b.link(name, "patient", patient)  # several images per patient_id
    # DATA.md: exact header; empty sex / site cells allowed.
    _write_csv(gt, _2020_HEADER, [list(r[:8]) for r in rows])
    _write_csv(top / "ISIC_2020_Training_Duplicates.csv", ["image_name_1", "image_name_2"],
               [["ISIC_0052212", "ISIC_0076262"], ["ISIC_0068279", "ISIC_0084086"]])
    # Non-image file in the image folder.
    b.raw(folder / "README.txt", b"SIIM-ISIC 2020 training images\n")


def _kaggle2020(b: _Builder, top: Path) -> None:
    # DATA.md: the Kaggle layout is train.csv + jpeg/train/ (same columns as the GT).
    folder = top / "jpeg" / "train"
    gt = top / "train.csv"
    rows = [
        # overlaps the challenge copy, smaller here -> duplicate
        ("ISIC_2637011", "IP_7279968", "male", "45.0", "head/neck", "unknown", "benign", "0", (60, 40)),
        # overlaps the challenge copy, larger here -> kept
        ("ISIC_0015719", "IP_3075186", "female", "45.0", "upper extremity", "unknown", "benign", "0", (96, 64)),
        # new ids, one sharing a patient with the challenge layout
        ("ISIC_0096034", "IP_3075186", "female", "45.0", "torso", "nevus", "benign", "0", (88, 66)),
        ("ISIC_0099474", "IP_9057861", "", "", "", "melanoma", "malignant", "1", (110, 73)),
    ]
    for name, patient, *_rest, dx, _bm, _t, size in rows:
        p = b.image(folder / f"{name}.jpg", size, name, base=_KAGGLE_BASE.get(name))
        b.copy(name, p, "isic2020", "train", _2020_DX[dx], size)
        b.row(gt, name, p)
        b.link(name, "patient", patient)
    _write_csv(gt, _2020_HEADER, [list(r[:8]) for r in rows])


# ---------------------------------------------------------------------------
# ISIC Archive export
# ---------------------------------------------------------------------------
_ARCHIVE_DX = {"melanoma": "MEL", "nevus": "NV", "basal cell carcinoma": "BCC",
               "seborrheic keratosis": "BKL", "squamous cell carcinoma": "SCC"}


def _archive(b: _Builder, top: Path) -> None:
    header = ["isic_id", "attribution", "copyright_license", "age_approx", "anatom_site_general",
              "benign_malignant", "diagnosis", "diagnosis_confirm_type", "image_type", "lesion_id",
              "patient_id", "sex"]
    # isic_id, benign_malignant, diagnosis, age, site, lesion, patient, sex, file ext / PIL mode, size
    rows = [
        ("ISIC_1000001", "malignant", "melanoma", "55", "anterior torso", "IL_1000001", "IP_1000001", "male", "P", (92, 69)),
        ("ISIC_1000002", "malignant", "melanoma", "55", "anterior torso", "IL_1000001", "IP_1000001", "male", "RGB", (80, 60)),
        ("ISIC_1000003", "benign", "nevus", "55", "upper extremity", "IL_1000003", "IP_1000001", "male", "RGBA", (70, 70)),
        ("ISIC_1000004", "malignant", "basal cell carcinoma", "70", "head/neck", "", "", "female", "I;16", (64, 48)),
        ("ISIC_1000005", "benign", "seborrheic keratosis", "", "", "IL_1000005", "IP_1000005", "", "RGB", (60, 80)),
        # DATA.md: plain indeterminate is dropped.
        ("ISIC_1000006", "indeterminate", "nevus", "40", "posterior torso", "IL_1000006", "IP_1000006", "female", "RGB", (72, 54)),
        # DATA.md: indeterminate/benign -> benign, indeterminate/malignant -> malignant.
        ("ISIC_1000007", "indeterminate/benign", "nevus", "35", "lower extremity", "IL_1000007", "IP_1000007", "female", "RGB", (66, 88)),
        ("ISIC_1000008", "indeterminate/malignant", "melanoma", "65", "posterior torso", "IL_1000008", "IP_1000008", "male", "RGB", (100, 75)),
        # A diagnosis that is not a known one.
        ("ISIC_1000009", "malignant", "basal cell carcinomaa", "60", "head/neck", "IL_1000009", "IP_1000009", "male", "RGB", (76, 57)),
        # Bad input: a .jpg that contains text.
        ("ISIC_1000010", "benign", "nevus", "30", "anterior torso", "IL_1000010", "IP_1000010", "female", "text", None),
    ]
    meta = top / "metadata.csv"
    out = []
    for cid, bm, dx, age, site, lesion, patient, sex, kind, size in rows:
        if kind == "text":
            p = b.raw(top / f"{cid}.jpg", b"<html><body>404 Not Found</body></html>\n")
            b.reject(p, "not an image")
        else:
            ext = ".png" if kind in ("P", "RGBA", "I;16") else ".jpg"
            p = b.image(top / f"{cid}{ext}", size, cid, mode=kind)
            if dx not in _ARCHIVE_DX:
                b.reject(p, "unknown diagnosis")
            elif bm == "indeterminate":
                b.reject(p, "no label")
            else:
                code = _ARCHIVE_DX[dx]
                assert (code in _MALIGNANT) == bm.endswith("malignant")  # both rules agree
                b.copy(cid, p, "isic_archive", "train", code, size)
                b.link(cid, "patient", patient)
                b.link(cid, "lesion", lesion)
        b.row(meta, cid, p)
        out.append([cid, "Anonymous", "CC-BY", age, site, bm, dx, "histopathology", "dermoscopic",
                    lesion, patient, sex])
    _write_csv(meta, header, out)


# ---------------------------------------------------------------------------
def build(root: Path) -> Expected:
    """Write every ISIC training layout of DATA.md under ``root``; return what ingest must find."""
    root = Path(root).resolve()
    a, b_, c, d = root / "a", root / "b", root / "c", root / "d"
    b = _Builder(root)
    _isic2016(b, a / "ISIC2016")
    _isic2017(b, a / "ISIC2017")
    t3 = _isic2018(b, a / "ISIC2018")
    _ham10000(b, a / "HAM10000", t3)
    _isic2019(b, b_ / "ISIC2019", t3)
    _isic2020(b, b_ / "ISIC2020")
    _kaggle2020(b, c / "siim-isic-melanoma-classification")
    _archive(b, d / "isic-archive-export")
    expected = b.finish([a, b_, c, d])
    check_consistency(expected)
    return expected


def check_consistency(e: Expected) -> None:
    """Self-check of the accounting invariant (and of the files really on disk)."""
    # Every image-extension file under the roots is listed, and vice versa.
    on_disk = {str(Path(dp) / f) for r in e.roots for dp, _, fs in os.walk(r) for f in fs
               if Path(f).suffix.lower() in IMAGE_EXTS}
    assert on_disk == e.image_files, on_disk ^ e.image_files
    assert set(e.labels) == set(MODES) and set(e.rejects) == set(MODES)
    ids = set(e.paths)
    for m in MODES:
        assert set(e.labels[m]) <= ids and all(v in (0, 1) for v in e.labels[m].values())
        ingested = {e.paths[cid] for cid in e.labels[m]}
        assert len(ingested) == len(e.labels[m])
        file_rejects = {k for k in e.rejects[m] if "#" not in k}
        row_rejects = set(e.rejects[m]) - file_rejects
        assert all(v in CATEGORIES for v in e.rejects[m].values())
        # Each image file is exactly one of: ingested, duplicate, rejected.
        parts = [ingested, e.duplicates, file_rejects]
        assert sum(map(len, parts)) == len(e.image_files), "overlap between ingested/dups/rejects"
        assert set().union(*parts) == e.image_files
        # Each ground-truth row is ingested, merged (its file is accounted for) or rejected.
        for key, path in e.gt_rows.items():
            assert (key in row_rejects) if path is None else (path in e.image_files), key
        assert all(e.gt_rows.get(k, "x") is None for k in row_rejects)
    for m in ("malignant", "malignant_ak"):  # melanoma <= malignant <= malignant_ak
        prev = "melanoma" if m == "malignant" else "malignant"
        assert all(e.labels[prev][k] <= e.labels[m][k] for k in e.labels[m])
    assert all(e.paths[cid] == p for cid, p in e.kept.items())
    assert set(e.sources) == ids == set(e.origin_split) == set(e.all_sources)
    assert set().union(*e.all_sources.values()) == set(SOURCE_ORDER)
    assert set(e.origin_split.values()) == {"train", "val", "test"}
    seen: set[str] = set()
    for g in e.groups:
        assert len(g) > 1 and g <= ids and not (g & seen)
        seen |= g
    assert not any(cid.endswith("_downsampled") for cid in ids)
    # Odd modes, EXIF and kept files really are what they claim.
    for p, mode in e.modes.items():
        with Image.open(p) as im:
            assert im.mode == mode and p in {e.paths[c] for c in ids}, (p, im.mode)
    with Image.open(e.exif_rotated) as im:
        assert ImageOps.exif_transpose(im).size == e.exif_size != im.size
    for cid, p in e.paths.items():
        with Image.open(p) as im:
            assert im.size == e.sizes[cid], (p, im.size)
            im.load()
    # Bad files really are bad, in the way their category says.
    for key, cat in e.rejects[MODES[0]].items():
        if cat == "empty file":
            assert Path(key).stat().st_size == 0
        elif cat == "not an image":
            try:
                Image.open(key).close()
                raise AssertionError(key)
            except UnidentifiedImageError:
                pass
        elif cat == "truncated image":
            with Image.open(key) as im:
                try:
                    im.load()
                    raise AssertionError(key)
                except OSError as err:
                    assert "truncated" in str(err), err
    for cid, tied in e.ties.items():
        assert e.paths[cid] in tied and len({Path(p).read_bytes() for p in tied}) == 1
