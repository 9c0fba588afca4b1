"""What do the samplers cost and what do they give up? (issue 6, deliverable 5)

Three measurements in one run, variants side by side:
  1. images/s per sampler (ddpm x 250, the paper's; ddim x 50; dpm++ x 25 and 50; dpm++-sde x 25), in
     process with `generate.Generator` (no Ray) and random EMA weights, at two shapes:
       quickstart - DiT XS/4 on 32 px pixel space, batch 32: full chains, measured;
       paper      - DiT-L/4 on 4x32x32 latents (458M params): a full chain on CPU takes far too
                    long, so each sampler runs --paper-steps steps at --paper-batch after a warm-up
                    forward and images/s = batch / (steps x seconds per step) is EXTRAPOLATED. The
                    VAE decode is skipped (vae=None: the Generator then clips x0 to [-1, 1] as in
                    pixel space, which costs nothing). The same extrapolation is checked against
                    the measured quickstart chains.
     Every sampler costs one DiT forward per step; guidance != 1 doubles the forward's batch
     (ddpm at the quickstart shape, guidance 1.0 vs 2.0, shows the ratio).
     Part 1 runs torch on --threads (default 1, what each of 2 CPU actors gets): on a shared 2-core
     machine a 2-thread forward slows 10-50x whenever another process takes a core (OpenMP threads
     wait on each other), which no side-by-side ratio survives. The forward's time at 1 and at all
     cores' threads (min and median of 10 calls) is printed so the figures can be scaled.
  2. `cnd_ray.launch.sample.run` with eval.actors=1 vs 2 (quickstart shape, dpm++ x 25, batch 32): wall
     seconds including actor start-up, images/s from its `timing`, and whether the PNGs match.
  3. FD/KD, MS-SSIM and class-fidelity AUROC of each sampler vs ddpm x 250 on a trained quickstart
     model (`cnd_ray.jobs.evaluate.run`, one fidelity classifier judging all samplers). Without
     --ckpt a quickstart model is trained for --train-steps first. Inception weights are not
     downloaded: with --inception PATH, FID/KID are added.

Run: python bench/sampling.py [--ckpt CKPT --reference SHARDS] [--num-samples 1000]
                              [--skip-paper] [--skip-actors] [--skip-eval] [--keep DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

SAMPLERS = (("ddpm", 250), ("ddim", 50), ("dpm++", 25), ("dpm++", 50), ("dpm++-sde", 25))
BASE = "ddpm-250"


def tag(sampler: str, steps: int) -> str:
    return f"{sampler}-{steps}"


def random_ema(cfg) -> dict:
    """A DiT state dict with random (not zero-initialised) weights, as tests.helpers does."""
    from cnd_ray.models import build_dit

    dit = build_dit(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if name != "pos_embed":  # the frozen sin-cos table keeps its values
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return dit.state_dict()


def run_chain(gen, base_cfg, sampler: str, steps: int, rows: dict, guidance: float = 1.0) -> float:
    """Seconds for one Generator call of `rows` with this sampler (the model stays the same)."""
    from cnd_ray import config as config_lib

    gen.cfg = config_lib.override(base_cfg, {"diffusion.sampler": sampler,
                                             "diffusion.sample_steps": steps,
                                             "diffusion.guidance_scale": guidance})
    t = time.perf_counter()
    gen(rows["seed"], rows["label"], rows["tone"])
    return time.perf_counter() - t


def forward_seconds(gen, batch: int, calls: int) -> float:
    """Seconds of one bare DiT forward at `batch` (mean of `calls`)."""
    cfg = gen.cfg
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    t = torch.full((batch,), 500, dtype=torch.long)
    y = torch.arange(batch) % cfg.model.num_classes
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(calls):
            gen.dit(x, t, y, None)
    return (time.perf_counter() - start) / calls


def thread_scaling(gen, batch: int, threads: int) -> dict:
    """Bare forward seconds (min, median of 10 single calls) at 1 thread and at all cores."""
    out = {}
    for n in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(n)
        ts = sorted(forward_seconds(gen, batch, 1) for _ in range(10))
        out[str(n)] = {"min": ts[0], "median": ts[len(ts) // 2]}
    torch.set_num_threads(threads)
    return out


def bench_speed(args) -> dict:
    """Part 1: images/s per sampler at the quickstart shape (measured) and the paper shape."""
    from cnd_ray import config as config_lib
    from cnd_ray import generate

    out = {"threads": args.threads}
    # quickstart: full chains, measured; then the short-run extrapolation the paper shape relies on
    cfg = config_lib.load("quickstart")
    gen = generate.Generator(cfg, random_ema(cfg))
    b = args.batch
    rows = generate.plan(b, [1.0, 1.0], 0, b)
    forward_seconds(gen, b, 3)  # warm-up
    out["forward_threads"] = thread_scaling(gen, b, args.threads)
    fwd = forward_seconds(gen, b, 10)
    for smp, _ in SAMPLERS:  # warm-up: dpm++'s first call imports diffusers (about a second)
        run_chain(gen, cfg, smp, 2, rows)
    full = {tag(s, n): [] for s, n in SAMPLERS}
    for _ in range(args.repeats):  # round-robin, so machine noise hits every sampler alike
        for s, n in SAMPLERS:
            full[tag(s, n)].append(run_chain(gen, cfg, s, n, rows))
    short = {tag(s, n): min(run_chain(gen, cfg, s, args.paper_steps, rows) for _ in range(2))
             for s, n in SAMPLERS}
    q = {"batch": b, "forward_s": fwd, "forward_ms_per_image": 1e3 * fwd / b, "rows": {}}
    for s, n in SAMPLERS:
        k = tag(s, n)
        secs = min(full[k])
        per_step = short[k] / args.paper_steps
        q["rows"][k] = {"sampler": s, "steps": n, "seconds": secs, "images_per_s": b / secs,
                        "step_ms_per_image": 1e3 * secs / n / b,
                        "extrapolated_images_per_s": b / (n * per_step),
                        "measured_over_extrapolated": (b / secs) / (b / (n * per_step))}
    # guidance doubles the forward's batch: ddpm x guidance_steps, guidance 1.0 vs 2.0
    g1 = min(run_chain(gen, cfg, "ddpm", args.guidance_steps, rows, 1.0) for _ in range(2))
    g2 = min(run_chain(gen, cfg, "ddpm", args.guidance_steps, rows, 2.0) for _ in range(2))
    q["guidance"] = {"sampler": "ddpm", "steps": args.guidance_steps, "seconds_g1": g1,
                     "seconds_g2": g2, "ratio": g2 / g1}
    out["quickstart"] = q
    del gen

    if args.skip_paper:
        return out
    cfg = config_lib.load("paper")
    t0 = time.perf_counter()
    gen = generate.Generator(cfg, random_ema(cfg), vae=None)  # no decode: see the docstring
    build = time.perf_counter() - t0
    pb, ps = args.paper_batch, args.paper_steps
    rows = generate.plan(pb, [1.0, 1.0], 0, pb)
    forward_seconds(gen, pb, 1)  # warm-up
    fwd = forward_seconds(gen, pb, 1)
    p = {"batch": pb, "timed_steps": ps, "params_m": sum(x.numel() for x in gen.dit.parameters()) / 1e6,
         "build_s": build, "forward_s": fwd, "forward_ms_per_image": 1e3 * fwd / pb, "rows": {},
         "extrapolated": True, "vae_decode": False}
    for s, n in SAMPLERS:
        secs = run_chain(gen, cfg, s, ps, rows)
        per_step = secs / ps
        p["rows"][tag(s, n)] = {"sampler": s, "steps": n, "seconds_per_step": per_step,
                                "step_ms_per_image": 1e3 * per_step / pb,
                                "images_per_s": pb / (n * per_step),
                                "seconds_per_image": n * per_step / pb}
    out["paper"] = p
    return out


def bench_actors(args, tmp: str) -> dict:
    """Part 2: cnd_ray.launch.sample.run with 1 vs 2 Ray actors on the same protocol."""
    from cnd_ray import checkpoint, engine
    from cnd_ray.launch import sample
    from cnd_ray import config as config_lib

    cfg = config_lib.load("quickstart")
    state = engine.build_state(cfg)  # random EMA weights, as tests.helpers.random_checkpoint makes
    state.ema.load_state_dict(random_ema(cfg))
    ckpt = str(checkpoint.save(state, Path(tmp) / "random-quickstart"))
    res = {1: [], 2: []}
    order = [1, 2] + [2, 1] * (args.actor_repeats > 1)  # ABBA: drift in load hits both alike
    order += [1, 2] * max(0, args.actor_repeats - 2)
    for i, actors in enumerate(order):
        out = os.path.join(tmp, f"sample-{actors}actor-{i}")
        t = time.perf_counter()
        r = sample.run(ckpt, out, num_per_class=args.per_class, progress=False, overrides=[
            "diffusion.sampler=dpm++", "diffusion.sample_steps=25", "eval.batch_size=32",
            f"eval.actors={actors}"])
        res[actors].append({"wall_s": time.perf_counter() - t, "images": r["images"],
                            "images_per_s": r["timing"]["images_per_s"],
                            "timing_s": r["timing"]["seconds"], "actors": r["timing"]["actors"], "out": out})
    a, b = Path(res[1][0]["out"]), Path(res[2][0]["out"])
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    same = sum((a / f).read_bytes() == (b / f).read_bytes() for f in files if (b / f).exists())
    w1, w2 = (min(x["wall_s"] for x in res[k]) for k in (1, 2))
    r1, r2 = (max(x["images_per_s"] for x in res[k]) for k in (1, 2))
    return {"per_class": args.per_class, "images": res[1][0]["images"], "order": order,
            "wall_s_all_1": [x["wall_s"] for x in res[1]], "wall_s_all_2": [x["wall_s"] for x in res[2]],
            "wall_s_1": w1, "wall_s_2": w2, "images_per_s_1": r1, "images_per_s_2": r2,
            "speedup_wall": w1 / w2, "speedup_images_per_s": r2 / r1,
            "pngs_compared": len(files), "pngs_identical": same}


def trained_checkpoint(args, tmp: str) -> tuple[str, str]:
    """(--ckpt, --reference) as given, else a quickstart model trained here and its shards."""
    from cnd_ray import checkpoint
    from cnd_ray.launch import train
    from cnd_ray import config as config_lib

    if args.ckpt:
        ckpt = args.ckpt
        ref = args.reference or checkpoint.load_config(ckpt).data.shards
        return ckpt, ref
    s = args.train_steps
    cfg = config_lib.load("quickstart", [f"train.storage={tmp}/runs", f"train.steps={s}",
                                         f"train.checkpoint_every={s}", f"train.eval_every={s}",
                                         f"track.tracking_uri=sqlite:///{tmp}/mlflow.db"])
    t = time.perf_counter()
    ckpt = train.run(cfg)["checkpoint"]
    print(f"trained quickstart x {s} steps in {time.perf_counter() - t:.0f} s: {ckpt}", flush=True)
    return ckpt, args.reference or checkpoint.load_config(ckpt).data.shards


def bench_quality(args, tmp: str) -> dict:
    """Part 3: evaluate each sampler with the same fidelity classifier."""
    from cnd_ray.jobs import evaluate

    ckpt, ref = trained_checkpoint(args, tmp)
    extractors = "fidelity,timm:resnet18" + (",inception" if args.inception else "")
    common = [f"eval.num_samples={args.num_samples}", f"eval.extractors={extractors}",
              "eval.timm_weights=random", f"eval.fidelity_steps={args.fidelity_steps}",
              f"track.tracking_uri=sqlite:///{tmp}/mlflow.db"]
    if args.inception:
        common.append(f"eval.inception_weights={os.path.abspath(args.inception)}")
    clf = ""
    rows = {}
    for s, n in SAMPLERS:
        out = Path(tmp) / f"eval-{tag(s, n)}"
        over = common + [f"diffusion.sampler={s}", f"diffusion.sample_steps={n}"]
        if clf:
            over.append(f"eval.fidelity_weights={clf}")
        t = time.perf_counter()
        with contextlib.redirect_stdout(open(os.devnull, "w")) if args.quiet else contextlib.nullcontext():
            res = evaluate.run(ckpt, ref, out=str(out), overrides=over, progress=False)
        wall = time.perf_counter() - t
        if not clf:
            clf = str(out / "fidelity_classifier.pt")
        count = str(max(res["protocol"]["num_samples"]))
        row = {"wall_s": wall, "images_per_s": res["sampling"].get("images_per_s"),
               "sampling_s": res["sampling"].get("seconds"), "actors": res["sampling"].get("actors"),
               "ms_ssim": res["diversity"]["generated"]["all"]["ms_ssim"],
               "ms_ssim_real": res["diversity"]["real"]["all"]["ms_ssim"],
               "auroc": res["fidelity"]["generated"]["auroc"],
               "heldout_auroc": res["fidelity"]["heldout"]["auroc"],
               "batch_size": res["protocol"]["batch_size"], "spaces": {}}
        for space, by_n in res["distances"].items():
            e = by_n[count]["all"]
            row["spaces"][space] = {"fd": e.get("fd"), "kd": e.get("kd"), "kd_std": e.get("kd_std"),
                                    "names": list(res["names"][space])}
        rows[tag(s, n)] = row
        print(f"  evaluated {tag(s, n)} in {wall:.0f} s", flush=True)
    base = rows[BASE]
    for row in rows.values():
        vs = {"speedup": (row["images_per_s"] or 0) / base["images_per_s"] if base["images_per_s"] else None,
              "d_auroc": row["auroc"] - base["auroc"], "d_ms_ssim": row["ms_ssim"] - base["ms_ssim"]}
        for space, e in row["spaces"].items():
            b = base["spaces"][space]
            for m in ("fd", "kd"):
                if e[m] is not None and b[m] is not None:
                    vs[f"d_{m}_{space}"] = e[m] - b[m]
                    vs[f"{m}_ratio_{space}"] = e[m] / b[m] if b[m] else None
        row["vs_ddpm250"] = vs
    return {"checkpoint": ckpt, "reference": ref, "num_samples": args.num_samples,
            "fidelity_classifier": clf, "rows": rows}


def print_speed(sp: dict) -> None:
    q = sp["quickstart"]
    print(f"\n1. Sampler speed, in-process Generator, {os.cpu_count()} cores, {sp['threads']} torch "
          f"thread(s), random EMA weights")
    print("   bare quickstart forward, batch 32, by torch threads: " + ", ".join(
        f"{k}: min {1e3 * v['min']:.1f} ms, median {1e3 * v['median']:.1f} ms"
        for k, v in sp["forward_threads"].items()))
    print(f"quickstart (XS/4, 32 px pixel), batch {q['batch']}: one DiT forward "
          f"{1e3 * q['forward_s']:.1f} ms = {q['forward_ms_per_image']:.2f} ms/image")
    print(f"{'sampler':10s} {'steps':>5s} {'seconds':>8s} {'images/s':>9s} {'ms/img/step':>12s} "
          f"{'extrap. img/s':>14s} {'meas/extrap':>11s}   source")
    for r in q["rows"].values():
        print(f"{r['sampler']:10s} {r['steps']:5d} {r['seconds']:8.2f} {r['images_per_s']:9.2f} "
              f"{r['step_ms_per_image']:12.3f} {r['extrapolated_images_per_s']:14.2f} "
              f"{r['measured_over_extrapolated']:11.2f}   measured full chain")
    rq = q["rows"]
    print(f"  ddpm-250 vs dpm++-25 images/s ratio {rq['dpm++-25']['images_per_s'] / rq[BASE]['images_per_s']:.2f}"
          f" (step ratio 10.00); extrapolation = batch / (steps x s/step of a short run)")
    g = q["guidance"]
    print(f"  guidance: ddpm x {g['steps']} at scale 2.0 / 1.0 = {g['seconds_g2']:.2f} s / "
          f"{g['seconds_g1']:.2f} s = {g['ratio']:.2f}x (each step runs a doubled batch)")
    p = sp.get("paper")
    if p:
        print(f"paper (DiT-L/4, 4x32x32 latents, {p['params_m']:.0f}M params), batch {p['batch']}, "
              f"{p['timed_steps']} timed steps per sampler, NO VAE decode: one DiT forward "
              f"{p['forward_s']:.2f} s = {p['forward_ms_per_image']:.0f} ms/image")
        print(f"{'sampler':10s} {'steps':>5s} {'s/step':>8s} {'images/s':>9s} {'ms/img/step':>12s} "
              f"{'s/image':>8s}   source")
        for r in p["rows"].values():
            print(f"{r['sampler']:10s} {r['steps']:5d} {r['seconds_per_step']:8.2f} "
                  f"{r['images_per_s']:9.4f} {r['step_ms_per_image']:12.1f} {r['seconds_per_image']:8.1f}"
                  "   EXTRAPOLATED")
        print(f"  paper / quickstart model cost per image per step: "
              f"{p['rows']['dpm++-25']['step_ms_per_image'] / rq['dpm++-25']['step_ms_per_image']:.0f}x")


def print_actors(a: dict) -> None:
    print(f"\n2. cnd_ray.launch.sample.run, quickstart shape, dpm++ x 25, batch 32, {a['images']} images; "
          f"runs in order {a['order']} (best of each; wall includes actor start-up)")
    print(f"{'actors':>6s} {'wall s':>8s} {'images/s':>9s}   all runs' wall s")
    for k in (1, 2):
        print(f"{k:6d} {a[f'wall_s_{k}']:8.1f} {a[f'images_per_s_{k}']:9.2f}   "
              + ", ".join(f"{x:.1f}" for x in a[f"wall_s_all_{k}"]))
    print(f"  speed-up 2 over 1: wall {a['speedup_wall']:.2f}x, images/s {a['speedup_images_per_s']:.2f}x; "
          f"PNGs identical: {a['pngs_identical']}/{a['pngs_compared']}")


def print_quality(qu: dict) -> None:
    rows = qu["rows"]
    spaces = list(rows[BASE]["spaces"])
    print(f"\n3. Sample quality, {qu['num_samples']} samples per sampler, checkpoint {qu['checkpoint']}")
    head = f"{'sampler':10s} {'img/s':>6s}"
    for sp in spaces:
        fd, kd = rows[BASE]["spaces"][sp]["names"]
        head += f" {fd:>24s} {kd + ' x1e3':>30s}"
    print(head + f" {'MS-SSIM':>8s} {'AUROC':>6s}")
    for k, r in rows.items():
        line = f"{k:10s} {r['images_per_s'] or 0:6.2f}"
        for sp in spaces:
            e = r["spaces"][sp]
            fd = "refused" if e["fd"] is None else f"{e['fd']:.3f}"
            kd = "-" if e["kd"] is None else f"{1e3 * e['kd']:.2f} +- {1e3 * e['kd_std']:.2f}"
            line += f" {fd:>24s} {kd:>30s}"
        print(line + f" {r['ms_ssim']:8.3f} {r['auroc']:6.3f}")
    print(f"  real MS-SSIM {rows[BASE]['ms_ssim_real']:.3f}; held-out real AUROC {rows[BASE]['heldout_auroc']:.3f};"
          " timm-resnet18 is random-init (a weak generic space); images/s include actor start-up")
    print("  vs ddpm-250:")
    for k, r in rows.items():
        if k == BASE:
            continue
        v = r["vs_ddpm250"]
        parts = [f"speed-up {v['speedup']:.2f}x"]
        for sp in spaces:
            if f"fd_ratio_{sp}" in v:
                parts.append(f"FD {sp} {v[f'd_fd_{sp}']:+.3f} ({v[f'fd_ratio_{sp}']:.2f}x)")
            if f"kd_ratio_{sp}" in v:
                parts.append(f"KD {sp} {1e3 * v[f'd_kd_{sp}']:+.2f}e-3 ({v[f'kd_ratio_{sp}']:.2f}x)")
        parts.append(f"AUROC {v['d_auroc']:+.3f}, MS-SSIM {v['d_ms_ssim']:+.3f}")
        print(f"    {k:10s} " + "; ".join(parts))


def rounded(x, digits: int = 4):
    if isinstance(x, dict):
        return {str(k): rounded(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v, digits) for v in x]
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="", help="a trained quickstart checkpoint (else one is trained)")
    ap.add_argument("--reference", default="", help="its reference shards (default: its data.shards)")
    ap.add_argument("--num-samples", type=int, default=1000, help="images per sampler in part 3")
    ap.add_argument("--fidelity-steps", type=int, default=300)
    ap.add_argument("--train-steps", type=int, default=1000, help="without --ckpt")
    ap.add_argument("--inception", default="", help="clean-fid Inception weights: adds FID/KID")
    ap.add_argument("--batch", type=int, default=32, help="quickstart batch in part 1")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in part 1 (see above)")
    ap.add_argument("--repeats", type=int, default=2, help="quickstart full chains per sampler (min)")
    ap.add_argument("--guidance-steps", type=int, default=20)
    ap.add_argument("--paper-batch", type=int, default=4)
    ap.add_argument("--paper-steps", type=int, default=3, help="timed steps per sampler (extrapolated)")
    ap.add_argument("--per-class", type=int, default=256, help="images per class in part 2")
    ap.add_argument("--actor-repeats", type=int, default=2, help="runs of each pool size in part 2")
    ap.add_argument("--skip-paper", action="store_true")
    ap.add_argument("--skip-actors", action="store_true")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="hide evaluate's step lines")
    ap.add_argument("--keep", default="", help="work in DIR (kept) instead of a temporary folder")
    args = ap.parse_args()
    import ray

    t_all = time.perf_counter()
    torch.set_num_threads(args.threads)
    out = {"cores": os.cpu_count()}
    with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory()) as tmp:
        os.makedirs(tmp, exist_ok=True)
        out["speed"] = bench_speed(args)  # before Ray starts: its processes would add noise
        print_speed(out["speed"])
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
        if not args.skip_actors:
            out["actors"] = bench_actors(args, tmp)
            print_actors(out["actors"])
        if not args.skip_eval:
            out["quality"] = bench_quality(args, tmp)
            print_quality(out["quality"])
        ray.shutdown()
    out["total_s"] = time.perf_counter() - t_all
    print(f"\ntotal {out['total_s']:.0f} s")
    print(json.dumps(rounded(out)))


if __name__ == "__main__":
    main()
