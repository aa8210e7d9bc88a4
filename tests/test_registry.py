"""The model registry (MLflow, a real SQLite store): bundles as registered versions, `models:/` URIs.

- `pneumo register` / `pneumo promote` make versions and move aliases; each version's tags carry the
  bundle's sha256;
- `mlflow.pyfunc.load_model("models:/NAME@champion").predict(...)` on image bytes or arrays gives the
  bundle's `Predictor`'s probabilities (an undecodable image is an error row);
- `resolve_bundle` turns `models:/NAME/VERSION` and `models:/NAME@ALIAS` into the hash-checked bundle
  and refuses a version whose bundle is not the registered one;
- `pneumo score` and `pneumo evaluate` take a registry URI and record it next to bundle_sha256;
- a Serve deployment on `models:/NAME@champion`, reconfigured after `pneumo promote`, swaps to the
  new version under load with no failed request.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    deploy,
    deploy_config,
    free_port,
    jpeg_bytes,
    make_serve_bundle,
    png_bytes,
    score,
    wait_for,
)

from pneumo.bundle.manifest import BundleError
from pneumo.bundle.registry import resolve_bundle
from pneumo.bundle.registry_cli import promote_main, register_main

NAME = "pneumo-cxr"


class Registry:
    def __init__(self, root: Path, uri: str, sha: dict[str, str]):
        self.root, self.uri, self.sha = root, uri, sha


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:  # noqa: ANN001
    """Two tiny bundles registered as versions 1 (@champion) and 2 in a fresh SQLite store."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    sha = {"1": make_serve_bundle(root / "b1", seed=1, drift=True), "2": make_serve_bundle(root / "b2", seed=2)}
    assert register_main([str(root / "b1"), "--name", NAME, "--alias", "champion", "--tracking-uri", uri]) == 0
    assert register_main([str(root / "b2"), "--name", NAME, "--tracking-uri", uri]) == 0
    return Registry(root, uri, sha)


def _client(r: Registry):  # noqa: ANN202
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=r.uri, registry_uri=r.uri)


def test_versions_carry_the_bundle_sha256_and_aliases_move(registry, capsys):  # noqa: ANN001
    c = _client(registry)
    for v in ("1", "2"):
        assert c.get_model_version(NAME, v).tags["bundle_sha256"] == registry.sha[v]
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert promote_main([NAME, "2", "--alias", "staging", "--tracking-uri", registry.uri]) == 0
    assert "models:/pneumo-cxr@staging -> models:/pneumo-cxr/2 (a new alias)" in capsys.readouterr().out
    assert str(c.get_model_version_by_alias(NAME, "staging").version) == "2"
    assert promote_main([NAME, "9", "--alias", "staging", "--tracking-uri", registry.uri]) == 2


@pytest.mark.parametrize("uri,version", [("models:/pneumo-cxr/2", "2"), ("models:/pneumo-cxr@champion", "1")])
def test_registry_uris_resolve_to_the_hash_checked_bundle(registry, uri, version):  # noqa: ANN001
    from pneumo.bundle.manifest import read_manifest

    loc = resolve_bundle(uri, None, registry.uri)
    assert loc.source == f"models:/{NAME}/{version}"
    assert read_manifest(loc).sha256 == registry.sha[version]


@pytest.mark.parametrize("uri,needle", [
    ("models:/pneumo-cxr@nosuch", "not in the registry"),
    ("models:/nosuch/1", "not in the registry"),
    ("models:/pneumo-cxr", "models:/NAME/VERSION or models:/NAME@ALIAS"),
])
def test_unknown_registry_uris_are_clear_errors(registry, uri, needle):  # noqa: ANN001
    with pytest.raises(BundleError, match=needle):
        resolve_bundle(uri, None, registry.uri)


def test_a_version_whose_bundle_is_not_the_registered_one_is_refused(registry):  # noqa: ANN001
    c = _client(registry)
    c.set_model_version_tag(NAME, "2", "bundle_sha256", "0" * 64)
    try:
        with pytest.raises(BundleError, match="is not the registered"):
            resolve_bundle("models:/pneumo-cxr/2", None, registry.uri)
    finally:
        c.set_model_version_tag(NAME, "2", "bundle_sha256", registry.sha["2"])


def test_pyfunc_predicts_what_the_bundles_predictor_predicts(registry):  # noqa: ANN001
    import mlflow

    from pneumo.bundle.predict import Predictor
    from pneumo.io.preprocess import load_image

    images = [png_bytes(seed=i, size=(90, 70)) for i in range(3)] + [jpeg_bytes(seed=9)]
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(registry.uri)
    mlflow.set_registry_uri(registry.uri)
    try:
        model = mlflow.pyfunc.load_model("models:/pneumo-cxr@champion")
        from_bytes = model.predict([*images, b"not an image"])
        planes = None
        predictor = Predictor(registry.root / "b1")
        planes = np.stack([load_image(b, "", predictor.spec) for b in images])
        from_arrays = model.predict(planes)
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    expected = predictor.predict(planes)
    for frame in (from_bytes.iloc[:4], from_arrays):
        got = frame[["p_NORMAL", "p_PNEUMONIA"]].to_numpy(dtype=np.float64)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
        assert list(frame["label"]) == predictor.labels(expected)
    bad = from_bytes.iloc[4]
    assert bad["error"].startswith("unsupported") and bad[["label", "probability"]].isna().all()


def test_score_records_the_registry_uri_next_to_bundle_sha256(registry, ray_local, tmp_path):  # noqa: ANN001
    from pneumo.runs import read_results

    data = tmp_path / "in"
    data.mkdir()
    for i in range(3):
        (data / f"x{i}.png").write_bytes(png_bytes(seed=i))
    (data / "broken.png").write_bytes(b"\x89PNG broken")
    score(data, "models:/pneumo-cxr@champion", tmp_path / "out", "--tracking-uri", registry.uri)
    rows = read_results(str(tmp_path / "out"))
    assert len(rows) == 4 and set(rows["model_uri"]) == {"models:/pneumo-cxr/1"}
    assert set(rows["bundle_sha256"]) == {registry.sha["1"]}


def test_evaluate_takes_a_registry_uri(registry, ray_local, synth_data, tmp_path):  # noqa: ANN001
    from pneumo.config import parse_config
    from pneumo.score.evaluate import EvaluateConfig, evaluate_bundle

    cfg = parse_config(EvaluateConfig, ["models:/pneumo-cxr/2", str(synth_data), "--split", "val", "--out",
                                        str(tmp_path / "eval"), "--tracking-uri", registry.uri, "--n-boot", "50",
                                        "--batch-size", "16"])
    report = evaluate_bundle(cfg)
    assert report["bundle"]["uri"] == "models:/pneumo-cxr/2" and report["bundle"]["sha256"] == registry.sha["2"]
    assert report["n"] > 0


def _one_app(bundle: str, uri: str, user_config: dict | None = None) -> dict:
    """serve_app/config.yaml's open app alone, one small replica, on `bundle` (a registry URI)."""
    cfg = deploy_config(bundle, "", user_config, apps=("",))
    cfg["applications"][0]["args"].update(tracking_uri=uri, drift_window=0)
    return cfg


def test_promote_then_reconfigure_swaps_the_served_version_under_load(registry, ray_local):  # noqa: ANN001
    """Serve `models:/pneumo-cxr@champion` (version 1), promote version 2, `serve deploy` with
    `user_config.bundle` = the alias: answers move from version 1 to 2, and not one request fails."""
    import httpx
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    alias = "models:/pneumo-cxr@champion"
    seen: dict[str, int] = {}
    failures: list[str] = []
    changed, stop = threading.Condition(), threading.Event()
    body = png_bytes(seed=7)

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/predict", content=body, headers={"content-type": "image/png"})
                    ok, key = r.status_code == 200, (r.json()["model"]["uri"] if r.status_code == 200
                                                     else f"{r.status_code} {r.text[:200]}")
                except Exception as exc:  # noqa: BLE001 - a dropped connection is a failure too
                    ok, key = False, repr(exc)
                with changed:
                    (seen.__setitem__(key, seen.get(key, 0) + 1) if ok else failures.append(key))
                    changed.notify_all()

    try:
        deploy(_one_app(alias, registry.uri))
        with httpx.Client(base_url=url, timeout=30) as c:
            wait_for(lambda: c.get("/readyz").status_code == 200, 60, "the app ready", interval=0.5)
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        with changed:
            assert changed.wait_for(lambda: seen.get("models:/pneumo-cxr/1", 0) >= 15 or failures, 120), seen
        assert promote_main([NAME, "2", "--alias", "champion", "--tracking-uri", registry.uri]) == 0
        deploy(_one_app(alias, registry.uri, user_config={"bundle": alias}))
        with changed:
            assert changed.wait_for(lambda: seen.get("models:/pneumo-cxr/2", 0) >= 15 or failures, 120), seen
    finally:
        stop.set()
        promote_main([NAME, "1", "--alias", "champion", "--tracking-uri", registry.uri])
        serve.shutdown()
    assert failures == [], failures[:5]
    assert seen.get("models:/pneumo-cxr/1", 0) >= 15 and seen.get("models:/pneumo-cxr/2", 0) >= 15, seen
