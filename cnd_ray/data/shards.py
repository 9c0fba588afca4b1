"""Ingested shards read back in shard order, without Ray: the real images that evaluation and the
judge compare samples against (training streams them through `stream` instead)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from cnd_ray.data import image as image_lib, shardset

READ_BATCH = 256  # images decoded at a time


def iter_split(shards: str, manifest: shardset.Manifest, split: str, limit: int = 0) -> Iterator[tuple]:
    """(uint8 images (B, 3, S, S), labels (B,)) batches of a split's rows, in shard order."""
    seen = 0
    for path in shardset.files(shards, manifest, split):
        for b in shardset.parquet_file(path).iter_batches(batch_size=READ_BATCH, columns=["image", "label"]):
            if limit and seen >= limit:
                return
            rows = b.to_pydict()
            n = len(rows["label"]) if not limit else min(len(rows["label"]), limit - seen)
            imgs = np.stack([image_lib.decode_png(x) for x in rows["image"][:n]])  # (B, S, S, 3)
            seen += n
            yield torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), np.asarray(rows["label"][:n])


def split_column(shards: str, manifest: shardset.Manifest, split: str, column: str) -> np.ndarray:
    """One numeric column of a split's rows in shard order (that column only: cheap)."""
    return np.concatenate([shardset.parquet_file(p).read(columns=[column]).column(column).to_numpy()
                           for p in shardset.files(shards, manifest, split)])


def split_labels(shards: str, manifest: shardset.Manifest, split: str, limit: int = 0) -> np.ndarray:
    """The labels of a split's rows in shard order (the label column only: cheap)."""
    labels = split_column(shards, manifest, split, "label").astype(np.int64)
    return labels[:limit] if limit else labels


def read_rows(shards: str, manifest: shardset.Manifest, split: str, positions) -> torch.Tensor:
    """uint8 images (N, 3, S, S) of the split's rows at `positions` (shard order), reading only the
    row groups that hold them."""
    want = {int(p): None for p in positions}
    start = 0
    for path in shardset.files(shards, manifest, split):
        f = shardset.parquet_file(path)
        for g in range(f.metadata.num_row_groups):
            n = f.metadata.row_group(g).num_rows
            hits = [p for p in want if start <= p < start + n]
            if hits:
                col = f.read_row_group(g, columns=["image"]).column("image")
                for p in hits:
                    want[p] = image_lib.decode_png(col[p - start].as_py())
            start += n
    return torch.from_numpy(np.stack([want[int(p)] for p in positions])).permute(0, 3, 1, 2)
