"""`cnd-ray <verb> [--config X] [section.key=value ...]`: the only argv parser.

It parses and dispatches: each verb is a function of verbs.py, whose result prints itself. Verb
modules are imported lazily, so `cnd-ray --help` imports neither torch nor ray. Flags are only for
paths; anything that changes what is trained is a config field given as section.key=value.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

from cnd_ray import config as config_lib
from cnd_ray import verbs
from cnd_ray.errors import UserError
from cnd_ray.launch import driverlog

CONFIG_HELP = ("packaged config name ({names}) or a YAML path; dataclass defaults (the paper's "
               "setup) when omitted")


def _config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    names = ", ".join(config_lib.packaged_names())
    p.add_argument("--config", default=default,
                   help=CONFIG_HELP.format(names=names) if default is None else
                   f"packaged config name ({names}) or a YAML path (default: {default})")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. method.lambda_cls=0.3 model.size=S")


def _default(section: type, name: str):
    """The default of `name`: a field of a config section (IngestConfig, SynthConfig)."""
    return getattr(section, name)


def _given(args: argparse.Namespace, *names: str) -> dict:
    """Only the flags the user gave, so run()'s own defaults apply to the rest."""
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


# Sampling flags the users type, and the config key each one sets.
SAMPLING_FLAGS = {"sampler": "diffusion.sampler", "steps": "diffusion.sample_steps",
                  "cfg_scale": "diffusion.guidance_scale", "tone_scale": "diffusion.tone_guidance_scale",
                  "seed": "eval.seed"}


def sampling_overrides(args: argparse.Namespace) -> list[str]:
    return [f"{key}={getattr(args, flag)}" for flag, key in SAMPLING_FLAGS.items()
            if getattr(args, flag, None) is not None] + list(args.overrides)


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


def _add_ingest(sub) -> None:
    from cnd_ray.data import layouts  # numpy/pyarrow only: --help stays free of torch/ray

    run = config_lib.IngestConfig
    p = sub.add_parser(
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
    p.set_defaults(run=lambda a: verbs.ingest(a.root, a.out, **_given(a, "labels", "image_size", "latent", "ak_malignant", "val_fraction", "seed", "shard_mb", "overwrite", "test")))


def _add_synth(sub) -> None:
    run = config_lib.SynthConfig
    p = sub.add_parser(
        "synth", help="write a synthetic dermoscopy data set in the ISIC 2020 layout",
        description="Dermoscopy-like images (vignette, hairs, a lesion painted from a severity: benign "
                    "small, round, even brown; malignant larger, asymmetric, irregular, several colours) "
                    "with the ISIC 2020 ground truth CSV, so `cnd-ray ingest --root DIR` reads it, and "
                    "a test set with every skin-tone group alike beside it (DIR-test). The default "
                    "difficulty, isic, overlaps the classes' cues and skin tones as on ISIC (a "
                    "classifier reaches AUROC ~0.9; Fitzpatrick V-VI under 1%); easy paints every lesion as "
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
    p.set_defaults(run=lambda a: verbs.synth(a.out, **_given(a, "num_images", "image_size", "malignant_fraction", "seed", "difficulty", "test_per_tone")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnd-ray",
        description="Class-N-Diff: a DiT trained jointly with a benign/malignant classifier.")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>", required=True)

    p = sub.add_parser("config", help="print the resolved, validated config as YAML",
                         description="Resolve defaults <- --config <- overrides, validate, and "
                                     "print the result as YAML (exit code 2 on a bad key/value).")
    _config_args(p)
    p.add_argument("--params", action="store_true",
                   help="also print dit_params and classifier_params (all parameters)")
    p.set_defaults(run=lambda a: verbs.config(a.config, a.overrides, params=a.params))
    _add_ingest(sub)
    p = sub.add_parser(
        "verify", help="read ingested shards back in full: checksums, footers, every row decoded",
        description="Check every shard the manifest lists: its sha256 against the manifest's, its "
                    "footer and row count, every Parquet page's CRC, and every row decoded. Prints "
                    "one line per shard and one per problem (file, row group, image id); exit 1 "
                    "when any is found.")
    p.add_argument("shards", metavar="SHARDS", help="folder (or URI) written by `cnd-ray ingest`")
    p.set_defaults(run=lambda a: verbs.verify(a.shards))
    _add_synth(sub)
    p = sub.add_parser(
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
    p.set_defaults(run=lambda a: verbs.track_sync(a.run_dir, to=a.to))
    p = sub.add_parser(
        "train", help="train Class-N-Diff on Ray Train workers, logged to MLflow",
        description="Train on scale.num_workers Ray Train workers (the cluster in RAY_ADDRESS, else a "
                    "local Ray) from data.shards (synthetic shards are made when it is empty). The run "
                    "is named from its config (or train.name): rerunning the same command resumes "
                    "from the latest checkpoint in train.storage. Prints `checkpoint: <path>` last.")
    _config_args(p)
    p.set_defaults(run=lambda a: verbs.train(a.config, a.overrides))
    p = sub.add_parser(
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
    p.set_defaults(run=lambda a: verbs.tune(a.space, a.config, a.overrides, resume=a.resume, name=a.name or ""))
    from cnd_ray.jobs import quickstart  # stdlib + config only: --help stays free of torch/ray

    p = sub.add_parser(
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
                    "20-38 minutes on this project's 2-core CPU machines; rerunning resumes.")
    _config_args(p, default="quickstart")
    p.add_argument("--space", default=argparse.SUPPRESS, metavar="NAME|FILE",
                   help=f"search space (default: {quickstart.DEFAULT_SPACE})")
    p.add_argument("--out", default=argparse.SUPPRESS, metavar="DIR",
                   help=f"report folder (default: {quickstart.DEFAULT_OUT})")
    p.set_defaults(run=lambda a: verbs.quickstart(a.config, a.overrides, **_given(a, "out", "space")))
    p = sub.add_parser(
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
    p.add_argument("--tone-scale", type=float, default=None, metavar="W",
                   help="guidance towards the --tone group; 1 = the tone only conditions, and a small "
                        "model may seldom draw it (default: the checkpoint's diffusion.tone_guidance_scale)")
    p.set_defaults(run=lambda a: verbs.sample(a.ckpt, a.out, a.num_per_class, sampling_overrides(a), tone=a.tone))
    p = sub.add_parser(
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
    p.set_defaults(run=lambda a: verbs.evaluate(a.ckpt, a.reference, a.out or "", ([f"eval.num_samples={a.num_samples}"] if a.num_samples else []) + sampling_overrides(a)))
    p = sub.add_parser(
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
    p.set_defaults(run=lambda a: verbs.fairness(a.real, a.synthetic, _named_paths(a.eval), a.out or "", a.ckpt or "", a.overrides))
    p = sub.add_parser("ui", help="open the MLflow UI for the configured tracking store",
                         description="Start `mlflow ui` on 127.0.0.1 (a free port unless --port) for "
                                     "track.tracking_uri / $MLFLOW_TRACKING_URI / ./mlflow.db.")
    _config_args(p)
    p.add_argument("--port", type=int, default=0, help="port to bind (default: a free one)")
    p.set_defaults(run=lambda a: verbs.ui(a.config, a.overrides, port=a.port))
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
            result = args.run(args)
            if str(result):
                print(result, flush=True)
            if result.err:
                print(result.err, file=sys.stderr)
            return result.code
        except UserError as e:  # config, paths, data: one line, exit code 2
            print(f"cnd-ray {args.verb}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # a second Ctrl-C (train), or the first one elsewhere
            print(f"cnd-ray {args.verb}: aborted", file=sys.stderr)
            return 130
