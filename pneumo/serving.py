"""Online scoring on Ray Serve: one deployment, a FastAPI ingress with a `@serve.batch` method.

    pneumo serve demo_out/train/bundle --port 8000          # local, blocking, Ctrl-C stops (pneumo.serve_cli)
    serve run serve_app/config.yaml                         # the deploy config (scaling, batching)
    serve run serve_app.app:build_app bundle=demo_out/train/bundle

`PneumoService` is shaped like Ray's own image-classifier example: `@serve.ingress(api)` on a
deployment that loads one `pneumo.predict.Predictor` in `__init__`. A request is read and checked
(`pneumo.http_api`), decoded with the bundle's `InputSpec` in a worker thread
(`pneumo.preprocess.load_image`), then joins a `@serve.batch` batch. One hop, no handle call.

Configuration lives in two places, never mixed:
- `ServeArgs` (the builder's `args:`): what the app serves and how it treats requests.
- The deployment options (`deployments:` in serve_app/config.yaml, or `.options()`): replicas,
  `max_ongoing_requests`, `max_queued_requests`, `ray_actor_options` and `user_config` (batch
  settings, live; a new `bundle` there is loaded aside and swapped in without downtime). The
  defaults in `DEPLOYMENT_DEFAULTS` apply where the YAML says nothing; the builder sets none.

Overload answers 503 with `Retry-After`: Serve itself once a caller's queue holds
`max_queued_requests` (`backpressure_config`), and the handler once a request has waited
`request_timeout_s`. `check_health` scores a tiny image, so Serve replaces a replica that cannot score.
"""

# No `from __future__ import annotations`: Serve inspects `build_app`'s annotation as a class.

import asyncio
import base64
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from pneumo import http_api as H
from pneumo.precision import PRECISIONS
from pneumo.predict import ENGINES
from pneumo.preprocess import DEFAULT_MAX_PIXELS, DecodeError

__all__ = ["ServeArgs", "UserConfig", "PneumoService", "build_app", "bind", "DEPLOYMENT_DEFAULTS"]

logger = logging.getLogger("ray.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BATCH_SIZE = 16  # the one default of @serve.batch's size ...
BATCH_WAIT_S = 0.01  # ... and wait; user_config changes both live
RETRY_AFTER_S = 1.0
DEPLOYMENT_DEFAULTS: dict[str, Any] = {  # where the YAML / .options() say nothing
    "max_ongoing_requests": 2 * MAX_BATCH_SIZE,  # one batch running, the next one filling
    "max_queued_requests": 4 * MAX_BATCH_SIZE,  # per caller (proxy); above: 503 + Retry-After
    "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S},
    "autoscaling_config": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 2,
                           "target_ongoing_requests": MAX_BATCH_SIZE // 2},
    "ray_actor_options": {"num_cpus": 1},
    "user_config": {"max_batch_size": MAX_BATCH_SIZE, "batch_wait_timeout_s": BATCH_WAIT_S},
    "graceful_shutdown_timeout_s": 10,
    "health_check_period_s": 10,
    "health_check_timeout_s": 30,
}


class ServeArgs(BaseModel):
    """Arguments of the Serve application (`args:` in serve_app/config.yaml): app settings only."""

    model_config = ConfigDict(extra="forbid")

    bundle: str = Field(description="model bundle: a folder or s3://bucket/prefix")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint, e.g. http://host:8333")
    engine: Literal[ENGINES] = Field("auto", description="auto, torch or onnxruntime")  # type: ignore[valid-type]
    precision: Literal[PRECISIONS] = Field("auto", description="scoring precision")  # type: ignore[valid-type]
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    channels_last: bool = Field(True, description="torch engine: channels_last memory format")
    threads: int = Field(0, ge=0, description="ONNX Runtime / torch threads; 0: the replica's num_cpus")
    api_key_file: str | None = Field(
        None, description=f"file holding the bearer token; else env {H.API_KEY_ENV}; neither: no key needed")
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0, description="largest accepted image, bytes")
    max_batch_files: int = Field(16, gt=0, description="most files in one /v1/predict/batch request")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="decoded pixels above this are a bomb: 413")
    request_timeout_s: float = Field(30.0, gt=0, description="a request not scored by then: 503 + Retry-After")
    drift_window: int = Field(500, ge=0, description="served images in the drift window (0: off)")
    drift_every_s: float = Field(60.0, gt=0, description="drift statistics recomputed at most this often")


class UserConfig(BaseModel):
    """The deployment's `user_config` (changeable live with `serve deploy`)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(MAX_BATCH_SIZE, gt=0)
    batch_wait_timeout_s: float = Field(BATCH_WAIT_S, ge=0)
    bundle: str | None = Field(None, description="a new bundle here is loaded and swapped in without downtime")
    s3_endpoint: str | None = None


# ---------------------------------------------------------------- the loaded model


@dataclass
class _Loaded:
    """A Predictor, its bundle and its drift window (swapped as one object)."""

    predictor: Any
    bundle: str
    s3_endpoint: str | None
    drift: Any = None  # pneumo.drift_window.DriftWindow when the bundle has a drift reference
    explain_lock: threading.Lock = field(default_factory=threading.Lock)


def _load(args: ServeArgs, bundle: str, s3_endpoint: str | None) -> _Loaded:
    from pneumo import drift
    from pneumo.bundle import read_file
    from pneumo.drift_window import DriftWindow
    from pneumo.predict import Predictor

    p = Predictor(bundle, s3_endpoint, device=args.device, precision=args.precision, engine=args.engine,
                  channels_last=args.channels_last, threads=args.threads)
    window = None
    if args.drift_window and drift.FILE_NAME in p.manifest.files:
        ref = drift.DriftReference.from_bytes(read_file(bundle, p.manifest, drift.FILE_NAME, s3_endpoint))
        window = DriftWindow(ref, size=args.drift_window, every_s=args.drift_every_s)
    _probe(p)  # a bundle that cannot score is refused before it serves
    return _Loaded(p, bundle, s3_endpoint, window)


def _probe(predictor: Any) -> None:
    """Score one blank image: raises when the model cannot score (check_health, /readyz)."""
    size = predictor.spec.size
    probs = predictor.predict(np.zeros((1, size, size), np.uint8))
    if probs.shape != (1, len(predictor.classes)) or not np.isfinite(probs).all():
        raise RuntimeError(f"the model answered {probs!r} for a blank image")


def _score(items: list[tuple[np.ndarray, _Loaded]]) -> list[np.ndarray]:
    """One forward pass per loaded model in the batch (two only while a swap is under way)."""
    out: list[np.ndarray | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for i, (_, loaded) in enumerate(items):
        groups.setdefault(id(loaded), []).append(i)
    for idx in groups.values():
        loaded = items[idx[0]][1]
        probs, feats = loaded.predictor.predict_with_features(np.stack([items[i][0] for i in idx]))
        if loaded.drift is not None:
            loaded.drift.add(feats, loaded.predictor.positive_probability(probs))
        for row, i in zip(probs, idx):
            out[i] = row
    return out  # type: ignore[return-value]


def _answer(predictor: Any, probs: np.ndarray) -> dict[str, Any]:
    m = predictor.manifest
    row = np.asarray(probs, dtype=np.float32)[None, :]
    return {
        "label": predictor.labels(row)[0],
        "probability": round(float(predictor.positive_probability(row)[0]), 6),
        "probabilities": {c: round(float(p), 6) for c, p in zip(predictor.classes, row[0])},
        "threshold": predictor.threshold,
        "model": {"name": m.model, "version": m.version, "sha256": m.sha256},
        "engine": predictor.engine,
        "precision": predictor.precision,
    }


def _explain(loaded: _Loaded, image: np.ndarray) -> str:
    from pneumo.gradcam import gradcam, overlay_png
    from pneumo.preprocess import to_tensor

    p = loaded.predictor
    with loaded.explain_lock:  # the Grad-CAM hooks must not see another request's pass
        x = to_tensor(image[None], p.spec, device=p.device)
        heat = gradcam(p.explain_model, x, p.manifest.negative_index)
    return base64.b64encode(overlay_png(image, heat)).decode("ascii")


_GAUGES: dict[str, Any] = {}


def _set_drift_gauges(snapshot: dict[str, Any], sha256: str) -> None:
    """`pneumo_<gauge>` Ray metrics (Prometheus) from a DriftWindow snapshot, tagged by bundle."""
    from ray.serve.metrics import Gauge

    for name, value in snapshot["gauges"].items():
        if name not in _GAUGES:
            _GAUGES[name] = Gauge(f"pneumo_{name}", description=f"{name} over the replica's drift window",
                                  tag_keys=("bundle_sha256",))
        _GAUGES[name].set(float(value), {"bundle_sha256": sha256[:12]})


# ---------------------------------------------------------------- the deployment


api = H.install(FastAPI(
    title="pneumo",
    version="1",
    description="Pneumonia classification of chest X-rays (JPEG, PNG, DICOM). Not a medical device.",
    docs_url="/docs",
))


@serve.deployment(name="PneumoService", **DEPLOYMENT_DEFAULTS)
@serve.ingress(api)
class PneumoService:
    """The HTTP API and the model in one replica: decode in a thread, score in `@serve.batch` batches."""

    def __init__(self, args: dict[str, Any] | ServeArgs):
        self.args = ServeArgs.model_validate(args)
        self._api_key = H.read_api_key(self.args.api_key_file)
        self._loaded = _load(self.args, self.args.bundle, self.args.s3_endpoint)
        self._reconfigure_lock = asyncio.Lock()
        self._batching = UserConfig().model_dump(include={"max_batch_size", "batch_wait_timeout_s"})
        self._batches = self._batched_images = 0
        self._drift_task: asyncio.Task | None = None
        self._drift_update(self._loaded)
        logger.info("pneumo up: %s; api key %s", self._loaded.predictor.describe(),
                    "required" if self._api_key else "not required")

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply `user_config`: batch settings now; a new bundle is loaded aside, then swapped in."""
        cfg = UserConfig.model_validate(config or {})
        self._batch.set_max_batch_size(cfg.max_batch_size)
        self._batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._batching = {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s}
        async with self._reconfigure_lock:
            current = self._loaded
            s3 = cfg.s3_endpoint if cfg.s3_endpoint is not None else current.s3_endpoint
            if cfg.bundle and (cfg.bundle != current.bundle or s3 != current.s3_endpoint):
                new = await asyncio.to_thread(_load, self.args, cfg.bundle, s3)
                self._loaded = new  # in-flight requests keep the Predictor they started with
                self._drift_update(new)
                logger.info("model swapped to bundle sha256 %s", new.predictor.manifest.sha256[:12])

    async def check_health(self) -> None:
        """Serve calls this every `health_check_period_s`; raising makes Serve replace the replica."""
        await asyncio.to_thread(_probe, self._loaded.predictor)

    # ---- scoring

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _batch(self, items: list[tuple[np.ndarray, _Loaded]]) -> list[np.ndarray]:
        self._batches += 1
        self._batched_images += len(items)
        out = await asyncio.to_thread(_score, items)
        for loaded in {id(x[1]): x[1] for x in items}.values():
            self._drift_update(loaded)
        return out

    def _drift_update(self, loaded: _Loaded) -> None:
        """Recompute the drift statistics in a thread when due (one at a time), then set the gauges."""
        if loaded.drift is None or (self._drift_task is not None and not self._drift_task.done()):
            return

        def run() -> None:
            try:
                _set_drift_gauges(loaded.drift.snapshot(), loaded.predictor.manifest.sha256)
            except Exception:  # drift monitoring must never fail scoring
                logger.exception("drift snapshot failed")

        try:
            self._drift_task = asyncio.get_running_loop().create_task(asyncio.to_thread(run))
        except RuntimeError:  # no running loop (in __init__): compute now
            run()

    async def _predict(self, data: bytes, explain: bool) -> dict[str, Any]:
        """Image bytes -> answer; 4xx ApiError for input that cannot be decoded, 503 when too slow."""
        from pneumo.preprocess import load_image

        if not data:
            raise H.ApiError(400, "empty", "empty file (0 bytes)")
        loaded = self._loaded
        p = loaded.predictor

        async def run() -> dict[str, Any]:
            t0 = time.perf_counter()
            try:
                image = await asyncio.to_thread(load_image, data, "", p.spec, self.args.max_pixels)
            except DecodeError as exc:
                raise H.ApiError(H.KIND_STATUS.get(exc.kind, 400), exc.kind, exc.reason) from None
            out = _answer(p, await self._batch((image, loaded)))
            out["model_ms"] = round((time.perf_counter() - t0) * 1000, 2)
            if explain:
                out["explanation"] = {"overlay_png_base64": await asyncio.to_thread(_explain, loaded, image),
                                      "method": "grad-cam (last convolution)"}
            return out

        try:
            return await asyncio.wait_for(run(), self.args.request_timeout_s)
        except TimeoutError:
            raise H.ApiError(503, "overloaded", f"not scored within {self.args.request_timeout_s} s; retry later",
                             retry_after_s=RETRY_AFTER_S) from None

    # ---- routes

    @api.get("/", include_in_schema=False)
    def index(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @api.get("/static/app.js", include_in_schema=False)
    def script(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "app.js", media_type="text/javascript")

    @api.get("/healthz", summary="Liveness: the HTTP server answers")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: the model scores a probe image")
    async def readyz(self) -> JSONResponse:
        try:
            await asyncio.wait_for(asyncio.to_thread(_probe, self._loaded.predictor), timeout=5)
        except Exception as exc:
            return H.error_response(503, "not_ready", f"the model cannot score ({type(exc).__name__})",
                                    headers={"Retry-After": str(round(RETRY_AFTER_S))})
        return JSONResponse({"status": "ready"})

    @api.get("/v1/model", summary="Metadata of the model being served")
    async def model_info(self, request: Request) -> dict[str, Any]:
        H.authorize(request, self._api_key)
        loaded = self._loaded
        info = loaded.predictor.describe()
        info["metrics"] = loaded.predictor.manifest.metrics
        info["batching"] = dict(self._batching)
        info["batches_run"] = {"batches": self._batches, "images": self._batched_images,
                               "mean_batch_size": round(self._batched_images / max(self._batches, 1), 2)}
        info["drift"] = None if loaded.drift is None else await asyncio.to_thread(loaded.drift.snapshot)
        info["limits"] = {"max_upload_bytes": self.args.max_upload_bytes,
                          "max_batch_files": self.args.max_batch_files, "max_pixels": self.args.max_pixels,
                          "request_timeout_s": self.args.request_timeout_s,
                          "content_types": list(H.RAW_CONTENT_TYPES) + ["multipart/form-data"]}
        return info

    @api.post("/v1/predict", summary="Classify one X-ray (multipart 'file' or a raw image body)",
              openapi_extra=H.PREDICT_BODY)
    async def predict(self, request: Request,
                      explain: bool = Query(False, description="add a Grad-CAM overlay PNG (base64)")) -> dict:
        t0 = time.perf_counter()
        H.authorize(request, self._api_key)
        result = await self._predict(await H.image_bytes(request, self.args.max_upload_bytes), explain)
        result["latency_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return result

    @api.post("/v1/predict/batch", summary="Classify several X-rays (multipart 'files'); per-item errors",
              openapi_extra=H.BATCH_BODY)
    async def predict_batch(self, request: Request,
                            explain: bool = Query(False, description="add Grad-CAM overlays")) -> dict:
        t0 = time.perf_counter()
        H.authorize(request, self._api_key)
        items = await H.batch_items(request, self.args.max_upload_bytes, self.args.max_batch_files)

        async def one(item: Any) -> dict[str, Any]:
            try:
                return await self._predict(H.file_bytes(item, self.args.max_upload_bytes), explain)
            except H.ApiError as exc:
                if exc.status == 503:  # overload fails the request, not one item
                    raise
                return exc.body()

        out = [{"index": i, **r} for i, r in enumerate(await asyncio.gather(*(one(i) for i in items)))]
        return {"results": out, "count": len(out), "errors": sum(1 for r in out if "error" in r),
                "latency_ms": round((time.perf_counter() - t0) * 1000, 2)}


# ---------------------------------------------------------------- builder and CLI


def build_app(args: ServeArgs) -> serve.Application:
    """The typed application builder: `serve run serve_app.app:build_app bundle=PATH`.

    App settings only: scaling and batching come from the config's `deployments:` entry (Serve
    applies it over this), else from `DEPLOYMENT_DEFAULTS`."""
    return bind(args)


def bind(args: ServeArgs | dict[str, Any], **options: Any) -> serve.Application:
    """The application with deployment `options` (`.options()`: replicas, queues, user_config)."""
    args = ServeArgs.model_validate(args)
    return (PneumoService.options(**options) if options else PneumoService).bind(args.model_dump())
