"""The model registry: a bundle as a registered model version (MLflow), and `models:/` URIs back
to the hash-checked bundle.

    v = register_bundle(Location.resolve("runs/x/bundle"), "pneumo-cxr", uri, alias="champion")
    loc = resolve_bundle("models:/pneumo-cxr@champion", None, "")   # Location of the bundle, source "models:/pneumo-cxr/3"
    loc = resolve_bundle("runs/x/bundle", None, "")                  # anything else: Location.resolve
    promote("pneumo-cxr", "3", "champion", uri)

A version is an MLflow pyfunc (`pneumo.bundle.pyfunc`, logged as code, nothing pickled) whose
artifacts are the bundle's files; the version's tags carry the manifest's sha256, model, version
and val/test metrics. `resolve_bundle` is the one place a `models:/NAME/VERSION` or
`models:/NAME@ALIAS` becomes a Location: the version's artifact folder where every node can read it
(a local path or `s3://`), else a download into `~/.cache/pneumo/registry/NAME/VERSION`
(`$PNEUMO_REGISTRY_CACHE`; an `mlflow-artifacts:` proxy); the manifest's sha256 must equal the version's tag, and the Predictor
checks every file against the manifest as always. The Location's `source` is the pinned registry
URI (`models:/NAME/VERSION`), which scoring rows and serving answers record next to `bundle_sha256`.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

import yaml

from pneumo.bundle.manifest import BundleError, Manifest, read_manifest
from pneumo.io.storage import Location, is_s3
from pneumo.track import tracking as T

SCHEME = "models:/"
MODEL_NAME = "model"  # the pyfunc's name in its run
BUNDLE_ARTIFACT = "bundle"
SHA_TAG = "bundle_sha256"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_\-]+))$")
CACHE_ENV = "PNEUMO_REGISTRY_CACHE"  # where downloaded versions go (default ~/.cache/pneumo/registry)

__all__ = ["SCHEME", "is_registry_uri", "parse", "resolve_bundle", "register_bundle", "promote"]


def is_registry_uri(text: Any) -> bool:
    return str(text).startswith(SCHEME)


def parse(text: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS` -> (name, version, alias)."""
    m = _URI.match(text)
    if not m:
        raise BundleError(f"{text!r}: a registry URI is models:/NAME/VERSION or models:/NAME@ALIAS")
    return m["name"], m["version"], m["alias"]


def _version(c: Any, text: str) -> Any:
    """The MLflow ModelVersion `text` names."""
    name, version, alias = parse(text)
    try:
        return c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
    except Exception as exc:  # noqa: BLE001 - MlflowException (no such model/alias) or an unreachable store
        raise BundleError(f"{text}: not in the registry ({type(exc).__name__}: {str(exc)[:200]})") from None


def _bundle_path(model_dir: Location) -> str:
    """The bundle's folder inside a logged pyfunc, from its MLmodel file."""
    try:
        mlmodel = yaml.safe_load(model_dir.join("MLmodel").read_bytes())
        return mlmodel["flavors"]["python_function"]["artifacts"][BUNDLE_ARTIFACT]["path"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise BundleError(f"{model_dir}: not a pneumo model version (MLmodel: {exc})") from None


def _local_root(root: str) -> str | None:
    if root.startswith("file://"):
        return root[len("file://"):]
    return root if root.startswith("/") else None


def _model_dir(c: Any, mv: Any, uri: str) -> str:
    """The version's model folder, where every reader can reach it: the artifact store's own
    path (local or s3://), else a download into the local cache."""
    root = c.get_model_version_download_uri(mv.name, mv.version)
    if _local_root(root):
        return _local_root(root) or root
    if is_s3(root):
        return root
    import mlflow.artifacts

    cache = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "pneumo", "registry")
    dest = os.path.join(cache, mv.name, str(mv.version))
    if not os.path.exists(os.path.join(dest, "MLmodel")):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(dest)) as tmp:
            got = mlflow.artifacts.download_artifacts(artifact_uri=root, dst_path=tmp, tracking_uri=uri)
            if not os.path.exists(dest):  # another process may have finished the same download first
                os.replace(got, dest)
    return dest


def resolve_bundle(text: str, s3_endpoint: str | None = None, tracking_uri: str = "") -> Location:
    """What a user typed as a bundle -> the bundle's Location. A registry URI is looked up (its
    manifest's sha256 checked against the version's tag); anything else is `Location.resolve`."""
    if not is_registry_uri(text):
        return Location.resolve(text, s3_endpoint)
    uri = T.tracking_uri(tracking_uri)
    c = T.client(uri)
    mv = _version(c, text)
    model_dir = Location.resolve(_model_dir(c, mv, uri), s3_endpoint or os.environ.get("MLFLOW_S3_ENDPOINT_URL"))
    bundle = model_dir.join(_bundle_path(model_dir))
    manifest = read_manifest(bundle)
    expected = (mv.tags or {}).get(SHA_TAG)
    if expected and manifest.sha256 != expected:
        raise BundleError(f"{text}: the bundle's sha256 {manifest.sha256[:16]}... is not the registered "
                          f"{expected[:16]}...; refusing it")
    return Location(bundle.uri, bundle.endpoint, source=f"{SCHEME}{mv.name}/{mv.version}")


def version_tags(manifest: Manifest) -> dict[str, str]:
    """The tags of a registered version: the bundle's identity and its val/test metrics."""
    tags = {SHA_TAG: manifest.sha256, "model": manifest.model, "bundle_version": manifest.version,
            "classes": ",".join(manifest.classes), "threshold": f"{manifest.threshold_value:.6g}"}
    for split, metrics in (manifest.metrics or {}).items():
        for key, value in (metrics or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                tags[f"{split}_{key}"] = f"{value:.6g}"
    return tags


def _local_copy(bundle: Location, tmp: str) -> str:
    """A local folder of the bundle's files (an S3 bundle is copied; a local one is used as is)."""
    if not bundle.is_s3:
        return bundle.path
    import pyarrow.fs as pafs

    pafs.copy_files(bundle.path, tmp, source_filesystem=bundle.fs, destination_filesystem=pafs.LocalFileSystem())
    return tmp


def _log_version(bundle_dir: str, uri: str, run_id: str, name: str, tags: dict[str, str]) -> Any:
    """The pyfunc (code: `pneumo/bundle/pyfunc_model.py`, artifacts: the bundle) logged in `run_id`
    and registered as a new version of `name` (MLflow's fluent API, pointed at `uri` meanwhile)."""
    import warnings

    import mlflow

    from pneumo import __version__

    warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")  # see pneumo.bundle.pyfunc
    code = os.path.join(os.path.dirname(__file__), "pyfunc_model.py")
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=code,
                                           artifacts={BUNDLE_ARTIFACT: bundle_dir},
                                           pip_requirements=[f"pneumo=={__version__}", f"mlflow=={mlflow.__version__}"])
        return mlflow.register_model(info.model_uri, name, tags=tags)
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def register_bundle(bundle: Location, name: str, tracking_uri: str = "", alias: str = "",
                    run_id: str | None = None, experiment: str = "pneumo") -> dict[str, str]:
    """Register the bundle at `bundle` as a new version of `name` (logged in `run_id`, else in a new
    run of `experiment`); `alias` moves to it. Returns {name, version, uri, alias, sha256}."""
    manifest = read_manifest(bundle)  # a malformed or unknown bundle is refused before anything is logged
    uri = T.tracking_uri(tracking_uri)
    c = T.client(uri)
    if run_id is None:
        experiment_id = T.prepare(uri, experiment)
        if experiment_id is None:
            raise BundleError(f"cannot register: the tracking store {uri} cannot be used")
        run_id = c.create_run(experiment_id, run_name=f"register {manifest.version}",
                              tags={SHA_TAG: manifest.sha256, "pneumo.bundle": str(bundle)}).info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        mv = _log_version(_local_copy(bundle, os.path.join(tmp, BUNDLE_ARTIFACT)), uri, run_id, name,
                          version_tags(manifest))
    if alias:
        c.set_registered_model_alias(name, alias, mv.version)
    return {"name": name, "version": str(mv.version), "uri": f"{SCHEME}{name}/{mv.version}", "alias": alias,
            "sha256": manifest.sha256, "run_id": run_id}


def promote(name: str, version: str, alias: str, tracking_uri: str = "") -> str | None:
    """Point `models:/name@alias` at `version`; returns the version it pointed at before (or None)."""
    c = T.client(T.tracking_uri(tracking_uri))
    _version(c, f"{SCHEME}{name}/{version}")  # the version must exist
    try:
        before: str | None = str(c.get_model_version_by_alias(name, alias).version)
    except Exception:  # noqa: BLE001 - a new alias
        before = None
    c.set_registered_model_alias(name, alias, version)
    return before
