"""Ray Data over ingested shards -> per-worker torch batches for the training loop.

Driver side: `dataset(cfg, split)` checks the shards against the config (image size, latent VAE) and
builds a lazy Ray Dataset that reads Parquet files in a new order each epoch and decodes in Ray
Data tasks. Worker side: `batches(shard, cfg, epoch)` iterates `get_dataset_shard(...)` and
`model_batch` turns a batch into the model's input with the worker's own torch RNG (random flip; a
latent draw z = scale * (mu + sigma * xi) from the stored posterior), so augmentation follows the
checkpointed RNG. Nothing is materialised: the data set streams, whatever its size.
"""
from __future__ import annotations

import json
import os
import posixpath
import time
from typing import Iterator

import numpy as np
import torch

from cnd_ray.config import Config
from cnd_ray.data import image as image_lib
from cnd_ray.data.ingest import SCHEMA_VERSION
from cnd_ray.errors import UserError

# Decode tasks take half a CPU so that, on a 2-core machine, Ray Data keeps running beside the
# training workers (whole-CPU tasks starve it; DESIGN.md).
DATA_TASK_CPUS = 0.5
FITZPATRICK_TYPES = 6


def _join(root: str, name: str) -> str:
    return posixpath.join(root, name) if "://" in root else os.path.join(root, name)


def read_manifest(shards: str) -> dict:
    """The manifest.json of an ingest output (local folder or pyarrow-filesystem URI)."""
    if not shards:
        raise UserError("data.shards: empty; point it at a folder written by `cnd-ray ingest`")
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(shards) if "://" in shards else (
            pafs.LocalFileSystem(), os.path.abspath(shards))
        with fs.open_input_stream(posixpath.join(path, "manifest.json")) as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise UserError(f"data.shards: {shards} has no readable manifest.json ({e}); "
                        "write one with `cnd-ray ingest`") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"data.shards: {shards} has schema version {manifest.get('schema_version')}, "
                        f"this cnd_ray reads {SCHEMA_VERSION}: re-run `cnd-ray ingest`")
    return manifest


def check(manifest: dict, cfg: Config, shards: str) -> None:
    """Refuse shards made for another image size or VAE (GUARANTEES 4: latent caches cannot lie)."""
    d = cfg.data
    if manifest["image_size"] != d.image_size:
        raise UserError(f"data.image_size={d.image_size} but {shards} was ingested at "
                        f"{manifest['image_size']} px: set data.image_size={manifest['image_size']} "
                        "or re-ingest with --image-size")
    if d.space == "latent":
        lat = manifest.get("latent")
        if not lat:
            raise UserError(f"data.space=latent but {shards} holds no latents: ingest with "
                            "--latent <VAE folder>, or set data.space=pixel")
        want = [2, cfg.in_channels, cfg.input_size, cfg.input_size]
        if lat["shape"] != want:
            raise UserError(f"{shards} holds latents of shape {lat['shape']}, the model wants {want}")
        if lat.get("scaling_factor") not in (None, d.latent_scale):
            raise UserError(f"data.latent_scale={d.latent_scale} but the VAE of {shards} says "
                            f"{lat['scaling_factor']}")


def shard_files(shards: str, manifest: dict, split: str) -> list[str]:
    files = [_join(shards, s["file"]) for s in manifest["shards"] if s["split"] == split]
    if not files:
        raise UserError(f"{shards} has no '{split}' rows (splits: {manifest.get('splits')})")
    return files


def _decode(batch: dict, space: str, repeat: int) -> dict:
    """Parquet rows -> numeric columns; malignant rows repeated `repeat` times to rebalance."""
    out = {"label": batch["label"].astype(np.int64), "tone": batch["fitzpatrick"].astype(np.int64),
           "row_id": batch["row_id"].astype(np.int64)}
    if space == "pixel":
        out["image"] = np.stack([image_lib.decode_png(b) for b in batch["image"]]).transpose(0, 3, 1, 2)
    else:
        for key, col in (("mean", "latent_mean"), ("logvar", "latent_logvar")):  # flat float16
            out[key] = np.stack([np.frombuffer(b, np.float16) for b in batch[col]])
    if repeat > 1:
        times = np.where(out["label"] == 1, repeat, 1)
        out = {k: np.repeat(v, times, axis=0) for k, v in out.items()}
    return out


def oversample_factor(manifest: dict, split: str) -> int:
    """How many times each malignant row is repeated to bring the classes near 1:1."""
    c = manifest["splits"][split]
    return max(1, round(c["benign"] / c["malignant"])) if c["malignant"] else 1


def _read_shard(batch: dict, columns: list[str], space: str, repeat: int, shuffle: bool) -> Iterator[dict]:
    """One Parquet shard -> decoded batches, one per row group (in a random order when shuffling)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    for path in batch["file"]:
        if "://" in path:
            fs, inner = pafs.FileSystem.from_uri(path)
            pf = pq.ParquetFile(fs.open_input_file(inner))
        else:
            pf = pq.ParquetFile(path)
        groups = np.arange(pf.num_row_groups)
        if shuffle:
            np.random.default_rng().shuffle(groups)
        for g in groups:
            table = pf.read_row_group(int(g), columns=columns)  # only the columns training needs
            yield _decode({c: table.column(c).to_numpy(zero_copy_only=False) for c in columns},
                          space, repeat)


def dataset(cfg: Config, split: str = "train", shuffle: bool = True):
    """A lazy Ray Dataset of decoded numeric columns over the ingested shards of one split.

    Each iteration is one epoch: with shuffle, shards and their row groups come in a new order
    (the worker's local shuffle buffer then mixes rows); without, in shard order. We read the
    Parquet files ourselves over a list of file names rather than with read_parquet, whose
    per-execution file listing cost ~2 s at every epoch start here (a small data set's epoch is a
    few dozen steps); this costs ~0.1 s (bench/data_stream.py).
    """
    import ray
    from ray.data import RandomSeedConfig

    shards = cfg.data.shards
    manifest = read_manifest(shards)
    check(manifest, cfg, shards)
    columns = ["row_id", "label", "fitzpatrick"] + (
        ["image"] if cfg.data.space == "pixel" else ["latent_mean", "latent_logvar"])
    repeat = oversample_factor(manifest, split) if cfg.data.balance == "oversample" else 1
    files = shard_files(shards, manifest, split)
    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    if shuffle:  # a plain int seed would repeat the same order every epoch
        ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=cfg.train.seed, reseed_after_execution=True))
    return ds.map_batches(_read_shard, batch_size=1, batch_format="numpy", num_cpus=DATA_TASK_CPUS,
                          fn_kwargs={"columns": columns, "space": cfg.data.space, "repeat": repeat,
                                     "shuffle": shuffle})


class DataWait:
    """Seconds the training loop spent blocked waiting for its next batch."""

    def __init__(self):
        self.seconds = 0.0
        self.batches = 0

    def timed(self, iterable) -> Iterator:
        it = iter(iterable)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - t0
            self.batches += 1
            yield item


def batches(shard, cfg: Config, epoch: int, wait: DataWait | None = None) -> Iterator[dict]:
    """One epoch of this worker's batches (numpy -> torch on CPU), locally shuffled per epoch."""
    buffer = cfg.data.shuffle_buffer
    it = shard.iter_torch_batches(
        batch_size=cfg.per_worker_batch, drop_last=True, prefetch_batches=2, device="cpu",
        local_shuffle_buffer_size=buffer or None,
        local_shuffle_seed=(cfg.train.seed * 100_003 + epoch) if buffer else None)
    return wait.timed(it) if wait is not None else iter(it)


def model_batch(batch: dict, cfg: Config, generator: torch.Generator | None = None) -> dict:
    """A stream batch -> {"x", "y", "id"[, "tone"]} for engine.train_step, with random h-flips."""
    y = batch["label"].long()
    n = y.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5  # (N,)
    if cfg.data.space == "pixel":
        x = batch["image"].float() / 127.5 - 1.0  # (N, 3, S, S) in [-1, 1]
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    else:
        shape = (n, 2, cfg.in_channels, cfg.input_size, cfg.input_size)
        pick = torch.arange(n), flip.long()  # index 1 = the posterior of the flipped image
        mean = batch["mean"].view(shape)[pick].float()  # (N, C, h, w)
        logvar = batch["logvar"].view(shape)[pick].float()
        xi = torch.randn(mean.shape, generator=generator)
        x = cfg.data.latent_scale * (mean + torch.exp(0.5 * logvar) * xi)
    out = {"x": x, "y": y, "id": batch["row_id"].tolist()}
    if cfg.model.tone_groups:
        out["tone"] = tone_group(batch["tone"].long(), cfg.model.tone_groups)
    return out


def tone_group(fitzpatrick: torch.Tensor, groups: int) -> torch.Tensor:
    """Fitzpatrick type 1..6 -> one of `groups` equal bands (3: I-II / III-IV / V-VI, as DDI);
    unknown (0) -> the null group `groups`."""
    g = (fitzpatrick - 1).clamp(min=0) * groups // FITZPATRICK_TYPES
    return torch.where(fitzpatrick > 0, g, torch.full_like(g, groups))
