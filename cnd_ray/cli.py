"""`cnd-ray <verb> [--config X] [section.key=value ...]`: the only argv parser.

Verb modules are imported lazily, so `cnd-ray --help` imports neither torch nor ray. Flags are only
for paths; anything that changes what is trained is a config field given as section.key=value.
"""
from __future__ import annotations

import argparse
import sys

from cnd_ray import config as config_lib

CONFIG_HELP = ("packaged config name ({names}) or a YAML path; dataclass defaults (the paper's "
               "setup) when omitted")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help=CONFIG_HELP.format(names=", ".join(config_lib.packaged_names())))
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except config_lib.ConfigError as e:
        print(f"cnd-ray {args.verb}: error: {e}", file=sys.stderr)
        return 2
