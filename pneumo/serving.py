"""Online scoring on Ray Serve: a FastAPI ingress in front of a batching model deployment.

    pneumo serve demo_out/train/bundle --port 8000          # local, blocking, Ctrl-C stops
    serve run serve_app/config.yaml                     # the deploy config (autoscaling etc.)
    serve run serve_app.app:build_app bundle=demo_out/train/bundle

Two deployments, shaped like the Ray Serve docs:

- `PneumoIngress` (`@serve.ingress(api)`): the HTTP API, request limits, the optional API key,
  request metrics, the web page at `/`. It never decodes images.
- `PneumoModel`: one `pneumo.predict.Predictor` per replica (loaded once); `predict(bytes)`
  decodes with `pneumo.preprocess.load_image` in a worker thread, then joins a `@serve.batch`
  batch. `user_config` (`reconfigure`) changes `max_batch_size` / `batch_wait_timeout_s`
  live, and a new `bundle` there swaps the model without downtime: the new Predictor is loaded
  in a thread while the old one keeps answering, then swapped in one assignment.

Decoding sits in the model replica, not the ingress, because the decode depends on the
bundle's `InputSpec` (size, channels, resize, equalise): decoding next to the Predictor that
will score the image keeps them in step even while a reconfigure swaps bundles, and it keeps
the ingress light (it only checks sizes and types and forwards bytes). Decode errors come back
as typed results (never exceptions) and the ingress maps them to 400/413/415.

`build_app(ServeArgs)` is the typed application builder (`serve run` / `serve deploy` pass the
config's `args:` to it, validated by pydantic).
"""

# No `from __future__ import annotations`: Serve inspects `build_app`'s annotation as a class.

import asyncio
import base64
import dataclasses
import hmac
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from pneumo.preprocess import DEFAULT_MAX_PIXELS, DecodeError

__all__ = ["ServeArgs", "PneumoModel", "PneumoIngress", "build_app", "main", "API_KEY_ENV", "RAW_CONTENT_TYPES"]

logger = logging.getLogger("ray.serve")

API_KEY_ENV = "PNEUMO_API_KEY"
RAW_CONTENT_TYPES = ("image/jpeg", "image/png", "application/dicom", "application/octet-stream")
KIND_STATUS = {"empty": 400, "corrupt": 400, "unsupported": 415, "too_large": 413}
STATIC_DIR = Path(__file__).resolve().parent / "static"
LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]
OPEN_PATHS = ("/", "/healthz", "/readyz", "/docs", "/openapi.json", "/static/app.js", "/favicon.ico")


class ServeArgs(BaseModel):
    """Arguments of the Serve application (`args:` in serve_app/config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    bundle: str = Field(description="model bundle: a folder or s3://bucket/prefix")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint, e.g. http://host:8333")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    channels_last: bool = True
    api_key_file: str | None = Field(
        None, description=f"file holding the bearer token; else env {API_KEY_ENV}; neither: no key needed"
    )
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0, description="largest accepted image, bytes")
    max_batch_files: int = Field(16, gt=0, description="most files in one /v1/predict/batch request")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="decoded pixels above this are a bomb: 413")
    max_batch_size: int = Field(16, gt=0, description="@serve.batch size (live via user_config)")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="@serve.batch wait (live via user_config)")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    model_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per model replica")
    ingress_num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per ingress replica")


class ModelUserConfig(BaseModel):
    """The model deployment's `user_config` (changeable live with `serve deploy`)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(16, gt=0)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    bundle: str | None = Field(None, description="a new bundle here is loaded and swapped in without downtime")
    s3_endpoint: str | None = None


# ---------------------------------------------------------------- model deployment


@dataclass
class _Loaded:
    """A loaded Predictor and the bundle it came from (swapped as one object)."""

    predictor: Any
    bundle: str
    s3_endpoint: str | None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _load(bundle: str, s3_endpoint: str | None, device: str, precision: str, channels_last: bool) -> _Loaded:
    from pneumo.predict import Predictor

    return _Loaded(Predictor(bundle, s3_endpoint, device=device, precision=precision, channels_last=channels_last),
                   bundle, s3_endpoint)


def _decode_error(exc: DecodeError) -> dict[str, Any]:
    return {"error": {"status": KIND_STATUS.get(exc.kind, 400), "kind": exc.kind, "message": exc.reason}}


@serve.deployment(name="PneumoModel", max_ongoing_requests=64, graceful_shutdown_timeout_s=10)
class PneumoModel:
    """Scores images with one Predictor per replica; batches concurrent requests.

    Serve (2.60) forms the next batch as soon as requests arrive, even while the previous batch
    still runs, so under steady load the batches that queue up stay small (measured: 1.6 images
    per batch at 32 concurrent clients). Requests therefore wait at `_idle` while a forward pass
    runs and join the batch queue together when it ends, which fills the next batch.
    """

    def __init__(self, bundle: str, s3_endpoint: str | None = None, device: str = "auto",
                 precision: str = "auto", channels_last: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS):
        self._opts = {"device": device, "precision": precision, "channels_last": channels_last}
        self._max_pixels = max_pixels
        self._loaded = _load(bundle, s3_endpoint, **self._opts)
        self._reconfigure_lock = asyncio.Lock()
        self._batching = {"max_batch_size": 16, "batch_wait_timeout_s": 0.01}
        self._batches = self._batched_items = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply `user_config`: batch settings now; a new bundle is loaded aside, then swapped in."""
        cfg = ModelUserConfig.model_validate(config or {})
        self.score_batch.set_max_batch_size(cfg.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._batching = {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s}
        async with self._reconfigure_lock:
            current = self._loaded
            s3 = cfg.s3_endpoint if cfg.s3_endpoint is not None else current.s3_endpoint
            if cfg.bundle and (cfg.bundle != current.bundle or s3 != current.s3_endpoint):
                new = await asyncio.to_thread(_load, cfg.bundle, s3, **self._opts)
                self._loaded = new  # in-flight requests keep the Predictor they started with
                logger.info("model swapped to bundle sha256 %s", new.predictor.manifest.sha256[:12])

    def ready(self) -> bool:
        return self._loaded is not None

    def describe(self) -> dict[str, Any]:
        loaded = self._loaded
        info = loaded.predictor.describe()
        info["batching"] = dict(self._batching)
        info["batches_run"] = {"batches": self._batches, "images": self._batched_items,
                               "mean_batch_size": round(self._batched_items / max(self._batches, 1), 2)}
        info["metrics"] = loaded.predictor.manifest.metrics
        info["torch_threads"] = _torch_threads()
        return info

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score_batch(self, items: list[tuple[np.ndarray, _Loaded]]) -> list[np.ndarray]:
        """One forward pass per loaded model in the batch (two only while a swap is under way)."""
        self._batches += 1
        self._batched_items += len(items)
        self._idle.clear()
        try:
            return await asyncio.to_thread(_score_items, items)
        finally:
            self._idle.set()

    async def predict(self, data: bytes, explain: bool = False) -> dict[str, Any]:
        """Image bytes -> answer dict, or {"error": {...}} for input that cannot be decoded."""
        from pneumo.preprocess import load_image

        loaded = self._loaded
        predictor = loaded.predictor
        t0 = time.perf_counter()
        try:
            image = await asyncio.to_thread(load_image, data, "", predictor.spec, self._max_pixels)
        except DecodeError as exc:
            return _decode_error(exc)
        await self._idle.wait()  # see the class docstring: batches form while the model is busy
        probs = await self.score_batch((image, loaded))
        out = _answer(predictor, probs)
        out["model_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        if explain:
            out["explanation"] = {
                "overlay_png_base64": await asyncio.to_thread(_explain, loaded, image),
                "method": "grad-cam (last convolution)",
            }
        return out


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _score_items(items: list[tuple[np.ndarray, _Loaded]]) -> list[np.ndarray]:
    out: list[np.ndarray | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for i, (_, loaded) in enumerate(items):
        groups.setdefault(id(loaded), []).append(i)
    for idx in groups.values():
        loaded = items[idx[0]][1]
        with loaded.lock:
            probs = loaded.predictor.predict(np.stack([items[i][0] for i in idx]))
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
    }


def _explain(loaded: _Loaded, image: np.ndarray) -> str:
    from pneumo.gradcam import gradcam, overlay_png

    predictor = loaded.predictor
    with loaded.lock:  # the Grad-CAM hook must not see a concurrent batch's forward pass
        heat = gradcam(predictor.model, predictor.to_input(image[None]), predictor.manifest.negative_index)
    return base64.b64encode(overlay_png(image, heat)).decode("ascii")


# ---------------------------------------------------------------- HTTP ingress


class ApiError(Exception):
    """A client error answered as {"error": {"status", "kind", "message"}}."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def _error_response(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "kind": kind, "message": message}}, status_code=status,
                        headers=headers)


_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"],
                           "properties": {"file": {"type": "string", "format": "binary"}}}
            },
            **{ct: {"schema": {"type": "string", "format": "binary"}} for ct in RAW_CONTENT_TYPES},
        },
    }
}
_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["files"],
                           "properties": {"files": {"type": "array",
                                                    "items": {"type": "string", "format": "binary"}}}}
            }
        },
    }
}

api = FastAPI(
    title="pneumo",
    version="1",
    description="Pneumonia classification of chest X-rays (JPEG, PNG, DICOM). Not a medical device.",
    docs_url="/docs",
)


@api.exception_handler(ApiError)
async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return _error_response(exc.status, exc.kind, exc.message, headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error_response(exc.status_code, kind, str(exc.detail))


@api.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    fields = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in exc.errors())
    return _error_response(422, "invalid_request", f"invalid or missing: {fields}")


_METRICS: dict[str, Any] = {}


def _metrics() -> dict[str, Any]:
    """Request counter and latency histogram (Ray metrics, exported to Prometheus by Ray)."""
    if not _METRICS:
        from ray.serve import metrics

        _METRICS["requests"] = metrics.Counter(
            "pneumo_http_requests", description="HTTP requests by endpoint and status code",
            tag_keys=("endpoint", "status_code"))
        _METRICS["latency"] = metrics.Histogram(
            "pneumo_http_latency_ms", description="HTTP request latency (ms) by endpoint and status code",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("endpoint", "status_code"))
    return _METRICS


@api.middleware("http")
async def _count_requests(request: Request, call_next: Any) -> Any:
    t0 = time.perf_counter()
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(500, "internal", "internal error")
    finally:
        ms = (time.perf_counter() - t0) * 1000
        route = request.scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        tags = {"endpoint": endpoint, "status_code": str(status)}
        try:
            m = _metrics()
            m["requests"].inc(1.0, tags)
            m["latency"].observe(ms, tags)
        except Exception:  # metrics must never fail a request
            pass


def _read_api_key(api_key_file: str | None) -> str | None:
    if api_key_file:
        key = Path(api_key_file).read_text().strip()
        if not key:
            raise ValueError(f"api key file {api_key_file} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) a declared or actual size above `limit` before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, "too_large", f"body of {declared} bytes exceeds the limit of {limit} bytes")
        except ValueError:
            raise ApiError(400, "invalid_request", "Content-Length is not a number") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _form(request: Request, body: bytes, max_files: int) -> Any:
    """Parse a multipart body already read (and size-checked) by `_read_body`."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    replay = Request(request.scope, receive)
    try:
        return await replay.form(max_files=max_files, max_fields=max_files + 8)
    except StarletteHTTPException as exc:
        too_many = "too many" in str(exc.detail).lower()
        raise ApiError(413 if too_many else 400, "too_large" if too_many else "invalid_request",
                       str(exc.detail)) from None
    except Exception as exc:
        raise ApiError(400, "invalid_request", f"malformed multipart body ({type(exc).__name__})") from None


def _file_bytes(item: Any, limit: int) -> bytes:
    """Bytes of one uploaded part (file or plain field), 413 above `limit`."""
    if isinstance(item, str):
        data = item.encode("latin-1", errors="replace")
    else:
        item.file.seek(0)
        data = item.file.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "too_large", f"file exceeds the limit of {limit} bytes")
    return data


@serve.deployment(name="PneumoIngress", max_ongoing_requests=256)
@serve.ingress(api)
class PneumoIngress:
    """The HTTP API in front of `PneumoModel`."""

    def __init__(self, model: DeploymentHandle, args: dict[str, Any]):
        self.model = model
        self.args = ServeArgs.model_validate(args)
        self._api_key = _read_api_key(self.args.api_key_file)
        self._body_limit = self.args.max_upload_bytes + 64 * 1024  # multipart headers and boundary
        logger.info("pneumo ingress up; api key %s", "required" if self._api_key else "not required")

    # ---- helpers

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._api_key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong API key (send 'Authorization: Bearer <key>')")

    async def _score(self, data: bytes, explain: bool) -> dict[str, Any]:
        if not data:
            return {"error": {"status": 400, "kind": "empty", "message": "empty file (0 bytes)"}}
        return await self.model.predict.remote(data, explain)

    @staticmethod
    def _raise_if_error(result: dict[str, Any]) -> dict[str, Any]:
        err = result.get("error")
        if err:
            raise ApiError(err["status"], err["kind"], err["message"])
        return result

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

    @api.get("/readyz", summary="Readiness: a model is loaded and answers")
    async def readyz(self) -> JSONResponse:
        async def ask() -> bool:
            return await self.model.ready.remote()

        try:
            ok = await asyncio.wait_for(ask(), timeout=5)
        except Exception as exc:
            return _error_response(503, "not_ready", f"model not ready ({type(exc).__name__})")
        return JSONResponse({"status": "ready" if ok else "loading"}, status_code=200 if ok else 503)

    @api.get("/v1/model", summary="Metadata of the model being served")
    async def model_info(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        info = await self.model.describe.remote()
        info["limits"] = {"max_upload_bytes": self.args.max_upload_bytes,
                          "max_batch_files": self.args.max_batch_files,
                          "content_types": list(RAW_CONTENT_TYPES) + ["multipart/form-data"]}
        return info

    @api.post("/v1/predict", summary="Classify one X-ray (multipart 'file' or a raw image body)",
              openapi_extra=_PREDICT_BODY)
    async def predict(self, request: Request,
                      explain: bool = Query(False, description="add a Grad-CAM overlay PNG (base64)")) -> dict:
        t0 = time.perf_counter()
        self._authorize(request)
        media = _media_type(request)
        limit = self.args.max_upload_bytes
        if media == "multipart/form-data":
            form = await _form(request, await _read_body(request, self._body_limit), max_files=1)
            if "file" not in form:
                raise ApiError(422, "invalid_request", "multipart field 'file' is missing")
            data = _file_bytes(form["file"], limit)
        elif media in RAW_CONTENT_TYPES:
            data = await _read_body(request, limit)
        else:
            raise ApiError(415, "unsupported", f"content-type {media or '(none)'!r} is not accepted; send "
                           f"multipart/form-data with a 'file' field or one of {', '.join(RAW_CONTENT_TYPES)}")
        result = self._raise_if_error(await self._score(data, explain))
        result["latency_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return result

    @api.post("/v1/predict/batch", summary="Classify several X-rays (multipart 'files'); per-item errors",
              openapi_extra=_BATCH_BODY)
    async def predict_batch(self, request: Request,
                            explain: bool = Query(False, description="add Grad-CAM overlays")) -> dict:
        t0 = time.perf_counter()
        self._authorize(request)
        if _media_type(request) != "multipart/form-data":
            raise ApiError(415, "unsupported", "send multipart/form-data with one or more 'files' fields")
        n = self.args.max_batch_files
        body = await _read_body(request, n * self.args.max_upload_bytes + 64 * 1024)
        form = await _form(request, body, max_files=n)
        items = form.getlist("files")
        if not items:
            raise ApiError(422, "invalid_request", "multipart field 'files' is missing")
        if len(items) > n:
            raise ApiError(413, "too_large", f"{len(items)} files exceed the limit of {n} per request")

        async def one(item: Any) -> dict[str, Any]:
            try:
                data = _file_bytes(item, self.args.max_upload_bytes)
            except ApiError as exc:
                return {"error": {"status": exc.status, "kind": exc.kind, "message": exc.message}}
            return await self._score(data, explain)

        results = await asyncio.gather(*(one(i) for i in items))
        out = [{"index": i, **r} for i, r in enumerate(results)]
        return {"results": out, "count": len(out),
                "errors": sum(1 for r in out if "error" in r),
                "latency_ms": round((time.perf_counter() - t0) * 1000, 2)}


# ---------------------------------------------------------------- builder and CLI


def build_app(args: ServeArgs) -> serve.Application:
    """The typed application builder: `serve run serve_app.app:build_app bundle=PATH`."""
    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(args)
    if args.max_replicas < max(args.min_replicas, 1):
        raise ValueError(f"max_replicas={args.max_replicas} is below min_replicas={args.min_replicas}")
    model = PneumoModel.options(
        autoscaling_config={
            "min_replicas": args.min_replicas,
            "initial_replicas": max(args.min_replicas, 1),
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
            "upscale_delay_s": args.upscale_delay_s,
            "downscale_delay_s": args.downscale_delay_s,
        },
        max_ongoing_requests=max(64, 4 * args.max_batch_size),
        ray_actor_options={"num_cpus": args.model_num_cpus},
        user_config={"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s},
    ).bind(args.bundle, args.s3_endpoint, args.device, args.precision, args.channels_last, args.max_pixels)
    ingress = PneumoIngress.options(ray_actor_options={"num_cpus": args.ingress_num_cpus})
    return ingress.bind(model, args.model_dump())


@dataclass
class ServeConfig:
    """Serve a model bundle with Ray Serve on this machine (blocking; Ctrl-C stops)."""

    bundle: str = field(metadata={"positional": True, "help": "model bundle folder or s3:// prefix"})
    host: str = field(default="127.0.0.1", metadata={"help": "HTTP host (0.0.0.0 to listen on all interfaces)"})
    port: int = field(default=8000, metadata={"help": "HTTP port"})
    s3_endpoint: str | None = field(default=None, metadata={"help": "S3-compatible endpoint URL"})
    precision: str = field(default="auto", metadata={"choices": ["auto", "fp32", "bf16"]})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    api_key_file: str | None = field(default=None, metadata={"help": f"bearer token file (else env {API_KEY_ENV})"})
    max_upload_bytes: int = field(default=20 * 1024 * 1024, metadata={"help": "largest accepted image in bytes"})
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0
    num_cpus: int | None = field(default=None, metadata={"help": "CPUs for the local Ray (default: all)"})
    address: str | None = field(default=None, metadata={"help": "an existing Ray cluster (default: start a local one)"})


def serve_args(cfg: ServeConfig) -> ServeArgs:
    keys = set(ServeArgs.model_fields)
    return ServeArgs.model_validate({k: v for k, v in dataclasses.asdict(cfg).items() if k in keys})


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """`pneumo serve BUNDLE [--host --port --precision ...]`."""
    import ray

    from pneumo.config import parse_config

    cfg = parse_config(ServeConfig, argv, prog="pneumo serve")
    args = serve_args(cfg)
    if not ray.is_initialized():
        ray.init(address=cfg.address, num_cpus=cfg.num_cpus, include_dashboard=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    app = build_app(args)
    print(f"pneumo: serving {cfg.bundle} at http://{cfg.host}:{cfg.port}/ (API docs at /docs); Ctrl-C stops")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where a parent shell ignored it
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops Serve cleanly too
    try:
        serve.run(app, name="pneumo", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
