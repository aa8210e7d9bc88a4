"""`pneumo register` and `pneumo promote`: the model registry from the command line.

    pneumo register runs/default/bundle --name pneumo-cxr [--alias champion] [--tracking-uri URI]
    pneumo promote pneumo-cxr 3 --alias champion

`register` logs the bundle as a new version of a registered model (`pneumo.bundle.registry`);
`promote` moves an alias to a version. A serving deployment follows with `serve deploy` of a
`user_config.bundle: models:/NAME@ALIAS` (or the pinned `models:/NAME/VERSION` printed here).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from pneumo.bundle.manifest import BundleError
from pneumo.bundle.registry import promote, register_bundle
from pneumo.config import parse_config
from pneumo.io.storage import Location
from pneumo.track.tracking import tracking_uri

TRACKING_HELP = "MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)"


@dataclass
class RegisterConfig:
    """Register a model bundle as a new version of a registered model (MLflow)."""

    bundle: str = field(metadata={"positional": True, "help": "model bundle: folder or s3:// prefix"})
    name: str = field(default="pneumo-cxr", metadata={"help": "registered model name"})
    alias: str = field(default="", metadata={"help": "point this alias (e.g. champion) at the new version"})
    tracking_uri: str = field(default="", metadata={"help": TRACKING_HELP})
    experiment: str = field(default="pneumo", metadata={"help": "MLflow experiment of the registering run"})
    s3_endpoint: str | None = field(default=None, metadata={"help": "S3-compatible endpoint of an s3:// bundle"})


@dataclass
class PromoteConfig:
    """Point a registered model's alias (e.g. champion) at one of its versions."""

    name: str = field(metadata={"positional": True, "help": "registered model name"})
    version: str = field(metadata={"positional": True, "help": "version number"})
    alias: str = field(default="champion", metadata={"help": "the alias to move"})
    tracking_uri: str = field(default="", metadata={"help": TRACKING_HELP})


def register_main(argv: list[str] | None = None) -> int:
    cfg = parse_config(RegisterConfig, argv, prog="pneumo register")
    try:
        reg = register_bundle(Location.resolve(cfg.bundle, cfg.s3_endpoint), cfg.name, cfg.tracking_uri,
                              alias=cfg.alias, experiment=cfg.experiment)
    except BundleError as exc:
        print(f"pneumo register: error: {exc}", file=sys.stderr)
        return 2
    alias = f", alias {cfg.name}@{cfg.alias}" if cfg.alias else ""
    print(f"registered {reg['uri']} (bundle sha256 {reg['sha256'][:12]}, run {reg['run_id']}{alias}) "
          f"in {tracking_uri(cfg.tracking_uri)}")
    return 0


def promote_main(argv: list[str] | None = None) -> int:
    cfg = parse_config(PromoteConfig, argv, prog="pneumo promote")
    try:
        before = promote(cfg.name, cfg.version, cfg.alias, cfg.tracking_uri)
    except BundleError as exc:
        print(f"pneumo promote: error: {exc}", file=sys.stderr)
        return 2
    was = f" (was version {before})" if before else " (a new alias)"
    print(f"models:/{cfg.name}@{cfg.alias} -> models:/{cfg.name}/{cfg.version}{was}")
    return 0
