"""Builders shared by test modules (import as `from helpers import ...`; tests/ is on sys.path).
Fixtures live in conftest.py; no test module imports another one.

- images: `jpeg_bytes`, `png_bytes`, `dicom_bytes` (real encoders: PIL, pydicom);
- bundles: `make_threshold_bundle` (a random seed_cnn whose threshold splits bright from dark
  images), `make_serve_bundle` (with an optional drift reference);
- runs: `score` (a `pneumo score` run in-process);
- Serve: `deploy_config` / `deploy` (what `serve run serve_app/config.yaml` does) and `Served`;
- waiting: `wait_for(condition, timeout, what)` instead of fixed sleeps; `free_port()`.
"""

from __future__ import annotations

import copy
import io
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "serve_app" / "config.yaml"
TINY_SPEC_KW: dict[str, Any] = {"size": 64, "channels": 1, "mean": (0.0,), "std": (1.0,)}
FAST_SCORE = ["--batch-size", "8", "--read-batch-size", "4"]


# ---------------------------------------------------------------- waiting and ports


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll `condition` until it returns something truthy (and return that); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, grpc_offset_free: bool = False) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (with `grpc_offset_free`, port+10000 is free too)."""
    ports: list[int] = []
    held: list[socket.socket] = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if grpc_offset_free and (port + 10000 > 65535 or not _port_free(port + 10000)):
                s.close()
                continue
            held.append(s)
            ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


# ---------------------------------------------------------------- images


def noise(seed: int, shape: tuple[int, ...], level: int | None = None) -> np.ndarray:
    """Seeded uint8 noise; with `level`, a quarter-contrast copy lifted to about that grey level."""
    px = np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)
    return px if level is None else np.clip(px // 4 + level, 0, 255).astype(np.uint8)


def jpeg_bytes(seed: int = 1, size: tuple[int, int] = (80, 96), level: int | None = None, rgb: bool = False) -> bytes:
    """A JPEG of seeded noise, `size` = (width, height); grey unless `rgb`."""
    shape = (size[1], size[0], 3) if rgb else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(noise(seed, shape, level)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bytes(seed: int = 0, size: tuple[int, int] = (80, 96), level: int | None = None) -> bytes:
    """An 8-bit grey PNG of seeded noise, `size` = (width, height)."""
    buf = io.BytesIO()
    Image.fromarray(noise(seed, (size[1], size[0]), level), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def tiny_rows(n: int, size: int, num_classes: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` rows like the ingest's: {image: uint8[size, size], label: int}, labels cycling over classes."""
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (size, size), dtype=np.uint8), "label": i % num_classes}
            for i in range(n)]


class ListShard:
    """A stand-in for a Ray Data shard: `iter_torch_batches` over in-memory rows, in order."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def iter_torch_batches(self, batch_size: int, **_: Any):  # noqa: ANN201
        for i in range(0, len(self.rows), batch_size):
            chunk = self.rows[i:i + batch_size]
            yield {"image": torch.from_numpy(np.stack([r["image"] for r in chunk])),
                   "label": torch.tensor([r["label"] for r in chunk])}


def pretrained_available(model: str) -> bool:
    """Whether `model`'s pretrained weights are on this machine (pneumo never downloads them)."""
    from pneumo.models.factory import load_pretrained_state
    from pneumo.models.weights import WeightsUnavailable
    from pneumo.models.zoo import get_spec

    spec = get_spec(model)
    if not spec.has_pretrained:
        return False
    try:
        load_pretrained_state(spec)
    except WeightsUnavailable:
        return False
    return True


def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", window: tuple[float, float] | None = None,
                preamble: bool = True, rows_cols: tuple[int, int] | None = None) -> bytes:
    """An uncompressed 16-bit DICOM of `pixels` (uint16), built with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows_cols or pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=preamble)
    return buf.getvalue()


# ---------------------------------------------------------------- bundles and runs


def make_threshold_bundle(root: Path) -> Path:
    """`root/b`: a random-weight seed_cnn bundle (64 px, 1 channel) whose threshold splits bright
    from dark images."""
    from pneumo.bundle.predict import Predictor
    from pneumo.bundle.store import save_bundle
    from pneumo.io.preprocess import InputSpec
    from pneumo.models.factory import get_model

    spec = InputSpec(**TINY_SPEC_KW)
    torch.manual_seed(0)
    model = get_model("seed_cnn", 2, input_spec=spec)
    save_bundle(model, root / "b0", "seed_cnn", ["NORMAL", "PNEUMONIA"], spec)
    p = Predictor(root / "b0", precision="fp32")
    dark, bright = np.full((1, 64, 64), 10, np.uint8), np.full((1, 64, 64), 240, np.uint8)
    lo, hi = sorted(float(p.positive_probability(p.predict(x))[0]) for x in (dark, bright))
    assert hi - lo > 1e-4, "random model should tell a dark from a bright image"
    save_bundle(model, root / "b", "seed_cnn", ["NORMAL", "PNEUMONIA"], spec,
                threshold={"value": (lo + hi) / 2, "method": "test", "target": None})
    return root / "b"


def make_serve_bundle(out: Path, seed: int, drift: bool = False) -> str:
    """A random-weight seed_cnn bundle (64 px); with `drift`, plus a drift reference from random
    images. Returns its sha256."""
    from pneumo.bundle.predict import Predictor
    from pneumo.bundle.store import save_bundle
    from pneumo.io.preprocess import InputSpec
    from pneumo.models.factory import get_model
    from pneumo.monitor import drift as D

    torch.manual_seed(seed)
    spec = InputSpec(**TINY_SPEC_KW)
    model = get_model("seed_cnn", 2, input_spec=spec)
    sha = save_bundle(model, out, "seed_cnn", ["NORMAL", "PNEUMONIA"], spec).sha256
    if not drift:
        return sha
    p = Predictor(out, device="cpu", engine="torch")
    images = (np.random.default_rng(seed).random((40, spec.size, spec.size)) * 255).astype(np.uint8)
    probs, feats = p.predict_with_features(images)
    ref = D.DriftReference.build(feats, p.positive_probability(probs), p.threshold, n_components=4)
    return save_bundle(model, out, "seed_cnn", ["NORMAL", "PNEUMONIA"], spec,
                       extra_files={D.FILE_NAME: ref.to_bytes()}).sha256


def score(data: str | Path | None, bundle: Path | str, out: Path | str, *extra: str):  # noqa: ANN201
    """`pneumo score DATA --bundle B --out OUT` (small batches) in this process; its ScoreResult."""
    from pneumo.config import parse_config
    from pneumo.score.driver import ScoreConfig, run_score

    argv = ([str(data)] if data is not None else []) + ["--bundle", str(bundle), "--out", str(out),
                                                         *FAST_SCORE, *extra]
    return run_score(parse_config(ScoreConfig, argv))


# ---------------------------------------------------------------- Serve


class Served:
    """A running Serve deployment of the test bundles: its URL, bundle folder, bundle hashes, key file."""

    def __init__(self, url: str, root: Path, sha1: str, sha2: str, key_file: str):
        self.url, self.root, self.sha1, self.sha2, self.key_file = url, root, sha1, sha2, key_file

    def client(self, **kw: Any):  # noqa: ANN201 - httpx.Client
        import httpx

        return httpx.Client(base_url=self.url, timeout=60, **kw)


SERVE_API_KEY = "s3cret-token-for-tests"
SERVE_LIMITS = {"max_upload_bytes": 200_000, "max_pixels": 4_000_000, "max_batch_files": 4, "drift_window": 20}
TIGHT_QUEUE = 2
SERVE_APPS = ("", "/secured", "/tight", "/slow")


def deploy_config(bundle: str, api_key_file: str, user_config: dict | None = None) -> dict:
    """serve_app/config.yaml pointed at the test bundle, one replica; plus a `secured` copy (API
    key), a `tight` copy that admits one request at a time and queues two (overload) and a `slow`
    copy whose request timeout no request can meet."""
    import yaml

    cfg = yaml.safe_load(SERVE_CONFIG.read_text())
    cfg.pop("http_options", None)
    cfg.pop("proxy_location", None)
    app = cfg["applications"][0]
    app["args"].update(bundle=bundle, **SERVE_LIMITS)
    app["runtime_env"] = {"env_vars": {"PYTHONPATH": str(REPO)}}
    (dep,) = app["deployments"]
    dep["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}
    dep["ray_actor_options"] = {"num_cpus": 0.25}
    if user_config is not None:
        dep["user_config"] = user_config
    secured = copy.deepcopy(app)
    secured.update(name="secured", route_prefix="/secured")
    secured["args"]["api_key_file"] = api_key_file
    tight = copy.deepcopy(app)
    tight.update(name="tight", route_prefix="/tight")
    tight["deployments"][0].update(max_ongoing_requests=1, max_queued_requests=TIGHT_QUEUE)
    slow = copy.deepcopy(app)  # no request can be scored within its timeout
    slow.update(name="slow", route_prefix="/slow")
    slow["args"]["request_timeout_s"] = 0.001
    return {"applications": [app, secured, tight, slow]}


def deploy(cfg: dict, timeout: float = 240) -> None:
    """What `serve run CONFIG` / `serve deploy CONFIG` do: apply a ServeDeploySchema (then wait)."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(cfg), _blocking=False)
    names = {a["name"] for a in cfg["applications"]}

    def running() -> bool:
        apps = serve.status().applications
        return all(n in apps and str(apps[n].status).endswith("RUNNING") for n in names)

    wait_for(running, timeout, f"Serve apps {sorted(names)} running", interval=0.5)


# ---------------------------------------------------------------- sweeps

SWEEPS = REPO / "ray_jobs" / "sweeps"
# every sweep file at smoke size: one tiny epoch or two, one worker, a few steps
TINY_TRIAL = ("epochs=2,num_workers=1,batch_size=8,max_steps_per_epoch=1,patience=0,val_frac=0.25,"
              "test_frac=0.2,num_to_keep=1")


def sweep(data: Path | str, config: Path | str, out: Path | str, *flags: str) -> dict:
    """`pneumo sweep DATA --config CONFIG --out OUT [flags]` in this process; run_sweep's result."""
    from pneumo.config import parse_config
    from pneumo.train.sweep import SweepConfig, run_sweep

    return run_sweep(parse_config(SweepConfig, [str(data), "--config", str(config), "--out", str(out), *flags]))


def write_sweep(path: Path, text: str) -> Path:
    """A sweep file with `text` (YAML) at `path`."""
    path.write_text(text)
    return path
