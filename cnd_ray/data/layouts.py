"""The published ISIC layouts (DATA.md): find them under some roots and read their ground truths.

`scan(roots)` walks every root once and returns one `Row` per ground-truth row, each matched to its
image file when one exists, plus every image file found. It reads CSVs only (never pixels), so it is
fast on the driver; labelling, de-duplication and decoding happen in `ingest`.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

from cnd_ray.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
SUPERPIXEL = re.compile(r"_superpixels$")  # ISIC 2017 training folder: masks, not lesion photos

# Canonical diagnosis codes. BENIGN / MALIGNANT = the source only says which (ISIC 2016, the Archive's
# benign_malignant, 2020's "unknown"); UNK = ISIC 2019's "none of the above".
DX_CODES = ("MEL", "NV", "BCC", "AK", "BKL", "SK", "DF", "VASC", "SCC", "BENIGN", "MALIGNANT", "UNK")
MALIGNANT_DX = {"MEL", "BCC", "SCC", "MALIGNANT"}

# Free-text diagnoses (HAM10000 dx, ISIC 2020 and Archive `diagnosis`) -> code. None = the
# source's benign_malignant decides. Anything not listed is rejected as unknown, never guessed.
DIAGNOSIS_WORDS: dict[str, str | None] = {
    "mel": "MEL", "melanoma": "MEL", "melanoma metastasis": "MEL",
    "nv": "NV", "nevus": "NV", "pigmented nevus": "NV",
    "bcc": "BCC", "basal cell carcinoma": "BCC",
    "scc": "SCC", "squamous cell carcinoma": "SCC",
    "akiec": "AK", "ak": "AK", "actinic keratosis": "AK",
    "bkl": "BKL", "pigmented benign keratosis": "BKL", "lentigo nos": "BKL", "lentigo simplex": "BKL",
    "solar lentigo": "BKL", "lichenoid keratosis": "BKL",
    "seborrheic keratosis": "SK",
    "df": "DF", "dermatofibroma": "DF",
    "vasc": "VASC", "vascular lesion": "VASC", "angioma": "VASC", "angiokeratoma": "VASC",
    "pyogenic granuloma": "VASC",
    "melanoma in situ": "MEL", "melanoma invasive": "MEL", "melanoma, nos": "MEL",
    "cafe-au-lait macule": "BENIGN", "atypical melanocytic proliferation": "BENIGN",
    # Further benign diagnoses of the ISIC Archive
    "acrochordon": "BENIGN", "angiofibroma or fibrous papule": "BENIGN", "clear cell acanthoma": "BENIGN",
    "mucosal melanosis": "BENIGN", "neurofibroma": "BENIGN", "nevus spilus": "NV", "scar": "BENIGN",
    "sebaceous adenoma": "BENIGN", "sebaceous hyperplasia": "BENIGN", "verruca": "BENIGN",
    # The Archive files these as indeterminate or either way: benign_malignant decides
    "aimp": None, "atypical spitz tumor": None,
    "unknown": None, "other": None, "": None,
}
# ISIC Archive benign_malignant; plain "indeterminate" has no label.
BENIGN_MALIGNANT = {"benign": "BENIGN", "malignant": "MALIGNANT",
                    "indeterminate/benign": "BENIGN", "indeterminate/malignant": "MALIGNANT"}
META_FIELDS = ("sex", "age", "site", "patient_id", "lesion_id")
# Which copy of an image to keep when two are equally large: the challenge release over its
# re-releases (HAM10000 = 2018 Task 3; 2019 re-ships 2016-2018), older over newer.
SOURCE_RANK = {s: i for i, s in enumerate(
    ("isic2016", "isic2017", "isic2018", "ham10000", "isic2019", "isic2020", "isic_archive"))}
_MISSING = {"", "unknown", "nan", "na", "n/a", "none"}


@dataclass
class Row:
    """One ground-truth row, matched to its image file (path None when absent)."""

    raw_id: str  # as written in the CSV (and the file name)
    source: str  # isic2016 ... isic2020, ham10000, isic_archive
    origin_split: str  # train | val | test in the source's own release
    dx: str | None  # a DX_CODES member; None = unreadable (see `problem`)
    csv: str
    meta: dict = field(default_factory=dict)
    path: str | None = None
    problem: str = ""  # "category: detail" when the row itself is unusable

    @property
    def image_id(self) -> str:
        return canonical_id(self.raw_id)

    @property
    def key(self) -> str:
        """What a reject of this row is filed under: its file, else the CSV row."""
        return self.path or f"{self.csv}#{self.raw_id}"


@dataclass
class Scan:
    rows: list[Row]
    image_files: set[str]  # every file with an image extension under the roots
    csvs: list[str]  # ground truths read
    isic2020_duplicates: set[str] = field(default_factory=set)  # image_name_2 of each pair


def canonical_id(raw: str) -> str:
    """ISIC 2019 renames the 2016/2017 images ISIC_xxxxxxx_downsampled."""
    return raw[: -len("_downsampled")] if raw.endswith("_downsampled") else raw


def _clean(value) -> str | None:
    value = (value or "").strip()
    return None if value.lower() in _MISSING else value


def _age(value) -> float | None:
    value = _clean(value)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _meta(sex=None, age=None, site=None, patient_id=None, lesion_id=None) -> dict:
    return {"sex": _clean(sex), "age": _age(age), "site": _clean(site),
            "patient_id": _clean(patient_id), "lesion_id": _clean(lesion_id)}


def _dict_rows(path: str) -> Iterator[dict]:
    """CSV rows with header names and cells stripped (some exports write `image, MEL, ...`)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        for cells in reader:
            if any(c.strip() for c in cells):
                yield {h: c.strip() for h, c in zip(header, cells)}


def _header(path: str) -> list[str]:
    """The header of a CSV, or [] when it is not UTF-8 text (then it is not one of ours)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [h.strip() for h in next(csv.reader(f), [])]
    except (UnicodeDecodeError, csv.Error):
        return []


def _read_csv(reader: Callable, path: str):
    """Run a CSV reader; a file we recognised but cannot read is the user's to fix."""
    try:
        out = reader(path)
        return out if isinstance(out, dict) else list(out)
    except KeyError as e:
        raise UserError(f"{path}: no column {e} (expected the published header; is the header "
                        "line missing?)") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a readable UTF-8 CSV ({e})") from None


def _float_flag(value: str) -> bool | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v == 1.0 if v in (0.0, 1.0) else None


def one_hot(rec: dict, columns: tuple[str, ...]) -> tuple[str | None, str]:
    """The one column set to 1.0; ISIC 2018 spells actinic keratosis AKIEC."""
    flags = {c: _float_flag(rec.get(c, "")) for c in columns}
    hot = [c for c, v in flags.items() if v]
    if None in flags.values() or len(hot) != 1:
        cells = ",".join(f"{c}={rec.get(c, '')}" for c in columns)
        return None, f"unknown diagnosis: one-hot row {cells} does not name exactly one class"
    return ("AK" if hot[0] == "AKIEC" else hot[0]), ""


def _word(diagnosis: str | None, benign_malignant: str | None) -> tuple[str | None, str]:
    """A free-text diagnosis, falling back to benign_malignant when it only says unknown/other."""
    key = (diagnosis or "").strip().lower()
    if key not in DIAGNOSIS_WORDS:
        return None, f"unknown diagnosis: {diagnosis!r}"
    dx = DIAGNOSIS_WORDS[key]
    bm = (benign_malignant or "").strip().lower()
    side = BENIGN_MALIGNANT.get(bm)
    if dx is None:
        if side is None:
            why = f"benign_malignant={benign_malignant!r}" if bm else "no diagnosis"
            return None, f"no label: {why}"
        return side, ""
    # Actinic keratosis is pre-malignant: sources file it either way, so it never conflicts.
    if side is not None and dx != "AK" and (dx in MALIGNANT_DX) != (side == "MALIGNANT"):
        return None, f"conflicting labels: diagnosis {diagnosis!r} vs benign_malignant {bm!r}"
    return dx, ""


# --- one reader per ground-truth format: csv path -> (raw_id, dx, problem, meta) -----------------

def _read_2016(path: str):
    """Headerless `id,label`: training writes benign/malignant, test writes 0.0/1.0."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        for rec in csv.reader(f):
            if not rec or not rec[0].strip():
                continue
            raw, value = rec[0].strip(), (rec[1].strip().lower() if len(rec) > 1 else "")
            flag = _float_flag(value)
            if value == "malignant" or flag is True:  # 2016 Part 3: malignant means melanoma
                yield raw, "MEL", "", _meta()
            elif value == "benign" or flag is False:
                yield raw, "BENIGN", "", _meta()
            else:
                yield raw, None, f"unknown diagnosis: label {value!r}", _meta()


def _read_2017(path: str):
    for rec in _dict_rows(path):
        mel, sk = _float_flag(rec.get("melanoma")), _float_flag(rec.get("seborrheic_keratosis"))
        if mel is None or sk is None or (mel and sk):
            yield (rec["image_id"], None, "unknown diagnosis: melanoma="
                   f"{rec.get('melanoma')!r} seborrheic_keratosis={rec.get('seborrheic_keratosis')!r}",
                   _meta())
        else:
            yield rec["image_id"], "MEL" if mel else "SK" if sk else "NV", "", _meta()


def _one_hot_reader(columns: tuple[str, ...]):
    def read(path: str):
        for rec in _dict_rows(path):
            dx, problem = one_hot(rec, columns)
            yield rec["image"], dx, problem, _meta()
    return read


def _read_ham(path: str):
    for rec in _dict_rows(path):
        dx, problem = _word(rec.get("dx"), None)
        if dx is None and not problem:
            problem = f"unknown diagnosis: dx {rec.get('dx')!r}"
        yield rec["image_id"], dx, problem, _meta(rec.get("sex"), rec.get("age"),
                                                  rec.get("localization"), None, rec.get("lesion_id"))


def _read_2020(path: str):
    """`target` is 1 exactly for melanoma; the diagnosis word refines benign ones."""
    for rec in _dict_rows(path):
        meta = _meta(rec.get("sex"), rec.get("age_approx"), rec.get("anatom_site_general_challenge"),
                     rec.get("patient_id"), rec.get("lesion_id"))
        dx, problem = _word(rec.get("diagnosis"), rec.get("benign_malignant"))
        target = _float_flag(rec.get("target", ""))
        if dx is not None:
            if target is None:
                dx, problem = None, f"no label: target={rec.get('target')!r}"
            elif target and dx in ("BENIGN", "MALIGNANT"):
                dx = "MEL"
            elif target != (dx == "MEL"):
                dx, problem = None, (f"conflicting labels: diagnosis {rec.get('diagnosis')!r} "
                                     f"vs target {rec.get('target')!r}")
        yield rec["image_name"], dx, problem, meta


def _read_archive(path: str):
    for rec in _dict_rows(path):
        meta = _meta(rec.get("sex"), rec.get("age_approx"), rec.get("anatom_site_general"),
                     rec.get("patient_id"), rec.get("lesion_id"))
        bm = (rec.get("benign_malignant") or "").strip().lower()
        if bm == "indeterminate":  # DATA.md: dropped, whatever the diagnosis suggests
            dx, problem = None, "no label: benign_malignant is 'indeterminate'"
        else:
            dx, problem = _word(rec.get("diagnosis"), rec.get("benign_malignant"))
        yield rec["isic_id"], dx, problem, meta


# --- metadata files that carry no labels, joined by image id ----------------------------------

def _metadata_2017(path: str) -> dict[str, dict]:
    return {r["image_id"]: _meta(r.get("sex"), r.get("age_approximate")) for r in _dict_rows(path)}


def _metadata_2019(path: str) -> dict[str, dict]:
    return {r["image"]: _meta(r.get("sex"), r.get("age_approx"), r.get("anatom_site_general"),
                              None, r.get("lesion_id")) for r in _dict_rows(path)}


def _groupings_2018(path: str) -> dict[str, dict]:
    return {r["image"]: _meta(lesion_id=r.get("lesion_id")) for r in _dict_rows(path)}


@dataclass(frozen=True)
class Layout:
    """A ground-truth file pattern and where its images live."""

    source: str
    gt: re.Pattern  # file name; group "split" is the release's split name when it has several
    read: Callable[[str], Iterator[tuple]]
    # split name -> ("name", rx): folders so named anywhere under the root, or ("under", rx):
    # folders below the ground truth's folder whose relative path matches ("." = that folder)
    image_dirs: Callable[[str], tuple[str, re.Pattern]]
    metadata: tuple[tuple[re.Pattern, Callable[[str], dict]], ...] = ()
    header: tuple[str, ...] = ()  # required header columns
    generic: bool = False  # a common file name: a wrong header means "not ours", not an error


_SPLITS = {"training": "train", "validation": "val", "test": "test", "test_v2": "test"}


def _named(fmt: str) -> Callable[[str], tuple[str, re.Pattern]]:
    """Image folders with a release-specific name, anywhere under the root."""
    return lambda split: ("name", re.compile("^" + fmt.format(split=re.escape(split)) + r"$"))


def _under(rx: str) -> Callable[[str], tuple[str, re.Pattern]]:
    """Image folders with a generic name, found below the ground truth (ISIC 2020, Archive)."""
    return lambda split: ("under", re.compile(rx))


LAYOUTS = (
    Layout("isic2016", re.compile(r"ISBI2016_ISIC_Part3_(?P<split>Training|Test)_GroundTruth\.csv$"),
           _read_2016, _named("ISBI2016_ISIC_Part3_{split}_Data")),
    Layout("isic2017", re.compile(r"ISIC-2017_(?P<split>Training|Validation|Test_v2)_Part3_GroundTruth\.csv$"),
           _read_2017, _named("ISIC-2017_{split}_Data"), header=("image_id", "melanoma", "seborrheic_keratosis"),
           metadata=((re.compile(r"ISIC-2017_(?P<split>Training|Validation|Test_v2)_Data_metadata\.csv$"),
                      _metadata_2017),)),
    Layout("isic2018", re.compile(r"ISIC2018_Task3_(?P<split>Training|Validation|Test)_GroundTruth\.csv$"),
           _one_hot_reader(("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")),
           _named("ISIC2018_Task3_{split}_Input"), header=("image", "MEL"),
           metadata=((re.compile(r"ISIC2018_Task3_(?P<split>Training)_LesionGroupings\.csv$"),
                      _groupings_2018),)),
    Layout("ham10000", re.compile(r"HAM10000_metadata(\.csv)?$"), _read_ham,
           lambda split: ("name", re.compile(r"^HAM10000_images(_part_[12])?$")),
           header=("lesion_id", "image_id", "dx")),
    Layout("isic2019", re.compile(r"ISIC_2019_(?P<split>Training|Test)_GroundTruth\.csv$"),
           _one_hot_reader(("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")),
           _named("ISIC_2019_{split}_Input"), header=("image", "MEL"),
           metadata=((re.compile(r"ISIC_2019_(?P<split>Training|Test)_Metadata\.csv$"), _metadata_2019),)),
    # The 2020 folder names are generic, so they are found below the ground truth (at any depth:
    # people unzip into ISIC_2020_Training_JPEG/train/ or train/train/).
    Layout("isic2020", re.compile(r"ISIC_2020_Training_GroundTruth(_v2)?\.csv$"), _read_2020,
           _under(r"(^|/)train$"), header=("image_name", "target")),
    Layout("isic2020", re.compile(r"^train\.csv$"), _read_2020,  # the Kaggle layout
           _under(r"(^|/)jpeg/train$"), header=("image_name", "target"), generic=True),
    Layout("isic_archive", re.compile(r".*\.csv$"), _read_archive,
           _under(r"^(\.|images)$"), header=("isic_id", "benign_malignant"), generic=True),
)


def _split_name(match: re.Match) -> str:
    return match.groupdict().get("split") or "Training"


def _walk(root: str) -> tuple[list[str], list[str], list[str]]:
    """(csv files, folders, image files) under root in sorted order, following symlinked folders
    (data often lives on another disk) but never into a loop."""
    csvs, dirs, images = [], [], []
    seen = set()
    for here, subdirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:
            subdirs[:] = []
            continue
        seen.add(real)
        subdirs.sort()
        dirs.append(here)
        for name in sorted(files):
            path = os.path.join(here, name)
            low = name.lower()
            if low.endswith(".csv"):
                csvs.append(path)
            elif low.endswith(IMAGE_EXTENSIONS):
                images.append(path)
    return csvs, dirs, images


def _images_in(folder: str) -> dict[str, str]:
    """Image files directly in folder, by file stem."""
    out = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS and not SUPERPIXEL.search(stem):
            out.setdefault(stem, os.path.join(folder, name))
    return out


def _match(path: str, layout: Layout) -> re.Match | None:
    m = layout.gt.search(os.path.basename(path))
    if m is None or not layout.header:
        return m
    missing = [c for c in layout.header if c not in _header(path)]
    if missing and not layout.generic:
        raise UserError(f"{path}: no column {missing[0]!r} (expected the published header; is the "
                        "header line missing?)")
    return None if missing else m


def scan(roots: list[str]) -> Scan:
    """Find every layout under the roots, read its ground truth and match rows to image files."""
    rows: list[Row] = []
    image_files: set[str] = set()
    read_csvs: list[str] = []
    duplicates: set[str] = set()
    for root in roots:
        root = os.path.abspath(root)
        csvs, dirs, images = _walk(root)
        image_files.update(images)
        by_dir = {os.path.dirname(p) for p in csvs}
        # ISIC 2020 publishes a _v2 ground truth next to the first one: read only the newer.
        skip = {os.path.join(d, "ISIC_2020_Training_GroundTruth.csv") for d in by_dir
                if os.path.exists(os.path.join(d, "ISIC_2020_Training_GroundTruth_v2.csv"))}
        metadata: dict[tuple[str, str], dict[str, dict]] = {}
        for path in csvs:
            name = os.path.basename(path)
            if name == "ISIC_2020_Training_Duplicates.csv":
                duplicates.update(r["image_name_2"] for r in _read_csv(_dict_rows, path)
                                  if r.get("image_name_2"))
            for layout in LAYOUTS:
                for pattern, reader in layout.metadata:
                    m = pattern.search(name)
                    if m:
                        metadata.setdefault((layout.source, _split_name(m)), {}).update(
                            _read_csv(reader, path))
        for path in csvs:
            if path in skip:
                continue
            layout, m = next(((lay, m) for lay in LAYOUTS if (m := _match(path, lay))), (None, None))
            if layout is None:
                continue
            read_csvs.append(path)
            split = _split_name(m)
            kind, rx = layout.image_dirs(split)
            base = os.path.dirname(path)
            if kind == "name":
                folders = [d for d in dirs if rx.search(os.path.basename(d))]
            else:
                folders = [d for d in dirs if (d == base or d.startswith(base + os.sep))
                           and rx.search(os.path.relpath(d, base).replace(os.sep, "/"))]
            files: dict[str, str] = {}
            for folder in folders:
                for stem, file in _images_in(folder).items():
                    files.setdefault(stem, file)
            extra = metadata.get((layout.source, split), {})
            for raw, dx, problem, meta in _read_csv(layout.read, path):
                raw = raw.strip()
                for k, v in extra.get(raw, {}).items():
                    if meta.get(k) is None:
                        meta[k] = v
                rows.append(Row(raw, layout.source, _SPLITS[split.lower()], dx, path, meta,
                                files.get(raw), problem))
    return Scan(rows, image_files, read_csvs, duplicates)


LABEL_MODES = ("melanoma", "malignant")


def label(dx: str, mode: str, ak_malignant: bool = False) -> int | None:
    """0/1 under a label mode (DATA.md); None = this row has no label in this mode."""
    if dx == "UNK":  # ISIC 2019's "none of the above": dropped in every mode
        return None
    if mode == "melanoma":
        return None if dx == "MALIGNANT" else int(dx == "MEL")  # MALIGNANT: melanoma or not?
    return int(dx in MALIGNANT_DX or (ak_malignant and dx == "AK"))
