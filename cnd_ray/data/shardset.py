"""A shard set: the folder (or URI) that `cnd-ray ingest` writes - Parquet shards and the
manifest.json that describes them (schema version, image size, latent VAE, rows per split and
class, each shard's file, split, rows and sha256). Reading and checking it, before Ray starts, is
all this module does, so the training stream, ingest, the VAE loader and evaluation share it
without importing each other.
"""
from __future__ import annotations

import hashlib
import json
import posixpath

from cnd_ray import storage
from cnd_ray.config import Config
from cnd_ray.errors import UserError

SCHEMA_VERSION = 1  # of manifest.json and the shards' columns; ingest writes it, readers check it


def read_manifest(shards: str) -> dict:
    """The manifest.json of an ingest output (local folder or pyarrow-filesystem URI)."""
    if not shards:
        raise UserError("data.shards: empty; point it at a folder written by `cnd-ray ingest`")
    try:
        fs, path = storage.resolve(shards)
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


def check_files(shards: str, manifest: dict) -> None:
    """Every shard the manifest lists is there, with a readable footer and the rows it says: a
    truncated or replaced file is named here, before a run starts, not as a decode task's
    traceback minutes into it."""
    import pyarrow as pa

    for s in manifest["shards"]:
        path = storage.join(shards, s["file"])
        try:
            rows = parquet_file(path).metadata.num_rows
        except (OSError, pa.ArrowInvalid) as e:  # missing, truncated, not Parquet
            raise UserError(f"damaged shard {path}: {str(e).splitlines()[0].rstrip('.')}; re-ingest "
                            f"{shards}") from None
        if rows != s["rows"]:
            raise UserError(f"damaged shard {path}: {rows} rows where the manifest says {s['rows']}; "
                            f"re-ingest {shards}")


def files(shards: str, manifest: dict, split: str) -> list[str]:
    files = [storage.join(shards, s["file"]) for s in manifest["shards"] if s["split"] == split]
    if not files:
        raise UserError(f"{shards} has no '{split}' rows (splits: {manifest.get('splits')})")
    return files


def oversample_factor(manifest: dict, split: str) -> int:
    """How many times each malignant row is repeated to bring the classes near 1:1."""
    c = manifest["splits"].get(split, {"benign": 0, "malignant": 0})
    return max(1, round(c["benign"] / c["malignant"])) if c["malignant"] else 1


def parquet_file(path: str):
    """A ParquetFile on a local path or any pyarrow-filesystem URI (s3://, gs://, ...), checking
    the page CRCs that ingest writes (shards without them read as before)."""
    import pyarrow.parquet as pq

    fs, inner = storage.resolve(path)
    return pq.ParquetFile(fs.open_input_file(inner), page_checksum_verification=True)


def file_sha256(path: str) -> str:
    """Hex sha256 of a local file or a pyarrow-filesystem URI, read in 8 MiB chunks."""
    fs, inner = storage.resolve(path)
    digest = hashlib.sha256()
    with fs.open_input_stream(inner) as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()
