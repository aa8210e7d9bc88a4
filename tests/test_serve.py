"""The Ray Serve endpoint over real HTTP: API contract, every error code, API key, batch endpoint,
a live reconfigure (new bundle + batch settings) under load, Prometheus metrics, and the upload
page in real headless Chromium.

Serve starts once for this module on a free port, from `serve_app/config.yaml` through the same
call `serve run serve_app/config.yaml` makes (`deploy_apps` with the file's ServeDeploySchema),
with two applications: `pneumo` at `/` and `secured` (API key required) at `/secured`. Bundles
are tiny random-weight seed_cnn models. Serve is shut down at module teardown.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from helpers import (
    SERVE_API_KEY,
    SERVE_LIMITS,
    SLOW_TIMEOUT_S,
    TINY_SPEC_KW,
    Load,
    deploy,
    deploy_config,
    dicom_bytes,
    jpeg_bytes,
    png_bytes,
    wait_for,
)
from PIL import Image

SPEC_KW = TINY_SPEC_KW
MAX_UPLOAD = SERVE_LIMITS["max_upload_bytes"]
API_KEY = SERVE_API_KEY
CHROMIUM = "/usr/bin/chromium"
DRIFT_WINDOW = SERVE_LIMITS["drift_window"]  # drift.MIN_IMAGES: statistics after 20 served images


def _png(h: int = 96, w: int = 80, seed: int = 0) -> bytes:
    return png_bytes(seed, size=(w, h))


def _jpeg(seed: int = 1) -> bytes:
    return jpeg_bytes(seed, size=(100, 120), rgb=True)


def _dicom() -> bytes:
    return dicom_bytes((np.random.default_rng(2).random((70, 60)) * 4095).astype(np.uint16))


def _bomb() -> bytes:
    """A tiny PNG that decodes to 3000 x 3000 = 9 M pixels (> the app's max_pixels)."""
    buf = io.BytesIO()
    Image.new("L", (3000, 3000), 0).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _assert_error(r: httpx.Response, status: int, kind: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["status"] == status and err["message"]
    if kind:
        assert err["kind"] == kind, err
    return err


# ---------------------------------------------------------------- contract


def test_health_ready_and_openapi(served):
    with served.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json() == {"status": "ready"}
        paths = c.get("/openapi.json").json()["paths"]
        assert {"/v1/predict", "/v1/predict/batch", "/v1/model", "/healthz", "/readyz"} <= set(paths)
        body = paths["/v1/predict"]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "image/jpeg", "image/png", "application/dicom"} <= set(body)
        assert c.get("/docs").status_code == 200
        doc = c.get("/openapi.json").json()
    # every $ref resolves in the live document (ReDoc refuses to render one that does not)
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert refs and refs <= set(doc["components"]["schemas"]), refs - set(doc["components"]["schemas"])


def test_predict_contract_matches_predictor(served):
    """The answer's shape, and its numbers equal the Predictor's on the same preprocessing."""
    from pneumo.bundle.predict import Predictor
    from pneumo.io.preprocess import load_image

    png = _png()
    with served.client() as c:
        r = c.post("/v1/predict", files={"file": ("patient_name.png", png, "image/png")})
    assert r.status_code == 200, r.text
    d = r.json()
    assert set(d) >= {"label", "probability", "probabilities", "threshold", "model", "latency_ms"}
    assert d["model"] == {"name": "seed_cnn", "version": served.sha1[:12], "sha256": served.sha1, "uri": None}  # uri: models:/ only
    assert set(d["probabilities"]) == {"NORMAL", "PNEUMONIA"}
    assert abs(sum(d["probabilities"].values()) - 1) < 1e-4
    assert d["threshold"] == 0.5 and d["latency_ms"] > 0
    with served.client() as c:  # the replica's own engine choice (auto: its threads, its micro-benchmark)
        model = c.get("/v1/model").json()
    assert (d["engine"], d["precision"]) == (model["engine"], model["precision"])
    p = Predictor(str(served.root / "b1"), device="cpu", engine=d["engine"], precision=d["precision"])
    probs = p.predict(load_image(png, "", p.spec)[None])
    assert d["probability"] == pytest.approx(float(p.positive_probability(probs)[0]), abs=1e-4)
    assert d["label"] == p.labels(probs)[0]
    assert "explanation" not in d


ENGINE_ANSWERS = {  # where an answer says which engine and precision scored it
    "predict": lambda c: c.post("/v1/predict", content=_png(), headers={"content-type": "image/png"}).json(),
    "batch_item": lambda c: c.post("/v1/predict/batch",
                                   files=[("files", ("a.png", _png(), "image/png"))]).json()["results"][0],
    "model": lambda c: c.get("/v1/model").json(),
}


@pytest.mark.parametrize("where", list(ENGINE_ANSWERS))
def test_answers_name_engine_and_precision(served, where):
    from pneumo.precision import ENGINES, PRECISIONS

    with served.client() as c:
        d = ENGINE_ANSWERS[where](c)
    assert d["engine"] in ENGINES and d["engine"] != "auto", d
    assert d["precision"] in PRECISIONS and d["precision"] != "auto", d


@pytest.mark.parametrize("kind", ["image/jpeg", "image/png", "application/dicom", "application/octet-stream"])
def test_predict_raw_body_each_content_type(served, kind):
    data = {"image/jpeg": _jpeg(), "image/png": _png(), "application/dicom": _dicom(),
            "application/octet-stream": _png(seed=5)}[kind]
    with served.client() as c:
        r = c.post("/v1/predict", content=data, headers={"content-type": kind})
    assert r.status_code == 200, r.text
    assert r.json()["label"] in ("NORMAL", "PNEUMONIA")


def test_explain_adds_gradcam_png(served):
    with served.client() as c:
        r = c.post("/v1/predict", params={"explain": "true"}, content=_png(), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    png = base64.b64decode(r.json()["explanation"]["overlay_png_base64"])
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (SPEC_KW["size"], SPEC_KW["size"])


def test_model_info(served):
    with served.client() as c:
        d = c.get("/v1/model").json()
    assert d["model"] == "seed_cnn" and d["bundle_sha256"] == served.sha1
    assert d["classes"] == ["NORMAL", "PNEUMONIA"] and d["input"]["size"] == SPEC_KW["size"]
    assert d["limits"]["max_upload_bytes"] == MAX_UPLOAD
    assert d["batching"]["max_batch_size"] >= 1


def test_drift_summary_in_model_info(served):
    """b1 has a drift reference: after DRIFT_WINDOW served images the window has statistics."""
    with served.client() as c:
        for i in range(DRIFT_WINDOW):
            assert c.post("/v1/predict", content=_png(seed=100 + i), headers={"content-type": "image/png"}
                          ).status_code == 200
        drift = c.get("/v1/model").json()["drift"]
    assert drift["window"] >= DRIFT_WINDOW and drift["status"] in ("ok", "drift"), drift
    assert set(drift["gauges"]) >= {"drift_shift", "drift_window_images", "drift_positive_rate",
                                    "drift_ks_p_value", "drift_mmd_p_value"}
    assert isinstance(drift["line"], str) and isinstance(drift["tests"], dict)


# ---------------------------------------------------------------- errors


def _chunks(data: bytes, n: int = 65536):
    for i in range(0, len(data), n):
        yield data[i : i + n]


ERROR_CASES = {
    "empty": (dict(content=b"", headers={"content-type": "image/png"}), 400, "empty"),
    "corrupt": (dict(content=_png()[:60], headers={"content-type": "image/png"}), 400, "corrupt"),
    "unsupported_bytes": (dict(content=b"GIF89a" + b"\0" * 64, headers={"content-type": "application/octet-stream"}),
                          415, "unsupported"),
    "unsupported_type": (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "unsupported"),
    "no_type": (dict(content=_png()), 415, "unsupported"),
    "missing_field": (dict(files={"image": ("x.png", _png(), "image/png")}), 422, "invalid_request"),
    "too_large_declared": (dict(content=b"\xff\xd8\xff" + b"\0" * MAX_UPLOAD, headers={"content-type": "image/jpeg"}),
                           413, "too_large"),
    "too_large_multipart": (dict(files={"file": ("x.jpg", b"\xff\xd8\xff" + b"\0" * MAX_UPLOAD, "image/jpeg")}),
                            413, "too_large"),
    "decompression_bomb": (dict(content=_bomb(), headers={"content-type": "image/png"}), 413, "too_large"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_gets_clear_4xx(served, case):
    kwargs, status, kind = ERROR_CASES[case]
    with served.client() as c:
        _assert_error(c.post("/v1/predict", **kwargs), status, kind)


def test_too_large_without_content_length(served):
    """A chunked body (no Content-Length) is cut off at the limit too."""
    big = b"\xff\xd8\xff" + b"\0" * (2 * MAX_UPLOAD)
    with served.client() as c:
        r = c.post("/v1/predict", content=_chunks(big), headers={"content-type": "image/jpeg"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    _assert_error(r, 413, "too_large")


def test_unknown_route_and_method(served):
    with served.client() as c:
        _assert_error(c.get("/v1/nothing"), 404)
        _assert_error(c.get("/v1/predict"), 405)


# ---------------------------------------------------------------- batch endpoint


def test_batch_endpoint_per_item_errors(served):
    files = [("files", ("a.png", _png(seed=1), "image/png")), ("files", ("b.jpg", b"not an image", "image/jpeg")),
             ("files", ("c.jpg", _jpeg(), "image/jpeg")), ("files", ("d.png", b"", "image/png"))]
    with served.client() as c:
        r = c.post("/v1/predict/batch", files=files)
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["count"] == 4 and d["errors"] == 2
        res = d["results"]
        assert [x["index"] for x in res] == [0, 1, 2, 3]
        assert res[0]["label"] in ("NORMAL", "PNEUMONIA") and res[2]["model"]["sha256"] == served.sha1
        assert res[1]["error"]["kind"] == "unsupported" and res[1]["error"]["status"] == 415
        assert res[3]["error"]["kind"] == "empty"
        # the batch answer agrees with the single endpoint
        single = c.post("/v1/predict", content=_png(seed=1), headers={"content-type": "image/png"}).json()
        assert single["probability"] == pytest.approx(res[0]["probability"], abs=1e-5)
        _assert_error(c.post("/v1/predict/batch", files={"file": ("a.png", _png(), "image/png")}), 422)
        too_many = [("files", (f"{i}.png", _png(seed=i), "image/png")) for i in range(5)]
        _assert_error(c.post("/v1/predict/batch", files=too_many), 413, "too_large")
        _assert_error(c.post("/v1/predict/batch", content=_png(), headers={"content-type": "image/png"}), 415)


# ---------------------------------------------------------------- API key


def test_api_key(served):
    png = _png()
    with served.client() as c:
        assert c.get("/secured/healthz").status_code == 200  # health stays open
        assert c.get("/secured/readyz").status_code == 200
        assert c.get("/secured/").status_code == 200  # the page itself; its requests carry the key
        r = c.post("/secured/v1/predict", content=png, headers={"content-type": "image/png"})
        _assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        bad = {"content-type": "image/png", "authorization": "Bearer wrong"}
        _assert_error(c.post("/secured/v1/predict", content=png, headers=bad), 401)
        _assert_error(c.get("/secured/v1/model", headers={"authorization": f"Basic {API_KEY}"}), 401)
        ok = {"content-type": "image/png", "authorization": f"Bearer {API_KEY}"}
        r = c.post("/secured/v1/predict", content=png, headers=ok)
        assert r.status_code == 200 and r.json()["label"] in ("NORMAL", "PNEUMONIA")
        # the open app answers without a key
        assert c.post("/v1/predict", content=png, headers={"content-type": "image/png"}).status_code == 200


# ---------------------------------------------------------------- metrics


def test_prometheus_metrics_by_status(served, ray_local):
    """Ray exports our request counter and latency histogram, tagged by status code."""
    node = ray_local._private.worker.global_worker.node
    port = getattr(node, "metrics_export_port", None)
    if not port:
        pytest.skip("this Ray node exports no metrics port")
    with served.client() as c:
        for _ in range(3):
            c.post("/v1/predict", content=b"", headers={"content-type": "image/png"})
            c.get("/healthz")
    def ours(text: str) -> list[str]:
        return [ln for ln in text.splitlines()
                if ln.startswith("ray_pneumo_http_requests") or ln.startswith("pneumo_http_requests")]

    def complete(text: str) -> bool:  # exactly what is asserted below: metrics export lags the requests
        lines = ours(text)
        return (any('status_code="400"' in ln and 'endpoint="/v1/predict"' in ln for ln in lines)
                and any('status_code="200"' in ln and 'endpoint="/healthz"' in ln for ln in lines)
                and "pneumo_http_latency_ms_bucket" in text and "pneumo_drift_shift" in text)

    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.HTTPError:
            text = ""
        if complete(text):
            break
        time.sleep(2)
    lines = ours(text)
    assert any('status_code="400"' in ln and 'endpoint="/v1/predict"' in ln for ln in lines), lines[:10]
    assert any('status_code="200"' in ln and 'endpoint="/healthz"' in ln for ln in lines), lines[:10]
    assert "pneumo_http_latency_ms_bucket" in text
    assert "pneumo_drift_shift" in text and "pneumo_drift_window_images" in text  # set at load


# ---------------------------------------------------------------- reconfigure under load


def test_reconfigure_new_bundle_and_batching_under_load(served):
    """`serve deploy` with a new user_config (bundle + batch settings): no request fails.

    Synchronised on answer counts, not sleeps: the swap starts after `before` answers from the
    old model, and the load stops after `after` answers from the new one."""
    before, after, deadline_s = 20, 20, 120
    with Load(served, "/v1/predict", _png(seed=7)) as load:
        load.wait(lambda: load.count(served.sha1) >= before, deadline_s, "answers from the old model")
        new_user_config = {"max_batch_size": 4, "batch_wait_timeout_s": 0.02, "bundle": str(served.root / "b2")}
        deploy(deploy_config(str(served.root / "b1"), served.key_file, user_config=new_user_config, apps=served.apps))
        load.wait(lambda: load.count(served.sha2) >= after, deadline_s, "answers from the new model")
    assert load.failures == [], load.failures[:5]
    assert load.count(served.sha1) >= before and load.count(served.sha2) >= after, load.seen
    with served.client() as c:
        info = c.get("/v1/model").json()
    assert info["bundle_sha256"] == served.sha2 and info["drift"] is None  # b2 has no drift reference
    assert info["batching"] == {"max_batch_size": 4, "batch_wait_timeout_s": 0.02}
    assert info["update"]["status"] == "ok"


def _metrics_text(ray_local) -> str | None:  # noqa: ANN001
    node = ray_local._private.worker.global_worker.node
    port = getattr(node, "metrics_export_port", None)
    if not port:
        return None
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return ""


def test_reconfigure_to_a_corrupt_bundle_keeps_the_old_model(served, ray_local, tmp_path):
    """A live update to a bundle that fails its hash check, under load: 0 failed requests, the old
    model answers throughout, the failure is in /v1/model and in a Prometheus counter, /readyz stays 200."""
    corrupt = tmp_path / "corrupt"
    shutil.copytree(served.root / "b2", corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # same size, wrong sha256
    with served.client() as c:
        serving = c.get("/v1/model").json()["bundle_sha256"]
    with Load(served, "/v1/predict", _png(seed=8)) as load:
        load.wait(lambda: load.count(serving) >= 10, 120, "answers before the update")
        deploy(deploy_config(str(served.root / "b1"), served.key_file, apps=served.apps,
                             user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.01, "bundle": str(corrupt)}))
        with served.client() as c:
            info = wait_for(lambda: (d := c.get("/v1/model").json())["update"] and d["update"]["status"] == "failed"
                            and d, 120, "the failed update in /v1/model")
        at_failure = load.count(serving)
        load.wait(lambda: load.count(serving) >= at_failure + 20, 120, "answers after the failed update")
    assert load.failures == [] and set(load.seen) == {serving}, (load.failures[:5], load.seen)
    assert info["bundle_sha256"] == serving and info["update"]["bundle"].endswith("corrupt")
    assert "sha256" in info["update"]["error"] or "hash" in info["update"]["error"].lower(), info["update"]
    with served.client() as c:
        assert c.get("/readyz").json() == {"status": "ready"}
    if _metrics_text(ray_local) is None:
        pytest.skip("this Ray node exports no metrics port")
    text = wait_for(lambda: (t := _metrics_text(ray_local)) and "pneumo_model_update_failures" in t and t, 60,
                    "the update-failure counter on the metrics endpoint", 2)
    assert any(ln.startswith(("ray_pneumo_model_update_failures", "pneumo_model_update_failures"))
               and not ln.rstrip().endswith(" 0.0") for ln in text.splitlines()), text[:500]


# ---------------------------------------------------------------- overload


def test_flood_gets_503_with_retry_after_never_500(served):
    """`tight` admits 1 request and queues TIGHT_QUEUE: 40 concurrent slow requests (Grad-CAM on a
    large image) get 200 or an immediate 503 with Retry-After; no 500, bounded latency."""
    n = 40
    big = io.BytesIO()
    Image.fromarray((np.arange(1500 * 1200) % 251).astype(np.uint8).reshape(1500, 1200)).save(big, format="PNG")
    body = big.getvalue()
    assert len(body) < MAX_UPLOAD
    start = threading.Barrier(n)
    results: list[tuple[int, float, dict]] = []
    lock = threading.Lock()

    def one() -> None:
        with served.client() as c:
            start.wait()
            t0 = time.perf_counter()
            try:
                r = c.post("/tight/v1/predict", params={"explain": "true"}, content=body,
                           headers={"content-type": "image/png"})
                out = (r.status_code, time.perf_counter() - t0, dict(r.headers))
            except Exception as exc:  # noqa: BLE001
                out = (-1, time.perf_counter() - t0, {"exception": repr(exc)})
            with lock:
                results.append(out)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    wall = time.perf_counter() - t0
    codes = sorted(r[0] for r in results)
    assert len(results) == n and set(codes) <= {200, 503}, codes
    rejected = [r for r in results if r[0] == 503]
    print(f"flood: {codes.count(200)} x 200, {len(rejected)} x 503 in {wall:.1f} s; slowest 503 "
          f"{max((s for _, s, _ in rejected), default=0):.2f} s, slowest 200 "
          f"{max((s for c, s, _ in results if c == 200), default=0):.2f} s")
    assert codes.count(200) >= 1 and len(rejected) >= n // 2, codes
    assert all(int(h["retry-after"]) >= 1 for _, _, h in rejected), rejected[:3]
    assert max(s for _, s, _ in rejected) < 10, sorted(s for _, s, _ in rejected)[-5:]  # refused, not held
    assert wall < 60, wall
    with served.client() as c:  # and it still answers afterwards
        assert c.get("/tight/readyz").status_code == 200


def test_request_timeout_is_503_with_retry_after(served):
    with served.client() as c:
        r = c.post("/slow/v1/predict", params={"explain": "true"}, content=_png(300, 250),
                   headers={"content-type": "image/png"})
        _assert_error(r, 503, "overloaded")
        assert int(r.headers["retry-after"]) >= 1
        assert c.get("/slow/readyz").status_code == 200  # slow is not broken: it still scores


def test_the_deadline_covers_the_body_read(served):
    """A client that sends half its body and stalls gets 408 at the app's deadline (not never)."""
    import socket

    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /slow/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 100000\r\n\r\n" + _png()[:1000])
        t0 = time.perf_counter()
        head = sock.recv(4096)
        waited = time.perf_counter() - t0
    assert head.startswith(b"HTTP/1.1 408"), head[:200]
    assert waited < SLOW_TIMEOUT_S + 20, waited  # the deadline, not the proxy's 60 s or the client's


def test_the_timeout_header_cannot_switch_the_deadline_off(served):
    """`x-request-timeout-seconds: 0` turns off only the proxy's backstop: the app's deadline holds."""
    with served.client() as c:
        r = c.post("/slow/v1/predict", content=_png(), headers={"content-type": "image/png",
                                                                  "x-request-timeout-seconds": "0"})
    _assert_error(r, 503, "overloaded")
    assert r.elapsed.total_seconds() < SLOW_TIMEOUT_S + 20


def test_readyz_flood_shares_one_probe_and_explain_does_not_starve_health(served):
    """A /readyz flood (no key) with Grad-CAM and scoring under way: every probe answers 200 from a
    shared cached result (a handful of forward passes, not one per request), and the replica is
    never replaced."""
    from helpers import replica_pids

    pids = replica_pids("pneumo")
    with served.client() as c:
        probes0 = c.get("/v1/model").json()["replica"]["probes"]
    codes: list[int] = []
    lock = threading.Lock()
    t0 = time.perf_counter()

    def flood() -> None:
        with served.client() as c:
            for _ in range(40):
                code = c.get("/readyz").status_code
                with lock:
                    codes.append(code)

    def explain() -> None:
        with served.client() as c:
            for _ in range(3):
                c.post("/v1/predict", params={"explain": "true"}, content=_png(), headers={"content-type": "image/png"})

    threads = [threading.Thread(target=flood) for _ in range(8)] + [threading.Thread(target=explain) for _ in range(4)]
    with Load(served, "/v1/predict", _png(seed=9), threads=2) as load:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    elapsed = time.perf_counter() - t0
    with served.client() as c:
        replica = c.get("/v1/model").json()["replica"]
    assert codes == [200] * 320 and load.failures == [], (sorted(set(codes)), load.failures[:3])
    assert replica["probes"] - probes0 <= elapsed / 5 + 3, (replica["probes"] - probes0, elapsed)
    assert replica_pids("pneumo") == pids  # no replica restarted


def test_a_64_megapixel_16_bit_png_peaks_under_300_mb_in_the_replica(served):
    """The decode budget and the strip-wise 16-bit conversion: the replica's peak RSS (VmHWM, reset
    just before) grows by less than 300 MB for one 8000 x 8000 16-bit PNG."""
    from helpers import png16_bytes, proc_status_kb, replica_pids

    body = png16_bytes(8000, 8000)
    (pid,) = replica_pids("big")
    with served.client() as c:
        assert c.post("/big/v1/predict", content=_png(), headers={"content-type": "image/png"}).status_code == 200
        before = proc_status_kb(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        r = c.post("/big/v1/predict", content=body, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    peak_mb = (proc_status_kb(pid, "VmHWM") - before) / 1024
    print(f"64 MP 16-bit PNG ({len(body) / 1e6:.1f} MB): replica peak +{peak_mb:.0f} MB")
    assert peak_mb < 300, peak_mb


def test_one_image_the_model_fails_on_is_an_error_for_that_image_only(served, tmp_path):
    """A model that returns NaN for bright images: in one @serve.batch batch, the bright image is a
    500 `model` item and the others are scored; single requests likewise."""
    from helpers import make_fragile_bundle
    from ray import serve

    from pneumo.serve.app import ServeArgs, bind

    make_fragile_bundle(tmp_path / "fragile")
    # ONNX Runtime: its overflow is NaN, where OpenVINO saturates to finite numbers (auto may pick either)
    serve.run(bind(ServeArgs(bundle=str(tmp_path / "fragile"), engine="onnxruntime"), ray_actor_options={"num_cpus": 0.25},
                   autoscaling_config={"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}),
              name="fragile", route_prefix="/fragile", blocking=False)
    dark, bright = _png_of(np.zeros((64, 64), np.uint8)), _png_of(np.full((64, 64), 240, np.uint8))
    try:
        with served.client() as c:
            wait_for(lambda: c.get("/fragile/readyz").status_code == 200, 120, "the fragile app ready", 0.5)
            files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate([dark, bright, dark])]
            res = c.post("/fragile/v1/predict/batch", files=files).json()["results"]
            assert "label" in res[0] and "label" in res[2], res
            assert res[1]["error"]["status"] == 500 and res[1]["error"]["kind"] == "model", res
            _assert_error(c.post("/fragile/v1/predict", content=bright, headers={"content-type": "image/png"}),
                          500, "model")
            assert c.post("/fragile/v1/predict", content=dark, headers={"content-type": "image/png"}
                          ).status_code == 200
            assert c.get("/fragile/readyz").status_code == 200  # the replica itself is fine
    finally:
        serve.delete("fragile")


def _png_of(px: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(px, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_replica_killed_under_load_costs_under_1_percent(served):
    """Two replicas under steady load; one replica actor is killed (as an OOM kill would): Serve
    routes around it and starts a replacement; fewer than 1% of requests may fail."""
    import ray
    from ray import serve

    from pneumo.serve.app import ServeArgs, bind

    two = {"min_replicas": 2, "max_replicas": 2, "initial_replicas": 2}
    serve.run(bind(ServeArgs(bundle=str(served.root / "b1")), autoscaling_config=two,
                   ray_actor_options={"num_cpus": 0.25}), name="killable", route_prefix="/killable", blocking=False)
    try:
        with served.client() as c:
            wait_for(lambda: c.get("/killable/readyz").status_code == 200, 120, "the killable app ready", 0.5)

        def replicas() -> list[str]:
            return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                          if "SERVE_REPLICA::killable#" in a["name"])

        wait_for(lambda: len(replicas()) >= 2, 60, "two replicas", 0.5)
        codes: list[int] = []
        lock = threading.Lock()
        stop = threading.Event()
        body = _png(64, 64)

        def load() -> None:
            with served.client() as c:
                while not stop.is_set():
                    try:
                        code = c.post("/killable/v1/predict", content=body,
                                      headers={"content-type": "image/png"}).status_code
                    except httpx.HTTPError:
                        code = -1
                    with lock:
                        codes.append(code)

        def answered() -> int:
            with lock:
                return len(codes)

        workers = [threading.Thread(target=load, daemon=True) for _ in range(4)]
        for w in workers:
            w.start()
        wait_for(lambda: answered() >= 30, 60, "30 answers before the kill")
        victim = replicas()[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        at_kill = answered()
        wait_for(lambda: victim not in replicas() and len(replicas()) >= 2, 90, "a replacement replica")
        wait_for(lambda: answered() >= at_kill + 60, 90, "60 answers after the kill")
        stop.set()
        for w in workers:
            w.join(timeout=60)
        failed = [c for c in codes if c != 200]
        print(f"replica kill: {len(codes)} requests, {len(failed)} not 200 ({sorted(set(failed))})")
        assert len(codes) >= 50, len(codes)
        assert len(failed) / len(codes) < 0.01, (len(failed), len(codes), sorted(set(failed)))
        assert len(replicas()) >= 2 and victim not in replicas()  # a replacement, not the killed one
    finally:
        serve.delete("killable")


# ---------------------------------------------------------------- the web page in real Chromium


@contextlib.contextmanager
def _offline_page() -> Iterator[tuple[Any, list[str]]]:
    """A headless Chromium page that can reach localhost only: every other request is aborted (and
    listed), as on a hospital network without internet."""
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip(f"Debian chromium not found at {CHROMIUM} (`make browser` installs it as root)")
    from playwright.sync_api import sync_playwright

    blocked: list[str] = []

    def route(r: Any) -> None:
        url = urlsplit(r.request.url)
        if url.scheme in ("data", "blob") or url.hostname in ("127.0.0.1", "localhost"):  # blob: ReDoc's worker
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync"],
        )
        try:
            page = browser.new_page()
            page.route("**/*", route)
            yield page, blocked
        finally:
            browser.close()


def test_browser_upload_shows_label_heatmap_model_quality_and_drift(served, tmp_path):
    from helpers import SERVE_RED_FLAGS

    image = tmp_path / "xray.png"
    image.write_bytes(_png(200, 160, seed=3))
    with _offline_page() as (page, blocked):
        page.goto(served.url + "/")
        assert "pneumo" in page.title()
        page.set_input_files("#file", str(image))
        page.click("#submit")
        page.wait_for_selector("#result:not([hidden])", timeout=30_000)
        label = page.inner_text("#label").strip()
        probability = page.inner_text("#probability").strip()
        page.wait_for_selector("#overlay-figure:not([hidden])", timeout=10_000)
        overlay_src = page.get_attribute("#overlay", "src") or ""
        natural_width = page.eval_on_selector("#overlay", "img => img.naturalWidth")
        page.wait_for_selector("#red-flags:not([hidden])", timeout=10_000)
        quality = (page.inner_text("#val-sensitivity"), page.inner_text("#val-specificity"))
        flags = page.inner_text("#red-flag-list")
        drift = page.inner_text("#drift")
    assert label in ("NORMAL", "PNEUMONIA")
    assert probability.endswith("%") and 0 <= float(probability[:-1]) <= 100
    assert overlay_src.startswith("data:image/png;base64,") and natural_width == SPEC_KW["size"]
    assert quality == ("87.5%", "12.5%")  # the bundle's val sensitivity and specificity
    assert SERVE_RED_FLAGS[0] in flags
    assert drift.startswith(("drift: ", "DRIFT: ", "not monitored")), drift  # DriftReport.line, from /v1/model
    assert blocked == []


REDOCLY_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@pytest.mark.parametrize("path, operation", [("/docs", ".opblock-summary-path"), ("/redoc", "text=Classify one X-ray")])
def test_api_docs_render_offline(served, path, operation):
    """Swagger UI and ReDoc come from the package: with every non-localhost request aborted, the
    page still renders its operation list."""
    with _offline_page() as (page, blocked):
        page.goto(served.url + path)
        page.wait_for_selector(operation, timeout=30_000)
        text = page.inner_text("body")
    assert "/v1/predict" in text and "/v1/model" in text
    # no script or style asked of a CDN; only ReDoc's "API docs by Redocly" footer logo, an <img>
    # that hides itself when it cannot load
    assert all(u == REDOCLY_LOGO for u in blocked), blocked


def test_favicon_is_served(served):
    with served.client() as c:
        r = c.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"] == "image/x-icon"
    assert r.content[:4] == b"\x00\x00\x01\x00"  # an ICO file
