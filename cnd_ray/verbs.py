"""The twelve verbs of `cnd-ray`, one function each, in one place. cli.py parses argv and calls them.

Each returns a small result that knows how to print itself (`str(result)`: what the verb prints on
stdout) and its exit status (`code`; `err`: a line for stderr). The work itself lives in the module
each verb names; heavy modules (torch, Ray, MLflow) are imported inside the functions, so
`cnd-ray --help` loads none of them.
"""
from __future__ import annotations

import dataclasses
import os

from cnd_ray import config as config_lib
from cnd_ray.errors import UserError


@dataclasses.dataclass
class Result:
    """What a verb printed and how it ended: stdout text, exit code, an optional stderr line."""
    code: int = 0
    err: str = ""

    def lines(self) -> list[str]:
        return []

    def __str__(self) -> str:
        return "\n".join(self.lines())


# --- data -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Ingested(Result):
    manifest: dict = dataclasses.field(default_factory=dict)
    out: str = ""

    def lines(self) -> list[str]:
        m = self.manifest
        splits = ", ".join(f"{s} {c['benign'] + c['malignant']} ({c['malignant']} malignant)"
                           for s, c in m["splits"].items())
        reasons = ", ".join(f"{n} {r}" for r, n in m["rejects_by_reason"].items()) or "none"
        return [f"ingested {m['num_images']} images ({m['classes']['benign']} benign, "
                f"{m['classes']['malignant']} malignant; {splits}) in {m['seconds']} s",
                f"rejected {m['num_rejected']} inputs ({reasons}) and merged {m['num_duplicates']} "
                "duplicates: see rejects.csv and duplicates.csv",
                f"shards: {self.out}"]


def ingest(roots: list[str], out: str, **given) -> Ingested:
    """`cnd-ray ingest`: ISIC archives -> Parquet shards (launch/ingest.py)."""
    from cnd_ray.launch import ingest as ingest_lib

    return Ingested(manifest=ingest_lib.run(roots, out, **given), out=os.path.abspath(out))


@dataclasses.dataclass
class Verified(Result):
    shards: str = ""
    good: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        return [*self.problems, f"{self.good} rows read and decoded; {len(self.problems)} problem(s)"
                + (f": re-ingest {self.shards}" if self.problems else "")]


def verify(shards: str) -> Verified:
    """`cnd-ray verify`: every shard read back in full (launch/stream.py)."""
    from cnd_ray.launch import stream

    good, problems = stream.verify(shards)
    return Verified(code=1 if problems else 0, shards=shards, good=good, problems=problems)


@dataclasses.dataclass
class Synthesised(Result):
    summary: dict = dataclasses.field(default_factory=dict)

    def lines(self) -> list[str]:
        s = self.summary
        tones = ", ".join(f"{g} {n}" for g, n in s["tone_groups"].items())
        out = [f"wrote {s['num_images']} synthetic images ({s['benign']} benign, {s['malignant']} "
               f"malignant; skin tones {tones}; {s['difficulty']} difficulty) in the ISIC 2020 layout "
               f"to {s['out']} in {s['seconds']:.1f} s"]
        if s["test_out"]:
            out += [f"and a test set of {s['test_images']} images, every skin-tone group alike, to "
                    f"{s['test_out']}", f"next: cnd-ray ingest --root {s['out']} --test {s['test_out']} --out SHARDS"]
        return out


def synth(out: str, **given) -> Synthesised:
    """`cnd-ray synth`: a synthetic stand-in for ISIC 2020, in its layout (data/synth.py)."""
    from cnd_ray.data import synth as synth_lib

    return Synthesised(summary=synth_lib.run(out, **given))


# --- configuration and tracking -------------------------------------------------------------------

@dataclasses.dataclass
class Configured(Result):
    yaml: str = ""
    params: dict | None = None

    def __str__(self) -> str:  # the YAML as written, then the counts
        counts = "".join(f"{k}_params: {v}\n" for k, v in (self.params or {}).items())
        return (self.yaml + counts).rstrip("\n")


def config(config_name: str | None, overrides: list[str], params: bool = False) -> Configured:
    """`cnd-ray config`: the resolved, validated config (and, asked, the models' parameter counts)."""
    cfg = config_lib.load(config_name, overrides)
    counts = None
    if params:
        from cnd_ray.models import params as params_lib  # imports torch only when asked for

        n = params_lib.count(cfg)
        counts = {"dit": n["dit"], "classifier": n["classifier"]}
    return Configured(yaml=cfg.to_yaml(), params=counts)


@dataclasses.dataclass
class Synced(Result):
    server: str = ""
    runs: dict = dataclasses.field(default_factory=dict)

    def lines(self) -> list[str]:
        return [f"uploaded run {name} to {self.server} (run {run_id})" for name, run_id in self.runs.items()]


def track_sync(run_dir: str, to: str = "") -> Synced:
    """`cnd-ray track-sync`: a run's MLflow spool uploaded (tracking/spool.py)."""
    from cnd_ray import tracking

    left = tracking.spool_server(run_dir)
    if left is None:
        raise UserError(f"{run_dir}: no MLflow spool here ({tracking.SPOOL}/): nothing waits for upload")
    done = tracking.upload(run_dir, to=to)
    if done is None:
        raise UserError(f"MLflow at {to or left} does not answer: start it and run this again (or --to URI)")
    return Synced(server=done[0], runs=done[1])


# --- training and search --------------------------------------------------------------------------

@dataclasses.dataclass
class Trained(Result):
    checkpoint: str | None = None

    def lines(self) -> list[str]:
        return [f"checkpoint: {self.checkpoint}"] if not self.code else []


def train(config_name: str | None, overrides: list[str]) -> Trained:
    """`cnd-ray train`: prepare the launch, drive it (launch/train.py)."""
    from cnd_ray.launch import train as train_lib

    cfg = config_lib.load(config_name, overrides)
    try:
        out = train_lib.run(cfg)
    except train_lib.TrainingStopped as e:
        return Trained(code=1, err=f"cnd-ray train: stopped: {e}")
    except train_lib.TrainingInterrupted as e:
        return Trained(code=130, err=f"cnd-ray train: {e}")  # as a shell reports a Ctrl-C
    return Trained(checkpoint=out["checkpoint"])


@dataclasses.dataclass
class Searched(Result):
    search: dict = dataclasses.field(default_factory=dict)

    def lines(self) -> list[str]:
        from cnd_ray import tracking

        s, best = self.search, self.search["best"]
        out = ["", f"search {s['name']} ({s['path']}), best first:", "", s["table"]]
        if best:
            out.append(f"best trial: {best['trial']}" + (f" (setting {best['setting']})" if best["setting"] else "")
                       + f"; checkpoint: {best['checkpoint']}")
        out.append(f"MLflow parent run {s['parent_run_id']}; browse it with: "
                   f"{tracking.ui_command(s['tracking_uri'])}")
        return out


def tune(space: str, config_name: str | None, overrides: list[str], resume: bool = False,
         name: str = "") -> Searched:
    """`cnd-ray tune`: the search a space file describes (launch/tune.py)."""
    from cnd_ray.launch import tune as tune_lib

    out = tune_lib.run(space, config_lib.load(config_name, overrides), resume=resume, name=name)
    return Searched(code=0 if out["best"] else 1, search=out)


@dataclasses.dataclass
class Quickstarted(Result):
    run: dict = dataclasses.field(default_factory=dict)

    def lines(self) -> list[str]:
        from cnd_ray import tracking
        from cnd_ray.jobs import quickstart

        o, search = self.run, self.run["search"]
        out = ["", search["table"]]
        for mode, comp in (o["comparison"] or {}).items():
            title = quickstart.mode_title(mode, comp["scale"])
            out += [f"## The paper's table, at this scale, {title} (95% intervals)", "",
                    quickstart.paper_table(comp, o["floors"], o["real_lesion_share"]),
                    f"## Each setting against setting {quickstart.BASELINE}, {title}", "",
                    quickstart.verdict_table(comp)]
        if o["comparison"]:
            out += ["\n".join(quickstart.verdicts(o["comparison"])), ""]
        if o["fairness"]:
            out.append(o["fairness"])
        out += [f"time:    {o['seconds'] / 60:.1f} minutes", f"report:  {o['report']}",
                f"search:  {search['path']}"]
        if o["best"]:
            out += [f"best:    {o['best']['checkpoint']}",
                    f"next:    cnd-ray evaluate --ckpt {o['best']['checkpoint']} --reference "
                    f"{o['shards']} --num-samples 1000 eval.extractors=fidelity"]
        out.append(f"MLflow:  {tracking.ui_command(search['tracking_uri'])}")
        return out


def quickstart(config_name: str | None, overrides: list[str], **given) -> Quickstarted:
    """`cnd-ray quickstart`: data, the paper's settings as a search, samples, the report (jobs/quickstart.py)."""
    from cnd_ray.jobs import quickstart as quickstart_lib

    out = quickstart_lib.run(config_lib.load(config_name, overrides), **given)
    return Quickstarted(code=0 if out["best"] else 1, run=out)


# --- sampling and evaluation ----------------------------------------------------------------------

@dataclasses.dataclass
class Sampled(Result):
    sample: dict = dataclasses.field(default_factory=dict)

    def lines(self) -> list[str]:
        o = self.sample
        p, t = o["protocol"], o["timing"]
        rate = f", {t['images_per_s']} img/s on {t['actors']} {t['device']} actors" if o["generated"] else ""
        out = [f"{o['images']} images ({o['generated']} new{rate}) from step {p['step']} with "
               f"{p['sampler']} x {p['steps']} steps, guidance {p['guidance_scale']}"
               + (f", tone {p['tone']} at tone guidance {p['tone_guidance_scale']}" if p.get("tone") is not None else "")
               + f", seed {p['seed']}"]
        if o.get("tone_check"):
            c = o["tone_check"]
            out.append(f"skin tone read back (ITA on the pixels): {100 * c['match']:.0f}% of {c['images']} "
                       f"images in the requested group {c['requested']}; by group: {c['read_back']} "
                       f"({c['groups']} = unknown)")
        return out + [f"samples: {o['out']}"]


def sample(ckpt: str, out: str, num_per_class: int, overrides: list[str], tone: int | None = None) -> Sampled:
    """`cnd-ray sample`: class folders of PNGs from a checkpoint's EMA model (launch/sample.py)."""
    from cnd_ray.launch import sample as sample_lib

    return Sampled(sample=sample_lib.run(ckpt, out, num_per_class, overrides, tone=tone))


@dataclasses.dataclass
class Evaluated(Result):
    res: dict = dataclasses.field(default_factory=dict)

    def lines(self) -> list[str]:
        from cnd_ray.jobs import evaluate as evaluate_lib

        m = self.res["mlflow"]
        return ["", evaluate_lib.report(self.res).rstrip("\n"), "",
                f"metrics: {self.res['out']}/metrics.json and metrics.md",
                f"MLflow run {m['run_id']}{' (new)' if m['new_run'] else ''} at {m['tracking_uri']}"]


def evaluate(ckpt: str, reference: str, out: str, overrides: list[str]) -> Evaluated:
    """`cnd-ray evaluate`: the paper's table for a checkpoint (jobs/evaluate.py)."""
    from cnd_ray.jobs import evaluate as evaluate_lib

    return Evaluated(res=evaluate_lib.run(ckpt, reference, out=out, overrides=overrides))


@dataclasses.dataclass
class Fair(Result):
    report: dict = dataclasses.field(default_factory=dict)

    def lines(self) -> list[str]:
        from cnd_ray.jobs import fairness as fairness_lib

        r = self.report
        return ["", fairness_lib.markdown(r).rstrip("\n"), "",
                f"report: {r['out']}/fairness.json and fairness.md; MLflow run {r['mlflow_run_id']}"]


def fairness(real: str, synthetic: list[str], evals: dict[str, str], out: str, ckpt: str,
             overrides: list[str]) -> Fair:
    """`cnd-ray fairness`: downstream classifiers on real vs real + synthetic (jobs/fairness.py)."""
    from cnd_ray.jobs import fairness as fairness_lib

    return Fair(report=fairness_lib.run(real, synthetic, evals, out=out, ckpt=ckpt, overrides=overrides))


# --- the MLflow UI --------------------------------------------------------------------------------

def ui(config_name: str | None, overrides: list[str], port: int = 0) -> Result:
    """`cnd-ray ui`: MLflow's UI on the configured store, until Ctrl-C or SIGTERM (tracking/ui.py).
    It prints its pages once they answer, then serves: its output comes as it goes."""
    import signal
    import socket
    import time

    from cnd_ray import tracking

    cfg = config_lib.load(config_name, overrides)
    uri = tracking.resolve_uri(cfg.track.tracking_uri)
    if uri.startswith("http"):
        print(f"MLflow UI: {uri} (a tracking server already serves it)")
        return Result()
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
    started = time.monotonic()
    proc = tracking.ui(uri, port)
    try:  # the pages are printed once they answer, so a click on them works
        urls = urls or tracking.ui_urls(uri, base, cfg.track.experiment)
        up = tracking.wait_until_up(proc, base, timeout=tracking.UI_WAIT, say=lambda m: print(m, flush=True),
                                    since=started)
    except BaseException:
        tracking.stop_server(proc)
        raise
    print(f"MLflow UI for {uri}: {urls['runs']} (Ctrl-C stops it)" +
          (f"; up in {up:.1f} s" if up is not None else f"; not answering after {tracking.UI_WAIT} s yet"),
          flush=True)
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
        return Result(code=proc.wait())
    except KeyboardInterrupt:
        return Result()
    finally:
        tracking.stop_server(proc)
