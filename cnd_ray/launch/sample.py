"""`cnd-ray sample`: class folders of PNGs from a checkpoint's EMA weights, made by a pool of Ray
actors, one model each (a GPU each when the cluster has GPUs).

The work is a Ray Dataset of chunks (rows of `generate.plan`); each actor turns a chunk into PNG
bytes and the driver writes them, so the output folder need only exist where the driver runs. The
driver reads the checkpoint and the VAE once and hands actors their tensors through the object
store. Images already on disk are skipped: rerunning an interrupted command finishes it, and a
longer run of the same protocol extends a shorter one (plans are prefixes of each other).

    OUT/benign/000000.png ...   OUT/malignant/000001.png ...
    OUT/index.parquet            index, seed, label, class, tone, chunk, file
    OUT/sample.json              the protocol (checkpoint, step, sampler, steps, guidance, seed, ...)
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from cnd_ray import checkpoint, config as config_lib, generate
from cnd_ray.launch import identity
from cnd_ray.config import ConfigError
from cnd_ray.errors import UserError

ACTOR_CPUS = 1  # per CPU actor; a whole core, because a denoiser forward is the whole job


def sampling_config(cfg, overrides) -> config_lib.Config:
    """The checkpoint's config with sampling overrides; a key that would change the model is refused."""
    allowed = config_lib.keys(sampling=True)
    for sec, kv in config_lib.to_nested(overrides).items():
        for k in kv:
            key = f"{sec}.{k}"
            if key not in allowed:
                listed = sorted(k for k in allowed if not k.startswith(("eval.", "track.")))
                raise ConfigError(f"{key}: fixed by the checkpoint; sampling may set only "
                                  f"{', '.join(listed)}, eval.* and track.*")
    return config_lib.override(cfg, overrides)  # validate() refuses guidance without a null label


def protocol(cfg, ckpt: str, step: int, tone: int | None = None) -> dict:
    """What determines the images (GUARANTEES 14); a folder's images all share one. `tone` is the
    skin-tone group asked for (None: not asked)."""
    d, e = cfg.diffusion, cfg.eval
    return {"checkpoint": ckpt, "step": step, "sampler": d.sampler, "steps": d.sample_steps,
            "eta": d.eta if d.sampler == "ddim" else None, "guidance_scale": d.guidance_scale,
            "seed": e.seed, "batch_size": e.batch_size, "image_size": cfg.data.image_size,
            "space": cfg.data.space, "tone": tone,
            "tone_guidance_scale": None if tone is None else d.tone_guidance_scale}


class _ChunkWorker:
    """A Ray Data actor holding one model: a chunk row -> that chunk's PNGs."""

    def __init__(self, cfg: dict, refs: dict, threads: int, gpu: bool):
        import ray
        import torch

        from cnd_ray import vae as vae_lib

        torch.set_num_threads(threads)
        device = "cuda" if gpu else "cpu"
        cfg = config_lib.from_dict(cfg)
        vae = None
        if refs["vae"] is not None:
            vae_cfg, vae_state = ray.get(refs["vae"])
            vae = vae_lib.from_parts(vae_cfg, vae_state, device)
        self.gen = generate.Generator(cfg, ray.get(refs["ema"]), vae, device)

    def __call__(self, batch: dict) -> dict:
        from cnd_ray.data.image import encode_png

        out = {"index": [], "png": []}
        for index, seeds, labels, tones in zip(batch["index"], batch["seed"], batch["label"],
                                               batch["tone"]):
            images = self.gen(seeds, labels, tones).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
            out["index"] += list(index)
            out["png"] += [encode_png(a) for a in images]
        return {"index": np.asarray(out["index"], np.int64), "png": np.array(out["png"], dtype=object)}


def _pool(ray, n_chunks: int, actors: int) -> tuple[int, float, float, int]:
    """(actors, CPUs and GPUs per actor, torch threads per actor) for this cluster."""
    res = ray.cluster_resources()
    if res.get("GPU", 0) >= 1:
        n = actors or int(res["GPU"])
        if n > res["GPU"]:
            raise UserError(f"eval.actors={n}: each GPU actor takes a GPU, the cluster has {res['GPU']:g}")
        return min(n, n_chunks), ACTOR_CPUS, 1.0, 1
    # One CPU stays free for Ray Data's own tasks (a whole-CPU shortage hangs silently: DESIGN.md).
    room = int(res.get("CPU", 0) - 1)
    n = actors or max(1, int(res.get("CPU", 0) // 2))
    if n * ACTOR_CPUS > room:
        raise UserError(f"eval.actors={n} CPU actors need {n * ACTOR_CPUS} CPUs plus 1 for data; the "
                        f"cluster has {res.get('CPU', 0):g}: lower eval.actors")
    n = min(n, n_chunks)
    # Actors of a local run share this machine's cores (Ray's CPU count is logical here).
    return n, ACTOR_CPUS, 0.0, max(1, (os.cpu_count() or 1) // n)


def _check_folder(out: Path, proto: dict) -> None:
    meta = out / "sample.json"
    if not meta.exists():
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--out {out}: exists and holds other files; choose an empty or new folder")
        return
    old = json.loads(meta.read_text())["protocol"]
    diff = sorted(k for k in proto if old.get(k) != proto[k])
    if diff:
        change = ", ".join(f"{k} {old.get(k)!r} -> {proto[k]!r}" for k in diff)
        raise UserError(f"--out {out}: holds samples made with another {', '.join(diff)} ({change}); "
                        "choose another --out")


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a file under its real name is complete


def generate_images(cfg, ckpt: str, step: int, ema: dict, rows: dict, out: Path,
                    progress: bool = True, drawn: np.ndarray | None = None) -> dict:
    """Write the images of plan `rows` that are not yet in `out`; index and protocol files too.
    `drawn`: the plan's images already drawn by this checkpoint's EMA model, uint8 (N, 3, S, S) in
    plan order (training's final evaluation keeps them): written instead of drawn again."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from tqdm import tqdm

    from cnd_ray import vae as vae_lib
    from cnd_ray.launch import session

    requested = sorted({int(t) for t in rows["tone"]} - {generate.NO_TONE})
    assert len(requested) <= 1, requested  # plans ask for one tone, or none
    proto = protocol(cfg, ckpt, step, requested[0] if requested else None)
    _check_folder(out, proto)
    n = len(rows["index"])
    files = [generate.file_name(int(i), int(y)) for i, y in zip(rows["index"], rows["label"])]
    for name in {generate.class_name(int(y)) for y in rows["label"]}:
        (out / name).mkdir(parents=True, exist_ok=True)
    have = np.array([(out / f).exists() for f in files])
    if drawn is not None:
        from cnd_ray.data import image

        for i in np.flatnonzero(~have):
            _write(out / files[i], image.encode_png(np.ascontiguousarray(drawn[i].transpose(1, 2, 0))))
        have[:] = True
    todo = sorted({int(c) for c, h in zip(rows["chunk"], have) if not h})
    t0, made, actors, device = time.perf_counter(), 0, 0, "CPU"
    if todo:
        session.connect()
        actors, cpus, gpus, threads = _pool(ray, len(todo), cfg.eval.actors)
        device = "GPU" if gpus else "CPU"
        vae = vae_lib.for_run(cfg)  # UserError here, before any actor starts, when it is missing
        refs = {"ema": ray.put(ema), "vae": None if vae is None else ray.put(vae_lib.to_parts(vae))}
        items = []
        for c in todo:
            sel = rows["chunk"] == c
            items.append({k: rows[k][sel].tolist() for k in ("index", "seed", "label", "tone")})
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _ChunkWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus, num_gpus=gpus,
            fn_constructor_kwargs={"cfg": cfg.to_dict(), "refs": refs, "threads": threads,
                                   "gpu": gpus > 0})
        bar = tqdm(total=n, initial=int(have.sum()), unit="img", desc=f"sampling ({actors} actors)",
                   disable=not progress)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            new = [(int(i), png) for i, png in zip(batch["index"], batch["png"]) if not have[int(i)]]
            for i, png in new:  # a redone chunk's images already on disk stay as they are
                _write(out / files[i], png)
            made += len(new)
            bar.update(len(new))
        bar.close()
    seconds = time.perf_counter() - t0
    meta_path, index_path = out / "sample.json", out / "index.parquet"
    old = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    # Sampler speed is reported next to quality (GUARANTEES 18): the latest run that made images.
    timing = ({"images": made, "seconds": round(seconds, 2), "images_per_s": round(made / seconds, 2),
               "actors": actors, "device": device}
              if made else old.get("timing"))
    meta = {"protocol": proto, "images": old.get("images", 0), "counts": old.get("counts"),
            "timing": timing}
    if n >= meta["images"]:  # keep the longer plan's index: shorter plans are its prefixes
        pq.write_table(pa.table({**{k: rows[k] for k in ("index", "seed", "label", "tone", "chunk")},
                                 "class": [generate.class_name(int(y)) for y in rows["label"]],
                                 "file": files}), index_path)
        meta["images"] = n
        meta["counts"] = {generate.class_name(int(k)): int((rows["label"] == k).sum())
                          for k in np.unique(rows["label"])}
    if requested:
        meta["tone_check"] = tone_check(out, files, requested[0], cfg.model.tone_groups)
    meta_path.write_text(json.dumps(meta, indent=2))
    return {"out": str(out), "images": n, "generated": made, "timing": timing, "protocol": proto,
            "tone_check": meta.get("tone_check")}


def tone_check(out: Path, files: list[str], requested: int, groups: int) -> dict:
    """Does a requested skin-tone group show? Each image's ITA, estimated on its pixels as for real
    images, mapped to the model's tone groups (the Fitzpatrick types of data.augment.tone_group):
    counts per group read back, and the share that reads back as requested."""
    import torch

    from cnd_ray.data import augment, image as image_lib, tone as tone_lib

    fitz = [tone_lib.fitzpatrick(tone_lib.estimate_ita(image_lib.decode_png((out / f).read_bytes())))
            for f in files]
    back = augment.tone_group(torch.tensor(fitz), groups).numpy()  # `groups` = unknown tone
    return {"groups": groups, "requested": [requested],
            "read_back": {str(g): int((back == g).sum()) for g in range(groups + 1) if (back == g).any()},
            "match": round(float((back == requested).mean()), 4), "images": len(files)}


def run(ckpt: str, out: str, num_per_class: int = 16, overrides=(), tone: int | None = None,
        progress: bool = True) -> dict:
    """Sample `num_per_class` images of every class from `ckpt` into `out`."""
    path = identity.resolve_checkpoint(ckpt, overrides)
    cfg, ema, step = checkpoint.load_ema(path)
    cfg = sampling_config(cfg, overrides)
    if tone is not None and not 0 <= tone < cfg.model.tone_groups:
        raise UserError(f"--tone {tone}: this model was trained with model.tone_groups="
                        f"{cfg.model.tone_groups} (valid groups 0..{cfg.model.tone_groups - 1})"
                        if cfg.model.tone_groups else
                        f"--tone {tone}: this model was not trained with a skin-tone condition")
    if num_per_class < 1:
        raise UserError(f"--num-per-class {num_per_class}: must be at least 1")
    k = cfg.model.num_classes
    rows = generate.plan(num_per_class * k, [1.0] * k, cfg.eval.seed, cfg.eval.batch_size,
                         generate.NO_TONE if tone is None else tone)
    return generate_images(cfg, path, step, ema, rows, Path(out).absolute(), progress)
