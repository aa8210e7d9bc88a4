"""The Open Inference Protocol v2 (`/v2`) over real HTTP with its reference client, and the whole
live OpenAPI (`/v1` and `/v2`) fuzzed by schemathesis.

- tritonclient's `InferenceServerClient` (the HTTP client Triton, KServe and Seldon users have):
  liveness, readiness, metadata, and `infer` with the binary tensor data extension on and off,
  with encoded images (BYTES) and preprocessed pixels (UINT8); every answer equals `/v1/predict`'s;
- `/v2` errors are `{"error": "..."}` with /v1's status codes; the API key applies to /v2 too;
- schemathesis generates requests from the live `/openapi.json` (bounded examples per operation)
  and fails on any 5xx, an undocumented status code or content type, or a body off its schema.

KServe's own `InferenceRESTClient` is not used: `kserve` would downgrade pandas (3 -> 2) and
protobuf (7 -> 6) in this environment. Serve runs the open and the API-key app (`served_v2`).
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from helpers import SERVE_API_KEY, SERVE_LIMITS, TINY_SPEC_KW, jpeg_bytes, png_bytes

tritonclient_http = pytest.importorskip("tritonclient.http")
schemathesis = pytest.importorskip("schemathesis")
oas_checks = pytest.importorskip("schemathesis.specs.openapi.checks")

SIZE = TINY_SPEC_KW["size"]
IMAGES = [png_bytes(1, size=(80, 96)), jpeg_bytes(2, size=(120, 100), rgb=True), png_bytes(3, size=(64, 64), level=200)]
BEARER = {"Authorization": f"Bearer {SERVE_API_KEY}"}


def _client(served, prefix: str = ""):  # noqa: ANN001, ANN202
    return tritonclient_http.InferenceServerClient(url=served.url.removeprefix("http://") + prefix,
                                                   network_timeout=60, connection_timeout=60)


def _v1(served, images: list[bytes]) -> list[dict]:  # noqa: ANN001
    with served.client() as c:
        out = [c.post("/v1/predict", content=b, headers={"content-type": "application/octet-stream"}) for b in images]
    assert all(r.status_code == 200 for r in out), [r.text for r in out]
    return [r.json() for r in out]


def _pixels(served, images: list[bytes]) -> np.ndarray:  # noqa: ANN001
    from pneumo.bundle.predict import Predictor
    from pneumo.io.preprocess import load_image

    spec = Predictor(str(served.root / "b1"), device="cpu").spec
    return np.stack([load_image(b, "", spec) for b in images])


def test_tritonclient_health_and_metadata(served_v2):
    client = _client(served_v2)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("pneumo") and not client.is_model_ready("nosuch")
    meta = client.get_model_metadata("pneumo")
    assert meta["name"] == "pneumo" and len(meta["versions"]) == 1
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
        "image": ("BYTES", [-1]), "pixels": ("UINT8", [-1, SIZE, SIZE])}
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]}
    assert outputs["probs"] == ("FP32", [-1, 2]) and outputs["label"] == ("BYTES", [-1])
    assert outputs["features"][0] == "FP32" and outputs["features"][1][1] > 0
    assert meta["parameters"]["classes"] == ["NORMAL", "PNEUMONIA"]
    version = meta["versions"][0]
    assert client.get_model_metadata("pneumo", model_version=version)["versions"] == [version]
    assert client.is_model_ready("pneumo", model_version=version)
    assert not client.is_model_ready("pneumo", model_version="0")
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]


def test_api_key_applies_to_v2(served_v2):
    client = _client(served_v2, "/secured")
    assert client.is_server_live() and client.is_server_ready()  # health stays open
    assert not client.is_model_ready("pneumo")
    with pytest.raises(Exception, match="API key"):
        client.get_model_metadata("pneumo")
    assert client.is_model_ready("pneumo", headers=BEARER)
    inp = tritonclient_http.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([IMAGES[0]], dtype=object))
    with pytest.raises(Exception, match="API key"):
        client.infer("pneumo", [inp])
    result = client.infer("pneumo", [inp], headers=BEARER)
    assert result.as_numpy("probs").shape == (1, 2)


def _infer(served, name: str, binary: bool, outputs: list[str] | None):  # noqa: ANN001, ANN202
    if name == "image":
        inp = tritonclient_http.InferInput("image", [len(IMAGES)], "BYTES")
        data = IMAGES if binary else [base64.b64encode(b) for b in IMAGES]  # JSON carries text: base64
        inp.set_data_from_numpy(np.array(data, dtype=object), binary_data=binary)
    else:
        pixels = _pixels(served, IMAGES)
        inp = tritonclient_http.InferInput("pixels", list(pixels.shape), "UINT8")
        inp.set_data_from_numpy(pixels, binary_data=binary)
    requested = None if outputs is None else [tritonclient_http.InferRequestedOutput(o, binary_data=binary)
                                              for o in outputs]
    return _client(served).infer("pneumo", [inp], outputs=requested)


@pytest.mark.parametrize("name", ["image", "pixels"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("outputs", [None, ["probs", "label", "features"]], ids=["default_outputs", "all_outputs"])
def test_tritonclient_infer_equals_v1(served_v2, name, binary, outputs):
    result = _infer(served_v2, name, binary, outputs)
    v1 = _v1(served_v2, IMAGES)
    probs = result.as_numpy("probs")
    assert probs.dtype == np.float32 and probs.shape == (len(IMAGES), 2)
    want = np.array([[r["probabilities"][c] for c in ("NORMAL", "PNEUMONIA")] for r in v1])
    np.testing.assert_allclose(probs, want, atol=2e-6)
    labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]  # str in JSON
    assert labels == [r["label"] for r in v1]
    response = result.get_response()
    assert response["model_name"] == "pneumo" and response["model_version"] == v1[0]["model"]["version"]
    features = result.as_numpy("features")
    if outputs is None:
        assert features is None
    else:
        assert features.shape[0] == len(IMAGES) and np.isfinite(features).all()
    binary_out = binary if outputs is not None else True  # tritonclient asks binary_data_output when no outputs
    assert all(("binary_data_size" in (o.get("parameters") or {})) == binary_out for o in response["outputs"])


def _json(name: str, shape: list[int], datatype: str, data: list) -> dict:
    return {"json": {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}}


B64 = base64.b64encode(IMAGES[0]).decode()
V2_ERRORS = {  # (path, request kwargs, status, substring of the error)
    "unknown_model": ("/v2/models/nosuch/infer", _json("image", [1], "BYTES", [B64]), 404, "no model"),
    "unknown_version": ("/v2/models/pneumo/versions/0/infer", _json("image", [1], "BYTES", [B64]), 404, "version"),
    "not_json": ("/v2/models/pneumo/infer", {"content": b"\x89PNG"}, 400, "not JSON"),
    "not_a_request": ("/v2/models/pneumo/infer", {"json": {"inputs": []}}, 400, "inputs"),
    "two_inputs": ("/v2/models/pneumo/infer", {"json": {"inputs": [
        {"name": "image", "shape": [1], "datatype": "BYTES", "data": [B64]},
        {"name": "pixels", "shape": [1, SIZE, SIZE], "datatype": "UINT8", "data": [0] * SIZE * SIZE}]}},
        400, "exactly one input"),
    "not_base64": ("/v2/models/pneumo/infer", _json("image", [1], "BYTES", ["%%%"]), 400, "base64"),
    "undecodable": ("/v2/models/pneumo/infer", _json("image", [2], "BYTES", [B64, base64.b64encode(
        b"\x89PNG\r\n\x1a\nbroken").decode()]), 400, "element 1"),
    "unsupported": ("/v2/models/pneumo/infer", _json("image", [1], "BYTES", [base64.b64encode(
        b"GIF89a" + bytes(64)).decode()]), 415, "element 0"),
    "too_many": ("/v2/models/pneumo/infer", _json("image", [SERVE_LIMITS["max_batch_files"] + 1], "BYTES",
                                                  [B64] * (SERVE_LIMITS["max_batch_files"] + 1)), 413, "limit"),
    "shape_mismatch": ("/v2/models/pneumo/infer", _json("image", [2], "BYTES", [B64]), 400, "base64 strings"),
    "pixels_wrong_size": ("/v2/models/pneumo/infer", _json("pixels", [1, 8, 8], "UINT8", [0] * 64), 400, "UINT8"),
    "pixels_out_of_range": ("/v2/models/pneumo/infer", _json("pixels", [1, SIZE, SIZE], "UINT8",
                                                             [300] * SIZE * SIZE), 400, "0-255"),
    "unknown_output": ("/v2/models/pneumo/infer", {"json": {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [B64]}],
        "outputs": [{"name": "logits"}]}}, 400, "unknown output"),
    "bad_header_length": ("/v2/models/pneumo/infer", {"content": b"{}", "headers": {
        "inference-header-content-length": "99"}}, 400, "Inference-Header-Content-Length"),
    "compressed": ("/v2/models/pneumo/infer", {"content": b"x", "headers": {"content-encoding": "gzip"}},
                   415, "compressed"),
    "no_key": ("/secured/v2/models/pneumo/infer", _json("image", [1], "BYTES", [B64]), 401, "API key"),
}


@pytest.mark.parametrize("case", list(V2_ERRORS))
def test_v2_errors_are_json_with_v1s_status_codes(served_v2, case):
    path, kwargs, status, needle = V2_ERRORS[case]
    with served_v2.client() as c:
        r = c.post(path, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and needle in body["error"], body


def test_v2_unknown_route_is_a_v2_error(served_v2):
    with served_v2.client() as c:
        r = c.get("/v2/models/pneumo/nothing")
        assert r.status_code == 404 and isinstance(r.json()["error"], str)
        r = c.get("/v1/nothing")  # /v1 keeps its own error shape
        assert r.status_code == 404 and r.json()["error"]["kind"] == "not_found"


# ---------------------------------------------------------------- the OpenAPI, fuzzed


def _documented_operations() -> list[tuple[str, str]]:
    """(method, path) of every documented operation, from the app's own OpenAPI (no Serve needed)."""
    from pneumo.serve.app import api

    return [(m.upper(), path) for path, ops in api.openapi()["paths"].items() for m in ops]


OPERATIONS = _documented_operations()
CHECKS = [schemathesis.checks.not_a_server_error, oas_checks.status_code_conformance,
          oas_checks.content_type_conformance, oas_checks.response_schema_conformance]
MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def live_schema(served_v2):  # noqa: ANN001, ANN201
    """The OpenAPI the running app serves (/openapi.json), as schemathesis loads it."""
    schema = schemathesis.openapi.from_url(served_v2.url + "/openapi.json")
    live = {(m.upper(), p) for p, ops in httpx.get(served_v2.url + "/openapi.json", timeout=60).json()["paths"].items()
            for m in ops}
    assert live == set(OPERATIONS) and {("POST", "/v1/predict"), ("POST", "/v2/models/{name}/infer")} <= live
    return schema


@pytest.mark.parametrize("method,path", OPERATIONS)
def test_openapi_fuzzed_no_5xx_and_answers_as_documented(live_schema, served_v2, method, path):
    """Hypothesis-generated requests for one operation (bounded examples): no 5xx, and every answer's
    status code, content type and body are the documented ones. (schemathesis's lazy pytest loader
    does not run on pytest 9, so its strategy is driven by hypothesis here.)"""
    from hypothesis import HealthCheck, Phase, given, settings

    operation = live_schema[path][method]
    codes: list[int] = []

    @given(case=operation.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def fuzz(case) -> None:  # noqa: ANN001
        codes.append(case.call_and_validate(base_url=served_v2.url, checks=CHECKS, timeout=60).status_code)

    fuzz()
    print(f"{method} {path}: {len(codes)} requests, codes {sorted(set(codes))}")
    assert codes and all(c < 500 for c in codes), codes
