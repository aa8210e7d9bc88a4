"""The FastAPI app of the endpoint (one object, shared by the /v1 routes in `pneumo.serve.app` and
the /v2 routes in `pneumo.serve.v2_routes`), with its JSON error handlers, metrics middleware and
the documented error answers of each route (`errors(...)`)."""

from __future__ import annotations

from typing import Any

from fastapi_offline import FastAPIOffline
from pydantic import BaseModel

from pneumo import __version__
from pneumo.serve import http_api as H

__all__ = ["api", "errors", "ERROR_TEXT"]

ERROR_TEXT = {
    400: "undecodable or malformed input", 401: "missing or wrong API key", 404: "no such model or version",
    408: "the request body did not arrive within request_timeout_s", 413: "too large (bytes, files or pixels)",
    415: "unsupported image or content type", 422: "a required field is missing or invalid",
    500: "the model failed on this image", 503: "overloaded or not ready (see Retry-After)",
}


class _ErrorDetail(BaseModel):
    status: int
    kind: str
    message: str


class ErrorV1(BaseModel):
    error: _ErrorDetail


class ErrorV2(BaseModel):
    error: str


def errors(*codes: int, v2: bool = False) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route: the error answers it can give, with their JSON shape."""
    model = ErrorV2 if v2 else ErrorV1
    return {code: {"model": model, "description": ERROR_TEXT[code]} for code in codes}


# FastAPIOffline: Swagger UI and ReDoc's JS/CSS come from the fastapi-offline package, not a CDN,
# so /docs renders on a hospital network without internet
api = H.install(FastAPIOffline(
    title="pneumo",
    version=__version__,
    description=("Pneumonia classification of chest X-rays (JPEG, PNG, DICOM). Not a medical device. "
                 "/v1: pneumo's own API; /v2: the Open Inference Protocol (KServe v2 / Triton HTTP)."),
    docs_url="/docs",
    redoc_url="/redoc",
    favicon_url="favicon.ico",
))
