"""HTTP plumbing of the Serve endpoint: JSON errors, body limits, multipart, the API key, metrics.

Kept apart from `pneumo.serve.app` (the deployment) so the model code and the request handling
read on their own. Everything here is plain FastAPI / Starlette:

- `ApiError(status, kind, message, retry_after_s=None)`: a client-visible error, answered as
  `{"error": {"status", "kind", "message"}}` (with `Retry-After` where given, e.g. 503 overload);
  `install(api)` registers the handlers for it, for 404/405 and for validation errors, plus a
  middleware that counts requests (Ray metrics) and turns any escaped exception into a JSON 500.
- `read_body(request, limit)` / `form(request, body, max_files)` / `file_bytes(item, limit)`: the
  body, refused (413) above a size by `Content-Length` and by the bytes actually read.
- `authorize(request, key)`: the bearer token (`pneumo.serve.config.read_api_key` reads it).

Errors under `/v2` (the Open Inference Protocol) are answered as `{"error": "<message>"}`, with the
same status codes and headers.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pneumo.serve.config import read_api_key

__all__ = ["ApiError", "error_response", "install", "authorize", "read_api_key", "read_body", "form",
           "file_bytes", "image_bytes", "batch_items", "is_v2", "RAW_CONTENT_TYPES", "KIND_STATUS"]

logger = logging.getLogger("ray.serve")

RAW_CONTENT_TYPES = ("image/jpeg", "image/png", "application/dicom", "application/octet-stream")
KIND_STATUS = {"empty": 400, "corrupt": 400, "unsupported": 415, "too_large": 413}
LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]
MULTIPART_OVERHEAD = 64 * 1024  # part headers and boundaries on top of the file bytes


def _openapi_body(field: str, many: bool, raw_types: tuple[str, ...] = ()) -> dict[str, Any]:
    """OpenAPI `requestBody` of a multipart upload (`field`, one file or many), or a raw image body."""
    binary = {"type": "string", "format": "binary"}
    schema = {"type": "object", "required": [field],
              "properties": {field: {"type": "array", "items": binary} if many else binary}}
    content = {"multipart/form-data": {"schema": schema}, **{ct: {"schema": binary} for ct in raw_types}}
    return {"requestBody": {"required": True, "content": content}}


PREDICT_BODY = _openapi_body("file", many=False, raw_types=RAW_CONTENT_TYPES)
BATCH_BODY = _openapi_body("files", many=True)


class ApiError(Exception):
    """A client error answered as {"error": {"status", "kind", "message"}}."""

    def __init__(self, status: int, kind: str, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.retry_after_s = status, kind, message, retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "kind": self.kind, "message": self.message}}


def is_v2(request: Request) -> bool:
    """Whether `request` is on the Open Inference Protocol routes (`/v2...` under the app's prefix)."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    rel = path[len(root):] if root and path.startswith(root) else path
    return rel == "/v2" or rel.startswith("/v2/")


def error_response(status: int, kind: str, message: str, headers: dict | None = None,
                   request: Request | None = None) -> JSONResponse:
    """A JSON error: `{"error": {"status", "kind", "message"}}`, or `{"error": message}` under /v2."""
    body: dict[str, Any] = ({"error": message} if request is not None and is_v2(request)
                            else {"error": {"status": status, "kind": kind, "message": message}})
    return JSONResponse(body, status_code=status, headers=headers)


def _headers(exc: ApiError) -> dict[str, str] | None:
    if exc.status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if exc.retry_after_s is not None:
        return {"Retry-After": str(max(1, round(exc.retry_after_s)))}
    return None


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


def install(api: FastAPI) -> FastAPI:
    """JSON error handlers and the metrics middleware on `api`."""

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.kind, exc.message, _headers(exc), request)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, kind, str(exc.detail), request=request)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in exc.errors())
        return error_response(422, "invalid_request", f"invalid or missing: {fields}", request=request)

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
            return error_response(500, "internal", "internal error", request=request)
        finally:
            route = request.scope.get("route")
            tags = {"endpoint": getattr(route, "path", None) or "unmatched", "status_code": str(status)}
            try:
                m = _metrics()
                m["requests"].inc(1.0, tags)
                m["latency"].observe((time.perf_counter() - t0) * 1000, tags)
            except Exception:  # metrics must never fail a request
                pass

    return api


# ---------------------------------------------------------------- API key


def authorize(request: Request, api_key: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <api_key>` (no key configured: open)."""
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong API key (send 'Authorization: Bearer <key>')")


# ---------------------------------------------------------------- bodies


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) a declared or actual size above `limit` before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise ApiError(400, "invalid_request", "Content-Length is not a number") from None
        if too_big:
            raise ApiError(413, "too_large", f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def form(request: Request, body: bytes, max_files: int) -> Any:
    """Parse a multipart body already read (and size-checked) by `read_body`."""
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


def file_bytes(item: Any, limit: int) -> bytes:
    """Bytes of one uploaded part (file or plain field), 413 above `limit`."""
    if isinstance(item, str):
        data = item.encode("latin-1", errors="replace")
    else:
        item.file.seek(0)
        data = item.file.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "too_large", f"file exceeds the limit of {limit} bytes")
    return data


async def image_bytes(request: Request, limit: int) -> bytes:
    """The one image of a /v1/predict request: multipart field `file`, or a raw body of an accepted type."""
    media = media_type(request)
    if media == "multipart/form-data":
        parts = await form(request, await read_body(request, limit + MULTIPART_OVERHEAD), max_files=1)
        if "file" not in parts:
            raise ApiError(422, "invalid_request", "multipart field 'file' is missing")
        return file_bytes(parts["file"], limit)
    if media in RAW_CONTENT_TYPES:
        return await read_body(request, limit)
    raise ApiError(415, "unsupported", f"content-type {media or '(none)'!r} is not accepted; send "
                   f"multipart/form-data with a 'file' field or one of {', '.join(RAW_CONTENT_TYPES)}")


async def batch_items(request: Request, limit: int, max_files: int) -> list[Any]:
    """The parts of a /v1/predict/batch request (multipart `files`), at most `max_files`."""
    if media_type(request) != "multipart/form-data":
        raise ApiError(415, "unsupported", "send multipart/form-data with one or more 'files' fields")
    body = await read_body(request, max_files * limit + MULTIPART_OVERHEAD)
    items = (await form(request, body, max_files=max_files)).getlist("files")
    if not items:
        raise ApiError(422, "invalid_request", "multipart field 'files' is missing")
    if len(items) > max_files:
        raise ApiError(413, "too_large", f"{len(items)} files exceed the limit of {max_files} per request")
    return items
