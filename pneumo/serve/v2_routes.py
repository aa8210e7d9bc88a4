"""The Open Inference Protocol routes (`/v2/...`) of `PneumoService`: a mixin whose methods Serve
turns into routes of the same replica, sharing its Predictor, batches, limits and API key.
The protocol itself (parsing, answers, metadata) is `pneumo.serve.v2`."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import Path, Request
from fastapi.responses import Response

from pneumo import __version__
from pneumo.serve import http_api as H
from pneumo.serve import v2
from pneumo.serve.api import api, errors
from pneumo.serve.config import RETRY_AFTER_S

__all__ = ["OpenInference", "install_openapi"]

INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "binary tensor data extension: the JSON request "
                                                "(Inference-Header-Content-Length bytes), then the tensors"}}}}
INFER_OK = {200: {"model": v2.InferenceResponse, "description": "JSON, or with binary outputs: "
                  "application/octet-stream, the JSON answer (Inference-Header-Content-Length bytes) then the tensors",
                  "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
INFER_ERRORS = errors(400, 401, 404, 408, 413, 415, 422, 500, 503, v2=True)
NAME = Path(description="the model's name: pneumo", examples=["pneumo"], openapi_examples={"pneumo": {"value": "pneumo"}})


def install_openapi(app: Any) -> None:
    """Put the InferenceRequest schema (raw body, parsed by hand for the binary extension) into
    the OpenAPI components, where the infer routes' requestBody points."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = base()
        schema = v2.InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        components.update(schema.pop("$defs", {}))
        components["InferenceRequest"] = schema
        app.openapi_schema = doc
        return doc

    app.openapi = openapi


class OpenInference:
    """/v2 routes; `self` is the PneumoService replica (its `_loaded`, `_probe`, `_api_key`, ...)."""

    def _v2_model(self, request: Request, name: str, version: str | None) -> Any:
        H.authorize(request, self._api_key)
        loaded = self._loaded
        current = loaded.predictor.manifest.version
        if name != v2.MODEL_NAME:
            raise H.ApiError(404, "not_found", f"no model {name!r}; this server has {v2.MODEL_NAME!r}")
        if version is not None and version != current:
            raise H.ApiError(404, "not_found", f"model {name!r} has no version {version!r} (serving {current!r})")
        return loaded

    @api.get("/v2/health/live", summary="v2 liveness", response_model=v2.Live)
    def v2_live(self) -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready", summary="v2 readiness: the model scores a probe image", response_model=v2.Ready,
             responses=errors(503, v2=True))
    async def v2_ready(self) -> dict[str, bool]:
        error = await self._probe.check(self._loaded.predictor)
        if error:
            raise H.ApiError(503, "not_ready", error, retry_after_s=RETRY_AFTER_S)
        return {"ready": True}

    @api.get("/v2", summary="v2 server metadata", response_model=v2.ServerMetadata, responses=errors(401, v2=True))
    def v2_server(self, request: Request) -> dict[str, Any]:
        H.authorize(request, self._api_key)
        return v2.server_metadata(__version__)

    async def _metadata(self, request: Request, name: str, version: str | None) -> dict[str, Any]:
        loaded = self._v2_model(request, name, version)
        return v2.model_metadata(loaded.predictor, loaded.features)

    @api.get("/v2/models/{name}", summary="v2 model metadata", response_model=v2.ModelMetadata,
             responses=errors(401, 404, v2=True))
    async def v2_model(self, request: Request, name: str = NAME) -> dict[str, Any]:
        return await self._metadata(request, name, None)

    @api.get("/v2/models/{name}/versions/{version}", summary="v2 model metadata (one version)",
             response_model=v2.ModelMetadata, responses=errors(401, 404, v2=True))
    async def v2_model_version(self, request: Request, name: str = NAME, version: str = Path()) -> dict[str, Any]:
        return await self._metadata(request, name, version)

    async def _ready(self, request: Request, name: str, version: str | None) -> dict[str, Any]:
        loaded = self._v2_model(request, name, version)
        error = await self._probe.check(loaded.predictor)
        if error:
            raise H.ApiError(503, "not_ready", error, retry_after_s=RETRY_AFTER_S)
        return {"name": name, "ready": True}

    @api.get("/v2/models/{name}/ready", summary="v2 model readiness", response_model=v2.ModelReady,
             responses=errors(401, 404, 503, v2=True))
    async def v2_model_ready(self, request: Request, name: str = NAME) -> dict[str, Any]:
        return await self._ready(request, name, None)

    @api.get("/v2/models/{name}/versions/{version}/ready", summary="v2 model readiness (one version)",
             response_model=v2.ModelReady, responses=errors(401, 404, 503, v2=True))
    async def v2_model_version_ready(self, request: Request, name: str = NAME, version: str = Path()) -> dict[str, Any]:
        return await self._ready(request, name, version)

    @api.post("/v2/models/{name}/infer", summary="v2 inference: encoded images (BYTES) or pixels (UINT8)",
              openapi_extra=INFER_BODY, responses={**INFER_OK, **INFER_ERRORS}, response_class=Response)
    async def v2_infer(self, request: Request, name: str = NAME) -> Response:
        return await self._infer(request, name, None)

    @api.post("/v2/models/{name}/versions/{version}/infer", summary="v2 inference (one version)",
              openapi_extra=INFER_BODY, responses={**INFER_OK, **INFER_ERRORS}, response_class=Response)
    async def v2_infer_version(self, request: Request, name: str = NAME, version: str = Path()) -> Response:
        return await self._infer(request, name, version)

    async def _infer(self, request: Request, name: str, version: str | None) -> Response:
        loaded = self._v2_model(request, name, version)
        p, args = loaded.predictor, self.args
        if request.headers.get("content-encoding", "identity").lower() not in ("identity", ""):
            raise H.ApiError(415, "unsupported", "compressed request bodies are not accepted")

        held = [self._admit(1)]  # before the body is read; the other images once it is

        async def work(progress: dict[str, bool]) -> Response:
            limit = args.max_batch_files * (args.max_upload_bytes + 8) + H.MULTIPART_OVERHEAD
            body = await H.read_body(request, limit)
            progress["reading"] = False
            parsed = await self._pools["decode"].run(
                v2.parse_infer, body, request.headers.get(v2.HEADER_LENGTH), p.spec.size,
                args.max_batch_files, args.max_upload_bytes)
            del body
            held[0] += self._admit(parsed.count - 1)
            if parsed.images is not None:
                images = await asyncio.gather(*(self._image(data, p, f"element {i}: ")
                                                for i, data in enumerate(parsed.images)))
            else:
                images = list(parsed.pixels)
            scored = await asyncio.gather(*(self._score(image, loaded) for image in images))
            probs = np.stack([s[0] for s in scored])
            values = {"probs": probs, "label": p.labels(probs), "features": np.stack([s[1] for s in scored])}
            content, headers = v2.encode_response(parsed, p.manifest.version, values)
            return Response(content, headers=headers, media_type=headers["content-type"])

        try:
            return await self._within(work)
        finally:
            self._admission.done(held[0])
