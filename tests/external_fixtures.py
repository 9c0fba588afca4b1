"""Miniature copies of the external evaluation sets of docs/DATA.md ("Evaluation sets").

``build(root)`` writes each published layout with its quirks under ``root`` and returns, per case, an
``Expected`` (what ``external.load`` must give). Cases: ``ddi`` (unnamed index column, True/False,
found one folder down), ``ddi_old`` (``malignancy(malig=1)``), ``fitzpatrick17k`` (scale + centaur,
images in nested folders), ``fitzpatrick17k_old`` (single ``fitzpatrick`` and a leading index),
``atlas`` (derm7pt release_v0, both image kinds), ``asan`` (upper-case .JPG), ``mclass_d`` (``malign``),
``mclass_nd`` (``malignant``), ``isic2018`` (Validation + Test, ground truths in their own folders, a
Training split that is not ours), ``pad_ufes_20`` (``fitspatrick``, images/imgs_part_N/). Each has rows
or files that must be rejected; ``rejects`` lists (a fragment of the reject's key, its category).
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_EXTS = {".jpg", ".jpeg", ".png"}


@dataclass
class Expected:
    set: str  # the loader's name
    root: str  # what to pass to load()
    labels: dict[str, int]  # kept id -> label
    groups: dict[str, str | None] = field(default_factory=dict)  # kept id -> group (default None)
    fitzpatrick: dict[str, int | None] = field(default_factory=dict)  # kept id -> type (default None)
    kinds: dict[str, str] = field(default_factory=dict)  # kept id -> kind (default "")
    rejects: list[tuple[str, str]] = field(default_factory=list)
    files: set[str] = field(default_factory=set)  # every image file written for the case
    other_labels: dict[str, dict[str, int]] = field(default_factory=dict)  # label mode -> id -> label

    @property
    def counts(self) -> dict[str, int]:
        malignant = sum(self.labels.values())
        return {"benign": len(self.labels) - malignant, "malignant": malignant, "rejected": len(self.rejects)}


def _picture(path: Path, seed: str, size=(28, 20)) -> str:
    """A small skin-coloured picture with a dark blob, saved in the format its extension names."""
    rnd = random.Random(zlib.crc32(seed.encode()))
    skin = (rnd.randint(150, 230), rnd.randint(100, 180), rnd.randint(80, 150))
    im = Image.new("RGB", size, skin)
    w, h = size
    ImageDraw.Draw(im).ellipse([w / 3, h / 3, 2 * w / 3, 2 * h / 3], fill=tuple(c // 3 for c in skin))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")
    return str(path)


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _ddi(root: Path) -> Expected:
    base = root / "ddi" / "ddidiversedermatologyimages"  # the loader finds it one folder down
    e = Expected("ddi", str(root / "ddi"), {})
    rows = [  # file, skin_tone, malignant, disease, image written?
        ("000001.png", "12", "True", "melanoma-in-situ", True),
        ("000002.png", "34", "False", "verruca-vulgaris", True),
        ("000003.png", "56", "True", "basal-cell-carcinoma", True),
        ("000004.png", "56", "False", "seborrheic-keratosis", False),  # missing image
        ("000005.png", "34", "maybe", "melanocytic-nevi", True),  # unknown label value
        ("000006.png", "78", "False", "melanocytic-nevi", True),  # unknown skin tone
    ]
    lines = [",DDI_ID,DDI_file,skin_tone,malignant,disease"]  # pandas' unnamed index column
    for n, (file, tone, malignant, disease, written) in enumerate(rows):
        lines.append(f"{n},{n + 1},{file},{tone},{malignant},{disease}")
        if written:
            e.files.add(_picture(base / "images" / file, file, (30 + n, 24)))
    _write(base / "ddi_metadata.csv", lines)
    e.labels = {"000001": 1, "000002": 0, "000003": 1}
    e.groups = {"000001": "I-II", "000002": "III-IV", "000003": "V-VI"}
    e.files.add(_picture(base / "images" / "000099.png", "extra"))
    e.rejects = [("000004", "missing image file"), ("000005.png", "unknown label value"),
                 ("000006.png", "unknown skin tone value"), ("000099.png", "unlisted image")]
    return e


def _ddi_old(root: Path) -> Expected:
    base = root / "ddi_old"
    # No skin_tone (000004): kept, its group left to the pixel estimate.
    e = Expected("ddi", str(base), {"000001": 1, "000002": 0, "000003": 0, "000004": 0},
                 groups={"000001": "V-VI", "000002": "I-II", "000003": "III-IV"})
    lines = ["DDI_ID,DDI_file,skin_tone,malignancy(malig=1),disease",
             "1,000001.png,56,1,melanoma-acral-lentiginous", "2,000002.png,12,0,dermatofibroma",
             "3,000003.png,34,0,melanocytic-nevi", "4,000004.png,,0,melanocytic-nevi"]
    _write(base / "ddi_metadata.csv", lines)
    for n in (1, 2, 3, 4):
        e.files.add(_picture(base / "images" / f"00000{n}.png", f"old{n}"))
    return e


def _md5(word: str) -> str:
    return f"{zlib.crc32(word.encode()):08x}" * 4  # 32 hex digits, as the real md5hash


F17K_COLUMNS = ("md5hash,fitzpatrick_scale,fitzpatrick_centaur,label,nine_partition_label,three_partition_label,"
                "qc,url,url_alphanum")


def _fitzpatrick17k(root: Path) -> Expected:
    base = root / "fitzpatrick17k"
    e = Expected("fitzpatrick17k", str(base), {})
    rows = [  # key, scale, centaur, label, nine, three, qc, folder (None = no image)
        ("mel", "2", "3", "melanoma", "malignant melanoma", "malignant", "", "images"),
        ("nev", "5", "5", "nevocytic nevus", "benign melanocyte", "benign", "1 Diagnostic", "images"),
        ("sk", "3", "4", "seborrheic keratosis", "benign epidermal", "benign", "", "data/finalfitz17k/b"),
        ("bcc", "6", "6", "basal cell carcinoma", "malignant epidermal", "malignant", "2 Characteristic",
         "data/finalfitz17k/b"),
        ("pso", "4", "4", "psoriasis", "inflammatory", "non-neoplastic", "", "images"),
        ("wrong", "3", "3", "melanoma", "malignant melanoma", "malignant", "3 Wrongly labelled", "images"),
        ("unk", "-1", "2", "nevocytic nevus", "benign melanocyte", "benign", "", "images"),
        ("gone", "4", "4", "melanoma", "malignant melanoma", "malignant", "", None),
        ("odd", "4", "4", "melanoma", "malignant melanoma", "", "", "images"),
        ("seven", "7", "4", "nevocytic nevus", "benign melanocyte", "benign", "", "images"),
    ]
    lines = [F17K_COLUMNS]
    for key, scale, centaur, label, nine, three, qc, folder in rows:
        h = _md5(key)
        lines.append(f"{h},{scale},{centaur},{label},{nine},{three},{qc},https://example.org/{h}.jpg,"
                     f"https--example.org-{h}.jpg")
        if folder:
            e.files.add(_picture(base / folder / f"{h}.jpg", key))
    _write(base / "fitzpatrick17k.csv", lines)
    # A second copy of one image in another folder: one is used, the other reported.
    e.files.add(_picture(base / "zz_copy" / f"{_md5('mel')}.jpg", "mel"))
    e.labels = {_md5("mel"): 1, _md5("nev"): 0, _md5("sk"): 0, _md5("bcc"): 1}
    e.fitzpatrick = {_md5("mel"): 2, _md5("nev"): 5, _md5("sk"): 3, _md5("bcc"): 6}  # scale, not centaur
    e.groups = {_md5("mel"): "I-II", _md5("nev"): "V-VI", _md5("sk"): "III-IV", _md5("bcc"): "V-VI"}
    e.rejects = [(_md5("pso"), "protocol filter"), (_md5("wrong"), "protocol filter"),
                 (_md5("unk"), "protocol filter"), (_md5("gone"), "missing image file"),
                 (_md5("odd"), "unknown label value"), (_md5("seven"), "unknown skin tone value"),
                 ("zz_copy", "duplicate")]
    return e


def _fitzpatrick17k_old(root: Path) -> Expected:
    base = root / "fitzpatrick17k_old"
    lines = [",md5hash,fitzpatrick,label,nine_partition_label,three_partition_label,qc,url,url_alphanum"]
    for n, (key, fst, three) in enumerate((("a", "1", "malignant"), ("b", "4", "benign"),
                                           ("c", "-1", "benign"))):
        h = _md5("old" + key)
        lines.append(f"{n},{h},{fst},x,y,{three},,https://example.org/{h}.jpg,u")
    _write(base / "fitzpatrick17k.csv", lines)
    e = Expected("fitzpatrick17k", str(base), {_md5("olda"): 1, _md5("oldb"): 0},
                 groups={_md5("olda"): "I-II", _md5("oldb"): "III-IV"},
                 fitzpatrick={_md5("olda"): 1, _md5("oldb"): 4}, rejects=[(_md5("oldc"), "protocol filter")])
    for key in "abc":
        e.files.add(_picture(base / f"{_md5('old' + key)}.jpg", key))
    return e


ATLAS_COLUMNS = ("case_num,diagnosis,seven_point_score,pigment_network,streaks,pigmentation,regression_structures,"
                 "dots_and_globules,blue_whitish_veil,vascular_structures,level_of_diagnostic_difficulty,"
                 "elevation,location,sex,clinic,derm,notes")


# A file whose name differs in case from the CSV's path: matched case-insensitively.
ON_DISK = {"Aal/Aal002.jpg": "Aal/AAL002.JPG"}


def _atlas(root: Path) -> Expected:
    base = root / "derm7pt" / "release_v0"
    images = base / "images"
    e = Expected("atlas", str(root / "derm7pt"), {})
    rows = [  # case, diagnosis, clinic, derm, which files exist
        (1, "melanoma (in situ)", "Fml/FML001.JPG", "Fml/Fml002.jpg", "cd"),
        (2, "clark nevus", "NEL/NEL025.JPG", "NEL/Nel026.jpg", "cd"),
        (3, "basal cell carcinoma", "Aal/Aal001.jpg", "Aal/Aal002.jpg", "cd"),
        (4, "melanoma metastasis", "Gdl/Gdl010.jpg", "Gdl/Gdl011.jpg", "c"),  # derm image missing
        (5, "", "Nal/Nal001.jpg", "Nal/Nal002.jpg", "cd"),  # no diagnosis
    ]
    lines = [ATLAS_COLUMNS]
    for case, diagnosis, clinic, derm, have in rows:
        lines.append(f"{case},{diagnosis},1,absent,absent,absent,absent,absent,absent,absent,low,"
                     f"flat,back,female,{clinic},{derm},")
        for kind, rel in (("c", clinic), ("d", derm)):
            if kind in have:
                e.files.add(_picture(images / ON_DISK.get(rel, rel), rel))
    _write(base / "meta" / "meta.csv", lines)
    e.files.add(_picture(images / "NEL" / "Nel999.jpg", "extra"))
    e.labels = {"Fml/FML001.JPG": 1, "Fml/Fml002.jpg": 1, "NEL/NEL025.JPG": 0, "NEL/Nel026.jpg": 0,
                "Aal/Aal001.jpg": 0, "Aal/Aal002.jpg": 0, "Gdl/Gdl010.jpg": 1}
    e.kinds = {"Fml/FML001.JPG": "clinic", "Fml/Fml002.jpg": "derm", "NEL/NEL025.JPG": "clinic",
               "NEL/Nel026.jpg": "derm", "Aal/Aal001.jpg": "clinic", "Aal/Aal002.jpg": "derm",
               "Gdl/Gdl010.jpg": "clinic"}
    e.rejects = [("#4/derm", "missing image file"), ("Nal001.jpg", "unknown label value"),
                 ("Nal002.jpg", "unknown label value"), ("Nel999.jpg", "unlisted image")]
    return e


def _asan(root: Path) -> Expected:
    base = root / "asan"
    e = Expected("asan", str(base), {"melanoma_1": 1, "melanoma_2": 1, "nevus2_3343": 0, "bcc_1": 0,
                                     "sk_4": 0, "lentigo_9": 0})
    for cls, name in (("malignantmelanoma", "melanoma_1.JPG"), ("malignantmelanoma", "melanoma_2.JPG"),
                      ("pigmentednevus", "nevus2_3343.JPG"), ("basalcellcarcinoma", "bcc_1.JPG"),
                      ("seborrheickeratosis", "sk_4.JPG"), ("lentigo", "lentigo_9.jpg"),
                      ("misc", "odd_1.JPG")):
        e.files.add(_picture(base / cls / name, name))
    e.files.add(_picture(base / "stray.JPG", "stray"))
    (base / "pigmentednevus" / "Thumbs.db").write_bytes(b"\0")  # not an image: ignored
    e.rejects = [("odd_1.JPG", "unknown class folder"), ("stray.JPG", "unknown class folder")]
    return e


def _mclass(root: Path) -> tuple[Expected, Expected]:
    base = root / "mclass"
    d = Expected("mclass_d", str(base), {"ISIC_0000001": 0, "ISIC_0000002": 0, "ISIC_0000003": 1})
    for cls, name in (("benign", "ISIC_0000001.jpg"), ("benign", "ISIC_0000002.jpg"),
                      ("malign", "ISIC_0000003.jpg"), ("unsure", "ISIC_0000009.jpg")):
        d.files.add(_picture(base / "BenchmarkDermoscopic" / cls / name, name))
    d.rejects = [("ISIC_0000009", "unknown class folder")]
    nd = Expected("mclass_nd", str(base), {"1": 0, "2": 1, "3": 1})
    for cls, name in (("benign", "1.jpg"), ("malignant", "2.jpg"), ("malignant", "3.jpg")):
        nd.files.add(_picture(base / "BenchmarkClinical" / cls / name, "nd" + name))
    (base / "BenchmarkClinical" / "readme.txt").write_text("MClass-ND\n")
    return d, nd


ISIC2018_HEADER = "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"
ONE_HOT = {"MEL": "1.0,0.0,0.0,0.0,0.0,0.0,0.0", "NV": "0.0,1.0,0.0,0.0,0.0,0.0,0.0",
           "BCC": "0.0,0.0,1.0,0.0,0.0,0.0,0.0", "AKIEC": "0.0,0.0,0.0,1.0,0.0,0.0,0.0",
           "BKL": "0.0,0.0,0.0,0.0,1.0,0.0,0.0", "TWO": "1.0,1.0,0.0,0.0,0.0,0.0,0.0"}


def _isic2018(root: Path) -> Expected:
    base = root / "isic2018"
    e = Expected("isic2018", str(base), {})
    splits = {"Validation": [("ISIC_0034321", "MEL", True), ("ISIC_0034322", "NV", True),
                             ("ISIC_0034323", "BCC", True), ("ISIC_0034324", "TWO", True)],
              "Test": [("ISIC_0034524", "AKIEC", True), ("ISIC_0034525", "MEL", True),
                       ("ISIC_0034526", "BKL", False)],
              "Training": [("ISIC_0024306", "NV", True)]}  # a training split: not an evaluation set
    for split, rows in splits.items():
        _write(base / f"ISIC2018_Task3_{split}_GroundTruth" / f"ISIC2018_Task3_{split}_GroundTruth.csv",
               [ISIC2018_HEADER] + [f"{i},{ONE_HOT[dx]}" for i, dx, _ in rows])
        folder = base / f"ISIC2018_Task3_{split}_Input"
        for i, dx, written in rows:
            if written:
                path = _picture(folder / f"{i}.jpg", i, (40, 30))
                if split != "Training":
                    e.files.add(path)
        (folder / "ATTRIBUTION.txt").write_text("ISIC\n")
        (folder / "LICENSE.txt").write_text("CC-BY-NC\n")
    e.labels = {"ISIC_0034321": 1, "ISIC_0034322": 0, "ISIC_0034323": 0, "ISIC_0034524": 0, "ISIC_0034525": 1}
    e.other_labels = {"malignant": {"ISIC_0034321": 1, "ISIC_0034322": 0, "ISIC_0034323": 1, "ISIC_0034524": 0,
                                    "ISIC_0034525": 1}}
    e.kinds = {"ISIC_0034321": "validation", "ISIC_0034322": "validation", "ISIC_0034323": "validation",
               "ISIC_0034524": "test", "ISIC_0034525": "test"}
    e.rejects = [("ISIC_0034324", "unknown label value"), ("ISIC_0034526", "missing image file")]
    return e


PAD_COLUMNS = ("patient_id,lesion_id,smoke,drink,background_father,background_mother,age,pesticide,gender,"
               "skin_cancer_history,cancer_history,has_piped_water,has_sewage_system,fitspatrick,region,"
               "diameter_1,diameter_2,diagnostic,itch,grew,hurt,changed,bleed,elevation,img_id,biopsed")


def _pad_ufes_20(root: Path) -> Expected:
    base = root / "pad_ufes_20"
    e = Expected("pad_ufes_20", str(base), {})
    rows = [  # img_id, diagnostic, fitspatrick, folder (None = no image)
        ("PAT_46_881_939.png", "MEL", "2.0", "imgs_part_1"),
        ("PAT_1516_1765_530.png", "NEV", "", "imgs_part_1"),  # pandas writes NaN as empty
        ("PAT_120_180_17.png", "BCC", "6.0", "imgs_part_2"),
        ("PAT_9_17_80.png", "SEK", "3.0", "imgs_part_2"),
        ("PAT_10_18_81.png", "SCC", "4.0", "imgs_part_3"),
        ("PAT_11_19_82.png", "ACK", "1.0", "imgs_part_3"),
        ("PAT_12_20_83.png", "XYZ", "2.0", "imgs_part_3"),  # unknown diagnosis
        ("PAT_13_21_84.png", "NEV", "7.0", "imgs_part_3"),  # no such Fitzpatrick type
        ("PAT_14_22_85.png", "MEL", "5.0", None),  # missing image
    ]
    lines = [PAD_COLUMNS]
    for img, dx, fst, folder in rows:
        pat, lesion = img.split("_")[1:3]
        lines.append(f"PAT_{pat},{lesion},False,False,POMERANIA,POMERANIA,55,False,FEMALE,True,True,True,"
                     f"True,{fst},FACE,6.0,5.0,{dx},True,True,False,True,False,True,{img},True")
        if folder:
            e.files.add(_picture(base / "images" / folder / img, img))
    _write(base / "metadata.csv", lines)
    e.labels = {"PAT_46_881_939": 1, "PAT_1516_1765_530": 0, "PAT_120_180_17": 1, "PAT_9_17_80": 0,
                "PAT_10_18_81": 1, "PAT_11_19_82": 0}
    e.fitzpatrick = {"PAT_46_881_939": 2, "PAT_120_180_17": 6, "PAT_9_17_80": 3, "PAT_10_18_81": 4,
                     "PAT_11_19_82": 1}
    e.groups = {"PAT_46_881_939": "I-II", "PAT_120_180_17": "V-VI", "PAT_9_17_80": "III-IV",
                "PAT_10_18_81": "III-IV", "PAT_11_19_82": "I-II"}
    e.rejects = [("PAT_12_20_83", "unknown label value"), ("PAT_13_21_84", "unknown skin tone value"),
                 ("PAT_14_22_85", "missing image file")]
    return e


def build(root: Path) -> dict[str, Expected]:
    """Write every case under root; case name -> Expected."""
    root = Path(root)
    mclass_d, mclass_nd = _mclass(root)
    return {"ddi": _ddi(root), "ddi_old": _ddi_old(root), "fitzpatrick17k": _fitzpatrick17k(root),
            "fitzpatrick17k_old": _fitzpatrick17k_old(root), "atlas": _atlas(root), "asan": _asan(root),
            "mclass_d": mclass_d, "mclass_nd": mclass_nd, "isic2018": _isic2018(root),
            "pad_ufes_20": _pad_ufes_20(root)}
