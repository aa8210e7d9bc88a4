"""Batch scoring's Ray Data pieces: the read tasks, the model actor, the pool sizing, the output schema.

    ds = score_dataset(listing, store, spec, bundle, cfg, run_id)   # lazy: read tasks -> BundlePredictor actors

`read_and_preprocess` (Ray Data tasks) reads, hashes and decodes each file through
`pneumo.io.reading.read_image`: a file that cannot be read or decoded becomes an error row, never
an exception and never a missing row; a file listed over `max_file_bytes` is a `too_large` row
without being read. `BundlePredictor` (an actor pool) loads the bundle once and scores ok rows;
its `__call__` never raises: a batch the model fails on is retried image by image, and each image
that still fails is a `model` error row; an overlay that cannot be made or written keeps the
row's prediction and says why in `explain_error`. `pneumo score` and `pneumo evaluate` both run
this pipeline.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa

from pneumo.io.preprocess import InputSpec, to_tensor
from pneumo.io.reading import IO_KINDS, read_image, too_large_message
from pneumo.io.storage import Location
from pneumo.ray_env import cluster_cpus_per_node
from pneumo.score.config import Pipeline

EXPLAIN_DIR = "explain"
# Error kinds: `pneumo.io.reading.KINDS` for reading, plus `model` (the model failed on the image)
# from the actors. I/O kinds and `model` are retried by --incremental (`read` is the name runs
# before the one read path gave to `unreadable`, `explain` the kind older runs gave a row whose
# overlay failed; their rows are retried too). Since then an overlay failure keeps the prediction
# and is said in `explain_error`.
SCORING_KINDS = ("model", "explain")
# Ray Data's write tasks ask for 1 CPU by default; with the model actor holding a node's CPUs less a
# read task's, no such task fits until the actors are gone ("Cluster resources are not enough to
# run any task from TaskPoolMapOperator[Write]"), so every block waited in the object store until
# the end of the run. A read task's share (`write_remote_args`) lets the writes stream beside the model.
RETRY_KINDS = (*IO_KINDS, "read", *SCORING_KINDS)
log = logging.getLogger(__name__)

OUTPUT_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("size_bytes", pa.int64()),
        ("etag_or_sha256", pa.string()),
        ("mtime_ns", pa.int64()),
        ("ctime_ns", pa.int64()),
        ("inode", pa.int64()),
        ("etag", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("error_kind", pa.string()),
        ("label", pa.string()),
        ("probability", pa.float64()),
        ("probabilities", pa.list_(pa.float64())),
        ("threshold", pa.float64()),
        ("model", pa.string()),
        ("model_version", pa.string()),
        ("bundle_sha256", pa.string()),
        ("model_uri", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("run_id", pa.string()),
        ("explain_path", pa.string()),
        ("explain_error", pa.string()),
        ("engine", pa.string()),
        ("precision", pa.string()),
        ("embedding", pa.list_(pa.float32())),
        ("adapted", pa.string()),
        ("prevalence_estimate", pa.float64()),
    ]
)


def _listed(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch's `LISTING_SCHEMA` columns, typed (an all-null ETag column arrives as floats)."""
    n = len(batch["path"])
    out = {"path": np.asarray(batch["path"], dtype=object), "etag": np.asarray(_strings(
        batch["etag"] if "etag" in batch else [None] * n), dtype=object)}
    for name in ("size_bytes", "mtime_ns", "ctime_ns", "inode"):
        out[name] = np.asarray(batch[name] if name in batch else np.full(n, -1), dtype=np.int64)
    return out


def read_and_preprocess(batch: dict[str, np.ndarray], spec: InputSpec, store: Location,
                        max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Ray Data task: read bytes, hash, decode+resize (`pneumo.io.reading.read_image`) of the
    batch's paths on `store` (the archive's location). Every input row gives one output row; a
    file listed over `max_bytes` is a `too_large` row, never read (one that grew since the
    listing is refused after `max_bytes + 1` bytes)."""
    listed = _listed(batch)
    n = len(listed["path"])
    images = np.zeros((n, spec.size, spec.size), dtype=np.uint8)
    sha = np.full(n, None, dtype=object)
    status = np.full(n, "ok", dtype=object)
    error = np.full(n, None, dtype=object)
    kind = np.full(n, None, dtype=object)
    for i, path in enumerate(listed["path"]):
        if max_bytes is not None and listed["size_bytes"][i] > max_bytes:
            status[i], kind[i], error[i] = "error", "too_large", too_large_message(int(listed["size_bytes"][i]), max_bytes)
            continue
        res = read_image(store.at(str(path)), spec, max_bytes=max_bytes)
        sha[i] = res.sha256
        if res.error is None:
            images[i] = res.image
        else:
            status[i], kind[i], error[i] = "error", res.error.kind, res.error.message
    return {**listed, "etag_or_sha256": sha, "status": status, "error": error, "error_kind": kind, "image": images}


def explain_name(path: str) -> str:
    """Overlay file name for an input path: `<stem>-<8 hex of the path>.png` (unique per path).
    The stem is cut to 100 bytes so the name (and `write_bytes`' temporary name) stays far under
    the 255-byte file-name limit, however long the input's name."""
    stem = PurePosixPath(path).stem.encode()[:100].decode(errors="ignore")
    return f"{stem}-{hashlib.sha256(path.encode()).hexdigest()[:8]}.png"


def _strings(values: np.ndarray) -> list[str | None]:
    """A string column back from Ray's numpy batches: an all-null column arrives as NaN floats."""
    return [v if isinstance(v, str) else None for v in values]


class BundlePredictor:
    """Ray Data actor: loads the bundle once in `__init__`, scores batches in `__call__`."""

    def __init__(
        self,
        bundle: Location,
        run_id: str,
        engine: str = "auto",
        precision: str = "auto",
        channels_last: bool = True,
        explain_dir: Location | None = None,
        threads: int = 0,
    ):
        # the Predictor loads in the actor only; on the ONNX engines it never imports torch (2-3 s
        # and ~400 MB per actor before), and its engine choice is cached per machine
        from pneumo.bundle.predict import Predictor

        bundle = Location.of(bundle)
        self.predictor = Predictor(bundle, engine=engine, precision=precision, channels_last=channels_last,
                                   threads=threads)
        self.run_id = run_id
        self.explain_dir = explain_dir
        self.reference = self.predictor.drift_reference()  # None: no `embedding` column values
        m = self.predictor.manifest
        self.meta = {"threshold": m.threshold_value, "model": m.model, "model_version": m.version,
                     "bundle_sha256": m.sha256, "model_uri": bundle.source, "engine": self.predictor.engine,
                     "precision": self.predictor.precision}

    def _explain(self, path: str, image: np.ndarray) -> str:
        from pneumo.models.gradcam import (  # start-up time: torch in the actor only
            gradcam,
            overlay_png,
        )

        p = self.predictor  # the input on the explain model's own device (CUDA when the actor has a GPU)
        heat = gradcam(p.explain_model, to_tensor(image[None], p.spec, device=p.device), p.manifest.negative_index)
        loc = self.explain_dir.join(explain_name(path))
        loc.write_bytes(overlay_png(image, heat))
        return loc.uri

    def _predict_batch(self, images: np.ndarray) -> list[tuple[Any, ...]]:
        """(probabilities, positive score, label, projected embedding or None) per image."""
        p, features = self.predictor.predict_with_features(images)
        z = self.reference.project(features) if self.reference is not None else [None] * len(images)
        pos, labels = self.predictor.positive_probability(p), self.predictor.labels(p)
        return [(p[j], pos[j], labels[j], z[j]) for j in range(len(images))]

    def _predict(self, images: np.ndarray) -> list[tuple[Any, ...] | Exception]:
        """`_predict_batch` on the whole batch; if that raises, image by image, so one image the
        model fails on costs only its own row (an exception in its place)."""
        try:
            return self._predict_batch(images)
        except Exception:  # noqa: BLE001 - retried image by image below
            if len(images) == 1:
                raise
        out: list[tuple[Any, ...] | Exception] = []
        for j in range(len(images)):
            try:
                out.extend(self._predict_batch(images[j: j + 1]))
            except Exception as exc:  # noqa: BLE001 - this image's `model` error row
                out.append(exc)
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Score a batch; never raises: a failure becomes `model` / `explain` error rows."""
        n = len(batch["path"])
        cols: dict[str, list[Any]] = {
            "status": _strings(batch["status"]), "error": _strings(batch["error"]),
            "error_kind": _strings(batch["error_kind"]), "label": [None] * n, "probability": [None] * n,
            "probabilities": [None] * n, "explain_path": [None] * n, "explain_error": [None] * n,
            "embedding": [None] * n,
        }
        ok = [i for i in range(n) if cols["status"][i] == "ok"]
        try:
            self._score(batch, ok, cols)
        except Exception as exc:  # noqa: BLE001 - anything else: the batch's ok rows become `model` errors
            for i in ok:
                _fail(cols, i, "model", f"model failed on the batch ({_reason(exc)})")
        return self._table(batch, cols)

    def _score(self, batch: dict[str, np.ndarray], ok: list[int], cols: dict[str, list[Any]]) -> None:
        if not ok:
            return
        images = np.asarray(batch["image"])[ok]
        negative = self.predictor.classes[self.predictor.manifest.negative_index]
        for j, (i, res) in enumerate(zip(ok, self._predict(images))):
            if isinstance(res, Exception):
                _fail(cols, i, "model", f"model failed on this image ({_reason(res)})")
                continue
            p, pos, label, z = res
            cols["label"][i], cols["probability"][i] = label, float(pos)
            cols["probabilities"][i], cols["embedding"][i] = [float(v) for v in p], z
            if self.explain_dir and label != negative:
                try:
                    cols["explain_path"][i] = self._explain(str(batch["path"][i]), images[j])
                except Exception as exc:  # noqa: BLE001 - e.g. the explain folder cannot be written
                    cols["explain_error"][i] = f"Grad-CAM overlay not written ({_reason(exc)})"  # prediction kept

    def _table(self, batch: dict[str, np.ndarray], cols: dict[str, list[Any]]) -> pa.Table:
        n = len(batch["path"])
        now = _dt.datetime.now(_dt.UTC)
        cols = {
            **cols,
            **_listed(batch),
            "etag_or_sha256": _strings(batch["etag_or_sha256"]),
            "threshold": [self.meta["threshold"]] * n,
            "model": [self.meta["model"]] * n,
            "model_version": [self.meta["model_version"]] * n,
            "bundle_sha256": [self.meta["bundle_sha256"]] * n,
            "model_uri": [self.meta["model_uri"]] * n,
            "scored_at": [now] * n,
            "run_id": [self.run_id] * n,
            "engine": [self.meta["engine"]] * n,
            "precision": [self.meta["precision"]] * n,
            "adapted": [None] * n,  # set by the --adapt post-pass
            "prevalence_estimate": [None] * n,
        }
        return pa.table({name: pa.array(cols[name], type=OUTPUT_SCHEMA.field(name).type) for name in OUTPUT_SCHEMA.names},
                        schema=OUTPUT_SCHEMA)


def _reason(exc: BaseException) -> str:
    """An exception as error-row text without a path: an OSError's message names the file (and
    file names carry patient ids), so only its type and strerror are kept."""
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or 'I/O error'}"
    return f"{type(exc).__name__}: {exc}"[:300]


def _fail(cols: dict[str, list[Any]], i: int, kind: str, message: str) -> None:
    """Row `i` becomes an error row of `kind` (`model`): no prediction, no overlay."""
    for name in ("label", "probability", "probabilities", "explain_path", "explain_error", "embedding"):
        cols[name][i] = None
    cols["status"][i], cols["error_kind"][i], cols["error"][i] = "error", kind, message


def write_remote_args(cfg: Pipeline) -> dict[str, float]:
    """Ray remote args for the output's write tasks: a read task's CPUs, not Ray Data's default 1."""
    return {"num_cpus": cfg.read_cpus}


def num_blocks(n_items: int, batch_size: int) -> int:
    """Ray Data blocks for `n_items` read in batches of `batch_size`: one block per batch."""
    return max(1, min(n_items, -(-n_items // batch_size)))


@dataclass(frozen=True)
class PoolSize:
    min_actors: int
    max_actors: int
    cpus_per_actor: float
    threads: int


def size_pool(cfg: Pipeline) -> PoolSize:
    """The model actor pool from the cluster's resources, unless the config fixes it.

    One actor per node with CPUs (the smallest node sets the size), each holding that node's CPUs
    less one read task's, with as many engine threads as the node has CPUs: on one 2-core machine
    the model gets both cores; on a cluster the pool grows with the nodes.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    node_cpus = min(cluster_cpus_per_node(), default=1.0)
    if cfg.gpus_per_actor > 0:
        nodes = [r for r in nodes if r.get("GPU", 0) >= cfg.gpus_per_actor] or nodes
    cpus = cfg.cpus_per_actor or max(0.5, node_cpus - cfg.read_cpus)
    max_actors = cfg.max_actors or max(cfg.min_actors, len(nodes))
    threads = cfg.threads or max(1, int(round(node_cpus if not cfg.cpus_per_actor else cfg.cpus_per_actor)))
    return PoolSize(cfg.min_actors, max_actors, cpus, threads)


def score_dataset(listing: Any, store: Location, spec: InputSpec, bundle: Location, cfg: Pipeline,
                  run_id: str, engine: str | None = None, explain_dir: Location | None = None) -> Any:
    """The one scoring pipeline, as a lazy Ray Dataset of `OUTPUT_SCHEMA` rows: read tasks over
    `listing` (a Ray Dataset of `LISTING_SCHEMA` rows, one read task per block, or a list of such
    dicts, on `store`), then
    the model actor pool sized by `size_pool`. `pneumo score` writes it to its table;
    `pneumo evaluate` collects it."""
    import ray

    pool = size_pool(cfg)
    ds = listing if not isinstance(listing, list) else ray.data.from_items(
        listing, override_num_blocks=num_blocks(len(listing), cfg.read_batch_size))  # one read task per block
    ds = ds.map_batches(read_and_preprocess, fn_kwargs={"spec": spec, "store": store, "max_bytes": cfg.max_file_bytes},
                        batch_size=cfg.read_batch_size, batch_format="numpy", num_cpus=cfg.read_cpus)
    return ds.map_batches(
        BundlePredictor,
        fn_constructor_kwargs={
            "bundle": bundle, "run_id": run_id,
            "engine": engine or cfg.engine, "precision": cfg.precision, "channels_last": cfg.channels_last,
            "explain_dir": explain_dir, "threads": pool.threads,
        },
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=pool.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor,
    )
