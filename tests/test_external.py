"""External evaluation sets (DATA.md "Evaluation sets"): each published layout with its quirks."""
import math
import shutil

import numpy as np
import pytest

from cnd_ray.data import external, image, tone
from cnd_ray.errors import UserError
from tests import external_fixtures

CASES = ("ddi", "ddi_old", "fitzpatrick17k", "fitzpatrick17k_old", "atlas", "asan", "mclass_d", "mclass_nd",
         "isic2018", "pad_ufes_20")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    return root, external_fixtures.build(root)


@pytest.fixture(scope="module")
def loaded(tree):
    _, expected = tree
    return {case: external.load(e.set, e.root) for case, e in expected.items()}


def test_every_set_has_a_case(tree):
    assert set(tree[1]) == set(CASES)
    assert {e.set for e in tree[1].values()} == set(external.SETS) - {"mclass"}  # = its two parts


def test_mclass_is_both_parts(tree, loaded):
    both = external.load("mclass", tree[1]["mclass_d"].root)
    parts = [loaded["mclass_d"], loaded["mclass_nd"]]
    assert [i.id for i in both.items] == [i.id for p in parts for i in p.items]
    assert both.rejects == [r for p in parts for r in p.rejects]
    assert external.isic_ids(both.items) == external.isic_ids(parts[0].items)  # ND's ids are not ISIC's


@pytest.mark.parametrize("case", CASES)
def test_items(case, tree, loaded):
    e, got = tree[1][case], loaded[case]
    assert got.name == e.set
    assert {i.id: i.label for i in got.items} == e.labels
    assert {i.id: i.group for i in got.items} == {i: e.groups.get(i) for i in e.labels}
    assert {i.id: i.fitzpatrick for i in got.items} == {i: e.fitzpatrick.get(i) for i in e.labels}
    assert {i.id: i.kind for i in got.items} == {i: e.kinds.get(i, "") for i in e.labels}
    assert all(i.source == e.set for i in got.items)
    assert got.counts == e.counts


@pytest.mark.parametrize("case", CASES)
def test_rejects_name_their_reason(case, tree, loaded):
    e, got = tree[1][case], loaded[case]
    assert len(got.rejects) == len(e.rejects), got.rejects
    for fragment, category in e.rejects:
        hits = [r for k, r in got.rejects if fragment in k]
        assert len(hits) == 1 and hits[0].startswith(category + ": "), (fragment, got.rejects)


@pytest.mark.parametrize("case", CASES)
def test_every_image_file_is_accounted_for(case, tree, loaded):
    e, got = tree[1][case], loaded[case]
    paths = [i.path for i in got.items] + [k for k, _ in got.rejects if "#" not in k]
    assert sorted(paths) == sorted(e.files)


def test_protocol_filters_say_which(loaded):
    reasons = sorted(r for _, r in loaded["fitzpatrick17k"].rejects if r.startswith("protocol filter"))
    assert reasons == ["protocol filter: Fitzpatrick type unknown (fitzpatrick_scale='-1')",
                       "protocol filter: non-neoplastic", "protocol filter: qc is '3 Wrongly labelled'"]


def test_isic2018_label_modes(tree):
    e = tree[1]["isic2018"]
    got = external.load("isic2018", e.root, labels="malignant")
    assert {i.id: i.label for i in got.items} == e.other_labels["malignant"]
    with pytest.raises(UserError, match="isic2018: unknown label mode 'bcc'"):
        external.load("isic2018", e.root, labels="bcc")
    with pytest.raises(UserError, match="ddi: labels='malignant' is not supported"):
        external.load("ddi", tree[1]["ddi"].root, labels="malignant")


def test_mclass_d_isic_ids(loaded):
    assert external.isic_ids(loaded["mclass_d"].items) == {"ISIC_0000001", "ISIC_0000002", "ISIC_0000003"}
    assert external.isic_ids(loaded["mclass_nd"].items) == set()


def test_read_gives_the_training_shape(loaded, tmp_path):
    for case in ("ddi", "atlas", "asan", "pad_ufes_20"):
        arr = external.read(loaded[case].items[0], 16)
        assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8 and arr.std() > 0
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(image.BadImage, match="not an image"):
        external.read(external.Item("bad", str(bad), 0, None, None, "ddi"), 16)


def test_group_from_ita():
    assert [tone.group_from_ita(v) for v in (60.0, 45.0, 30.0, 20.0, 15.0, -40.0, math.nan)] == \
        ["I-II", "I-II", "III-IV", "III-IV", "V-VI", "V-VI", None]


def test_wrong_roots_are_user_errors(tree, tmp_path):
    root, expected = tree
    with pytest.raises(UserError, match=r"unknown evaluation set 'ham' \(choose from ddi, "):
        external.load("ham", root)
    with pytest.raises(UserError, match=f"ddi: {tmp_path / 'nope'} is not a folder .*ddi_metadata.csv"):
        external.load("ddi", tmp_path / "nope")
    # Each set pointed at another set's folder: one line naming the set, the path and the file.
    wrong = {"ddi": "asan", "fitzpatrick17k": "ddi", "atlas": "ddi", "asan": "ddi", "mclass_d": "asan",
             "mclass_nd": "asan", "isic2018": "ddi", "pad_ufes_20": "ddi"}
    names = {"ddi": "ddi_metadata.csv", "fitzpatrick17k": "fitzpatrick17k.csv", "atlas": "meta/meta.csv",
             "asan": "malignantmelanoma", "mclass_d": "BenchmarkDermoscopic", "mclass_nd": "BenchmarkClinical",
             "isic2018": "ISIC2018_Task3_Validation_GroundTruth.csv", "pad_ufes_20": "metadata.csv"}
    for name, other in wrong.items():
        where = expected[other].root
        with pytest.raises(UserError) as info:
            external.load(name, where)
        msg = str(info.value)
        assert msg.startswith(f"{name}: no ") and where in msg and names[name] in msg and "\n" not in msg


def test_a_renamed_column_is_a_user_error(tree, tmp_path):
    base = tmp_path / "ddi"
    shutil.copytree(tree[1]["ddi_old"].root, base)
    (base / "ddi_metadata.csv").write_text("DDI_ID,DDI_file,skin_tone,label\n1,000001.png,56,1\n")
    with pytest.raises(UserError, match=r"ddi: .*ddi_metadata.csv has none of the columns 'malignant', "):
        external.load("ddi", base)
    (base / "ddi_metadata.csv").write_text("DDI_ID,file,skin_tone,malignant\n1,000001.png,56,True\n")
    with pytest.raises(UserError, match=r"ddi: .*ddi_metadata.csv has no column 'DDI_file'"):
        external.load("ddi", base)


def test_duplicate_rows_are_rejected(tree, tmp_path):
    base = tmp_path / "ddi"
    shutil.copytree(tree[1]["ddi_old"].root, base)
    with open(base / "ddi_metadata.csv", "a") as f:
        f.write("4,000002.png,12,0,dermatofibroma\n")
    got = external.load("ddi", base)
    assert len(got.items) == 4 and [r.split(":")[0] for _, r in got.rejects] == ["duplicate"]
