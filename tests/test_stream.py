"""The Ray Data stream: shards -> decoded batches -> model input, per-epoch shuffle, balancing."""
import json

import pyarrow.parquet as pq
import pytest
import torch

from cnd_ray import config as C
from cnd_ray.data import image as image_lib
from cnd_ray.data import augment, shardset
from cnd_ray.launch import stream
from cnd_ray.errors import UserError


def _cfg(shards, **over):
    base = {"data.shards": str(shards), "data.image_size": 32, "data.space": "pixel",
            "train.global_batch": 4}
    base.update(over)
    return C.load("debug", [f"{k}={v}" for k, v in base.items()])


def _rows(folder, split):
    m = json.loads((folder / "manifest.json").read_text())
    files = [str(folder / s["file"]) for s in m["shards"] if s["split"] == split]
    return {r["row_id"]: r for r in pq.read_table(files).to_pylist()}


def _epoch(ds):
    return [b for b in ds.iter_torch_batches(batch_size=8, device="cpu")]


def test_pixel_round_trip_shards_to_batches(ingested):
    folder, _ = ingested["melanoma"]
    cfg = _cfg(folder)
    rows = _rows(folder, "train")
    seen = {}
    for batch in _epoch(stream.dataset(cfg, "train")):
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, 32, 32)
        for rid, img, y in zip(batch["row_id"].tolist(), batch["image"], batch["label"].tolist()):
            seen[rid] = (img, y)
    assert set(seen) == set(rows)  # every train row exactly once per epoch
    for rid, (img, y) in seen.items():
        assert y == rows[rid]["label"]
        assert torch.equal(img, torch.from_numpy(image_lib.decode_png(rows[rid]["image"]).copy()).permute(2, 0, 1))


def _order(ds):
    rows = [(e, i) for b in _epoch(ds) for e, i in zip(b["epoch"].tolist(), b["row_id"].tolist())]
    return [[i for e, i in rows if e == epoch] for epoch in sorted({e for e, _ in rows})]


def test_epochs_are_reshuffled_and_reproducible_from_seed_and_epoch(ingested):
    folder, _ = ingested["melanoma"]
    cfg = _cfg(folder)
    orders = _order(stream.dataset(cfg, "train", epochs=(0, 6)))
    assert len(orders) == 6 and all(sorted(o) == sorted(orders[0]) for o in orders)
    assert len({tuple(o) for o in orders}) > 1  # new orders (only 3 row groups here: 6 orders)
    assert _order(stream.dataset(cfg, "train", epochs=(0, 6))) == orders  # same seed, same stream
    assert _order(stream.dataset(cfg, "train", epochs=(4, 6))) == orders[4:]  # a resume at epoch 4
    other = _order(stream.dataset(_cfg(folder, **{"train.seed": 1}), "train", epochs=(0, 1)))
    assert other[0] != orders[0]
    plain = _order(stream.dataset(cfg, "train", shuffle=False))
    assert plain[0] == list(_rows(folder, "train"))  # evaluation: shard order, every row once


def test_relative_shards_path_works_inside_ray_tasks(ingested, monkeypatch):
    folder, _ = ingested["melanoma"]
    monkeypatch.chdir(folder.parent)
    rows = [i for b in _epoch(stream.dataset(_cfg(folder.name), "train")) for i in b["row_id"].tolist()]
    assert len(rows) == sum(ingested["melanoma"][1]["splits"]["train"].values())


def test_oversampling_brings_classes_near_balance(ingested):
    folder, manifest = ingested["melanoma"]
    k = shardset.oversample_factor(shardset.Manifest.parse(manifest), "train")
    c = manifest["splits"]["train"]
    assert k == round(c["benign"] / c["malignant"]) > 1
    labels = [y for b in _epoch(stream.dataset(_cfg(folder, **{"data.balance": "oversample"}), "train"))
              for y in b["label"].tolist()]
    assert labels.count(1) == k * c["malignant"] and labels.count(0) == c["benign"]
    val = [y for b in _epoch(stream.dataset(_cfg(folder, **{"data.balance": "oversample"}), "val",
                                            shuffle=False)) for y in b["label"].tolist()]
    assert sorted(val) == sorted(manifest["splits"]["val"]["benign"] * [0]
                                 + manifest["splits"]["val"]["malignant"] * [1])  # never oversampled


def test_model_batch_pixel_flip_and_tone():
    cfg = C.load("debug", ["data.space=pixel", "data.image_size=16", "model.tone_groups=3"])
    img = torch.arange(2 * 3 * 16 * 16, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 3, 16, 16)
    batch = {"image": img, "label": torch.tensor([0, 1]), "row_id": torch.tensor([7, 9]),
             "tone": torch.tensor([1, 0])}
    g = torch.Generator().manual_seed(0)
    flips = set()
    for _ in range(20):
        out = augment.model_batch(batch, cfg, g)
        assert out["x"].dtype == torch.float32 and out["x"].min() >= -1 and out["x"].max() <= 1
        x0 = img[0].float() / 127.5 - 1
        flips.add(torch.equal(out["x"][0], x0.flip(-1)))
        assert torch.equal(out["x"][0], x0) or torch.equal(out["x"][0], x0.flip(-1))
    assert flips == {True, False}
    assert out["id"] == [7, 9] and out["tone"].tolist() == [0, 3]  # type I -> group 0; unknown -> null


def test_tone_groups_follow_fitzpatrick_bands():
    fitz = torch.arange(0, 7)
    assert augment.tone_group(fitz, 3).tolist() == [3, 0, 0, 1, 1, 2, 2]
    assert augment.tone_group(fitz, 6).tolist() == [6, 0, 1, 2, 3, 4, 5]
    assert augment.tone_group(fitz, 1).tolist() == [1, 0, 0, 0, 0, 0, 0]


@pytest.mark.slow
def test_latent_stream_draws_from_the_stored_posterior(latent_shards):
    folder, manifest, _ = latent_shards
    cfg = C.load("debug", [f"data.shards={folder}", "data.image_size=64", "data.space=latent",
                           "train.global_batch=4"])
    batch = _epoch(stream.dataset(cfg, "train"))[0]
    assert batch["mean"].dtype == torch.float16 and batch["mean"].shape[1:] == (2 * 4 * 8 * 8,)
    draws = torch.stack([augment.model_batch(batch, cfg, torch.Generator().manual_seed(s))["x"]
                         for s in range(200)])  # (200, N, 4, 8, 8)
    mean = batch["mean"].view(-1, 2, 4, 8, 8).float()
    sigma = torch.exp(0.5 * batch["logvar"].view(-1, 2, 4, 8, 8).float())
    # each draw is scale * (mu + sigma * xi) for the image or its flip
    z = draws / cfg.data.latent_scale
    xi0, xi1 = (z - mean[None, :, 0]) / sigma[None, :, 0], (z - mean[None, :, 1]) / sigma[None, :, 1]
    use0 = (xi0.abs().amax(dim=(2, 3, 4)) < (xi1.abs().amax(dim=(2, 3, 4))))
    xi = torch.where(use0[..., None, None, None], xi0, xi1)
    assert abs(xi.mean().item()) < 0.05 and abs(xi.std().item() - 1) < 0.05
    assert 0.3 < use0.float().mean().item() < 0.7  # both flips are drawn


def test_check_refuses_shards_made_for_another_model(ingested, latent_shards, tmp_path):
    folder, manifest = ingested["melanoma"]
    with pytest.raises(UserError, match="data.image_size=64 .* ingested at 32 px"):
        shardset.check(shardset.Manifest.parse(manifest), _cfg(folder, **{"data.image_size": 64}), str(folder))
    with pytest.raises(UserError, match="holds no latents"):
        shardset.check(shardset.Manifest.parse(manifest), _cfg(folder, **{"data.space": "latent"}), str(folder))
    lat_folder, lat_manifest, _ = latent_shards
    with pytest.raises(UserError, match="latent_scale"):
        shardset.check(shardset.Manifest.parse(lat_manifest), C.load("debug", ["data.image_size=64", "data.space=latent",
                                                       "data.latent_scale=0.5"]),
                     str(lat_folder))
    with pytest.raises(UserError, match="manifest.json"):
        shardset.read_manifest(str(folder / "nowhere"))
    # A manifest.json that lacks a field readers need: one line naming the field and the file.
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": shardset.SCHEMA_VERSION, "image_size": 32}))
    with pytest.raises(UserError, match=r"^data.shards: .*manifest.json: malformed or missing field "
                                        r"\(KeyError: 'label_mode'\); re-run `cnd-ray ingest`$"):
        shardset.read_manifest(str(tmp_path))


def test_a_damaged_shard_is_named_before_a_run_starts(ingested, tmp_path):
    import shutil
    import subprocess
    import sys

    folder, manifest = ingested["melanoma"]
    copy = tmp_path / "shards"
    shutil.copytree(folder, copy)
    shardset.check_files(str(copy), shardset.Manifest.parse(manifest))  # intact
    shard = copy / manifest["shards"][0]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # the truncated file
    with pytest.raises(UserError, match=rf"^damaged shard {shard}: .*; re-ingest {copy}$"):
        shardset.check_files(str(copy), shardset.Manifest.parse(manifest))
    # As a user meets it: one line, exit 2, before Ray or MLflow start.
    r = subprocess.run([sys.executable, "-m", "cnd_ray", "train", "--config", "debug", f"data.shards={copy}",
                        "data.image_size=32", f"track.tracking_uri=sqlite:///{tmp_path}/m.db"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and f"damaged shard {shard}" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "m.db").exists()
    # A whole file that holds other rows than the manifest says (a shard replaced by another).
    other = copy / manifest["shards"][-1]["file"]
    shard.write_bytes(other.read_bytes())
    if manifest["shards"][-1]["rows"] != manifest["shards"][0]["rows"]:
        with pytest.raises(UserError, match="rows where the manifest says"):
            shardset.check_files(str(copy), shardset.Manifest.parse(manifest))
    shard.unlink()
    with pytest.raises(UserError, match=rf"^damaged shard {shard}: "):
        shardset.check_files(str(copy), shardset.Manifest.parse(manifest))


def test_verify_reads_every_row_and_names_each_damage(ingested, tmp_path):
    """`cnd-ray verify`: clean shards pass (exit 0); zeros written into a shard's pages (the footer
    intact, so the run's start-up check passes it) fail the file's sha256 and the page CRC, named
    by file and row group; an image that no longer decodes is named by its id."""
    import shutil
    import subprocess
    import sys

    import pyarrow as pa

    from cnd_ray.data.shardset import file_sha256

    folder, manifest = ingested["melanoma"]
    assert all(s["sha256"] == file_sha256(str(folder / s["file"])) for s in manifest["shards"])
    good, problems = stream.verify(str(folder), say=lambda line: None)
    assert problems == [] and good == manifest["num_images"]
    copy = tmp_path / "shards"
    shutil.copytree(folder, copy)
    shard = copy / manifest["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    shardset.check_files(str(copy), shardset.Manifest.parse(manifest))  # footer and row count still fine
    _, problems = stream.verify(str(copy), say=lambda line: None)
    assert problems[0] == f"{shard}: sha256 differs from the manifest's (changed since ingest)"
    assert any(p.startswith(f"damaged shard {shard}, row group ") for p in problems[1:]), problems
    # One PNG replaced (the file rewritten with its page checksums: only the image is wrong).
    table = pq.read_table(folder / manifest["shards"][0]["file"])
    images = table.column("image").to_pylist()
    images[3] = b"\x89PNG but not really"
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image",
                                    pa.array(images, pa.binary())), shard, write_page_checksum=True)
    want = table.column("image_id")[3].as_py()
    r = subprocess.run([sys.executable, "-m", "cnd_ray", "verify", str(copy)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"damaged shard {shard}, row group 0, image {want}: " in r.stdout
    assert r.stdout.strip().endswith(f"{manifest['num_images'] - 1} rows read and decoded; 2 problem(s): "
                                      f"re-ingest {copy}"), r.stdout
    assert "Traceback" not in r.stderr


def test_an_image_that_no_longer_decodes_is_named_by_its_id(ingested, tmp_path):
    import pyarrow as pa

    folder, manifest = ingested["melanoma"]
    src = folder / manifest["shards"][0]["file"]
    table = pq.read_table(src)
    images = table.column("image").to_pylist()
    images[3] = b"\x89PNG but not really"
    bad = tmp_path / "bad.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image",
                                    pa.array(images, pa.binary())), bad)
    want = table.column("image_id")[3].as_py()
    with pytest.raises(stream.DamagedShard, match=rf"^damaged shard {bad}, row group 0, image {want}: "):
        stream.GroupCache(2 ** 20).get(str(bad), 0, ["row_id", "label", "fitzpatrick", "image"], "pixel")
    # As Ray hands it to a worker: the line is found inside the wrapped traceback.
    wrapped = RuntimeError(f'Traceback...\n    raise DamagedShard(f"damaged shard {{path}}")\n'
                           f"cnd_ray.launch.stream.DamagedShard: damaged shard {bad}, row group 0: x\n")
    assert stream.damaged(wrapped) == f"damaged shard {bad}, row group 0: x"
    assert stream.damaged(RuntimeError("something else")) is None


def test_data_wait_times_only_the_blocking_next():
    import time

    def slow():
        for i in range(3):
            time.sleep(0.05)
            yield i

    wait = stream.DataWait()
    for _ in wait.timed(slow()):
        time.sleep(0.02)  # "compute" is not counted
    assert wait.blocks == 3 and 0.14 < wait.seconds < 0.2


def _stream_worker(config):
    """A minimal Ray Train loop over the stream; each rank writes what it saw to a file."""
    import ray.train

    cfg = C.from_dict(config["config"])
    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    wait = stream.DataWait()
    gen = torch.Generator().manual_seed(rank)
    seen = [[], []]
    batches = 0
    for batches, batch in enumerate(stream.batches(shard, cfg, wait), 1):
        mb = augment.model_batch(batch, cfg, gen)
        assert mb["x"].shape == (cfg.per_worker_batch, 3, 32, 32)
        for epoch, i in zip(batch["epoch"].tolist(), mb["id"]):
            seen[epoch].append(i)
    with open(f"{config['out']}/rank{rank}.json", "w") as f:
        json.dump({"seen": seen, "wait": wait.seconds, "batches": batches}, f)
    ray.train.report({"data_wait_s": wait.seconds})


@pytest.mark.slow
def test_two_workers_get_equal_disjoint_shards(ingested, ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    folder, manifest = ingested["melanoma"]
    cfg = _cfg(folder, **{"scale.num_workers": 2})
    trainer = TorchTrainer(
        _stream_worker, train_loop_config={"config": cfg.to_dict(), "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets={"train": stream.dataset(cfg, "train", epochs=(0, 2))},
        dataset_config=stream.data_config(),
        run_config=RunConfig(name="stream_test", storage_path=str(tmp_path / "runs")))
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    n_train = manifest["splits"]["train"]["benign"] + manifest["splits"]["train"]["malignant"]
    assert ranks[0]["batches"] == ranks[1]["batches"] > 0  # equal batches per rank: uneven deadlock DDP
    for epoch in (0, 1):
        a, b = ranks[0]["seen"][epoch], ranks[1]["seen"][epoch]
        assert not set(a) & set(b) and len(set(a)) == len(a)  # disjoint, no row twice in an epoch
        assert len(a) + len(b) >= n_train - 2 * cfg.per_worker_batch  # only drop_last remainders lost
    assert ranks[0]["seen"][0] != ranks[0]["seen"][1]  # reshuffled per epoch



def test_the_scheduler_waits_instead_of_spinning_when_nothing_is_in_flight(monkeypatch):
    """Ray Data's loop skips ray.wait with no task running; ours sleeps then, and only then."""
    from ray.data._internal.execution import streaming_executor as se

    installed = se.process_completed_tasks
    assert installed.calm
    stream.calm_idle_scheduler()  # importing twice wraps once
    assert se.process_completed_tasks is installed

    class Op:
        def __init__(self, active):
            self.active = active

        def get_active_tasks(self):
            return self.active

    slept, calls = [], []
    monkeypatch.setattr(stream.time, "sleep", slept.append)
    step = stream.calm(lambda topology, *a, **k: calls.append(topology) or 7)
    idle, busy = {Op([]): None}, {Op([]): None, Op(["task"]): None}
    assert step(idle) == 7 and slept == [0.01]
    assert step(busy) == 7 and slept == [0.01]
    assert calls == [idle, busy]


def _blocks(rows: int, group: int, epochs: int, start=(0, 0), repeat: int = 1, split=None):
    """What dataset() streams, without Ray: each epoch's row groups of `group` rows in an order
    drawn from the epoch, every third row malignant and repeated `repeat` times, from `start`
    (epoch, position) on; `split(i)` keeps only the i-th block (a worker's share)."""
    import numpy as np

    ids = np.arange(rows)
    starts = list(range(0, rows, group))
    i = 0
    for epoch in range(start[0], epochs):
        offset = 0
        for g in np.random.default_rng(epoch).permutation(len(starts)):
            pos = np.arange(offset, offset + len(ids[starts[g]:starts[g] + group]))
            row = ids[starts[g]:starts[g] + group]
            offset += len(row)
            keep = pos >= start[1] if epoch == start[0] else pos >= 0
            pos, row = pos[keep], row[keep]
            times = np.where(row % 3 == 0, repeat, 1)
            block = {"row_id": np.repeat(row, times), "pos": np.repeat(pos, times),
                     "epoch": np.full(times.sum(), epoch)}
            block["copy"] = np.arange(times.sum()) - np.repeat(np.cumsum(times) - times, times)
            if len(pos) and (split is None or split(i)):
                yield block
            i += 1


def _ids(batches):
    return [tuple(b["row_id"].tolist()) for b in batches]


@pytest.mark.parametrize("buffer, rows, repeat", [(1000, 61, 1), (1000, 61, 3), (16, 100, 1),
                                                   (7, 100, 2), (0, 50, 1)])
def test_a_resume_continues_with_the_next_untrained_row_in_the_same_order(buffer, rows, repeat):
    """One worker, any shuffle buffer (the shipped 1000 is larger than this set), oversampling:
    stop after k batches, checkpoint what the rows trained name, resume -> exactly the batches
    the uninterrupted stream trains next."""
    straight = list(stream.rebatch(stream.windows(_blocks(rows, 16, 6, repeat=repeat), buffer, 0), 8))
    for k in (1, 5, len(straight) // 2 + 3):
        seen = stream.Consumed(buffer)
        for b in straight[:k]:
            seen.add(b)
        start = seen.window_start()
        assert start[1] % max(1, buffer) == 0
        again = stream.Consumed(buffer, start, seen.since(start, restored=True))
        resumed = stream.rebatch(stream.windows(again.after_start(_blocks(rows, 16, 6, start, repeat)),
                                                buffer, 0), 8, again.done)
        assert _ids(resumed) == _ids(straight[k:])


def test_windows_shuffle_within_an_epoch_and_keep_every_row_once():
    straight = list(stream.rebatch(stream.windows(_blocks(61, 16, 3, repeat=2), 1000, 0), 1))
    for epoch in range(3):
        got = sorted(b["row_id"][0] for b in straight if b["epoch"][0] == epoch)
        assert got == sorted(list(range(61)) + list(range(0, 61, 3)))
    first = [int(b["row_id"][0]) for b in straight[:20]]
    assert first != sorted(first)  # shuffled, not in row-group order


def test_several_workers_resume_with_no_row_lost_or_trained_twice():
    """Two workers share the stream by blocks; the restart hands the blocks out differently (Ray's
    split follows which worker asks first). Every row (each oversampled copy) before where the
    stream would restart is trained exactly once, none twice, across the restart."""
    import numpy as np

    trained = []

    def run(start, done, split_by, steps):
        ranks = [stream.Consumed(1000, start, done) for _ in range(2)]
        its = [stream.rebatch(stream.windows(r.after_start(_blocks(61, 8, 5, start, 2, split_by(i))),
                                             1000, 0), 4, r.done) for i, r in enumerate(ranks)]
        for _ in range(steps):
            for r, it in zip(ranks, its):
                b = next(it)
                r.add(b)
                trained.extend(zip(b["epoch"].tolist(), b["pos"].tolist(), b["copy"].tolist()))
        start = min(r.window_start() for r in ranks)
        return start, np.concatenate([r.since(start, restored=i == 0) for i, r in enumerate(ranks)])

    start, done = run((0, 0), None, lambda i: lambda j: j % 2 == i, 13)
    assert start > (0, 0) and len(done)  # mid-epoch, with rows trained past the restart point
    end, _ = run(start, done, lambda i: lambda j: (j // 3) % 2 == i, 20)
    assert len(trained) == len(set(trained)) == 2 * 33 * 4  # none twice
    before = {(int(e), int(p), int(c)) for b in _blocks(61, 8, 5, repeat=2)
              for e, p, c in zip(b["epoch"], b["pos"], b["copy"]) if (e, p) < end}
    assert end[0] >= 2 and before <= set(trained)  # none lost: two epochs and more, all there
