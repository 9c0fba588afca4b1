"""A shard set: the folder (or URI) that `cnd-ray ingest` writes - Parquet shards and the
manifest.json that describes them (schema version, image size, latent VAE, rows per split and
class, each shard's file, split, rows and sha256). Reading and checking it, before Ray starts, is
all this module does, so the training stream, ingest, the VAE loader and evaluation share it
without importing each other.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
from dataclasses import dataclass

from cnd_ray import storage
from cnd_ray.config import Config
from cnd_ray.errors import UserError

SCHEMA_VERSION = 1  # of manifest.json and the shards' columns; ingest writes it, readers check it


@dataclass(frozen=True)
class Counts:
    """A split's images per class."""

    benign: int = 0
    malignant: int = 0

    @property
    def rows(self) -> int:
        return self.benign + self.malignant

    def __str__(self) -> str:
        return f"{self.benign} benign, {self.malignant} malignant"


@dataclass(frozen=True)
class Shard:
    """One Parquet file of the set."""

    file: str  # relative to the shard set's folder
    split: str
    rows: int
    sha256: str  # "" where an early ingest recorded none


@dataclass(frozen=True)
class Manifest:
    """What readers use of the manifest.json `cnd-ray ingest` writes (DATA.md lists every field).
    `raw` is the file as written: what the judge's and the baselines' cache names hash, and what a
    run logs."""

    image_size: int
    label_mode: str
    ak_malignant: bool
    latent: dict | None  # latent shards: the VAE's folder, sha256, shape, scaling_factor; else None
    splits: dict[str, Counts]
    shards: tuple[Shard, ...]
    skin_tones: dict[str, int]  # images per ITA band
    raw: dict = dataclasses.field(repr=False, compare=False)

    @classmethod
    def parse(cls, raw: dict, where: str = "manifest.json") -> "Manifest":
        """A Manifest of the decoded manifest.json; a missing or malformed field is a UserError
        naming it and `where`."""
        try:
            return cls(image_size=int(raw["image_size"]), label_mode=raw["label_mode"],
                       ak_malignant=bool(raw.get("ak_malignant", False)), latent=raw.get("latent") or None,
                       splits={s: Counts(int(c["benign"]), int(c["malignant"])) for s, c in raw["splits"].items()},
                       shards=tuple(Shard(s["file"], s["split"], int(s["rows"]), s.get("sha256", "")) for s in raw["shards"]),
                       skin_tones=dict(raw.get("skin_tones", {})), raw=raw)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{where}: malformed or missing field ({type(e).__name__}: {e}); re-run "
                            "`cnd-ray ingest`") from None

    def counts(self, split: str) -> Counts:
        """The split's images per class (none for a split the set lacks)."""
        return self.splits.get(split, Counts())

    def describe_splits(self) -> str:
        """'train 726 benign, 281 malignant; val ...' (for messages)."""
        return "; ".join(f"{s} {c}" for s, c in self.splits.items()) or "none"

    def digest(self) -> str:
        """sha256 (hex) of the manifest as written: another ingest, another digest."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()


def read_manifest(shards: str) -> Manifest:
    """The manifest.json of an ingest output (local folder or pyarrow-filesystem URI)."""
    if not shards:
        raise UserError("data.shards: empty; point it at a folder written by `cnd-ray ingest`")
    try:
        fs, path = storage.resolve(shards)
        with fs.open_input_stream(posixpath.join(path, "manifest.json")) as f:
            raw = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise UserError(f"data.shards: {shards} has no readable manifest.json ({e}); "
                        "write one with `cnd-ray ingest`") from None
    if not isinstance(raw, dict) or raw.get("schema_version") != SCHEMA_VERSION:
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        raise UserError(f"data.shards: {shards} has schema version {version}, "
                        f"this cnd_ray reads {SCHEMA_VERSION}: re-run `cnd-ray ingest`")
    return Manifest.parse(raw, f"data.shards: {storage.join(shards, 'manifest.json')}")


def check(manifest: Manifest, cfg: Config, shards: str) -> None:
    """Refuse shards made for another image size or VAE (GUARANTEES 4: latent caches cannot lie)."""
    d = cfg.data
    if manifest.image_size != d.image_size:
        raise UserError(f"data.image_size={d.image_size} but {shards} was ingested at "
                        f"{manifest.image_size} px: set data.image_size={manifest.image_size} "
                        "or re-ingest with --image-size")
    if d.space == "latent":
        lat = manifest.latent
        if not lat:
            raise UserError(f"data.space=latent but {shards} holds no latents: ingest with "
                            "--latent <VAE folder>, or set data.space=pixel")
        want = [2, cfg.in_channels, cfg.input_size, cfg.input_size]
        if lat["shape"] != want:
            raise UserError(f"{shards} holds latents of shape {lat['shape']}, the model wants {want}")
        if lat.get("scaling_factor") not in (None, d.latent_scale):
            raise UserError(f"data.latent_scale={d.latent_scale} but the VAE of {shards} says "
                            f"{lat['scaling_factor']}")


def check_files(shards: str, manifest: Manifest) -> None:
    """Every shard the manifest lists is there, with a readable footer and the rows it says: a
    truncated or replaced file is named here, before a run starts, not as a decode task's
    traceback minutes into it."""
    import pyarrow as pa

    for s in manifest.shards:
        path = storage.join(shards, s.file)
        try:
            rows = parquet_file(path).metadata.num_rows
        except (OSError, pa.ArrowInvalid) as e:  # missing, truncated, not Parquet
            raise UserError(f"damaged shard {path}: {str(e).splitlines()[0].rstrip('.')}; re-ingest "
                            f"{shards}") from None
        if rows != s.rows:
            raise UserError(f"damaged shard {path}: {rows} rows where the manifest says {s.rows}; "
                            f"re-ingest {shards}")


def files(shards: str, manifest: Manifest, split: str) -> list[str]:
    files = [storage.join(shards, s.file) for s in manifest.shards if s.split == split]
    if not files:
        raise UserError(f"{shards} has no '{split}' rows (splits: {manifest.describe_splits()})")
    return files


def oversample_factor(manifest: Manifest, split: str) -> int:
    """How many times each malignant row is repeated to bring the classes near 1:1."""
    c = manifest.counts(split)
    return max(1, round(c.benign / c.malignant)) if c.malignant else 1


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
