"""The Open Inference Protocol v2 (KServe v2, Triton's HTTP API) for pneumo: request parsing,
answers and metadata. Plain pydantic and numpy (no Ray, no torch); the routes are in
`pneumo.serve.v2_routes`.

One model, `MODEL_NAME`, version = the bundle's version. Inputs (exactly one per request):
- `image`: BYTES `[N]` (or `[N, 1]`), one encoded JPEG / PNG / DICOM per element, decoded with the
  bundle's own preprocessing; in the JSON form an element is the image's base64 (JSON carries
  only UTF-8 text), in the binary tensor data extension the raw bytes;
- `pixels`: UINT8 `[N, S, S]`, images already preprocessed (`pneumo.io.preprocess.load_image`).
Outputs: `probs` FP32 `[N, C]` (class order in the model metadata's `parameters.classes`),
`label` BYTES `[N]`, and `features` FP32 `[N, F]` when asked for. The binary tensor data extension
(`Inference-Header-Content-Length`, `binary_data_size`, `binary_data` / `binary_data_output`) is
read and written as tritonclient does by default. Errors are `{"error": "..."}`.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pneumo.serve.http_api import ApiError

__all__ = ["MODEL_NAME", "InferenceRequest", "InferenceResponse", "ModelMetadata", "ServerMetadata",
           "Parsed", "parse_infer", "encode_response", "model_metadata", "server_metadata", "HEADER_LENGTH"]

MODEL_NAME = "pneumo"
HEADER_LENGTH = "inference-header-content-length"
INPUTS = ("image", "pixels")
OUTPUTS = ("probs", "label", "features")
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "torch": "pytorch_libtorch"}


# ---------------------------------------------------------------- the documented shapes


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class RequestInput(_Model):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestOutput(_Model):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(_Model):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_Model):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(_Model):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(_Model):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(_Model):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] | None = None


class ServerMetadata(_Model):
    name: str
    version: str
    extensions: list[str]


class Live(_Model):
    live: bool


class Ready(_Model):
    ready: bool


class ModelReady(_Model):
    name: str
    ready: bool


class Error(BaseModel):
    error: str


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "pneumo", "version": version, "extensions": ["binary_tensor_data"]}


def model_metadata(predictor: Any, features: int) -> dict[str, Any]:
    size, classes = predictor.spec.size, list(predictor.classes)
    return {
        "name": MODEL_NAME, "versions": [predictor.manifest.version],
        "platform": PLATFORMS.get(predictor.engine, predictor.engine),
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                   {"name": "pixels", "datatype": "UINT8", "shape": [-1, size, size]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, len(classes)]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]},
                    {"name": "features", "datatype": "FP32", "shape": [-1, features]}],
        "parameters": {"classes": classes, "threshold": predictor.threshold, "model": predictor.manifest.model,
                       "engine": predictor.engine, "precision": predictor.precision,
                       "input": "exactly one of: image (BYTES [N], encoded JPEG/PNG/DICOM; base64 in JSON) "
                                f"or pixels (UINT8 [N, {size}, {size}], preprocessed)"},
    }


# ---------------------------------------------------------------- requests


@dataclass
class Parsed:
    """A checked infer request: encoded images (`images`) or preprocessed `pixels`, and the outputs."""

    request_id: str | None
    images: list[bytes] | None
    pixels: np.ndarray | None
    outputs: dict[str, bool]  # output name -> as binary data

    @property
    def count(self) -> int:
        return len(self.images) if self.images is not None else len(self.pixels)


def _bad(message: str, status: int = 400) -> ApiError:
    return ApiError(status, "too_large" if status == 413 else "invalid_request", message)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise _bad("Inference-Header-Content-Length is not a number") from None
    if not 0 < n <= len(body):
        raise _bad(f"Inference-Header-Content-Length {n} does not fit the body of {len(body)} bytes")
    return body[:n], body[n:]


def _request(header: bytes) -> InferenceRequest:
    try:
        doc = json.loads(header)
    except (ValueError, UnicodeDecodeError):
        raise _bad("the inference request is not JSON") from None
    try:
        return InferenceRequest.model_validate(doc)
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:3])
        raise _bad(f"not an inference request ({where})") from None


def _bytes_elements(raw: bytes, n: int, limit: int) -> list[bytes]:
    """BYTES tensor data in binary form: each element is a 4-byte little-endian length, then the bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise _bad("BYTES tensor data ends inside an element's length")
        (size,) = struct.unpack_from("<I", raw, at)
        if size > limit:
            raise _bad(f"element {len(out)} is {size} bytes, over the limit of {limit}", 413)
        if at + 4 + size > len(raw):
            raise _bad(f"element {len(out)} is cut short")
        out.append(raw[at + 4:at + 4 + size])
        at += 4 + size
    if len(out) != n:
        raise _bad(f"input 'image' has shape [{n}] but {len(out)} elements")
    return out


def _json_images(data: list[Any], n: int, limit: int) -> list[bytes]:
    flat = [x for row in data for x in (row if isinstance(row, list) else [row])]
    if len(flat) != n or not all(isinstance(x, str) for x in flat):
        raise _bad(f"input 'image' needs {n} base64 strings in 'data'")
    out = []
    for i, text in enumerate(flat):
        if len(text) > limit * 4 // 3 + 4:
            raise _bad(f"element {i} exceeds the limit of {limit} bytes", 413)
        try:
            out.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise _bad(f"element {i} of input 'image' is not base64 (JSON carries images as base64)") from None
    return out


def _count(tensor: RequestInput, dims: int | tuple[int, ...], max_items: int) -> int:
    shape = tensor.shape
    if len(shape) not in ((dims,) if isinstance(dims, int) else dims) or any(d < 0 for d in shape):
        raise _bad(f"input '{tensor.name}' has shape {shape}")
    if shape[0] < 1:
        raise _bad(f"input '{tensor.name}' has no images")
    if shape[0] > max_items:
        raise _bad(f"{shape[0]} images exceed the limit of {max_items} per request", 413)
    return shape[0]


def _pixels(tensor: RequestInput, raw: bytes | None, size: int, max_items: int) -> np.ndarray:
    n = _count(tensor, 3, max_items)
    if tensor.datatype != "UINT8" or tensor.shape[1:] != [size, size]:
        raise _bad(f"input 'pixels' must be UINT8 [N, {size}, {size}], got {tensor.datatype} {tensor.shape}")
    want = n * size * size
    if raw is not None:
        if len(raw) != want:
            raise _bad(f"input 'pixels' needs {want} bytes of binary data, got {len(raw)}")
        return np.frombuffer(raw, np.uint8).reshape(n, size, size).copy()
    try:
        arr = np.asarray(tensor.data)
    except ValueError:
        raise _bad("input 'pixels' data is ragged") from None
    if arr.size != want or arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() > 255)):
        raise _bad(f"input 'pixels' needs {want} integers in 0-255")
    return arr.astype(np.uint8).reshape(n, size, size)


def _outputs(req: InferenceRequest) -> dict[str, bool]:
    default = bool((req.parameters or {}).get("binary_data_output", False))
    if not req.outputs:
        return {"probs": default, "label": default}
    out = {}
    for o in req.outputs:
        if o.name not in OUTPUTS:
            raise _bad(f"unknown output '{o.name}'; outputs: {', '.join(OUTPUTS)}")
        out[o.name] = bool((o.parameters or {}).get("binary_data", default))
    return out


def parse_infer(body: bytes, header_length: str | None, size: int, max_items: int, item_limit: int) -> Parsed:
    """A checked request from the body (JSON, or JSON + binary tensors); 400 / 413 `ApiError` else."""
    header, rest = _split(body, header_length)
    req = _request(header)
    if len(req.inputs) != 1 or req.inputs[0].name not in INPUTS:
        names = [t.name for t in req.inputs]
        raise _bad(f"send exactly one input, 'image' (BYTES) or 'pixels' (UINT8); got {names}")
    (tensor,) = req.inputs
    raw = None
    binary = (tensor.parameters or {}).get("binary_data_size")
    if binary is not None:
        if not isinstance(binary, int) or binary < 0 or binary != len(rest):
            raise _bad(f"binary_data_size {binary!r} does not match the {len(rest)} bytes after the JSON")
        raw = rest
    elif rest:
        raise _bad("binary data after the JSON, but no input has binary_data_size")
    elif tensor.data is None:
        raise _bad(f"input '{tensor.name}' has neither 'data' nor binary_data_size")
    if tensor.name == "pixels":
        return Parsed(req.id, None, _pixels(tensor, raw, size, max_items), _outputs(req))
    n = _count(tensor, (1, 2), max_items)
    if tensor.datatype != "BYTES" or tensor.shape[1:] not in ([], [1]):
        raise _bad(f"input 'image' must be BYTES [N], got {tensor.datatype} {tensor.shape}")
    images = _bytes_elements(raw, n, item_limit) if raw is not None else _json_images(tensor.data, n, item_limit)
    return Parsed(req.id, images, None, _outputs(req))


# ---------------------------------------------------------------- answers


def _tensor(name: str, value: Any, binary: bool) -> tuple[dict[str, Any], bytes | None]:
    if name == "label":
        data = [str(v).encode() for v in value]
        meta = {"name": name, "datatype": "BYTES", "shape": [len(data)]}
        if not binary:
            return {**meta, "data": [d.decode() for d in data]}, None
        raw = b"".join(struct.pack("<I", len(d)) + d for d in data)
    else:
        arr = np.ascontiguousarray(value, dtype="<f4")
        meta = {"name": name, "datatype": "FP32", "shape": list(arr.shape)}
        if not binary:
            return {**meta, "data": [float(x) for x in arr.reshape(-1)]}, None
        raw = arr.tobytes()
    return {**meta, "parameters": {"binary_data_size": len(raw)}}, raw


def encode_response(parsed: Parsed, version: str, values: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of an infer answer; binary outputs after the JSON header, as tritonclient reads it."""
    outputs, blobs = [], []
    for name, binary in parsed.outputs.items():
        meta, raw = _tensor(name, values[name], binary)
        outputs.append(meta)
        if raw is not None:
            blobs.append(raw)
    doc: dict[str, Any] = {"model_name": MODEL_NAME, "model_version": version, "outputs": outputs}
    if parsed.request_id is not None:
        doc["id"] = parsed.request_id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream",
                                      "inference-header-content-length": str(len(header))}
