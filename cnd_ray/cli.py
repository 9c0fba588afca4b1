"""`cnd-ray <verb> [--config X] [section.key=value ...]`: the only argv parser.

Verb modules are imported lazily, so `cnd-ray --help` imports neither torch nor ray. Flags are only
for paths; anything that changes what is trained is a config field given as section.key=value.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import signal
import sys

from cnd_ray import config as config_lib
from cnd_ray.launch import driverlog
from cnd_ray.errors import UserError

CONFIG_HELP = ("packaged config name ({names}) or a YAML path; dataclass defaults (the paper's "
               "setup) when omitted")


def _config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    names = ", ".join(config_lib.packaged_names())
    p.add_argument("--config", default=default,
                   help=CONFIG_HELP.format(names=names) if default is None else
                   f"packaged config name ({names}) or a YAML path (default: {default})")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. method.lambda_cls=0.3 model.size=S")


def cmd_config(args: argparse.Namespace) -> int:
    cfg = config_lib.load(args.config, args.overrides)
    print(cfg.to_yaml(), end="")
    if args.params:
        from cnd_ray.models import params  # imports torch only when asked for

        counts = params.count(cfg)
        print(f"dit_params: {counts['dit']}")
        print(f"classifier_params: {counts['classifier']}")
    return 0


def _default(where, name: str):
    """The default of `name`: a field of a config section (IngestConfig, SynthConfig), else a keyword
    of a verb's run() (quickstart's folder and space)."""
    if isinstance(where, type):
        return getattr(where, name)
    return inspect.signature(where).parameters[name].default


def _given(args: argparse.Namespace, *names: str) -> dict:
    """Only the flags the user gave, so run()'s own defaults apply to the rest."""
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def cmd_ingest(args: argparse.Namespace) -> int:
    from cnd_ray.launch import ingest

    m = ingest.run(args.root, args.out, **_given(args, "labels", "image_size", "latent", "ak_malignant",
                                                 "val_fraction", "seed", "shard_mb", "overwrite", "test"))
    splits = ", ".join(f"{s} {c['benign'] + c['malignant']} ({c['malignant']} malignant)"
                       for s, c in m["splits"].items())
    print(f"ingested {m['num_images']} images ({m['classes']['benign']} benign, "
          f"{m['classes']['malignant']} malignant; {splits}) in {m['seconds']} s")
    reasons = ", ".join(f"{n} {r}" for r, n in m["rejects_by_reason"].items()) or "none"
    print(f"rejected {m['num_rejected']} inputs ({reasons}) and merged {m['num_duplicates']} "
          "duplicates: see rejects.csv and duplicates.csv")
    print(f"shards: {os.path.abspath(args.out)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from cnd_ray.launch import stream

    good, problems = stream.verify(args.shards)
    for line in problems:
        print(line)
    print(f"{good} rows read and decoded; {len(problems)} problem(s)"
          + (f": re-ingest {args.shards}" if problems else ""))
    return 1 if problems else 0


def cmd_track_sync(args: argparse.Namespace) -> int:
    from cnd_ray import tracking

    left = tracking.spool_server(args.run_dir)
    if left is None:
        raise UserError(f"{args.run_dir}: no MLflow spool here ({tracking.SPOOL}/): nothing waits for upload")
    done = tracking.upload(args.run_dir, to=args.to)
    if done is None:
        raise UserError(f"MLflow at {args.to or left} does not answer: start it and run this again "
                        "(or --to URI)")
    for name, run_id in done[1].items():
        print(f"uploaded run {name} to {done[0]} (run {run_id})")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from cnd_ray.data import synth

    s = synth.run(args.out, **_given(args, "num_images", "image_size", "malignant_fraction", "seed",
                                     "difficulty", "test_per_tone"))
    tones = ", ".join(f"{g} {n}" for g, n in s["tone_groups"].items())
    print(f"wrote {s['num_images']} synthetic images ({s['benign']} benign, {s['malignant']} "
          f"malignant; skin tones {tones}; {s['difficulty']} difficulty) in the ISIC 2020 layout to "
          f"{s['out']} in {s['seconds']:.1f} s")
    if s["test_out"]:
        print(f"and a test set of {s['test_images']} images, every skin-tone group alike, to {s['test_out']}")
        print(f"next: cnd-ray ingest --root {s['out']} --test {s['test_out']} --out SHARDS")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cnd_ray.launch import train

    cfg = config_lib.load(args.config, args.overrides)
    try:
        out = train.run(cfg)
    except train.TrainingStopped as e:
        print(f"cnd-ray train: stopped: {e}", file=sys.stderr)
        return 1
    except train.TrainingInterrupted as e:
        print(f"cnd-ray train: {e}", file=sys.stderr)
        return 130  # as a shell reports a Ctrl-C
    print(f"checkpoint: {out['checkpoint']}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from cnd_ray import tracking
    from cnd_ray.launch import tune

    cfg = config_lib.load(args.config, args.overrides)
    out = tune.run(args.space, cfg, resume=args.resume, name=args.name or "")
    print(f"\nsearch {out['name']} ({out['path']}), best first:\n")
    print(out["table"])
    best = out["best"]
    if best:
        print(f"best trial: {best['trial']}" + (f" (setting {best['setting']})" if best["setting"] else "")
              + f"; checkpoint: {best['checkpoint']}")
    print(f"MLflow parent run {out['parent_run_id']}; browse it with: "
          f"{tracking.ui_command(out['tracking_uri'])}")
    return 0 if best else 1


def cmd_quickstart(args: argparse.Namespace) -> int:
    from cnd_ray import quickstart, tracking

    cfg = config_lib.load(args.config, args.overrides)
    out = quickstart.run(cfg, **_given(args, "out", "space"))
    search = out["search"]
    print(f"\n{search['table']}")
    for mode, comp in (out["comparison"] or {}).items():
        title = quickstart.mode_title(mode, comp["scale"])
        print(f"## The paper's table, at this scale, {title} (95% intervals)\n\n"
              f"{quickstart.paper_table(comp, out['floors'], out['real_lesion_share'])}")
        print(f"## Each setting against setting {quickstart.BASELINE}, {title}\n\n{quickstart.verdict_table(comp)}")
    if out["comparison"]:
        print("\n".join(quickstart.verdicts(out["comparison"])) + "\n")
    if out["fairness"]:
        print(out["fairness"])
    print(f"time:    {out['seconds'] / 60:.1f} minutes")
    print(f"report:  {out['report']}")
    print(f"search:  {search['path']}")
    if out["best"]:
        print(f"best:    {out['best']['checkpoint']}")
        print(f"next:    cnd-ray evaluate --ckpt {out['best']['checkpoint']} --reference "
              f"{out['shards']} --num-samples 1000 eval.extractors=fidelity")
    print(f"MLflow:  {tracking.ui_command(search['tracking_uri'])}")
    return 0 if out["best"] else 1


# Sampling flags the users type, and the config key each one sets.
SAMPLING_FLAGS = {"sampler": "diffusion.sampler", "steps": "diffusion.sample_steps",
                  "cfg_scale": "diffusion.guidance_scale", "seed": "eval.seed"}


def sampling_overrides(args: argparse.Namespace) -> list[str]:
    return [f"{key}={getattr(args, flag)}" for flag, key in SAMPLING_FLAGS.items()
            if getattr(args, flag, None) is not None] + list(args.overrides)


def cmd_sample(args: argparse.Namespace) -> int:
    from cnd_ray.launch import sample

    out = sample.run(args.ckpt, args.out, args.num_per_class, sampling_overrides(args), tone=args.tone)
    p = out["protocol"]
    t = out["timing"]
    rate = f", {t['images_per_s']} img/s on {t['actors']} {t['device']} actors" if out["generated"] else ""
    print(f"{out['images']} images ({out['generated']} new{rate}) from step {p['step']} with "
          f"{p['sampler']} x {p['steps']} steps, guidance {p['guidance_scale']}, seed {p['seed']}")
    if out.get("tone_check"):
        c = out["tone_check"]
        print(f"skin tone read back (ITA on the pixels): {100 * c['match']:.0f}% of {c['images']} images "
              f"in the requested group {c['requested']}; by group: {c['read_back']} "
              f"({c['groups']} = unknown)")
    print(f"samples: {out['out']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cnd_ray.evaluate import run as evaluate

    counts = [f"eval.num_samples={args.num_samples}"] if args.num_samples else []
    res = evaluate.run(args.ckpt, args.reference, out=args.out or "",
                       overrides=counts + sampling_overrides(args))
    print()
    print(evaluate.report(res), end="")
    m = res["mlflow"]
    print(f"\nmetrics: {res['out']}/metrics.json and metrics.md")
    print(f"MLflow run {m['run_id']}{' (new)' if m['new_run'] else ''} at {m['tracking_uri']}")
    return 0


def _named_paths(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--eval {v!r}: expected NAME=PATH, e.g. ddi=/data/ddi")
        if name in out:
            raise UserError(f"--eval {name}: given twice ({out[name]} and {path})")
        out[name] = path
    return out


def cmd_fairness(args: argparse.Namespace) -> int:
    from cnd_ray.fairness import run as fairness

    res = fairness.run(args.real, args.synthetic, _named_paths(args.eval), out=args.out or "",
                       ckpt=args.ckpt or "", overrides=args.overrides)
    print()
    print(fairness.markdown(res), end="")
    print(f"\nreport: {res['out']}/fairness.json and fairness.md; MLflow run {res['mlflow_run_id']}")
    return 0


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="CKPT",
                   help="checkpoint folder, a training run folder (its latest checkpoint), or a model "
                        "in MLflow: models:/<search>@best (a search's registered best), "
                        "models:/<name>/<version>, models:/<logged model id>")
    p.add_argument("--sampler", choices=config_lib.SAMPLERS, default=None,
                   help="ddpm: ancestral, the paper's (250 steps); ddim; dpm++: DPM-Solver++(2M), an "
                        "ODE solver for 20-50 steps; dpm++-sde: its stochastic form, clean in 25 steps "
                        "even on a short-trained model (default: the checkpoint's diffusion.sampler)")
    p.add_argument("--steps", type=int, default=None, metavar="S",
                   help="model calls per image (default: the checkpoint's diffusion.sample_steps)")
    p.add_argument("--cfg-scale", type=float, default=None, metavar="W",
                   help="classifier-free guidance scale; 1 = none (default: the checkpoint's "
                        "diffusion.guidance_scale)")
    p.add_argument("--seed", type=int, default=None, metavar="K",
                   help="image i's noise comes from (K, i) alone (default: eval.seed, 0)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="sampling settings: diffusion.eta, data.vae, eval.batch_size, eval.actors, ...")


def cmd_ui(args: argparse.Namespace) -> int:
    import socket

    from cnd_ray import tracking

    cfg = config_lib.load(args.config, args.overrides)
    uri = tracking.resolve_uri(cfg.track.tracking_uri)
    if uri.startswith("http"):
        print(f"MLflow UI: {uri} (a tracking server already serves it)")
        return 0
    port = args.port
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    # The pages are read while the server starts (both load MLflow: seconds on a busy laptop), but a
    # new store is made first: both creating its tables at once killed the server ("Online
    # migration expected to match one row").
    new = uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):])
    urls = tracking.ui_urls(uri, base, cfg.track.experiment) if new else None
    proc = tracking.ui(uri, port)
    try:  # the pages are printed once they answer, so a click on them works
        urls = urls or tracking.ui_urls(uri, base, cfg.track.experiment)
        up = tracking.wait_until_up(proc, base, timeout=tracking.UI_WAIT, say=lambda m: print(m, flush=True))
    except BaseException:
        tracking.stop_server(proc)
        raise
    print(f"MLflow UI for {uri}: {urls['runs']} (Ctrl-C stops it)" +
          (f"; up in {up:.1f} s" if up is not None else f"; not answering after {tracking.UI_WAIT} s yet"), flush=True)
    if "search" in urls:
        print(f"latest search, its trials side by side: {urls['search']}", flush=True)
    if "parent" in urls:
        print(f"latest search's parent run: {urls['parent']}", flush=True)

    def _stop(signum, frame):
        raise KeyboardInterrupt

    # Killed (SIGTERM) or its terminal closed (SIGHUP): stop the server too, not only on Ctrl-C.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        tracking.stop_server(proc)


def _add_ingest(verbs) -> None:
    from cnd_ray.data import layouts  # numpy/pyarrow only: --help stays free of torch/ray

    run = config_lib.IngestConfig
    p = verbs.add_parser(
        "ingest", help="ISIC archives (2016-2020, HAM10000, Archive exports) -> Parquet shards",
        description="Find every ISIC layout under the roots (recursively), label, de-duplicate, split "
                    "by patient/lesion, decode and resize through Ray Data, and write Parquet shards "
                    "with manifest.json, rejects.csv (every input not ingested, and why) and "
                    "duplicates.csv. Uses the Ray cluster in RAY_ADDRESS, else a local one.")
    p.add_argument("--root", action="append", required=True, metavar="DIR",
                   help="folder holding unpacked archives, searched recursively (repeatable)")
    p.add_argument("--test", action="append", default=argparse.SUPPRESS, metavar="DIR",
                   help="folder holding an archive kept whole as the test split, never split into train "
                        "and val (a tone-balanced or external set, e.g. the one `cnd-ray synth` writes "
                        "beside its --out); training images sharing a patient or lesion with it are "
                        "left out and listed (repeatable)")
    p.add_argument("--out", required=True, metavar="SHARDS", help="output folder (must not exist "
                   "or be empty; written under a temporary name and renamed when complete)")
    p.add_argument("--labels", choices=layouts.LABEL_MODES, default=argparse.SUPPRESS,
                   help=f"melanoma: melanoma vs rest (the paper's); malignant: MEL, BCC, SCC vs rest "
                        f"(default: {_default(run, 'labels')})")
    p.add_argument("--ak-malignant", action="store_true", default=argparse.SUPPRESS,
                   help="with --labels malignant, count actinic keratosis (AK/AKIEC) as malignant")
    p.add_argument("--image-size", type=int, default=argparse.SUPPRESS, metavar="S",
                   help=f"short side resize + centre crop to SxS (default: {_default(run, 'image_size')})")
    p.add_argument("--latent", default=argparse.SUPPRESS, metavar="none|VAE_DIR",
                   help="also store VAE posteriors (image and flip) using the diffusers AutoencoderKL "
                        "saved in this local folder (never downloaded); default: none")
    p.add_argument("--val-fraction", type=float, default=argparse.SUPPRESS, metavar="F",
                   help=f"share of patient/lesion groups held out (default: {_default(run, 'val_fraction')})")
    p.add_argument("--seed", type=int, default=argparse.SUPPRESS,
                   help=f"seed of the split and the shard order (default: {_default(run, 'seed')})")
    p.add_argument("--shard-mb", type=float, default=argparse.SUPPRESS, metavar="MB",
                   help=f"payload per Parquet shard (default: {_default(run, 'shard_mb')})")
    p.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                   help="replace a non-empty --out (atomically, once the new one is complete)")
    p.set_defaults(func=cmd_ingest)


def _add_synth(verbs) -> None:
    run = config_lib.SynthConfig
    p = verbs.add_parser(
        "synth", help="write a synthetic dermoscopy data set in the ISIC 2020 layout",
        description="Dermoscopy-like images (vignette, hairs, a lesion painted from a severity: benign "
                    "small, round, even brown; malignant larger, asymmetric, irregular, several colours) "
                    "with the ISIC 2020 ground truth CSV, so `cnd-ray ingest --root DIR` reads it, and "
                    "a test set with every skin-tone group alike beside it (DIR-test). The default "
                    "difficulty, isic, overlaps the classes' cues and skin tones as on ISIC (a "
                    "classifier reaches AUROC ~0.9; Fitzpatrick V-VI ~3%); easy paints every lesion as "
                    "its class's prototype on tones spread evenly. Deterministic per seed.")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder to write")
    for flag, typ, name in (("--num-images", int, "num_images"), ("--image-size", int, "image_size"),
                            ("--malignant-fraction", float, "malignant_fraction"),
                            ("--seed", int, "seed"), ("--test-per-tone", int, "test_per_tone")):
        p.add_argument(flag, type=typ, default=argparse.SUPPRESS,
                       help=f"default: {_default(run, name)}" + (
                           " (images per skin-tone group in DIR-test; 0: no test set)"
                           if name == "test_per_tone" else ""))
    p.add_argument("--difficulty", choices=config_lib.SYNTH_DIFFICULTIES, default=argparse.SUPPRESS,
                   help=f"isic: class cues and skin tones as on ISIC; easy: every lesion plain, every "
                        f"tone alike (default: {_default(run, 'difficulty')})")
    p.set_defaults(func=cmd_synth)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnd-ray",
        description="Class-N-Diff: a DiT trained jointly with a benign/malignant classifier.")
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>", required=True)

    p = verbs.add_parser("config", help="print the resolved, validated config as YAML",
                         description="Resolve defaults <- --config <- overrides, validate, and "
                                     "print the result as YAML (exit code 2 on a bad key/value).")
    _config_args(p)
    p.add_argument("--params", action="store_true",
                   help="also print dit_params and classifier_params (all parameters)")
    p.set_defaults(func=cmd_config)
    _add_ingest(verbs)
    p = verbs.add_parser(
        "verify", help="read ingested shards back in full: checksums, footers, every row decoded",
        description="Check every shard the manifest lists: its sha256 against the manifest's, its "
                    "footer and row count, every Parquet page's CRC, and every row decoded. Prints "
                    "one line per shard and one per problem (file, row group, image id); exit 1 "
                    "when any is found.")
    p.add_argument("shards", metavar="SHARDS", help="folder (or URI) written by `cnd-ray ingest`")
    p.set_defaults(func=cmd_verify)
    _add_synth(verbs)
    p = verbs.add_parser(
        "track-sync", help="upload a run's MLflow spool (kept while the tracking server was away)",
        description="A run whose tracking server did not answer at start logs to an MLflow store "
                    "in its folder (mlflow-spool/, in a local folder or at a URI such as s3://) and "
                    "uploads it when the server answers. If it never did during the run, this uploads "
                    "it: params, tags, every metric value the server lacks, artifacts and the status, "
                    "each once; then removes the spool.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's folder or URI (train.storage/<run name>), "
                   "or a search's (train.storage/<search name>): its parent run and trials")
    p.add_argument("--to", metavar="URI", default="", help="another tracking server than the one the "
                   "run was started with")
    p.set_defaults(func=cmd_track_sync)
    p = verbs.add_parser(
        "train", help="train Class-N-Diff on Ray Train workers, logged to MLflow",
        description="Train on scale.num_workers Ray Train workers (the cluster in RAY_ADDRESS, else a "
                    "local Ray) from data.shards (synthetic shards are made when it is empty). The run "
                    "is named from its config (or train.name): rerunning the same command resumes "
                    "from the latest checkpoint in train.storage. Prints `checkpoint: <path>` last.")
    _config_args(p)
    p.set_defaults(func=cmd_train)
    p = verbs.add_parser(
        "tune", help="search the gamma schedule, lambda and step period with Ray Tune",
        description="Run the search a space file describes (tune_spaces/README.md): every trial is a "
                    "full `cnd-ray train` run of the base config with the trial's overrides, a child "
                    "of one MLflow parent run. Prints the trials ranked by the space's metric. "
                    "Rerunning the same command resumes an interrupted search (finished trials are "
                    "not rerun).")
    p.add_argument("--space", required=True, metavar="NAME|FILE",
                   help="a space file, or the name of a shipped one (" + ", ".join(
                       sorted(q.stem for q in config_lib.SPACE_DIR.glob("*.yaml"))) + ")")
    _config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="require an interrupted search to resume (without it: resume if there is one)")
    p.add_argument("--name", default="", help="search name (default: <space>-<hash of space and config>)")
    p.set_defaults(func=cmd_tune)
    from cnd_ray import quickstart  # stdlib + config only: --help stays free of torch/ray

    p = verbs.add_parser(
        "quickstart", help="the main job: data, the paper's five settings, samples, a report",
        description="Synthesise and ingest a small data set (unless data.shards is given), train the "
                    "judge, run the paper_settings search (METHOD.md section 4: five Class-N-Diff "
                    "trials ranked by sample quality) at the quickstart scale on a local Ray (or "
                    "RAY_ADDRESS), draw the same images from every trial's EMA model without guidance "
                    "(as the paper samples) and with the run's, and write OUT/report.md: the ranked "
                    "search, the paper's table with bootstrap intervals, whether settings 2-5 beat "
                    "setting 1 on FD and on class fidelity (overall and per skin-tone group), whether "
                    "each setting's samples make a fairer downstream classifier (per skin-tone group, "
                    "against real only and reweighted real; fairness.in_loop), curves (with the "
                    "critic's pull), and sample grids beside real images. "
                    "About 38 minutes on this project's 2-core CPU machines; rerunning resumes.")
    _config_args(p, default="quickstart")
    p.add_argument("--space", default=argparse.SUPPRESS, metavar="NAME|FILE",
                   help=f"search space (default: {_default(quickstart.run, 'space')})")
    p.add_argument("--out", default=argparse.SUPPRESS, metavar="DIR",
                   help=f"report folder (default: {_default(quickstart.run, 'out')})")
    p.set_defaults(func=cmd_quickstart)
    p = verbs.add_parser(
        "sample", help="class folders of PNGs from a checkpoint's EMA model, on Ray actors",
        description="Generate --num-per-class images of every class from the checkpoint's EMA weights "
                    "(decoded by the run's VAE in latent space) on a pool of Ray actors, one model "
                    "each (a GPU each when the cluster has GPUs). Writes OUT/<class>/<index>.png, "
                    "OUT/index.parquet (seed, label, tone of every image) and OUT/sample.json (the "
                    "protocol). Image i depends only on (seed, i): the same command gives the same "
                    "images whatever the number of actors, and rerunning finishes an interrupted one.")
    _sampling_args(p)
    p.add_argument("--num-per-class", type=int, required=True, metavar="N", help="images per class")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new, or one to finish)")
    p.add_argument("--tone", type=int, default=None, metavar="G",
                   help="skin-tone group to request (models trained with model.tone_groups > 0)")
    p.set_defaults(func=cmd_sample)
    p = verbs.add_parser(
        "evaluate", help="FID/KID at 5k/10k/20k samples, MS-SSIM, class fidelity, memorisation",
        description="Reproduce the paper's table for a checkpoint (METHOD.md section 4): generate the "
                    "largest --num-samples count with `cnd-ray sample` (the reference split's class "
                    "mix), then report per class and overall, for each feature space in "
                    "eval.extractors, the Frechet and kernel distances to the reference images at "
                    "every count (FID/KID in clean-fid's Inception space, whose weights must be on "
                    "disk: eval.inception_weights); MS-SSIM diversity of generated and real "
                    "same-class pairs; class fidelity under an independently trained classifier; a "
                    "memorisation check; PCA plots. Writes OUT/metrics.json and OUT/metrics.md and "
                    "logs them to the checkpoint's MLflow run. Rerunning reuses finished samples.")
    _sampling_args(p)
    p.add_argument("--reference", required=True, metavar="SHARDS",
                   help="ingested shards whose real images are the reference (eval.reference_split, "
                        "default train) and the held-out set (eval.heldout_split, default val)")
    p.add_argument("--num-samples", default=None, metavar="N[,N...]",
                   help="generated-image counts to report (default: eval.num_samples, the paper's "
                        "5000,10000,20000)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: evaluation/<run name>-step<step>)")
    p.set_defaults(func=cmd_evaluate)
    p = verbs.add_parser(
        "fairness", help="downstream classifiers on real vs real+synthetic data, per skin tone",
        description="Train a benign/malignant classifier (fairness.backbone) on the --real shards "
                    "alone and on them plus the --synthetic images (rebalanced by fairness.balance: "
                    "class, or class x skin-tone group), choose each one's threshold on the real "
                    "validation split, and evaluate both on every --eval set: AUROC, sensitivity, "
                    "specificity and balanced accuracy overall and per skin-tone group (I-II, III-IV, "
                    "V-VI: the set's Fitzpatrick labels, else ITA on the pixels), worst-group AUROC, "
                    "the light-dark gap, equal-opportunity and equalized-odds differences, with "
                    "bootstrap 95% intervals, and real+synthetic minus real with paired intervals. "
                    "Writes OUT/fairness.json, fairness.md and ROC plots, and logs them to MLflow.")
    p.add_argument("--real", required=True, metavar="SHARDS", help="ingested shards (train and val splits)")
    p.add_argument("--synthetic", action="append", default=[], metavar="DIR",
                   help="a folder written by `cnd-ray sample` (repeatable)")
    p.add_argument("--eval", action="append", default=[], metavar="NAME=PATH", required=True,
                   help="an evaluation set in its published layout (repeatable); NAME is one of "
                        "ddi, fitzpatrick17k, atlas, asan, mclass (= mclass_d + mclass_nd), mclass_d, "
                        "mclass_nd, isic2018, pad_ufes_20. With MClass, its ISIC images are left out "
                        "of training")
    p.add_argument("--ckpt", default=None, metavar="CKPT",
                   help="also evaluate this Class-N-Diff checkpoint's (or run folder's) joint classifier, "
                        "next to its backbone trained alone on the same real images")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: fairness-<hash>)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="fairness.* (backbone, steps, balance, ...) and track.* settings")
    p.set_defaults(func=cmd_fairness)
    p = verbs.add_parser("ui", help="open the MLflow UI for the configured tracking store",
                         description="Start `mlflow ui` on 127.0.0.1 (a free port unless --port) for "
                                     "track.tracking_uri / $MLFLOW_TRACKING_URI / ./mlflow.db.")
    _config_args(p)
    p.add_argument("--port", type=int, default=0, help="port to bind (default: a free one)")
    p.set_defaults(func=cmd_ui)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse argv; overrides may come anywhere, also after flags (`... a.b=1 --out D c.d=2`), which
    argparse alone refuses once the positional list has been consumed."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


# Verbs whose driver output (Ray forwards the workers' and trials' to it) is kept with their run.
LOGGED_VERBS = ("train", "tune", "quickstart")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with driverlog.capture() if args.verb in LOGGED_VERBS else contextlib.nullcontext():
        try:
            return args.func(args)
        except UserError as e:  # config, paths, data: one line, exit code 2
            print(f"cnd-ray {args.verb}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # a second Ctrl-C (train), or the first one elsewhere
            print(f"cnd-ray {args.verb}: aborted", file=sys.stderr)
            return 130
