"""Online scoring on Ray Serve: one deployment, a FastAPI ingress with a `@serve.batch` method.

    pneumo serve demo_out/train/bundle --port 8000          # local, blocking, Ctrl-C stops (pneumo.serve.cli)
    serve run serve_app/config.yaml                         # the deploy config (scaling, batching)
    serve run serve_app.app:build_app bundle=demo_out/train/bundle

`PneumoService` is shaped like Ray's own image-classifier example: `@serve.ingress(api)` on a
deployment that loads one `pneumo.bundle.predict.Predictor` in `__init__`. A request is read and
checked (`pneumo.serve.http_api`), decoded with the bundle's `InputSpec` on the replica's decode
pool (`pneumo.io.preprocess.load_image`, within a budget of decoded bytes), then joins a
`@serve.batch` batch scored on the score pool. One hop, no handle call. The same replica answers
pneumo's `/v1` API and the Open Inference Protocol's `/v2` (`pneumo.serve.v2_routes`).

Configuration (`ServeArgs`, the deployment options and `DEPLOYMENT_DEFAULTS`): `pneumo.serve.config`;
the replica's pools, probe cache and budgets: `pneumo.serve.runtime`.

Overload answers 503 with `Retry-After`: Serve itself once a caller's queue holds
`max_queued_requests` (`backpressure_config`), the handler once a request is not answered within
`request_timeout_s` (from the first byte of its body: a body still arriving then is a 408) and
once the Grad-CAM queue is full. `check_health` and `/readyz` share one cached probe.
"""

# No `from __future__ import annotations`: Serve inspects `build_app`'s annotation as a class.

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Query, Request
from fastapi.responses import FileResponse
from pydantic import ValidationError
from ray import serve

from pneumo.io.preprocess import DecodeError, load_image
from pneumo.serve import http_api as H
from pneumo.serve.api import api, errors
from pneumo.serve.config import (
    BATCH_WAIT_S,
    DEPLOYMENT_DEFAULTS,
    DEPLOYMENT_NAME,
    MAX_BATCH_SIZE,
    RETRY_AFTER_S,
    ServeArgs,
    UserConfig,
    access_error,
    read_api_key,
)
from pneumo.serve.runtime import (
    Admission,
    ByteBudget,
    Loaded,
    Pool,
    ProbeCache,
    decode_cost,
    explain_png,
    load,
    probe,
    score_items,
)
from pneumo.serve.v2_routes import OpenInference, install_openapi

__all__ = ["ServeArgs", "UserConfig", "PneumoService", "build_app", "bind", "DEPLOYMENT_DEFAULTS", "probe"]

logger = logging.getLogger("ray.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
PREDICT_ERRORS = errors(400, 401, 408, 413, 415, 422, 500, 503)
# ---------------------------------------------------------------- answers and metrics


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


_METRICS: dict[str, Any] = {}


def _metric(kind: str, name: str, description: str, tags: tuple[str, ...]) -> Any:
    """A Ray metric (exported to Prometheus by Ray), made once per replica."""
    if name not in _METRICS:
        from ray.serve import metrics

        _METRICS[name] = getattr(metrics, kind)(f"pneumo_{name}", description=description, tag_keys=tags)
    return _METRICS[name]


def _set_drift_gauges(snapshot: dict[str, Any], sha256: str) -> None:
    """`pneumo_<gauge>` Ray metrics (Prometheus) from a DriftWindow snapshot, tagged by bundle."""
    for name, value in snapshot["gauges"].items():
        _metric("Gauge", name, f"{name} over the replica's drift window", ("bundle_sha256",)).set(
            float(value), {"bundle_sha256": sha256[:12]})


def record_drift(records: list[tuple]) -> None:
    """Add a batch's embeddings to the drift windows, then refresh the gauges when due (on the
    drift pool, after the answers; a failure here is logged, never an answer's)."""
    try:
        for loaded, feats, scores in records:
            loaded.drift.add(feats, scores)
        for loaded in {id(r[0]): r[0] for r in records}.values():
            _set_drift_gauges(loaded.drift.snapshot(), loaded.predictor.manifest.sha256)
    except Exception:  # noqa: BLE001 - drift monitoring must never fail scoring
        logger.exception("drift bookkeeping failed")


def serve_http_host() -> str | None:
    """The host Serve's HTTP proxies bind (None when no Serve controller can be reached)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:  # noqa: BLE001 - unknown: treated as not loopback
        return None


# ---------------------------------------------------------------- the deployment


install_openapi(api)  # before @serve.ingress, which freezes a copy of the app: later changes never reach it


@serve.deployment(name=DEPLOYMENT_NAME, **DEPLOYMENT_DEFAULTS)
@serve.ingress(api)
class PneumoService(OpenInference):
    """The HTTP API and the model in one replica: decode on a pool, score in `@serve.batch` batches."""

    def __init__(self, args: dict[str, Any] | ServeArgs):
        self.args = ServeArgs.model_validate(args)
        self._api_key = read_api_key(self.args.api_key_file)
        problem = access_error(serve_http_host(), self._api_key is not None, self.args.allow_anonymous)
        if problem:
            logger.error("pneumo: %s", problem)
            raise RuntimeError(problem)
        a = self.args
        self._pools = {"decode": Pool("decode", a.decode_threads), "score": Pool("score", 1),
                       "explain": Pool("explain", 1, a.explain_queue), "health": Pool("health", 1),
                       "drift": Pool("drift", 1)}
        self._loaded = load(a, a.location)
        self._probe = ProbeCache(self._pools["health"])
        self._budget = ByteBudget(a.max_decode_bytes)
        self._admission = Admission(a.max_queue_wait_s, cap=2 * MAX_BATCH_SIZE)
        self._reconfigure_lock = asyncio.Lock()
        self._batching = UserConfig().model_dump(include={"max_batch_size", "batch_wait_timeout_s"})
        self._batches = self._batched_images = 0
        self._update: dict[str, Any] | None = None
        if self._loaded.drift is not None:
            _set_drift_gauges(self._loaded.drift.snapshot(), self._loaded.predictor.manifest.sha256)
        logger.info("pneumo up: %s; api key %s", self._loaded.predictor.describe(),
                    "required" if self._api_key else "not required")

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply `user_config`: batch settings now; a new bundle is loaded aside, then swapped in.
        A bundle that fails to load leaves the old model serving, and the failure is reported
        (`/v1/model` `update`, the log, the `pneumo_model_update_failures` counter), never raised."""
        try:
            cfg = UserConfig.model_validate(config or {})
        except ValidationError as exc:
            return self._update_failed(None, exc)
        self._batch.set_max_batch_size(cfg.max_batch_size)
        self._batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._batching = {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s}
        async with self._reconfigure_lock:
            current, target = self._loaded, None
            try:
                target = await asyncio.to_thread(cfg.location, current.location, self.args.tracking_uri)
                if target is None or target == current.location:
                    return
                new = await asyncio.to_thread(load, self.args, target)
            except Exception as exc:  # noqa: BLE001 - the old model keeps serving
                return self._update_failed(str(target) if target else cfg.bundle, exc)
            self._loaded = new  # in-flight requests keep the Predictor they started with
            self._update = {"status": "ok", "bundle": str(target), "at": time.time(), "error": None}
            logger.info("model swapped to bundle sha256 %s", new.predictor.manifest.sha256[:12])

    def _update_failed(self, bundle: str | None, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"[:500]
        self._update = {"status": "failed", "bundle": bundle, "at": time.time(), "error": error,
                        "serving": self._loaded.predictor.manifest.sha256}
        logger.error("pneumo: model update to %s failed, still serving %s: %s", bundle,
                     self._loaded.predictor.manifest.sha256[:12], error)
        try:
            _metric("Counter", "model_update_failures", "live model updates (reconfigure) that failed to load",
                    ("error",)).inc(1.0, {"error": type(exc).__name__})
        except Exception:  # noqa: BLE001 - metrics must never fail the replica
            logger.exception("pneumo: the update-failure counter could not be set")

    async def check_health(self) -> None:
        """Serve calls this every `health_check_period_s`; raising makes Serve replace the replica."""
        error = await self._probe.check(self._loaded.predictor)
        if error:
            raise RuntimeError(error)

    # ---- scoring

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _batch(self, items: list[tuple[np.ndarray, Loaded]]) -> list[Any]:
        self._batches += 1
        self._batched_images += len(items)
        out, drift = await self._pools["score"].run(score_items, items)
        if drift:
            self._pools["drift"].submit(record_drift, drift)
        return out

    def _admit(self, n: int) -> int:
        """Admit `n` images for scoring (returns n), or refuse at once: 503 + Retry-After."""
        if n and not self._admission.admit(n):
            raise H.ApiError(503, "overloaded", f"about {self._admission.waiting} images are waiting for the model "
                             f"(more than {self.args.max_queue_wait_s} s of work); retry later",
                             retry_after_s=RETRY_AFTER_S)
        return n

    async def _within(self, work: Callable[[dict[str, bool]], Awaitable[Any]]) -> Any:
        """`work(progress)` within `request_timeout_s` from the first byte of the body: 408 while
        the body is still arriving, 503 + Retry-After after."""
        progress = {"reading": True}
        timeout = self.args.request_timeout_s
        try:
            return await asyncio.wait_for(work(progress), timeout)
        except TimeoutError:
            if progress["reading"]:
                raise H.ApiError(408, "timeout", f"the request body did not arrive within {timeout} s") from None
            raise H.ApiError(503, "overloaded", f"not answered within {timeout} s; retry later",
                             retry_after_s=RETRY_AFTER_S) from None

    async def _image(self, data: bytes, p: Any, where: str = "") -> np.ndarray:
        """Bytes -> the model's input plane, on the decode pool, within the decoded-bytes budget."""
        if not data:
            raise H.ApiError(400, "empty", f"{where}empty file (0 bytes)")
        decode = self._pools["decode"]
        cost = await decode.run(decode_cost, data)
        async with self._budget.hold(cost):
            try:
                return await decode.run(load_image, data, "", p.spec, self.args.max_pixels)
            except DecodeError as exc:
                raise H.ApiError(H.KIND_STATUS.get(exc.kind, 400), exc.kind, where + exc.reason) from None

    async def _score(self, image: np.ndarray, loaded: Loaded) -> tuple[np.ndarray, np.ndarray]:
        result = await self._batch((image, loaded))
        if isinstance(result, Exception):
            raise H.ApiError(500, "model", str(result))
        return result

    def _explain_busy(self) -> H.ApiError:
        return H.ApiError(503, "overloaded", "the Grad-CAM queue is full; retry later or ask without explain",
                          retry_after_s=RETRY_AFTER_S)

    async def _predict(self, data: bytes, explain: bool) -> dict[str, Any]:
        """Image bytes -> answer; 4xx ApiError for input that cannot be decoded."""
        explainer = self._pools["explain"]
        if explain and explainer.full():
            raise self._explain_busy()
        loaded = self._loaded
        t0 = time.perf_counter()
        image = await self._image(data, loaded.predictor)
        probs, _ = await self._score(image, loaded)
        out = _answer(loaded.predictor, probs)
        out["model_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        if explain:
            overlay = explainer.try_run(explain_png, loaded, image)
            if overlay is None:
                raise self._explain_busy()
            try:
                out["explanation"] = {"overlay_png_base64": await overlay, "method": "grad-cam (last convolution)"}
            except Exception as exc:  # noqa: BLE001 - the prediction stands; only its overlay failed
                logger.exception("pneumo: Grad-CAM failed")
                out["explanation"] = {"error": f"Grad-CAM failed ({type(exc).__name__})"}
        return out

    # ---- routes

    @api.get("/", include_in_schema=False)
    def index(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @api.get("/static/app.js", include_in_schema=False)
    def script(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "app.js", media_type="text/javascript")

    @api.get("/favicon.ico", include_in_schema=False)
    def favicon(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "favicon.ico", media_type="image/x-icon")

    @api.get("/healthz", summary="Liveness: the HTTP server answers")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: the model scores a probe image (cached a few seconds)",
             responses=errors(503))
    async def readyz(self) -> dict[str, str]:
        error = await self._probe.check(self._loaded.predictor)
        if error:
            raise H.ApiError(503, "not_ready", error, retry_after_s=RETRY_AFTER_S)
        return {"status": "ready"}

    @api.get("/v1/model", summary="Metadata of the model being served", responses=errors(401))
    async def model_info(self, request: Request) -> dict[str, Any]:
        H.authorize(request, self._api_key)
        loaded, a = self._loaded, self.args
        info = loaded.predictor.describe()
        info["metrics"] = loaded.predictor.manifest.metrics
        info["red_flags"] = loaded.predictor.manifest.training.get("red_flags")  # None: not judged (older bundle)
        info["batching"] = dict(self._batching)
        info["batches_run"] = {"batches": self._batches, "images": self._batched_images,
                               "mean_batch_size": round(self._batched_images / max(self._batches, 1), 2)}
        info["drift"] = None if loaded.drift is None else await self._pools["drift"].run(loaded.drift.snapshot)
        info["update"] = self._update
        info["limits"] = {"max_upload_bytes": a.max_upload_bytes, "max_batch_files": a.max_batch_files,
                          "max_pixels": a.max_pixels, "request_timeout_s": a.request_timeout_s,
                          "max_decode_bytes": a.max_decode_bytes, "explain_queue": a.explain_queue,
                          "max_queue_wait_s": a.max_queue_wait_s,
                          "content_types": list(H.RAW_CONTENT_TYPES) + ["multipart/form-data"]}
        info["replica"] = {"pools": {k: p.stats() for k, p in self._pools.items()}, "probes": self._probe.probes,
                           "admission": self._admission.stats(),
                           "decode_bytes": {"used": self._budget.used, "waiting": self._budget.waiting}}
        return info

    @api.post("/v1/predict", summary="Classify one X-ray (multipart 'file' or a raw image body)",
              openapi_extra=H.PREDICT_BODY, responses=PREDICT_ERRORS)
    async def predict(self, request: Request,
                      explain: bool = Query(False, description="add a Grad-CAM overlay PNG (base64)")) -> dict:
        t0 = time.perf_counter()
        H.authorize(request, self._api_key)

        async def work(progress: dict[str, bool]) -> dict[str, Any]:
            data = await H.image_bytes(request, self.args.max_upload_bytes)
            progress["reading"] = False
            return await self._predict(data, explain)

        self._admit(1)  # before the body is read
        try:
            result = await self._within(work)
        finally:
            self._admission.done(1)
        result["latency_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return result

    @api.post("/v1/predict/batch", summary="Classify several X-rays (multipart 'files'); per-item errors",
              openapi_extra=H.BATCH_BODY, responses=PREDICT_ERRORS)
    async def predict_batch(self, request: Request,
                            explain: bool = Query(False, description="add Grad-CAM overlays")) -> dict:
        t0 = time.perf_counter()
        H.authorize(request, self._api_key)
        a = self.args

        async def one(item: Any) -> dict[str, Any]:
            try:
                return await self._predict(H.file_bytes(item, a.max_upload_bytes), explain)
            except H.ApiError as exc:
                if exc.status == 503:  # overload fails the request, not one item
                    raise
                return exc.body()

        held = [self._admit(1)]  # before the body is read; the other files once it is

        async def work(progress: dict[str, bool]) -> list[dict[str, Any]]:
            items = await H.batch_items(request, a.max_upload_bytes, a.max_batch_files)
            progress["reading"] = False
            held[0] += self._admit(len(items) - 1)
            return list(await asyncio.gather(*(one(i) for i in items)))

        try:
            out = [{"index": i, **r} for i, r in enumerate(await self._within(work))]
        finally:
            self._admission.done(held[0])
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
