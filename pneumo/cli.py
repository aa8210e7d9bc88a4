"""The `pneumo` command: one verb per job, each a thin call into the module that owns it.

    pneumo synth OUT --n 200          write synthetic chest-like X-rays
    pneumo eda DATA --out DIR         describe a dataset (counts, sizes, duplicates, PNGs)
    pneumo models                     list the registered models
    pneumo train DATA --out DIR       train with Ray Train, export a model bundle
    pneumo evaluate BUNDLE DATA       evaluate a bundle on a labelled split
    pneumo export BUNDLE              add model.onnx to an older bundle
    pneumo quantize BUNDLE            add a gated model.int8.onnx
    pneumo score DATA --bundle B --out DIR   batch-score an archive into a Delta Lake table
    pneumo sample SCORES --out S.csv  pick the images of a scored run to label at a new site
    pneumo calibrate BUNDLE LOCAL --out NEW   validate and recalibrate a bundle on a site's labelled sample
    pneumo serve BUNDLE               serve a bundle with Ray Serve
    pneumo sweep DATA --config S.yaml --out DIR   a Ray Tune sweep of training runs, ranked on val
    pneumo register BUNDLE --name N   make a bundle a registered model version (MLflow)
    pneumo promote NAME VERSION --alias champion   move a registry alias
    pneumo cluster up|down|status     a local multi-node Ray cluster with token auth
    pneumo submit ...                 submit / follow / stop a job on a Ray cluster
    pneumo demo --out DIR             the whole path on synthetic data

Every verb names a `module[:function]` taking `argv` and returning an exit code (default `main`); verbs are imported lazily, so `pneumo synth`
does not pay for importing Ray.
"""

from __future__ import annotations

import importlib
import os
import sys

from pneumo import __version__
from pneumo.config import UserError

VERBS: dict[str, tuple[str, str]] = {
    "synth": ("pneumo.data.synth", "write synthetic chest-like X-rays in the labelled layout"),
    "eda": ("pneumo.data.eda", "describe a dataset: counts, sizes, modes, duplicates, PNG charts"),
    "models": ("pneumo.models.zoo", "list the registered models and their input specs"),
    "train": ("pneumo.train.cli", "train with Ray Train and export a model bundle"),
    "evaluate": ("pneumo.score.evaluate", "evaluate a model bundle on a labelled split"),
    "export": ("pneumo.bundle.upgrade:export_main", "add a parity-checked ONNX graph to an existing bundle"),
    "quantize": ("pneumo.bundle.upgrade:quantize_main", "add a gated int8 ONNX graph to a bundle"),
    "score": ("pneumo.score.driver", "batch-score an archive into a Delta Lake table with Ray Data"),
    "sample": ("pneumo.score.sample", "pick the images of a scored run a radiologist should label"),
    "calibrate": ("pneumo.score.calibrate", "validate a bundle on a site's labelled sample and recalibrate it"),
    "serve": ("pneumo.serve.cli", "serve a model bundle with Ray Serve"),
    "sweep": ("pneumo.train.sweep", "run a Ray Tune sweep of training runs, ranked on val"),
    "register": ("pneumo.bundle.registry_cli:register_main", "register a bundle as a model version (MLflow)"),
    "promote": ("pneumo.bundle.registry_cli:promote_main", "point a registered model's alias at a version"),
    "cluster": ("pneumo.cluster", "start, inspect or stop a local multi-node Ray cluster with token auth"),
    "submit": ("pneumo.submit", "submit, follow, inspect or stop a job on a Ray cluster"),
    "demo": ("pneumo.demo", "run the whole path on synthetic data on an embedded local Ray"),
}


def _usage() -> str:
    lines = ["usage: pneumo VERB [options]   (pneumo VERB --help for a verb's options)", "", "verbs:"]
    lines += [f"  {verb:<9} {text}" for verb, (_, text) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"pneumo: unknown verb {verb!r}; valid: {', '.join(VERBS)}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, func = VERBS[verb][0].partition(":")
    try:
        module = importlib.import_module(module_name)
        return int(getattr(module, func or "main")(rest) or 0)
    except UserError as exc:
        return _refuse(verb, exc)
    except (FileNotFoundError, NotADirectoryError, PermissionError, ConnectionError) as exc:
        # What the user named is not there or not reachable: their mistake to fix, not ours.
        return _refuse(verb, exc)
    except KeyboardInterrupt:
        print(f"pneumo {verb}: interrupted", file=sys.stderr)
        return 130


def _refuse(verb: str, exc: BaseException) -> int:
    """One line and exit 2 for a user's mistake; `PNEUMO_DEBUG=1` shows the traceback."""
    if os.environ.get("PNEUMO_DEBUG") == "1":
        raise exc
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    print(f"pneumo {verb}: error: {text}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
