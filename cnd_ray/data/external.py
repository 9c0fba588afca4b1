"""The external evaluation sets of DATA.md ("Evaluation sets") in their published layouts.

`load(name, root)` finds the set under `root` (the root itself or a subfolder, up to MAX_DEPTH levels
down), reads its CSV or class folders and returns every image as an `Item` or a reject with a reason:
a row or image file is never dropped silently. It reads CSVs and folder listings only (no pixels);
`read(item, size)` decodes one image. Skin tone: `Item.group` is the labelled Fitzpatrick group
(I-II / III-IV / V-VI, as DDI) or None; the fairness code fills the None ones from the pixels with
`tone.group_from_ita(tone.estimate_ita(...))`.
"""
from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from cnd_ray.data import image, layouts
from cnd_ray.data.tone import group_of
from cnd_ray.errors import UserError

SETS = ("ddi", "fitzpatrick17k", "atlas", "asan", "mclass", "mclass_d", "mclass_nd", "isic2018", "pad_ufes_20")
MCLASS_PARTS = ("mclass_d", "mclass_nd")  # "mclass" = both, the paper's 160 benign / 40 malignant
MAX_DEPTH = 3  # how far below the given root a set is looked for

# Reject categories: a reason is "category: detail".
MISSING = "missing image file"
UNKNOWN_LABEL = "unknown label value"
UNKNOWN_TONE = "unknown skin tone value"
PROTOCOL = "protocol filter"
UNLISTED = "unlisted image"
DUPLICATE = "duplicate"
UNKNOWN_CLASS = "unknown class folder"

DDI_TONES = {12: "I-II", 34: "III-IV", 56: "V-VI"}
ASAN_CLASSES = ("actinickeratosis", "basalcellcarcinoma", "dermatofibroma", "lentigo", "malignantmelanoma",
                "pigmentednevus", "seborrheickeratosis", "squamouscellcarcinoma")
# MClass-D publishes `malign`, MClass-ND `malignant`; either spelling is read in both.
MCLASS_CLASSES = {"benign": 0, "malign": 1, "malignant": 1}
PAD_DIAGNOSES = {"ACK": 0, "BCC": 1, "MEL": 1, "NEV": 0, "SCC": 1, "SEK": 0}
ISIC2018_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC2018_SPLITS = ("Validation", "Test")  # Training is a training set, not an external one
ISIC_ID = re.compile(r"ISIC_\d{7}")
_MISSING = {"", "nan", "none", "na", "n/a"}


@dataclass(frozen=True)
class Item:
    """One evaluation image: label 1 = malignant under the set's protocol."""

    id: str
    path: str
    label: int
    fitzpatrick: int | None  # labelled type 1-6; None when the set gives only a group or nothing
    group: str | None  # "I-II" / "III-IV" / "V-VI" when labelled; None = estimate from the pixels
    source: str  # the set's name
    kind: str = ""  # the part of the set: atlas derm / clinic, isic2018 validation / test


@dataclass(frozen=True)
class Loaded:
    name: str
    root: str  # the folder the set was found in (the given root or a subfolder of it)
    items: list[Item]
    rejects: list[tuple[str, str]]  # (image path, or "csv#row id" when there is no file; reason)

    @property
    def counts(self) -> dict[str, int]:
        malignant = sum(i.label for i in self.items)
        return {"benign": len(self.items) - malignant, "malignant": malignant, "rejected": len(self.rejects)}


def isic_ids(items: Iterable[Item]) -> set[str]:
    """ISIC ids among the items (MClass-D is ISIC images): what training must exclude."""
    ids = (layouts.canonical_id(i.id) for i in items)
    return {i for i in ids if ISIC_ID.fullmatch(i)}


def read(item: Item, size: int) -> np.ndarray:
    """The item's image as (size, size, 3) uint8; raises image.BadImage for an unreadable file."""
    with open(item.path, "rb") as f:
        return image.load(f.read(), size)[0]


# --- finding files -------------------------------------------------------------------------------

def _dirs(root: str, depth: int) -> Iterator[str]:
    """Folders under root, shallowest first and sorted within a level; links are followed, loops not."""
    seen, level = set(), [root]
    for _ in range(depth + 1):
        deeper = []
        for d in level:
            real = os.path.realpath(d)
            if real in seen:
                continue
            seen.add(real)
            yield d
            deeper += sorted(e.path for e in _entries(d) if e.is_dir())
        level = deeper


def _image_files(folder: str) -> list[str]:
    """Every image-extension file under folder (sorted, any depth; ATTRIBUTION.txt and the like skipped)."""
    return [e.path for d in _dirs(folder, 64) for e in sorted(_entries(d), key=lambda e: e.name)
            if e.name.lower().endswith(layouts.IMAGE_EXTENSIONS) and e.is_file()]


def _entries(folder: str) -> list[os.DirEntry]:
    try:
        return list(os.scandir(folder))
    except OSError:  # unreadable folder: nothing of ours is in it
        return []


def _locate(name: str, root: str, found: Callable[[str], bool], expected: str) -> str:
    """The shallowest folder under root (root included) holding the set, or a UserError."""
    if not os.path.isdir(root):
        raise UserError(f"{name}: {root} is not a folder (expected a folder holding {expected})")
    base = next((d for d in _dirs(root, MAX_DEPTH) if found(d)), None)
    if base is None:
        raise UserError(f"{name}: no {expected} in {root} or its subfolders (up to {MAX_DEPTH} levels "
                        "down); point the root at the unpacked release")
    return base


def _has(*parts: str) -> Callable[[str], bool]:
    return lambda d: os.path.isfile(os.path.join(d, *parts))


def _name_key(path: str) -> str:
    return os.path.basename(path).lower()


def _stem_key(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0].lower()


class _Files:
    """Image files matched by a key (file name, stem or relative path; case-insensitive)."""

    def __init__(self, paths: list[str], key: Callable[[str], str]):
        self.paths, self.key, self.index = paths, key, {}
        for p in paths:
            self.index.setdefault(key(p), p)

    def find(self, ref: str) -> str | None:
        return self.index.get(self.key(ref))


class _Out:
    """Collects items and rejects so that every row and file ends up in exactly one of them."""

    def __init__(self):
        self.items: list[Item] = []
        self.rejects: list[tuple[str, str]] = []
        self.used: set[str] = set()

    def keep(self, item: Item, where: str) -> None:
        if item.path in self.used:
            self.reject(item.path, f"{DUPLICATE}: {where} lists this image again")
        else:
            self.used.add(item.path)
            self.items.append(item)

    def reject(self, key: str, reason: str) -> None:
        self.used.add(key)
        self.rejects.append((key, reason))

    def sweep(self, files: _Files, listing: str) -> None:
        """Files no row referred to: a second copy of a name in use, or not listed at all."""
        for p in files.paths:
            if p not in self.used:
                first = files.index[files.key(p)]
                self.reject(p, f"{DUPLICATE}: a file of the same name was matched instead ({first})"
                            if first != p else f"{UNLISTED}: not in {listing}")


def _csv(name: str, path: str, required: tuple[str, ...]) -> tuple[list[str], list[dict]]:
    """(header, rows) with cells stripped; a leading unnamed index column is kept under the key ""."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            # Short rows are padded: a missing cell reads as empty and is rejected by its value.
            rows = [dict(zip(header, [c.strip() for c in cells] + [""] * len(header))) for cells in reader
                    if any(c.strip() for c in cells)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{name}: {path} is not a readable UTF-8 CSV ({e})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(f"{name}: {path} has no column {missing[0]!r} (expected the published header; "
                        "is the header line missing?)")
    return header, rows


def _pick(name: str, path: str, header: list[str], *columns: str) -> str:
    """The first of several spellings a release uses for a column."""
    col = next((c for c in columns if c in header), None)
    if col is None:
        raise UserError(f"{name}: {path} has none of the columns {', '.join(map(repr, columns))}")
    return col


def _flag(value: str) -> int | None:
    v = value.strip().lower()
    if v in ("true", "1", "1.0"):
        return 1
    if v in ("false", "0", "0.0"):
        return 0
    return None


def _number(value: str) -> int | None:
    """An integer written as "3" or "3.0"; None when it is not one."""
    try:
        v = float(value)
    except ValueError:
        return None
    return int(v) if math.isfinite(v) and v == int(v) else None


def _fitzpatrick(value: str) -> tuple[int | None, str]:
    """(type 1-6 or None when unlabelled, problem)."""
    if value.strip().lower() in _MISSING:
        return None, ""
    t = _number(value)
    if t is None or not 1 <= t <= 6:
        return None, f"{UNKNOWN_TONE}: {value!r} is not a Fitzpatrick type 1-6"
    return t, ""


# --- one reader per set: (located folder, out) ------------------------------------------------

def _ddi(base: str, out: _Out) -> None:
    path = os.path.join(base, "ddi_metadata.csv")
    header, rows = _csv("ddi", path, ("DDI_file", "skin_tone"))
    col = _pick("ddi", path, header, "malignant", "malignancy(malig=1)")  # the older release's name
    files = _Files(_image_files(base), _name_key)
    for rec in rows:
        ref = rec["DDI_file"]
        file = files.find(ref)
        key = file or f"{path}#{ref}"
        label = _flag(rec[col])
        tone_value = rec["skin_tone"]
        number = _number(tone_value)
        if label is None:
            out.reject(key, f"{UNKNOWN_LABEL}: {col}={rec[col]!r}")
        elif tone_value.lower() not in _MISSING and number not in DDI_TONES:
            out.reject(key, f"{UNKNOWN_TONE}: skin_tone={tone_value!r} (expected 12, 34 or 56)")
        elif file is None:
            out.reject(key, f"{MISSING}: {ref}")
        else:
            out.keep(Item(os.path.splitext(ref)[0], file, label, None, DDI_TONES.get(number), "ddi"), path)
    out.sweep(files, path)


def _fitzpatrick17k(base: str, out: _Out) -> None:
    path = os.path.join(base, "fitzpatrick17k.csv")
    header, rows = _csv("fitzpatrick17k", path, ("md5hash", "three_partition_label"))
    # The current release has fitzpatrick_scale (+ fitzpatrick_centaur, a second rater); the older one
    # a single `fitzpatrick`.
    col = _pick("fitzpatrick17k", path, header, "fitzpatrick_scale", "fitzpatrick")
    files = _Files(_image_files(base), _stem_key)  # images are <md5hash>.jpg, in any subfolder
    for rec in rows:
        ref, part, fst = rec["md5hash"], rec["three_partition_label"].lower(), rec[col]
        file = files.find(ref)
        key = file or f"{path}#{ref}"
        t, problem = _fitzpatrick(fst)
        if part == "non-neoplastic":
            out.reject(key, f"{PROTOCOL}: non-neoplastic")
        elif part not in ("benign", "malignant"):
            out.reject(key, f"{UNKNOWN_LABEL}: three_partition_label={rec['three_partition_label']!r}")
        elif rec.get("qc", "") == "3 Wrongly labelled":
            out.reject(key, f"{PROTOCOL}: qc is '3 Wrongly labelled'")
        elif fst.strip().lower() in _MISSING or _number(fst) == -1:
            out.reject(key, f"{PROTOCOL}: Fitzpatrick type unknown ({col}={fst!r})")
        elif problem:
            out.reject(key, problem)
        elif file is None:
            out.reject(key, f"{MISSING}: {ref}.jpg")
        else:
            out.keep(Item(ref, file, int(part == "malignant"), t, group_of(t), "fitzpatrick17k"), path)
    out.sweep(files, path)


def _atlas(base: str, out: _Out) -> None:
    path = os.path.join(base, "meta", "meta.csv")
    _, rows = _csv("atlas", path, ("case_num", "diagnosis", "clinic", "derm"))
    images = os.path.join(base, "images")
    # Keyed by the path below images/: a file's absolute path and a CSV cell give the same key.
    files = _Files(_image_files(images) if os.path.isdir(images) else [],
                   lambda p: os.path.relpath(os.path.join(images, p), images).replace(os.sep, "/").lower())
    for rec in rows:
        diagnosis = rec["diagnosis"]
        for kind in ("derm", "clinic"):
            ref = rec[kind]
            file = files.find(ref) if ref else None
            key = file or f"{path}#{rec['case_num']}/{kind}"
            if not diagnosis:
                out.reject(key, f"{UNKNOWN_LABEL}: diagnosis is empty")
            elif not ref:
                out.reject(key, f"{MISSING}: the {kind} column is empty")
            elif file is None:
                out.reject(key, f"{MISSING}: images/{ref}")
            else:
                label = int(diagnosis.lower().startswith("melanoma"))
                out.keep(Item(ref, file, label, None, None, "atlas", kind), path)
    out.sweep(files, path)


def _folders(name: str, base: str, classes: dict[str, int], out: _Out) -> None:
    """<base>/<class>/<image>: the folder names the label."""
    for file in _image_files(base):
        rel = os.path.relpath(file, base)
        folder = rel.split(os.sep)[0] if os.sep in rel else ""
        if folder.lower() not in classes:
            out.reject(file, f"{UNKNOWN_CLASS}: {folder or '(none)'!r} is not one of {', '.join(classes)}")
        else:
            out.keep(Item(os.path.splitext(os.path.basename(file))[0], file, classes[folder.lower()],
                          None, None, name), base)


def _isic2018(root: str, labels: str, ak_malignant: bool, out: _Out) -> None:
    gts, inputs = {}, {}
    for d in _dirs(root, MAX_DEPTH):
        for split in ISIC2018_SPLITS:
            gt = os.path.join(d, f"ISIC2018_Task3_{split}_GroundTruth.csv")
            if split not in gts and os.path.isfile(gt):
                gts[split] = gt
            if os.path.basename(d) == f"ISIC2018_Task3_{split}_Input":
                inputs.setdefault(split, []).append(d)
    for split, gt in gts.items():
        _, rows = _csv("isic2018", gt, ("image",) + ISIC2018_COLUMNS)
        files = _Files([p for d in inputs.get(split, []) for p in _image_files(d)], _stem_key)
        for rec in rows:
            ref = rec["image"]
            file = files.find(ref)
            key = file or f"{gt}#{ref}"
            dx, problem = layouts.one_hot(rec, ISIC2018_COLUMNS)
            if dx is None:
                out.reject(key, f"{UNKNOWN_LABEL}: {problem.split(': ', 1)[1]}")
            elif file is None:
                out.reject(key, f"{MISSING}: ISIC2018_Task3_{split}_Input/{ref}.jpg")
            else:
                out.keep(Item(ref, file, layouts.label(dx, labels, ak_malignant), None, None, "isic2018",
                              split.lower()), gt)
        out.sweep(files, gt)


def _pad_ufes_20(base: str, out: _Out) -> None:
    path = os.path.join(base, "metadata.csv")
    _, rows = _csv("pad_ufes_20", path, ("img_id", "diagnostic", "fitspatrick"))  # sic: fitspatrick
    files = _Files(_image_files(base), _name_key)  # images/ (or images/imgs_part_N/ as unzipped)
    for rec in rows:
        ref, dx = rec["img_id"], rec["diagnostic"]
        file = files.find(ref)
        key = file or f"{path}#{ref}"
        t, problem = _fitzpatrick(rec["fitspatrick"])
        if dx.upper() not in PAD_DIAGNOSES:
            out.reject(key, f"{UNKNOWN_LABEL}: diagnostic={dx!r}")
        elif problem:
            out.reject(key, problem)
        elif file is None:
            out.reject(key, f"{MISSING}: {ref}")
        else:
            group = group_of(t) if t else None
            out.keep(Item(os.path.splitext(ref)[0], file, PAD_DIAGNOSES[dx.upper()], t, group, "pad_ufes_20"),
                     path)
    out.sweep(files, path)


def _isic2018_found(d: str) -> bool:
    return any(os.path.isfile(os.path.join(d, f"ISIC2018_Task3_{s}_GroundTruth.csv")) for s in ISIC2018_SPLITS)


# name -> (is this folder the set?, what the user should have, the reader)
_LAYOUTS: dict[str, tuple[Callable[[str], bool], str, Callable]] = {
    "ddi": (_has("ddi_metadata.csv"), "ddi_metadata.csv (DDI: ddi_metadata.csv + images/)", _ddi),
    "fitzpatrick17k": (_has("fitzpatrick17k.csv"), "fitzpatrick17k.csv (images <md5hash>.jpg beside it)",
                       _fitzpatrick17k),
    "atlas": (_has("meta", "meta.csv"), "meta/meta.csv (derm7pt release_v0: meta/meta.csv + images/)",
              _atlas),
    "asan": (lambda d: any(os.path.isdir(os.path.join(d, c)) for c in ASAN_CLASSES),
             f"class folder ({', '.join(ASAN_CLASSES)})",
             lambda base, out: _folders("asan", base, {c: int(c == "malignantmelanoma") for c in ASAN_CLASSES},
                                        out)),
    "mclass_d": (lambda d: os.path.basename(d).lower() == "benchmarkdermoscopic",
                 "BenchmarkDermoscopic/ folder (with benign/ and malign/)",
                 lambda base, out: _folders("mclass_d", base, MCLASS_CLASSES, out)),
    "mclass_nd": (lambda d: os.path.basename(d).lower() == "benchmarkclinical",
                  "BenchmarkClinical/ folder (with benign/ and malignant/)",
                  lambda base, out: _folders("mclass_nd", base, MCLASS_CLASSES, out)),
    "isic2018": (_isic2018_found,
                 "ISIC2018_Task3_Validation_GroundTruth.csv or ISIC2018_Task3_Test_GroundTruth.csv",
                 None),  # read by _isic2018: it takes a label mode
    "pad_ufes_20": (_has("metadata.csv"), "metadata.csv (PAD-UFES-20: metadata.csv + images/)", _pad_ufes_20),
}


def load(name: str, root: str, labels: str | None = None, ak_malignant: bool = False) -> Loaded:
    """Every image of an evaluation set under root, as items and rejects (DATA.md protocols).

    labels, ak_malignant: only isic2018 has a choice (layouts.LABEL_MODES, default "melanoma", as
    `ingest`); every other set has one published protocol, and None means it.
    """
    if name == "mclass":
        parts = [load(p, root) for p in MCLASS_PARTS]
        return Loaded(name, os.path.abspath(root), [i for p in parts for i in p.items],
                      [r for p in parts for r in p.rejects])
    if name not in _LAYOUTS:
        raise UserError(f"unknown evaluation set {name!r} (choose from {', '.join(SETS)})")
    if labels is not None and name != "isic2018":
        raise UserError(f"{name}: labels={labels!r} is not supported (only isic2018 has a label mode; "
                        "the other sets have one published protocol)")
    if name == "isic2018" and (labels or "melanoma") not in layouts.LABEL_MODES:
        raise UserError(f"isic2018: unknown label mode {labels!r} (choose from {', '.join(layouts.LABEL_MODES)})")
    found, expected, reader = _LAYOUTS[name]
    base = _locate(name, os.path.abspath(root), found, expected)
    out = _Out()
    if name == "isic2018":
        base = os.path.abspath(root)  # the two splits may sit in different subfolders
        _isic2018(base, labels or "melanoma", ak_malignant, out)
    else:
        reader(base, out)
    return Loaded(name, base, out.items, out.rejects)
