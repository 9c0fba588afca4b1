"""Layout scanning edge cases that real downloads produce (no Ray: the scan reads CSVs only)."""
import os

import pytest
from PIL import Image

from cnd_ray.data import layouts
from cnd_ray.errors import UserError

GT2020 = "image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target"


def _img(path, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (150, 100, 80)).save(path, format="JPEG")


def _found(scan):
    return {r.raw_id: (r.dx, r.path is not None, r.problem.split(":")[0]) for r in scan.rows}


def test_bom_crlf_spaced_header_and_upper_case_extension(tmp_path):
    d = tmp_path / "ISIC2018_Task3_Training_Input"
    _img(d / "ISIC_0024306.JPG")
    _img(d / "ISIC_0024307.jpg")
    (tmp_path / "ISIC2018_Task3_Training_GroundTruth.csv").write_bytes(
        b"\xef\xbb\xbfimage, MEL, NV, BCC, AKIEC, BKL, DF, VASC\r\n"
        b"ISIC_0024306,0.0,1.0,0.0,0.0,0.0,0.0,0.0\r\nISIC_0024307 ,1.0,0.0,0.0,0.0,0.0,0.0,0.0\r\n")
    assert _found(layouts.scan([str(tmp_path)])) == {"ISIC_0024306": ("NV", True, ""),
                                                     "ISIC_0024307": ("MEL", True, "")}


def test_nested_and_renamed_2020_folders_and_the_v2_ground_truth(tmp_path):
    root = tmp_path / "siim"
    _img(root / "ISIC_2020_Training_JPEG" / "train" / "ISIC_0000001.jpg")
    _img(root / "ISIC_2020_Training_JPEG" / "train" / "ISIC_0000002.jpg")
    row = "{},IP_1,male,40.0,torso,nevus,benign,0"
    (root / "ISIC_2020_Training_GroundTruth.csv").write_text("\n".join([GT2020, row.format("ISIC_0000001")]))
    (root / "ISIC_2020_Training_GroundTruth_v2.csv").write_text(
        "\n".join([GT2020 + ",lesion_id", row.format("ISIC_0000001") + ",IL_1",
                   row.format("ISIC_0000002") + ",IL_2"]))
    scan = layouts.scan([str(tmp_path)])
    assert scan.csvs == [str(root / "ISIC_2020_Training_GroundTruth_v2.csv")]  # only the newer
    assert {r.raw_id: (r.path is not None, r.meta["lesion_id"]) for r in scan.rows} == {
        "ISIC_0000001": (True, "IL_1"), "ISIC_0000002": (True, "IL_2")}


def test_nested_2019_folder_and_kaggle_test_images_are_unlabelled(tmp_path):
    inner = tmp_path / "ISIC_2019_Training_Input" / "ISIC_2019_Training_Input"
    _img(inner / "ISIC_0000000_downsampled.jpg")
    (tmp_path / "ISIC_2019_Training_GroundTruth.csv").write_text(
        "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\nISIC_0000000_downsampled,0,1,0,0,0,0,0,0,0\n")
    kaggle = tmp_path / "kaggle"
    _img(kaggle / "jpeg" / "train" / "ISIC_0000009.jpg")
    _img(kaggle / "jpeg" / "test" / "ISIC_0000010.jpg")
    (kaggle / "train.csv").write_text(GT2020 + "\nISIC_0000009,IP_9,female,30.0,,melanoma,malignant,1\n")
    (kaggle / "test.csv").write_text("image_name,patient_id,sex,age_approx,anatom_site_general_challenge\n"
                                     "ISIC_0000010,IP_9,female,30.0,torso\n")
    scan = layouts.scan([str(tmp_path)])
    rows = {r.raw_id: r for r in scan.rows}
    assert rows["ISIC_0000000_downsampled"].path and rows["ISIC_0000000_downsampled"].image_id == "ISIC_0000000"
    assert rows["ISIC_0000009"].dx == "MEL" and rows["ISIC_0000009"].path
    matched = {r.path for r in scan.rows}
    assert scan.image_files - matched == {str(kaggle / "jpeg" / "test" / "ISIC_0000010.jpg")}


def test_symlinked_data_is_followed_and_loops_do_not_hang(tmp_path):
    elsewhere = tmp_path / "disk2" / "isic2020"
    _img(elsewhere / "train" / "ISIC_0000001.jpg")
    (elsewhere / "ISIC_2020_Training_GroundTruth.csv").write_text(
        GT2020 + "\nISIC_0000001,IP_1,male,40.0,torso,nevus,benign,0\n")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(elsewhere, root / "isic2020")
    os.symlink(root, root / "loop")
    scan = layouts.scan([str(root)])
    assert [r.path is not None for r in scan.rows] == [True]


def test_foreign_csvs_are_ignored_and_broken_ground_truths_named(tmp_path):
    (tmp_path / "notes.csv").write_bytes(b"\xff\xfe\x00latin-1 \xe9t\xe9\n")  # not UTF-8: not ours
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    assert layouts.scan([str(tmp_path)]).rows == []
    (tmp_path / "ISIC-2017_Training_Part3_GroundTruth.csv").write_text("ISIC_0000000,0.0,0.0\n")
    with pytest.raises(UserError, match="ISIC-2017_Training_Part3_GroundTruth.csv: no column 'image_id'"):
        layouts.scan([str(tmp_path)])


def test_archive_vocabulary_and_its_benign_malignant(tmp_path):
    rows = ["isic_id,benign_malignant,diagnosis", "ISIC_1,benign,verruca", "ISIC_2,malignant,melanoma in situ",
            "ISIC_3,indeterminate/malignant,AIMP", "ISIC_4,malignant,melanomaa", "ISIC_5,benign,melanoma"]
    (tmp_path / "metadata.csv").write_text("\n".join(rows) + "\n")
    found = _found(layouts.scan([str(tmp_path)]))
    assert found["ISIC_1"][0] == "BENIGN" and found["ISIC_2"][0] == "MEL"
    assert found["ISIC_3"][0] == "MALIGNANT"
    assert found["ISIC_4"][2] == "unknown diagnosis" and found["ISIC_5"][2] == "conflicting labels"
    assert layouts.label("MALIGNANT", "melanoma") is None and layouts.label("MALIGNANT", "malignant") == 1
