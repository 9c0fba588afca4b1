"""Ingest: every layout of DATA.md, labels per mode, de-duplication, splits, accounting, atomicity."""
import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cnd_ray.data import image as image_lib
from cnd_ray.launch import ingest
from tests import isic_fixtures

MODES = isic_fixtures.MODES


def _table(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    return pq.read_table([str(folder / s["file"]) for s in manifest["shards"]]).to_pylist()


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("mode", MODES)
def test_labels_rejects_and_duplicates_match_every_layout(ingested, isic_tree, mode):
    _, expected = isic_tree
    folder, manifest = ingested[mode]
    rows = _table(folder)
    assert {r["image_id"]: r["label"] for r in rows} == expected.labels[mode]
    rejects = {r["path"]: r["reason"].split(":")[0] for r in _csv(folder / "rejects.csv")}
    assert rejects == expected.rejects[mode]
    assert {r["path"] for r in _csv(folder / "duplicates.csv")} == expected.duplicates
    kept = {r["image_id"]: r for r in rows}
    assert {i: kept[i]["source"] for i in expected.sources} == expected.sources
    assert {i: kept[i]["origin_split"] for i in expected.origin_split} == expected.origin_split
    for image_id, path in expected.kept.items():  # the highest-resolution copy was kept
        assert (kept[image_id]["orig_width"], kept[image_id]["orig_height"]) == expected.sizes[image_id], path
    for image_id, sources in expected.all_sources.items():
        if image_id in kept:
            assert set(kept[image_id]["sources"].split(",")) <= sources


@pytest.mark.parametrize("mode", MODES)
def test_every_input_is_accounted_for(ingested, isic_tree, mode):
    """Each image file is ingested, merged as a duplicate or rejected - exactly one of them."""
    _, expected = isic_tree
    folder, manifest = ingested[mode]
    ingested_paths = set(expected.paths[i] for i in expected.labels[mode])
    dups = [r["path"] for r in _csv(folder / "duplicates.csv")]
    rejects = [r["path"] for r in _csv(folder / "rejects.csv")]
    file_outcomes = ([p for p in dups if "#" not in p] + [p for p in rejects if "#" not in p]
                     + sorted(ingested_paths))
    assert sorted(file_outcomes) == sorted(expected.image_files)  # no file twice, none lost
    for key, path in expected.gt_rows.items():  # and every ground-truth row
        assert path in file_outcomes if path else key in rejects, key
    assert manifest["num_images"] == len(expected.labels[mode])
    assert manifest["num_rejected"] == len(rejects) and manifest["num_duplicates"] == len(dups)
    assert manifest["inputs"]["image_files"] == len(expected.image_files)


def test_splits_are_grouped_by_patient_and_lesion(ingested, isic_tree):
    _, expected = isic_tree
    rows = {r["image_id"]: r for r in _table(ingested["melanoma"][0])}
    for group in expected.groups:
        assert len({rows[i]["split"] for i in group}) == 1, group
    for r in rows.values():  # metadata merged across copies: 2019 knows the HAM lesion ids
        assert r["split"] in ("train", "val")


def test_manifest_and_shards(ingested):
    folder, m = ingested["melanoma"]
    for key in ("num_images", "num_rejected", "num_duplicates", "label_mode", "classes", "sources",
                "image_size", "latent", "schema_version", "splits", "shards"):
        assert key in m
    assert m["label_mode"] == "melanoma" and m["image_size"] == 32 and m["latent"] is None
    assert sum(m["classes"].values()) == m["num_images"] == sum(m["sources"].values())
    assert sum(s["rows"] for s in m["shards"]) == m["num_images"]
    assert len([s for s in m["shards"] if s["split"] == "train"]) > 1  # rolled at --shard-mb
    assert (folder / "rejects.csv").read_text().splitlines()[0] == "path,reason"
    rows = _table(folder)
    assert sorted(r["row_id"] for r in rows) == list(range(m["num_images"]))
    img = image_lib.decode_png(rows[0]["image"])
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    for r in rows:
        assert r["skin_tone"] in ("very_light", "light", "intermediate", "tan", "brown", "dark", "unknown")
        assert 0 <= r["fitzpatrick"] <= 6
    columns = set(rows[0])
    for col in ("image_id", "label", "split", "source", "origin_split", "sex", "age", "site",
                "patient_id", "lesion_id", "ita", "skin_tone", "image"):
        assert col in columns


def test_odd_modes_and_exif_orientation(ingested, isic_tree):
    _, expected = isic_tree
    rows = {r["image_id"]: r for r in _table(ingested["melanoma"][0])}
    by_path = {p: i for i, p in expected.paths.items()}
    rotated = rows[by_path[expected.exif_rotated]]
    assert (rotated["orig_width"], rotated["orig_height"]) == expected.exif_size
    for path, mode in expected.modes.items():
        if path in by_path and by_path[path] in rows:
            arr = image_lib.decode_png(rows[by_path[path]]["image"])
            assert arr.std() > 1, mode  # not a blank conversion


def test_same_input_same_shards(ray_local, isic_tree, ingested, tmp_path):
    root, _ = isic_tree
    ingest.run([str(root)], str(tmp_path / "again"), image_size=32, progress=False, shard_mb=0.02)
    first, second = ingested["melanoma"][0], tmp_path / "again"

    def comparable(rows):  # nan (skin tone unknown) equals nan here
        return [{k: "nan" if isinstance(v, float) and v != v else v for k, v in r.items()} for r in rows]

    assert comparable(_table(first)) == comparable(_table(second))


def test_interrupted_ingest_leaves_nothing_that_looks_complete(ray_local, isic_tree, tmp_path, monkeypatch):
    root, _ = isic_tree
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = ingest.shard_record
    monkeypatch.setattr(ingest, "shard_record", boom)
    out = tmp_path / "shards"
    with pytest.raises(KeyboardInterrupt):
        ingest.run([str(root)], str(out), image_size=32, progress=False)
    assert not out.exists() and os.listdir(tmp_path) == []


def test_refuses_a_non_empty_out_unless_overwrite(ray_local, isic_tree, tmp_path):
    root, _ = isic_tree
    out = tmp_path / "shards"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    with pytest.raises(ingest.IngestError, match="not empty"):
        ingest.run([str(root)], str(out), image_size=32, progress=False)
    with pytest.raises(ingest.IngestError, match="only replaces an earlier ingest output"):
        ingest.run([str(root)], str(out), image_size=32, progress=False, overwrite=True)
    assert (out / "precious.txt").exists()
    (out / "precious.txt").unlink()
    ingest.run([str(root)], str(out), image_size=32, progress=False, seed=1)
    ingest.run([str(root)], str(out), image_size=32, progress=False, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 0
    assert sorted(os.listdir(tmp_path)) == ["shards"]  # no temp or old folder left behind


def test_out_may_not_overlap_the_inputs(tmp_path):
    from cnd_ray.data import synth

    synth.run(str(tmp_path / "data" / "isic"), num_images=4, image_size=32, test_per_tone=0, progress=False)
    for out in (tmp_path / "data", tmp_path / "data" / "isic", tmp_path / "data" / "isic" / "shards"):
        with pytest.raises(ingest.IngestError, match="overlaps --root"):
            ingest.run([str(tmp_path / "data" / "isic")], str(out), overwrite=True, progress=False)
    assert len(os.listdir(tmp_path / "data" / "isic" / "train")) == 4


def test_a_test_archive_is_kept_whole_and_nothing_of_it_is_trained_on(ray_local, tmp_path):
    """--test: every image under it lands in the test split (never train or val); a training image
    that is a copy of a test image, or shares a patient with one, is left out and listed."""
    from cnd_ray.data import synth, tone

    synth.run(str(tmp_path / "isic"), num_images=30, image_size=32, malignant_fraction=0.3, test_per_tone=4,
              progress=False)
    test = synth.test_folder(tmp_path / "isic")
    gt = tmp_path / "isic" / synth.GROUND_TRUTH
    rows = list(csv.reader(open(gt)))
    held = list(csv.reader(open(test / synth.GROUND_TRUTH)))[1:]
    # A copy of a test image, and an image of a test image's patient, among the training archive's.
    Image.open(test / "train" / f"{held[0][0]}.jpg").save(tmp_path / "isic" / "train" / f"{held[0][0]}.jpg")
    Image.open(tmp_path / "isic" / "train" / f"{rows[1][0]}.jpg").save(tmp_path / "isic" / "train" / "ISIC_9999999.jpg")
    rows += [held[0], ["ISIC_9999999", held[1][1], *rows[1][2:]]]
    with open(gt, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    m = ingest.run([str(tmp_path / "isic")], str(tmp_path / "shards"), image_size=16, val_fraction=0.3,
                   progress=False, test=[str(test)])
    assert m["test_roots"] == [str(test)] and sum(m["splits"]["test"].values()) == 12
    assert sum(sum(c.values()) for s, c in m["splits"].items() if s != "test") == 30
    table = _table(tmp_path / "shards")
    in_test = [r for r in table if r["split"] == "test"]
    assert {r["image_id"] for r in in_test} == {h[0] for h in held}
    # Every skin-tone group alike, as ingest estimates it from the pixels.
    assert sorted(tone.group_of(r["fitzpatrick"]) for r in in_test) == sorted(tone.GROUPS * 4)
    assert not {r["patient_id"] for r in in_test} & {r["patient_id"] for r in table if r["split"] != "test"}
    assert [r["image_id"] for r in _csv(tmp_path / "shards" / "duplicates.csv")] == [held[0][0]]
    rejects = _csv(tmp_path / "shards" / "rejects.csv")
    assert [(os.path.basename(r["path"]), r["reason"].split(":")[0]) for r in rejects] == [
        ("ISIC_9999999.jpg", ingest.TEST_LEAK)]
    with pytest.raises(ingest.IngestError, match="--test .* overlaps --root"):
        ingest.run([str(tmp_path)], str(tmp_path.parent / "other"), test=[str(test)], progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ingest.IngestError, match="no ISIC ground truth found under --test"):
        ingest.run([str(tmp_path / "isic")], str(tmp_path / "x"), test=[str(tmp_path / "empty")], progress=False)


def test_nothing_to_ingest_is_an_error(ray_local, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ingest.IngestError, match="no ISIC ground truth found"):
        ingest.run([str(tmp_path / "empty")], str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
    only_bad = tmp_path / "bad"
    (only_bad / "train").mkdir(parents=True)
    (only_bad / "train" / "ISIC_0000001.jpg").write_bytes(b"")
    (only_bad / "ISIC_2020_Training_GroundTruth.csv").write_text(
        "image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target\n"
        "ISIC_0000001,IP_1,male,40.0,torso,nevus,benign,0\n")
    with pytest.raises(ingest.IngestError, match="no image could be ingested.*rejects.csv"):
        ingest.run([str(only_bad)], str(tmp_path / "out"), progress=False)
    assert "empty file" in (tmp_path / "out" / "rejects.csv").read_text()  # the report is kept


@pytest.mark.parametrize("kwargs, match", [
    ({"labels": "cancer"}, "--labels"), ({"image_size": 4}, "--image-size"),
    ({"val_fraction": 1.0}, "--val-fraction"), ({"latent": "/nonexistent"}, "--latent"),
    ({"seed": -1}, "--seed"), ({"shard_mb": 0}, "--shard-mb"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, kwargs, match):
    (tmp_path / "in").mkdir()
    with pytest.raises(ingest.IngestError, match=match):
        ingest.run([str(tmp_path / "in")], str(tmp_path / "out"), progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_missing_root_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cnd_ray", "ingest", "--root", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"cnd-ray ingest: error: --root {tmp_path / 'nope'}: not a folder"]


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_load_handles_modes_16_bit_and_bad_bytes():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))  # 16-bit greyscale
    assert Image.open(io.BytesIO(_encode(Image.fromarray(ramp), "PNG"))).mode.startswith("I")
    arr, size = image_lib.load(_encode(Image.fromarray(ramp), "PNG"), 32)
    assert size == (64, 64) and arr.shape == (32, 32, 3)
    assert arr.min() < 10 and arr.max() > 245  # the full 16-bit range maps onto 0..255
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    for mode in ("L", "P", "RGBA", "CMYK", "1", "LA"):
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        out, _ = image_lib.load(_encode(rgb.convert(mode), fmt), 16)
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    good = _encode(rgb, "JPEG")
    for data, category in ((b"", "empty file"), (b"GIF89a nonsense", "not an image"),
                           (b"%PDF-1.4", "not an image"), (good[: len(good) // 2], "truncated image")):
        with pytest.raises(image_lib.BadImage, match=f"^{category}:"):
            image_lib.load(data, 16)


def test_load_refuses_decompression_bombs():
    bomb = _encode(Image.new("1", (12000, 8000)), "PNG")  # 96M pixels in a few kB
    assert len(bomb) < 100_000
    with pytest.raises(image_lib.BadImage, match="^too large:"):
        image_lib.load(bomb, 16)


# Runs in a fresh interpreter: the peak resident memory of decoding the files given, one at a time.
_PEAK = """
import resource, sys
from cnd_ray.data import image
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if len(sys.argv) > 3:  # a hard address-space limit this far above what is mapped now
    import re
    vm = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[3]), resource.RLIM_INFINITY))
for path in sys.argv[2].split(","):
    try:
        out = image.load(open(path, "rb").read(), int(sys.argv[1]))[0].shape
    except image.BadImage as e:
        out = str(e)
    print(path.rsplit("/", 1)[-1], out)
print("peak_mb", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def _peak(files, size, limit=None):
    cmd = [sys.executable, "-c", _PEAK, str(size), ",".join(map(str, files))] + ([str(limit)] if limit else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.split("\n")
    return dict(line.split(" ", 1) for line in lines if line)


def test_hostile_aspect_ratios_and_big_scans_decode_in_bounded_memory(tmp_path):
    # The bombs: 121 bytes that resized whole took 5.4 GB, and a MemoryError; plus the
    # largest scan the pixel guard lets through, in the mode that costs most to convert.
    files = {"thin.png": Image.new("RGB", (1, 20000), (200, 150, 120)),
             "thinner.png": Image.new("RGB", (1, 100000), (200, 150, 120)),
             "wide16.png": Image.new("I;16", (9000, 9000), 30000)}
    for name, img in files.items():
        img.save(tmp_path / name)
    assert (tmp_path / "thinner.png").stat().st_size < 2000
    got = _peak([tmp_path / n for n in files], 256)
    assert got["thin.png"] == got["thinner.png"] == got["wide16.png"] == "(256, 256, 3)", got
    assert float(got["peak_mb"]) < 1024, got  # per decode task: under 1 GB


def test_running_out_of_memory_on_one_image_makes_it_a_reject(tmp_path):
    Image.new("RGB", (8000, 8000), (200, 150, 120)).save(tmp_path / "big.png")  # 192 MB decoded
    Image.new("RGB", (64, 64), (200, 150, 120)).save(tmp_path / "small.png")
    got = _peak([tmp_path / "big.png", tmp_path / "small.png"], 32, limit=100 * 2**20)
    assert got["big.png"].startswith("out of memory:"), got
    assert got["small.png"] == "(32, 32, 3)"  # the next image decodes as usual


def test_load_resizes_short_side_and_centre_crops():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 20:60] = 255  # a white centre square in a wide black image
    out, size = image_lib.load(_encode(Image.fromarray(arr), "PNG"), 20)
    assert size == (80, 40) and out.shape == (20, 20, 3)
    assert out.mean() > 250  # the crop is the centre square


@pytest.mark.slow
def test_latent_ingest_stores_posteriors_of_image_and_flip(latent_shards):
    torch = pytest.importorskip("torch")
    out, m, vae = latent_shards
    assert m["latent"]["shape"] == [2, 4, 8, 8] and len(m["latent"]["sha256"]) == 64
    row = _table(out)[0]
    mean = np.frombuffer(row["latent_mean"], np.float16).reshape(2, 4, 8, 8)
    logvar = np.frombuffer(row["latent_logvar"], np.float16).reshape(2, 4, 8, 8)
    x = torch.from_numpy(image_lib.decode_png(row["image"]).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        post = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
    assert np.allclose(mean, post.mean.numpy(), atol=2e-2)
    assert np.allclose(logvar, post.logvar.numpy(), atol=2e-2)
    assert not np.allclose(mean[0], mean[1])  # the flip is a different posterior
