"""Online scoring on Ray Serve: one deployment, a FastAPI ingress with a `@serve.batch` method.

    pneumo serve demo_out/train/bundle --port 8000          # local, blocking, Ctrl-C stops (pneumo.serve.cli)
    serve run serve_app/config.yaml                         # the deploy config (scaling, batching)
    serve run serve_app.app:build_app bundle=demo_out/train/bundle

`PneumoService` is shaped like Ray's own image-classifier example: `@serve.ingress(api)` on a
deployment that loads one `pneumo.bundle.predict.Predictor` in `__init__`. A request is read and
checked (`pneumo.serve.http_api`), decoded with the bundle's `InputSpec` in a worker thread
(`pneumo.io.preprocess.load_image`), then joins a `@serve.batch` batch. One hop, no handle call.

Configuration (`ServeArgs`, the deployment options and `DEPLOYMENT_DEFAULTS`): `pneumo.serve.config`.

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
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from ray import serve

from pneumo.bundle.manifest import drift_reference
from pneumo.bundle.predict import Predictor
from pneumo.io.preprocess import DecodeError, load_image, to_tensor
from pneumo.io.storage import Location
from pneumo.models.gradcam import gradcam, overlay_png
from pneumo.monitor.window import DriftWindow
from pneumo.serve import http_api as H
from pneumo.serve.config import (
    BATCH_WAIT_S,
    DEPLOYMENT_DEFAULTS,
    DEPLOYMENT_NAME,
    MAX_BATCH_SIZE,
    RETRY_AFTER_S,
    ServeArgs,
    UserConfig,
)

__all__ = ["ServeArgs", "UserConfig", "PneumoService", "build_app", "bind", "DEPLOYMENT_DEFAULTS"]

logger = logging.getLogger("ray.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
# ---------------------------------------------------------------- the loaded model


@dataclass
class _Loaded:
    """A Predictor, its bundle and its drift window (swapped as one object)."""

    predictor: Any
    location: Location
    drift: DriftWindow | None = None  # when the bundle has a drift reference
    explain_lock: threading.Lock = field(default_factory=threading.Lock)


def _load(args: ServeArgs, location: Location) -> _Loaded:
    p = Predictor(location, device=args.device, precision=args.precision, engine=args.engine,
                  channels_last=args.channels_last, threads=args.threads)
    reference = drift_reference(location, p.manifest) if args.drift_window else None
    window = DriftWindow(reference, size=args.drift_window, every_s=args.drift_every_s) if reference else None
    probe(p)  # a bundle that cannot score is refused before it serves
    return _Loaded(p, location, window)


def probe(predictor: Any) -> None:
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
        "model": {"name": m.model, "version": m.version, "sha256": m.sha256,
                  "uri": predictor.location.source if predictor.location else None},  # models:/NAME/VERSION
        "engine": predictor.engine,
        "precision": predictor.precision,
    }


def _explain(loaded: _Loaded, image: np.ndarray) -> str:
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


@serve.deployment(name=DEPLOYMENT_NAME, **DEPLOYMENT_DEFAULTS)
@serve.ingress(api)
class PneumoService:
    """The HTTP API and the model in one replica: decode in a thread, score in `@serve.batch` batches."""

    def __init__(self, args: dict[str, Any] | ServeArgs):
        self.args = ServeArgs.model_validate(args)
        self._api_key = H.read_api_key(self.args.api_key_file)
        self._loaded = _load(self.args, self.args.location)
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
            target = await asyncio.to_thread(cfg.location, current.location, self.args.tracking_uri)
            if target is not None and target != current.location:
                new = await asyncio.to_thread(_load, self.args, target)
                self._loaded = new  # in-flight requests keep the Predictor they started with
                self._drift_update(new)
                logger.info("model swapped to bundle sha256 %s", new.predictor.manifest.sha256[:12])

    async def check_health(self) -> None:
        """Serve calls this every `health_check_period_s`; raising makes Serve replace the replica."""
        await asyncio.to_thread(probe, self._loaded.predictor)

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
            await asyncio.wait_for(asyncio.to_thread(probe, self._loaded.predictor), timeout=5)
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
