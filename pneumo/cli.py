"""The `pneumo` command: one verb per job, each a thin call into the module that owns it.

    pneumo synth OUT --n 200          write synthetic chest-like X-rays
    pneumo eda DATA --out DIR         describe a dataset (counts, sizes, duplicates, PNGs)
    pneumo models                     list the registered models
    pneumo train DATA --out DIR       train with Ray Train, export a model bundle
    pneumo evaluate BUNDLE DATA       evaluate a bundle on a labelled split
    pneumo export BUNDLE              add model.onnx to an older bundle
    pneumo quantize BUNDLE            add a gated model.int8.onnx
    pneumo score DATA --bundle B --out DIR   batch-score an archive into Parquet
    pneumo serve BUNDLE               serve a bundle with Ray Serve
    pneumo sweep DATA --config S.yaml --out DIR   a Ray Tune sweep of training runs, ranked on val
    pneumo register BUNDLE --name N   make a bundle a registered model version (MLflow)
    pneumo promote NAME VERSION --alias champion   move a registry alias
    pneumo submit ...                 submit / follow / stop a job on a Ray cluster
    pneumo demo --out DIR             the whole path on synthetic data

Every verb names a `module[:function]` taking `argv` and returning an exit code (default `main`); verbs are imported lazily, so `pneumo synth`
does not pay for importing Ray.
"""

from __future__ import annotations

import importlib
import sys

VERBS: dict[str, tuple[str, str]] = {
    "synth": ("pneumo.data.synth", "write synthetic chest-like X-rays in the labelled layout"),
    "eda": ("pneumo.data.eda", "describe a dataset: counts, sizes, modes, duplicates, PNG charts"),
    "models": ("pneumo.models.zoo", "list the registered models and their input specs"),
    "train": ("pneumo.train.cli", "train with Ray Train and export a model bundle"),
    "evaluate": ("pneumo.score.evaluate", "evaluate a model bundle on a labelled split"),
    "export": ("pneumo.bundle.upgrade:export_main", "add a parity-checked ONNX graph to an existing bundle"),
    "quantize": ("pneumo.bundle.upgrade:quantize_main", "add a gated int8 ONNX graph to a bundle"),
    "score": ("pneumo.score.driver", "batch-score an archive into Parquet with Ray Data"),
    "serve": ("pneumo.serve.cli", "serve a model bundle with Ray Serve"),
    "sweep": ("pneumo.train.sweep", "run a Ray Tune sweep of training runs, ranked on val"),
    "register": ("pneumo.bundle.registry_cli:register_main", "register a bundle as a model version (MLflow)"),
    "promote": ("pneumo.bundle.registry_cli:promote_main", "point a registered model's alias at a version"),
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
        from pneumo import __version__

        print(__version__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"pneumo: unknown verb {verb!r}; valid: {', '.join(VERBS)}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, func = VERBS[verb][0].partition(":")
    module = importlib.import_module(module_name)
    return int(getattr(module, func or "main")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
