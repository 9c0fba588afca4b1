"""Ray Data over ingested shards -> per-worker torch batches for the training loop.

Driver side: `dataset(cfg, split, epochs=...)` checks the shards against the config (image size,
latent VAE) and builds a lazy Ray Dataset that streams those epochs, each visiting the row groups in
an order drawn from (seed, epoch), decoded in Ray Data tasks. Worker side: `batches(shard, cfg)`
iterates `get_dataset_shard(...)` in shuffle windows a checkpoint can name (`windows`, `Consumed`),
and `augment.model_batch` turns each batch into the model's input.
Nothing is materialised: the data set streams, whatever its size. This module does not import torch:
Ray Data's decode workers import it, and a new worker that loads torch stalls the stream ~5 s.
"""
from __future__ import annotations

import re
import time
from typing import Iterator

import numpy as np

from cnd_ray import storage
from cnd_ray.config import Config
from cnd_ray.data import image as image_lib
from cnd_ray.data import shardset
from cnd_ray.errors import UserError

# Decode tasks take half a CPU so that, on a 2-core machine, Ray Data keeps running beside the
# training workers (whole-CPU tasks starve it; DESIGN.md).
DATA_TASK_CPUS = 0.5
# One row group (item) per Ray Data block, up to this many blocks. Larger blocks (16 groups) cut the
# decode tasks a small trial schedules, but then a worker-group restart with several workers split
# the resumed stream differently from the first one and ran out of data (tests/test_multinode.py):
# the skip-to-position logic assumes whole row groups go to one worker.
MAX_BLOCKS = 2000


def calm_idle_scheduler() -> None:
    """Make Ray Data's streaming executor wait 10 ms, not spin, while it has no task in flight.

    Ray Data 2.60's scheduling loop calls ray.wait only when some task is running; once every block
    of the stream is decoded ahead and the trainer is behind (the usual state of a small cached set),
    it loops without pause. In `cnd-ray quickstart` two of three trials' SplitCoordinators burned
    ~30% of a core each that way, taken from the training workers on a 2-core machine. This module
    is imported wherever the executor runs (the coordinator unpickles `_read_groups`), so patching
    here reaches it. A no-op where Ray Data's internals differ."""
    try:
        from ray.data._internal.execution import streaming_executor as se
    except ImportError:
        return
    inner = getattr(se, "process_completed_tasks", None)
    if inner is not None and not getattr(inner, "calm", False):
        se.process_completed_tasks = calm(inner)


def calm(inner):
    """`inner` (Ray Data's process_completed_tasks), preceded by a 10 ms sleep when no operator of
    the topology has a task in flight (with one in flight, Ray's own ray.wait paces the loop)."""

    def process_completed_tasks(topology, *args, **kwargs):
        if not any(op.get_active_tasks() for op in topology):
            time.sleep(0.01)
        return inner(topology, *args, **kwargs)

    process_completed_tasks.calm = True
    return process_completed_tasks


calm_idle_scheduler()

def verify(shards: str, say=print) -> tuple[int, list[str]]:
    """`cnd-ray verify`: read every shard back in full. Each file's sha256 against the manifest
    (ingests that recorded one), its footer and row count, every page's CRC, and every row decoded
    (pixel shards: the PNG; latent ones: the posterior's length). Returns (rows that passed, one
    line per problem naming the file, and the row group and image where it is one)."""
    manifest = shardset.read_manifest(shards)
    lat = manifest.latent
    want = int(np.prod(lat["shape"])) * 2 if lat else 0  # latent_mean bytes: image and flip, float16
    good, problems = 0, []
    for n, s in enumerate(manifest.shards, 1):
        path = storage.join(shards, s.file)
        found = len(problems)
        if s.sha256 and shardset.file_sha256(path) != s.sha256:
            problems.append(f"{path}: sha256 differs from the manifest's (changed since ingest)")
        try:
            f = shardset.parquet_file(path)
            groups = f.metadata.num_row_groups
        except Exception as e:
            problems.append(f"damaged shard {path}: {str(e).splitlines()[0]}")
            continue
        if f.metadata.num_rows != s.rows:
            problems.append(f"damaged shard {path}: {f.metadata.num_rows} rows where the manifest says {s.rows}")
        for g in range(groups):
            try:
                t = f.read_row_group(g, columns=["image_id", "image"] + (["latent_mean"] if lat else []))
            except Exception as e:
                problems.append(f"damaged shard {path}, row group {g}: {str(e).splitlines()[0]}")
                continue
            ids, pngs = t.column("image_id").to_pylist(), t.column("image").to_pylist()
            means = t.column("latent_mean").to_pylist() if lat else [None] * len(ids)
            for i, png, mean in zip(ids, pngs, means):
                try:
                    image_lib.decode_png(png)
                    if lat and len(mean) != want:
                        raise ValueError(f"latent of {len(mean)} bytes, not {want}")
                    good += 1
                except Exception as e:
                    problems.append(f"damaged shard {path}, row group {g}, image {i}: {e}")
        say(f"{n}/{len(manifest.shards)} {s.file}: {s.rows} rows, "
            f"{'ok' if len(problems) == found else f'{len(problems) - found} problem(s)'}")
    return good, problems


class DamagedShard(UserError):
    """A shard whose bytes cannot be read or decoded: deterministic, so a retry cannot help."""


def damaged(error: BaseException) -> str | None:
    """The DamagedShard line inside an error as Ray Data hands it to a worker (wrapped), or None."""
    # The message itself, or its line after the class name in Ray's traceback (not the source
    # line `raise DamagedShard(f"damaged shard ...` that the traceback quotes).
    m = re.search(r"(?:^|DamagedShard: )(damaged shard [^\n]+)", str(error), re.M)
    return m.group(1) if m else None


def _png(data: bytes, path: str, group: int, row: int) -> np.ndarray:
    try:
        return image_lib.decode_png(data)
    except Exception as e:  # a stored image that no longer decodes: name it
        ids = shardset.parquet_file(path).read_row_group(group, columns=["image_id"]).column(0).to_pylist()
        raise DamagedShard(f"damaged shard {path}, row group {group}, image {ids[row]}: its stored "
                           f"PNG does not decode ({e})") from None


def _decode(batch: dict, space: str, path: str, group: int) -> dict:
    """Parquet rows (row group `group` of `path`) -> numeric columns."""
    out = {"label": batch["label"].astype(np.int64), "tone": batch["fitzpatrick"].astype(np.int64),
           "row_id": batch["row_id"].astype(np.int64)}
    if space == "pixel":
        out["image"] = np.stack([_png(b, path, group, i)
                                 for i, b in enumerate(batch["image"])]).transpose(0, 3, 1, 2)
    else:
        for key, col in (("mean", "latent_mean"), ("logvar", "latent_logvar")):  # flat float16
            out[key] = np.stack([np.frombuffer(b, np.float16) for b in batch[col]])
    return out


class GroupCache:
    """Decoded row groups kept by a decode worker process, least recently used dropped beyond
    CACHE_BYTES: later epochs of a set that fits are served without re-reading or re-decoding (a
    decode worker serves many epochs: the task pool is bounded)."""

    def __init__(self, budget: int):
        self.budget, self.used, self.groups = budget, 0, {}

    def get(self, path: str, group: int, columns: list[str], space: str) -> dict:
        key = (path, group, tuple(columns), space)
        hit = self.groups.pop(key, None)
        if hit is None:
            try:
                table = shardset.parquet_file(path).read_row_group(group, columns=columns)
                cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}
            except Exception as e:  # corrupt pages, a truncated file: the same on every retry
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise DamagedShard(f"damaged shard {path}, row group {group}: {first}") from None
            hit = _decode(cols, space, path, group)
            size = sum(v.nbytes for v in hit.values())
            while self.groups and self.used + size > self.budget:
                old = self.groups.pop(next(iter(self.groups)))  # dicts keep insertion order: oldest
                self.used -= sum(v.nbytes for v in old.values())
            self.used += size
        self.groups[key] = hit  # now the most recent
        return hit


CACHE_BYTES = 256 * 2 ** 20  # per decode worker process
_CACHE = GroupCache(CACHE_BYTES)


def _read_groups(batch: dict, columns: list[str], space: str, repeat: int) -> Iterator[dict]:
    """(epoch, file, row group, position, first row) items -> decoded batches, each row tagged
    with its epoch, its position in that epoch's order (what a resume skips to) and, for a row
    repeated by oversampling, which copy it is."""
    for epoch, path, group, offset, start in zip(batch["epoch"], batch["file"], batch["group"],
                                                 batch["offset"], batch["start"]):
        rows = _CACHE.get(str(path), int(group), columns, space)
        start = int(start)
        out = {k: v[start:] for k, v in rows.items()}
        out["pos"] = np.arange(offset + start, offset + len(rows["label"]), dtype=np.int64)
        times = np.where(out["label"] == 1, repeat, 1)  # malignant rows repeated to rebalance
        out = {k: np.repeat(v, times, axis=0) for k, v in out.items()}
        # Which copy of its row each is: (epoch, pos, copy) names one row of the stream exactly.
        out["copy"] = np.arange(len(out["pos"])) - np.repeat(np.cumsum(times) - times, times)
        out["epoch"] = np.full(len(out["label"]), epoch, np.int64)
        yield out


def dataset(cfg: Config, split: str = "train", shuffle: bool = True, epochs: tuple[int, int] = (0, 1),
            skip_rows: int = 0):
    """A lazy Ray Dataset of decoded numeric columns over one split, for epochs [first, last).

    One iteration streams all those epochs back to back; each row carries its `epoch`. With
    shuffle (training), epoch e visits the split's row groups in an order drawn from
    (train.seed, e) alone, so a run resumed at epoch e sees what an uninterrupted one saw (exactly
    so with one worker; the worker's shuffle windows then order the rows), and oversampling
    applies. Without shuffle (evaluation), one pass in shard order. `skip_rows` drops the first
    rows of the first epoch: a resume continues where the checkpoint's epoch left off.

    We list row groups ourselves instead of calling read_parquet, whose file listing cost ~2 s at
    every epoch start here (a small set's epoch is a few dozen steps): see bench/data_stream.py.
    """
    import ray

    shards = storage.absolute(cfg.data.shards)  # Ray tasks run in another working directory
    manifest = shardset.read_manifest(shards)
    shardset.check(manifest, cfg, shards)
    files = shardset.files(shards, manifest, split)
    columns = ["row_id", "label", "fitzpatrick"] + (
        ["image"] if cfg.data.space == "pixel" else ["latent_mean", "latent_logvar"])
    repeat = shardset.oversample_factor(manifest, split) if shuffle and cfg.data.balance == "oversample" else 1
    groups = []  # (file, row group, rows)
    for f in files:
        meta = shardset.parquet_file(f).metadata
        groups += [(f, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    items = []
    for epoch in range(*epochs):
        order = (np.random.default_rng((cfg.train.seed, epoch)).permutation(len(groups)) if shuffle
                 else range(len(groups)))
        offset = 0
        for i in order:
            f, g, n = groups[i]
            skip = skip_rows - offset if epoch == epochs[0] else 0
            if skip < n:
                items.append({"epoch": epoch, "file": f, "group": g, "offset": offset, "start": max(0, skip)})
            offset += n
    if not items:
        raise UserError(f"no epochs to stream: epochs={epochs}")
    blocks = min(len(items), MAX_BLOCKS)
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds.context.execution_options.preserve_order = True  # the order above is the order delivered
    # A bounded number of decode tasks reuses the same worker processes; unbounded, Ray Data ramps
    # up mid-run and each new worker process stalls the stream for seconds (bench/data_stream.py).
    tasks = cfg.data.decode_tasks or max(2, int(ray.cluster_resources().get("CPU", 2)) // 2)
    return ds.map_batches(_read_groups, batch_size=1, batch_format="numpy", num_cpus=DATA_TASK_CPUS,
                          compute=ray.data.TaskPoolStrategy(size=min(tasks, blocks)),
                          fn_kwargs={"columns": columns, "space": cfg.data.space, "repeat": repeat})


def data_config():
    """Ray Train's DataConfig for these datasets: split "train" across workers, and keep the order
    dataset() chose (Ray Train's default ingest options drop preserve_order, which lets parallel
    decode tasks swap row groups and makes runs differ)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=["train"], execution_options=options)


class DataWait:
    """Seconds the training loop spent blocked waiting for the stream's next block of rows."""

    def __init__(self):
        self.seconds = 0.0
        self.blocks = 0

    def timed(self, iterable) -> Iterator:
        it = iter(iterable)
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                self.seconds += time.perf_counter() - t0
                self.blocks += 1
                yield item
        finally:  # closing us closes Ray's iterator, which stops its executor decoding ahead
            if hasattr(it, "close"):
                it.close()


def batches(shard, cfg: Config, wait: DataWait | None = None, resume: "Consumed | None" = None
            ) -> Iterator[dict]:
    """This worker's batches of torch tensors (on CPU) over every epoch the dataset streams, in
    shuffle windows of data.shuffle_buffer row positions (`windows`), from the place `resume`
    names: rows before its start and rows it already trained on are dropped."""
    import torch  # worker side only (the module docstring says why)

    blocks = shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
    blocks = wait.timed(blocks) if wait is not None else blocks
    resume = resume or Consumed(cfg.data.shuffle_buffer)
    ordered = windows(resume.after_start(blocks), cfg.data.shuffle_buffer, cfg.train.seed)
    for batch in rebatch(ordered, cfg.per_worker_batch, resume.done):
        yield {k: torch.from_numpy(v) for k, v in batch.items()}


def _since(rows: dict, start: tuple[int, int]) -> np.ndarray:
    """Mask of the rows at or after (epoch, position) `start`."""
    e, p = rows["epoch"], rows["pos"]
    return (e > start[0]) | ((e == start[0]) & (p >= start[1]))


def windows(blocks: Iterator[dict], size: int, seed: int) -> Iterator[dict]:
    """Blocks of rows in stream order -> one block per shuffle window: the rows at positions
    [k * size, (k + 1) * size) of an epoch, in an order drawn from (seed, epoch, k) alone.

    Ray Data's local shuffle buffer mixed rows across epochs in an order no checkpoint could
    name, so a resume skipped rows never trained (issue 17). Here the order a row is trained in
    follows from where it sits in the stream: a resume re-reads its window, draws the same order
    and drops what was trained. A window holds whatever part of it this worker receives (all of
    it with one worker); `size` 0 keeps the stream's order."""
    size = max(1, size)
    pending, key = [], None
    for block in blocks:
        if not len(block["pos"]):
            continue
        w = block["pos"] // size
        # Where (epoch, window) changes inside the block: it may straddle two windows.
        cut = np.flatnonzero((np.diff(w) != 0) | (np.diff(block["epoch"]) != 0)) + 1
        for lo, hi in zip(np.r_[0, cut], np.r_[cut, len(w)]):
            here = (int(block["epoch"][lo]), int(w[lo]))
            if here != key and pending:
                yield _shuffled(pending, key, size, seed)
                pending = []
            key = here
            pending.append({k: v[lo:hi] for k, v in block.items()})
    if pending:
        yield _shuffled(pending, key, size, seed)


def _shuffled(parts: list[dict], key: tuple[int, int], size: int, seed: int) -> dict:
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if size == 1:  # shuffling off: copies of one row are alike
        return rows
    order = np.random.default_rng((seed, *key)).permutation(len(rows["pos"]))
    return {k: v[order] for k, v in rows.items()}


def rebatch(blocks: Iterator[dict], size: int, done: set | None = None) -> Iterator[dict]:
    """Blocks of rows -> batches of exactly `size` rows in the same order, leaving out the rows
    whose (epoch, pos, copy) is in `done`; a last partial batch is dropped."""
    carry: list[dict] = []
    held = 0
    for block in blocks:
        if done:
            keep = np.array([k not in done for k in zip(block["epoch"].tolist(), block["pos"].tolist(),
                                                         block["copy"].tolist())], bool)
            block = {k: v[keep] for k, v in block.items()}
        carry.append(block)
        held += len(block["pos"])
        if held < size:
            continue
        rows = {k: np.concatenate([c[k] for c in carry]) for k in block}
        full = held - held % size
        for lo in range(0, full, size):
            yield {k: v[lo:lo + size] for k, v in rows.items()}
        carry, held = [{k: v[full:] for k, v in rows.items()}], held - full


class Consumed:
    """What one rank has trained on, in the stream's terms, for a checkpoint to name exactly.

    A checkpoint keeps a stream start (epoch, position: the start of the earliest shuffle window
    any rank was still in) and every row at or after it that some rank trained, by (epoch, pos,
    copy). A resume streams from that start and drops those rows: nothing is skipped and nothing
    trained twice, for any data.shuffle_buffer and worker count. With one worker the order is the
    uninterrupted run's too (the same windows, shuffled the same way)."""

    def __init__(self, window: int, start: tuple[int, int] = (0, 0), done: np.ndarray | None = None):
        self.window = max(1, window)
        self.start = (int(start[0]), int(start[1]))
        self.restored = np.zeros((0, 3), np.int64) if done is None else np.asarray(done, np.int64)
        self.done = set(map(tuple, self.restored.tolist()))
        self.rows: list[np.ndarray] = []  # (N, 3) per trained batch: epoch, pos, copy
        self.at = (self.start[0], self.start[1] // self.window)  # (epoch, window) of the last row

    def after_start(self, blocks: Iterator[dict]) -> Iterator[dict]:
        """The blocks without their rows before the start (a restart inside one launch streams
        from the launch's start)."""
        for block in blocks:
            keep = _since(block, self.start)
            yield block if keep.all() else {k: v[keep] for k, v in block.items()}

    def add(self, batch: dict) -> None:
        """A batch (of `batches`) has been trained on."""
        rows = np.stack([np.asarray(batch[k]) for k in ("epoch", "pos", "copy")], 1).astype(np.int64)
        self.rows.append(rows)
        self.at = (int(rows[-1, 0]), int(rows[-1, 1]) // self.window)

    def window_start(self) -> tuple[int, int]:
        """(epoch, position) where the window this rank is in starts."""
        return self.at[0], self.at[1] * self.window

    def since(self, start: tuple[int, int], restored: bool) -> np.ndarray:
        """The rows at or after `start` this rank trained (plus, when `restored`, those the
        checkpoint it resumed from named: one rank passes them on); older ones are forgotten."""

        def keep(rows: np.ndarray) -> np.ndarray:
            return rows[_since({"epoch": rows[:, 0], "pos": rows[:, 1]}, start)]

        self.rows = [keep(np.concatenate(self.rows))] if self.rows else []
        self.restored = keep(self.restored)
        return np.concatenate(self.rows + [self.restored if restored else self.restored[:0]])
