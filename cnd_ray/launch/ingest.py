"""`cnd-ray ingest`: ISIC archives -> Parquet shards, with every input accounted for.

Driver: scan the layouts (CSV only), label, drop listed duplicates, group lesions and patients for
the split. Ray Data: read, decode, resize, estimate skin tone (and VAE-encode) in parallel. Driver
again: keep the highest-resolution copy of each image and stream rows into shards. The output folder
is written under a temporary name and renamed at the end, so an interrupted ingest leaves nothing
that looks complete. Invariant (tested): every ground-truth row and every image file found is
ingested, merged as a duplicate (duplicates.csv) or rejected (rejects.csv).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cnd_ray.config import IngestConfig
from cnd_ray.data import image as image_lib
from cnd_ray.data import layouts, shardset, tone
from cnd_ray.errors import UserError

VAE_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
MISSING_ON_WORKER = "missing on worker"
TEST = "test"  # the split of every image under --test
TEST_LEAK = "test leak"  # reject category: a training image that shares a patient or lesion with a test image
ROW_GROUP = 256  # rows per Parquet row group: small enough for Ray Data to split a shard


class IngestError(UserError):
    """Bad arguments: one line naming the culprit, raised before any work starts."""


SCHEMA = pa.schema([
    ("row_id", pa.int64()), ("image_id", pa.string()), ("label", pa.int64()),
    ("diagnosis", pa.string()), ("split", pa.string()), ("source", pa.string()),
    ("sources", pa.string()), ("origin_split", pa.string()), ("sex", pa.string()),
    ("age", pa.float32()), ("site", pa.string()), ("patient_id", pa.string()),
    ("lesion_id", pa.string()), ("ita", pa.float32()), ("skin_tone", pa.string()),
    ("fitzpatrick", pa.int64()), ("orig_width", pa.int32()), ("orig_height", pa.int32()),
    ("image", pa.binary()),
])
LATENT_FIELDS = [("latent_mean", pa.binary()), ("latent_logvar", pa.binary())]


@dataclass
class Candidate:
    """A labelled row with a file, on its way through the pipeline."""

    row: layouts.Row
    label: int
    split: str = "train"


# --- arguments -----------------------------------------------------------------------------------

def _check_vae(folder: str) -> dict:
    """A diffusers AutoencoderKL saved with save_pretrained: its config and a hash of its weights."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise IngestError(f"--latent {folder}: no config.json there (expected a diffusers "
                          "AutoencoderKL folder written by save_pretrained)")
    try:
        with open(cfg_path) as f:
            vae_cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise IngestError(f"--latent {folder}: config.json is not readable JSON ({e})") from None
    if not isinstance(vae_cfg, dict) or vae_cfg.get("_class_name") != "AutoencoderKL":
        raise IngestError(f"--latent {folder}: config.json describes {vae_cfg.get('_class_name')!r}, "
                          "not an AutoencoderKL")
    weights = [os.path.join(folder, n) for n in VAE_FILES if os.path.isfile(os.path.join(folder, n))]
    if not weights:
        raise IngestError(f"--latent {folder}: no weights file ({' or '.join(VAE_FILES)})")
    digest = hashlib.sha256()
    for path in [cfg_path, weights[0]]:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    down = 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)
    return {"vae": folder, "sha256": digest.hexdigest(), "scaling_factor": vae_cfg.get("scaling_factor"),
            "channels": vae_cfg.get("latent_channels", 4), "downsample": down}


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_args(roots, test, out, labels, image_size, latent, val_fraction, seed, shard_mb,
                overwrite) -> dict | None:
    if not roots:
        raise IngestError("give at least one --root folder")
    for flag, root in [("--root", r) for r in roots] + [("--test", r) for r in test]:
        if not os.path.isdir(root):
            raise IngestError(f"{flag} {root}: not a folder")
        # --overwrite replaces --out wholesale: it must never hold (or be held by) the inputs
        if _inside(out, root) or _inside(root, out):
            raise IngestError(f"--out {out}: overlaps {flag} {root}; write the shards outside the inputs")
    for t in test:
        for root in roots:
            if _inside(t, root) or _inside(root, t):
                raise IngestError(f"--test {t}: overlaps --root {root}; the test set must lie apart "
                                  "from the training archives (its images would be read twice)")
    if labels not in layouts.LABEL_MODES:
        raise IngestError(f"--labels {labels!r}: choose one of {', '.join(layouts.LABEL_MODES)}")
    if image_size < 8:
        raise IngestError(f"--image-size {image_size}: must be >= 8")
    if not 0.0 <= val_fraction < 1.0:
        raise IngestError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if seed < 0:
        raise IngestError(f"--seed {seed}: must be >= 0")
    if not shard_mb > 0:
        raise IngestError(f"--shard-mb {shard_mb}: must be > 0")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise IngestError(f"--out {out}: exists and is a file")
        if os.listdir(out) and not overwrite:
            raise IngestError(f"--out {out}: exists and is not empty (pass --overwrite to replace it)")
        if os.listdir(out) and not os.path.isfile(os.path.join(out, "manifest.json")):
            raise IngestError(f"--out {out}: --overwrite only replaces an earlier ingest output "
                              "(this folder has no manifest.json)")
    if latent in (None, "", "none"):
        return None
    info = _check_vae(os.path.abspath(latent))
    if image_size % info["downsample"]:
        raise IngestError(f"--image-size {image_size}: must be a multiple of the VAE's "
                          f"downsampling factor {info['downsample']}")
    info["shape"] = [2, info["channels"], image_size // info["downsample"], image_size // info["downsample"]]
    return info


# --- driver-side bookkeeping ---------------------------------------------------------------------

class Ledger:
    """Where every input went: rejects.csv and duplicates.csv."""

    def __init__(self):
        self.rejects: list[tuple[str, str]] = []
        self.duplicates: list[tuple[str, str, str]] = []

    def reject(self, key: str, reason: str) -> None:
        self.rejects.append((key, reason))

    def duplicate(self, key: str, image_id: str, kept: str) -> None:
        self.duplicates.append((key, image_id, kept))

    def write(self, folder: str) -> None:
        with open(os.path.join(folder, "rejects.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "reason"])
            w.writerows(sorted(self.rejects))
        with open(os.path.join(folder, "duplicates.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "image_id", "kept"])
            w.writerows(sorted(self.duplicates))

    def by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(r.split(":", 1)[0] for _, r in self.rejects).items()))


def _select(scan: layouts.Scan, mode: str, ak_malignant: bool, ledger: Ledger) -> list[Candidate]:
    """Label every row; file what cannot be used; drop the 2020 duplicates list's second images."""
    matched = {r.path for r in scan.rows if r.path}
    for path in sorted(scan.image_files - matched):
        stem = os.path.splitext(os.path.basename(path))[0]
        if layouts.SUPERPIXEL.search(stem):
            ledger.reject(path, "superpixel mask: ISIC 2017 segmentation aid, not a lesion image")
        else:
            ledger.reject(path, "present but unlabelled: no ground-truth row names this file")
    seen: dict[str, layouts.Row] = {}
    out = []
    for row in scan.rows:
        if row.path is None:
            ledger.reject(row.key, f"listed but missing: {os.path.basename(row.csv)} names "
                                   f"{row.raw_id} but no image file of that name was found")
            continue
        if row.path in seen:  # the same file named twice (e.g. a repeated CSV row)
            ledger.duplicate(f"{row.csv}#{row.raw_id}", row.image_id, seen[row.path].path)
            continue
        seen[row.path] = row
        if row.problem:
            ledger.reject(row.path, row.problem)
            continue
        y = layouts.label(row.dx, mode, ak_malignant)
        if y is None:
            ledger.reject(row.path, f"no label: diagnosis {row.dx} has no label in {mode} mode")
            continue
        if row.source == "isic2020" and row.image_id in scan.isic2020_duplicates:
            ledger.duplicate(row.path, row.image_id, "ISIC_2020_Training_Duplicates.csv")
            continue
        out.append(Candidate(row, y))
    return out


def _assign_splits(cands: list[Candidate], val_fraction: float, seed: int, ledger: Ledger) -> list[Candidate]:
    """Train/val by connected groups of shared patient or lesion ids, seeded and order-free; the
    candidates already marked "test" (from --test) keep it, and a training candidate connected to
    one is left out (a duplicate of its image, or a reject when it shares a patient or lesion), so
    nothing of the test set is trained on. Returns the candidates kept."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for c in cands:
        me = find("id:" + c.row.image_id)
        for field in ("patient_id", "lesion_id"):
            if c.row.meta.get(field):
                other = find(f"{field}:{c.row.meta[field]}")
                if other != me:
                    parent[max(me, other)] = min(me, other)
                    me = min(me, other)
    held = {find("id:" + c.row.image_id) for c in cands if c.split == TEST}
    test_copy = {c.row.image_id: c.row.path for c in cands if c.split == TEST}
    kept = []
    for c in cands:
        root = find("id:" + c.row.image_id)
        if c.split != TEST and root in held:
            if c.row.image_id in test_copy:
                ledger.duplicate(c.row.path, c.row.image_id, test_copy[c.row.image_id])
            else:
                ledger.reject(c.row.path, f"{TEST_LEAK}: shares a patient or lesion id with an image "
                                          "of the --test set")
            continue
        if c.split != TEST:
            h = hashlib.sha256(f"{seed}:{root}".encode()).digest()
            c.split = "val" if int.from_bytes(h[:8], "big") / 2 ** 64 < val_fraction else "train"
        kept.append(c)
    return kept


# --- Ray Data stages (run in workers) ------------------------------------------------------------

def _preprocess(batch: dict, size: int, keep_pixels: bool) -> dict:
    """Read, decode, resize and crop each file; estimate skin tone. Errors become data."""
    n = len(batch["path"])
    out = {"idx": batch["idx"], "image": [], "error": [], "ita": np.full(n, np.nan, np.float32),
           "width": np.zeros(n, np.int32), "height": np.zeros(n, np.int32)}
    pixels = np.zeros((n, size, size, 3), np.uint8)
    for i, path in enumerate(batch["path"]):
        try:
            with open(path, "rb") as f:
                arr, (w, h) = image_lib.load(f.read(), size)
        except image_lib.BadImage as e:
            out["image"].append(b"")
            out["error"].append(str(e))
            continue
        except FileNotFoundError as e:  # seen by the driver, absent here: another node's disk
            out["image"].append(b"")
            out["error"].append(f"{MISSING_ON_WORKER}: {e}")
            continue
        except OSError as e:  # unreadable file (permissions)
            out["image"].append(b"")
            out["error"].append(f"unreadable: {e}")
            continue
        pixels[i] = arr
        out["image"].append(image_lib.encode_png(arr))
        out["error"].append("")
        out["ita"][i] = tone.estimate_ita(arr)
        out["width"][i], out["height"][i] = w, h
    out["image"] = np.array(out["image"], dtype=object)
    out["error"] = np.array(out["error"], dtype=object)
    if keep_pixels:
        out["pixels"] = pixels
    return out


class _Encoder:
    """VAE posterior of each image and its horizontal flip (METHOD.md section 1), one model per actor."""

    def __init__(self, folder: str):
        import torch

        from cnd_ray import vae

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vae = vae.load(folder, self.device)

    def __call__(self, batch: dict) -> dict:
        torch = self.torch
        pixels = batch.pop("pixels")
        ok = np.flatnonzero(batch["error"] == "")
        n = len(batch["idx"])
        means, logvars = [b""] * n, [b""] * n
        if len(ok):
            x = torch.from_numpy(pixels[ok]).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            x = torch.cat([x, x.flip(-1)])  # (2n, 3, S, S): each image, then each flip
            with torch.no_grad():
                post = self.vae.encode(x).latent_dist
            m = post.mean.float().cpu().numpy().astype(np.float16)  # (2n, 4, h, w)
            lv = post.logvar.float().cpu().numpy().astype(np.float16)
            k = len(ok)
            for j, i in enumerate(ok):
                means[i] = np.stack([m[j], m[k + j]]).tobytes()  # (2, 4, h, w): as is, flipped
                logvars[i] = np.stack([lv[j], lv[k + j]]).tobytes()
        batch["latent_mean"] = np.array(means, dtype=object)
        batch["latent_logvar"] = np.array(logvars, dtype=object)
        return batch


# --- writing -------------------------------------------------------------------------------------

class ShardWriter:
    """Rolls Parquet files per split at about shard_bytes of payload each."""

    def __init__(self, folder: str, schema: pa.Schema, shard_bytes: int):
        self.folder, self.schema, self.shard_bytes = folder, schema, shard_bytes
        self.buffers: dict[str, list[dict]] = defaultdict(list)
        self.buffered: Counter = Counter()  # payload bytes waiting per split
        self.writers: dict[str, tuple[pq.ParquetWriter, dict]] = {}
        self.shards: list[dict] = []

    def add(self, row: dict) -> None:
        split = row["split"]
        self.buffers[split].append(row)
        self.buffered[split] += sum(len(row[k]) for k in ("image", "latent_mean", "latent_logvar")
                                    if k in row)
        open_bytes = self.writers[split][1]["bytes"] if split in self.writers else 0
        if len(self.buffers[split]) >= ROW_GROUP or open_bytes + self.buffered[split] >= self.shard_bytes:
            self._flush(split)

    def _flush(self, split: str) -> None:
        rows = self.buffers.pop(split, [])
        self.buffered[split] = 0
        if not rows:
            return
        if split not in self.writers:
            name = f"{split}-{sum(s['split'] == split for s in self.shards):05d}.parquet"
            info = {"file": name, "split": split, "rows": 0, "bytes": 0}
            self.shards.append(info)
            # Page CRCs: a reader (shardset.parquet_file verifies them) names a damaged page
            # instead of decoding whatever the damage left.
            self.writers[split] = (pq.ParquetWriter(os.path.join(self.folder, name), self.schema,
                                                    compression="zstd", write_page_checksum=True), info)
        writer, info = self.writers[split]
        table = pa.Table.from_pylist(rows, schema=self.schema)
        writer.write_table(table, row_group_size=ROW_GROUP)
        info["rows"] += len(rows)
        info["bytes"] += table.nbytes
        if info["bytes"] >= self.shard_bytes:
            self._close(split)

    def _close(self, split: str) -> None:
        """Finish the open shard of `split`; its sha256 goes to the manifest (`cnd-ray verify`)."""
        writer, info = self.writers.pop(split)
        writer.close()
        info["sha256"] = shardset.file_sha256(os.path.join(self.folder, info["file"]))

    def close(self) -> list[dict]:
        for split in list(self.buffers):
            self._flush(split)
        for split in list(self.writers):
            self._close(split)
        return self.shards


def _merged_meta(copies: list[Candidate]) -> dict:
    """The kept copy's metadata, gaps filled from the other copies (2019 knows lesions, 2017 ages)."""
    meta = dict(copies[0].row.meta)
    for c in copies[1:]:
        for k, v in c.row.meta.items():
            if meta.get(k) is None and v is not None:
                meta[k] = v
    return meta


def _resolve(copies: list[Candidate], results: list[dict], ledger: Ledger) -> tuple | None:
    """Keep the highest-resolution copy that decoded; the rest become duplicates or rejects."""
    good = []
    for c, r in zip(copies, results):
        if r["error"]:
            ledger.reject(c.row.path, r["error"])
        else:
            good.append((c, r))
    if not good:
        return None
    if len({c.label for c, _ in good}) > 1:
        said = ", ".join(f"{c.row.source} says {c.label}" for c, _ in good)
        for c, _ in good:
            ledger.reject(c.row.path, f"conflicting labels: {said}")
        return None
    # Highest resolution wins; ties go by layouts.SOURCE_RANK, then the first copy found.
    order = sorted(range(len(good)), key=lambda i: (-int(good[i][1]["width"]) * int(good[i][1]["height"]),
                                                    layouts.SOURCE_RANK[good[i][0].row.source]))
    good = [good[i] for i in order]
    kept, result = good[0]
    for c, _ in good[1:]:
        ledger.duplicate(c.row.path, c.row.image_id, kept.row.path)
    return kept, result, [c for c, _ in good]


def shard_record(kept: Candidate, result: dict, copies: list[Candidate], row_id: int) -> dict:
    """The shard row of the kept copy of an image: its pixels (or latents) in `result`, the labels
    and metadata merged over all its `copies`."""
    meta = _merged_meta(copies)
    ita = float(result["ita"])
    out = {
        "row_id": row_id, "image_id": kept.row.image_id, "label": kept.label, "diagnosis": kept.row.dx,
        "split": kept.split, "source": kept.row.source,
        "sources": ",".join(sorted({c.row.source for c in copies})),
        "origin_split": kept.row.origin_split, "sex": meta["sex"], "age": meta["age"],
        "site": meta["site"], "patient_id": meta["patient_id"], "lesion_id": meta["lesion_id"],
        "ita": ita, "skin_tone": tone.band(ita), "fitzpatrick": tone.fitzpatrick(ita),
        "orig_width": int(result["width"]), "orig_height": int(result["height"]),
        "image": result["image"],
    }
    if "latent_mean" in result:
        out["latent_mean"], out["latent_logvar"] = result["latent_mean"], result["latent_logvar"]
    return out


# --- the verb ------------------------------------------------------------------------------------

def run(roots: list[str], out: str, labels: str = IngestConfig.labels,
        image_size: int = IngestConfig.image_size, latent: str | None = None,
        ak_malignant: bool = IngestConfig.ak_malignant, val_fraction: float = IngestConfig.val_fraction,
        seed: int = IngestConfig.seed, shard_mb: float = IngestConfig.shard_mb, overwrite: bool = False,
        progress: bool = True, test: list[str] = ()) -> dict:
    """Ingest ISIC archives under `roots` into Parquet shards in `out`, split into train and val, and
    the archives under `test` whole into a test split; returns the manifest."""
    roots = [os.path.abspath(r) for r in roots]
    test = [os.path.abspath(r) for r in test]
    out = os.path.abspath(out)
    vae = _check_args(roots, test, out, labels, image_size, latent, val_fraction, seed, shard_mb, overwrite)
    t0 = time.perf_counter()
    scan = layouts.scan(roots + test)
    for what, folders in (("", roots), ("--test ", test)):
        if folders and not any(_inside(c, r) for c in scan.csvs for r in folders):
            raise IngestError(f"no ISIC ground truth found under {what}{', '.join(folders)} (looked for "
                              "the file names of DATA.md's layouts, e.g. ISIC_2020_Training_GroundTruth.csv)")
    ledger = Ledger()
    cands = _select(scan, labels, ak_malignant, ledger)
    for c in cands:
        if any(_inside(c.row.path, t) for t in test):
            c.split = TEST
    cands = _assign_splits(cands, val_fraction, seed, ledger)

    # Copies of one image travel together, in a seeded order, so shards mix sources and classes.
    groups: dict[str, list[Candidate]] = defaultdict(list)
    for c in cands:
        groups[c.row.image_id].append(c)
    ids = sorted(groups)
    np.random.default_rng(seed).shuffle(ids)
    ordered = [c for i in ids for c in groups[i]]

    tmp = f"{out}.partial-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        schema = SCHEMA if vae is None else pa.schema(list(SCHEMA) + LATENT_FIELDS)
        writer = ShardWriter(tmp, schema, int(shard_mb * 2 ** 20))
        stats = _run_pipeline(ordered, groups, image_size, vae, writer, ledger, progress)
        shards = writer.close()
        ledger.write(tmp)
        manifest = _manifest(roots, test, labels, ak_malignant, image_size, vae, val_fraction, seed,
                             scan, ledger, shards, stats, schema, time.perf_counter() - t0)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        if stats["missing_on_workers"]:
            raise IngestError(f"{stats['missing_on_workers']} files the driver found were missing on "
                              "the Ray workers: on a cluster the --root folders must be on storage "
                              "every node mounts at the same path")
        old = None
        if os.path.exists(out):
            old = f"{out}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if manifest["num_images"] == 0:
        raise IngestError(f"no image could be ingested: every input is listed with its reason in "
                          f"{os.path.join(out, 'rejects.csv')}")
    return manifest


def _run_pipeline(ordered, groups, image_size, vae, writer, ledger, progress) -> dict:
    """Decode in Ray Data, resolve copies and write rows in order on the driver."""
    stats = {"classes": Counter(), "splits": defaultdict(Counter), "sources": Counter(),
             "skin_tones": Counter(), "num_images": 0, "missing_on_workers": 0}
    if not ordered:
        return stats
    import ray
    from ray.data import DataContext
    from tqdm import tqdm

    from cnd_ray.launch import session

    session.connect()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar of ours instead of one per operator
    ctx.print_on_execution_start = False
    items = [{"idx": i, "path": c.row.path} for i, c in enumerate(ordered)]
    # Enough blocks that every CPU of the cluster has several to work on, small enough to stream.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    blocks = min(len(items), max(-(-len(items) // 32), 4 * cpus), 4000)
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds.context.execution_options.preserve_order = True  # the same input gives the same shards
    ds = ds.map_batches(_preprocess, batch_size=16, batch_format="numpy",
                        fn_kwargs={"size": image_size, "keep_pixels": vae is not None})
    if vae is not None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        ds = ds.map_batches(_Encoder, fn_constructor_args=(vae["vae"],), batch_size=16,
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
                            num_gpus=1 if use_gpu else 0)

    pending: dict[str, list[dict]] = {}
    row_id = 0
    bar = tqdm(total=len(ordered), desc="ingest", unit="img", disable=not progress)
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        for j in range(len(batch["idx"])):
            cand = ordered[int(batch["idx"][j])]
            result = {k: v[j] for k, v in batch.items()}
            stats["missing_on_workers"] += result["error"].startswith(MISSING_ON_WORKER)
            got = pending.setdefault(cand.row.image_id, [])
            got.append(result)
            copies = groups[cand.row.image_id]
            if len(got) < len(copies):
                continue
            del pending[cand.row.image_id]
            resolved = _resolve(copies, got, ledger)
            bar.update(len(copies))
            if resolved is None:
                continue
            kept, result, good = resolved
            rec = shard_record(kept, result, good, row_id)
            row_id += 1
            writer.add(rec)
            stats["num_images"] += 1
            stats["classes"]["malignant" if rec["label"] else "benign"] += 1
            stats["splits"][rec["split"]]["malignant" if rec["label"] else "benign"] += 1
            stats["sources"][rec["source"]] += 1
            stats["skin_tones"][rec["skin_tone"]] += 1
    bar.close()
    assert not pending, f"copies never came back: {sorted(pending)[:5]}"
    return stats


def _manifest(roots, test, labels, ak_malignant, image_size, vae, val_fraction, seed, scan, ledger,
              shards, stats, schema, seconds) -> dict:
    from cnd_ray import __version__

    classes = stats["classes"]
    return {
        "schema_version": shardset.SCHEMA_VERSION,
        "created_by": f"cnd_ray {__version__}",
        "roots": roots,
        "test_roots": test,
        "label_mode": labels,
        "ak_malignant": ak_malignant,
        "image_size": image_size,
        "image_format": "png",
        "latent": vae,
        "val_fraction": val_fraction,
        "seed": seed,
        "num_images": stats["num_images"],
        "num_rejected": len(ledger.rejects),
        "num_duplicates": len(ledger.duplicates),
        "classes": {"benign": classes["benign"], "malignant": classes["malignant"]},
        "splits": {s: {"benign": c["benign"], "malignant": c["malignant"]}
                   for s, c in sorted(stats["splits"].items())},
        "sources": dict(sorted(stats["sources"].items())),
        "skin_tones": {b: stats["skin_tones"][b] for b in [n for n, _ in tone.BANDS] + [tone.UNKNOWN]
                       if stats["skin_tones"][b]},
        "rejects_by_reason": ledger.by_reason(),
        "inputs": {"image_files": len(scan.image_files), "ground_truth_rows": len(scan.rows),
                   "ground_truth_files": scan.csvs},
        "shards": shards,
        "columns": schema.names,
        "seconds": round(seconds, 1),
    }
