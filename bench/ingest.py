"""Ingest throughput on ISIC-2020-sized photos (6000x4000 JPEGs) at the training resolution.

Measured side by side in one run:
  full    - one process: PIL full-size decode, resize, crop (what a naive loader does)
  draft   - one process: our image.load (JPEG DCT-domain downscale), PNG encode, ITA estimate
  ray     - `ingest.run` through Ray Data on all cores (scan, label, decode, write shards)
and reports images/s, images/s per core, and the projected time for the 58k-image ISIC pool.

Run: python bench/ingest.py [--images 48] [--size 256] [--distinct 6]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

from cnd_ray.data import image as image_lib
from cnd_ray.data import synth, tone
from cnd_ray.launch import ingest

ISIC_POOL = 57_964  # 2019 + 2020 after de-duplication (DATA.md)


def make_dataset(root: str, n: int, distinct: int, width: int = 6000, height: int = 4000) -> list[str]:
    """An ISIC 2020 layout of n big JPEGs: `distinct` synthetic photos upscaled, with sensor noise,
    then copied under new names (decode cost is what matters, not content)."""
    small = os.path.join(root, "small")
    synth.run(small, num_images=distinct, image_size=1000, malignant_fraction=0.5, test_per_tone=0,
              progress=False)
    os.makedirs(os.path.join(root, "isic", "train"))
    rng = np.random.default_rng(0)
    sources = []
    for i, name in enumerate(sorted(os.listdir(os.path.join(small, "train")))):
        img = Image.open(os.path.join(small, "train", name)).resize((width, height), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-6, 7, (height, width, 3), dtype=np.int16)
        path = os.path.join(root, f"big{i}.jpg")
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=92)
        sources.append(path)
    lines = ["image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,"
             "benign_malignant,target"]
    paths = []
    for i in range(n):
        image_id = f"ISIC_{8000000 + i:07d}"
        path = os.path.join(root, "isic", "train", image_id + ".jpg")
        shutil.copyfile(sources[i % len(sources)], path)
        paths.append(path)
        lines.append(f"{image_id},IP_{i:07d},female,50.0,torso,nevus,benign,0")
    with open(os.path.join(root, "isic", "ISIC_2020_Training_GroundTruth.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return paths


def full_decode(data: bytes, size: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    scale = size / min(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.Resampling.LANCZOS)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def ours(data: bytes, size: int) -> None:
    arr, _ = image_lib.load(data, size)
    image_lib.encode_png(arr)
    tone.estimate_ita(arr)


def per_image(fn, paths, size) -> float:
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            fn(f.read(), size)
    return (time.perf_counter() - t) / len(paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--distinct", type=int, default=6)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        paths = make_dataset(tmp, args.images, args.distinct)
        mb = np.mean([os.path.getsize(p) for p in paths]) / 2 ** 20
        print(f"made {len(paths)} 6000x4000 JPEGs (mean {mb:.1f} MB) in {time.perf_counter() - t:.0f} s")
        sample = paths[: min(len(paths), 8)]
        t_full = per_image(full_decode, sample, args.size)
        t_ours = per_image(ours, sample, args.size)
        import ray

        ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR")
        ingest.run([os.path.join(tmp, "isic")], os.path.join(tmp, "warm"), image_size=args.size,
                   progress=False)  # start-up (workers, imports) excluded from the timing below
        t = time.perf_counter()
        m = ingest.run([os.path.join(tmp, "isic")], os.path.join(tmp, "shards"), image_size=args.size,
                       progress=False)
        t_ray = time.perf_counter() - t
    ray_ips = m["num_images"] / t_ray
    rows = [("full decode (1 process)", 1 / t_full, 1 / t_full),
            ("image.load draft + png + ITA (1 process)", 1 / t_ours, 1 / t_ours),
            (f"ingest.run via Ray Data ({cores} cores)", ray_ips, ray_ips / cores)]
    print(f"\n{'variant':45s} {'img/s':>8s} {'img/s/core':>11s}")
    for name, ips, per_core in rows:
        print(f"{name:45s} {ips:8.2f} {per_core:11.2f}")
    print(f"\ndraft vs full decode: {t_full / t_ours:.2f}x faster per image")
    for n_cores in (cores, 16, 64):
        print(f"projected ISIC pool ({ISIC_POOL} images) on {n_cores} cores: "
              f"{ISIC_POOL / (ray_ips / cores * n_cores) / 60:.1f} min")
    print(json.dumps({"images": m["num_images"], "size": args.size, "cores": cores,
                      "jpeg_mb": round(mb, 2),
                      "full_decode_img_s": round(1 / t_full, 2), "draft_img_s": round(1 / t_ours, 2),
                      "draft_speedup": round(t_full / t_ours, 2), "ray_img_s": round(ray_ips, 2),
                      "ray_img_s_per_core": round(ray_ips / cores, 2),
                      "pool_minutes_16_cores": round(ISIC_POOL / (ray_ips / cores * 16) / 60, 1)}),
          flush=True)  # Ray's shutdown may end the process without flushing stdout
    ray.shutdown()


if __name__ == "__main__":
    main()
