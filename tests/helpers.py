"""Builders shared by test modules (import as `from helpers import ...`; tests/ is on sys.path).
Fixtures live in conftest.py; no test module imports another one.

- images: `jpeg_bytes`, `png_bytes`, `dicom_bytes` (real encoders: PIL, pydicom);
- bundles: `make_threshold_bundle` (a random seed_cnn whose threshold splits bright from dark
  images), `make_serve_bundle` (with an optional drift reference);
- runs: `score` (a `pneumo score` run in-process), `write_legacy_run` (an old Parquet run folder),
  `OpenWatch` (inotify: which files any process opened), `read_only` (a folder nobody, root
  included, can write);
- Serve: `deploy_config` / `deploy` (what `serve run serve_app/config.yaml` does), `Served`,
  `Load` (client threads under way while something changes), `replica_pids` / `proc_status_kb`;
- waiting: `wait_for(condition, timeout, what)` instead of fixed sleeps; `free_port()`.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import json
import os
import socket
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
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
    said = {"metrics": {"val": SERVE_VAL_METRICS}, "training": {"red_flags": SERVE_RED_FLAGS}}
    sha = save_bundle(model, out, "seed_cnn", ["NORMAL", "PNEUMONIA"], spec, **said).sha256
    if not drift:
        return sha
    p = Predictor(out, device="cpu", engine="torch")
    images = (np.random.default_rng(seed).random((40, spec.size, spec.size)) * 255).astype(np.uint8)
    probs, feats = p.predict_with_features(images)
    ref = D.DriftReference.build(feats, p.positive_probability(probs), p.threshold, n_components=4)
    return save_bundle(model, out, "seed_cnn", ["NORMAL", "PNEUMONIA"], spec,
                       extra_files={D.FILE_NAME: ref.to_bytes()}, **said).sha256


# what the serving test bundles say of their val split (a random model: the page must show its red flag)
SERVE_VAL_METRICS = {"auc": 0.41, "sensitivity": 0.875, "specificity": 0.125}
SERVE_RED_FLAGS = ["val AUC 0.410 is below chance (0.5): the model ranks cases backwards"]


def score(data: str | Path | None, bundle: Path | str, out: Path | str, *extra: str):  # noqa: ANN201
    """`pneumo score DATA --bundle B --out OUT` (small batches) in this process; its ScoreResult."""
    from pneumo.config import parse_config
    from pneumo.score.driver import ScoreConfig, run_score

    argv = ([str(data)] if data is not None else []) + ["--bundle", str(bundle), "--out", str(out),
                                                         *FAST_SCORE, *extra]
    return run_score(parse_config(ScoreConfig, argv))


LEGACY_ONLY_NEW = ("ctime_ns", "inode", "etag", "explain_error")  # columns old runs did not have


def write_legacy_run(out: Path, run_id: str, rows: Any, finished_at: str) -> Path:
    """`out/runs/<run_id>/` in the old format (before the Delta table): `rows` (an Arrow table of
    scored rows, today's columns; those old runs lacked are dropped) as one part, then `_SUCCESS.json`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run_dir = out / "runs" / run_id
    run_dir.mkdir(parents=True)
    rows = rows.drop_columns([c for c in LEGACY_ONLY_NEW if c in rows.column_names])
    rows = rows.set_column(rows.schema.get_field_index("run_id"), "run_id",
                           pa.array([run_id] * len(rows), pa.string()))
    pq.write_table(rows, run_dir / "part-00000-x.parquet")
    marker = {"run_id": run_id, "files": ["part-00000-x.parquet"], "n_scored": len(rows), "finished_at": finished_at,
              "bundle_sha256": rows.column("bundle_sha256")[0].as_py() if len(rows) else None}
    (run_dir / "_SUCCESS.json").write_text(json.dumps(marker))
    return run_dir


class OpenWatch:
    """Which files under `root` any process (Ray workers included) opens while the watch is on:
    Linux inotify `IN_OPEN` on every folder, read with ctypes (no package needed)."""

    IN_OPEN, IN_ISDIR = 0x20, 0x40000000

    def __init__(self, root: Path):
        self.root = Path(root)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0, "inotify_init1 failed"
        self.folders: dict[int, Path] = {}
        for folder in [self.root, *[p for p in self.root.rglob("*") if p.is_dir() and not p.is_symlink()]]:
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(folder), self.IN_OPEN)
            assert wd >= 0, f"inotify_add_watch({folder}) failed"
            self.folders[wd] = folder
        self.opened: Counter[str] = Counter()

    def poll(self) -> Counter[str]:
        """Opens seen so far, by path relative to `root` (files only)."""
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return self.opened
            i = 0
            while i < len(buf):
                wd, mask, _cookie, n = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16: i + 16 + n].rstrip(b"\0").decode(errors="replace")
                i += 16 + n
                if name and not mask & self.IN_ISDIR and wd in self.folders:
                    self.opened[(self.folders[wd] / name).relative_to(self.root).as_posix()] += 1

    def close(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """`folder` made unwritable for everyone: immutable (`chattr +i`, which binds root too) where the
    file system allows, else mode 0555 (which binds only non-root users: checked with a probe)."""
    folder.mkdir(parents=True, exist_ok=True)
    immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    if not immutable:
        folder.chmod(0o555)
    try:
        probe = folder / ".probe"
        try:
            probe.write_bytes(b"x")
            probe.unlink()
            raise AssertionError(f"{folder} is still writable (no chattr, and running as root)")
        except PermissionError:
            pass
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=False)
        else:
            folder.chmod(0o755)


# ---------------------------------------------------------------- Serve


class Served:
    """A running Serve deployment of the test bundles: its URL, bundle folder, bundle hashes, key file."""

    def __init__(self, url: str, root: Path, sha1: str, sha2: str, key_file: str, apps: tuple[str, ...] = ()):
        self.url, self.root, self.sha1, self.sha2, self.key_file = url, root, sha1, sha2, key_file
        self.apps = apps

    def client(self, **kw: Any):  # noqa: ANN201 - httpx.Client
        import httpx

        return httpx.Client(base_url=self.url, timeout=60, **kw)


SERVE_API_KEY = "s3cret-token-for-tests"
SERVE_LIMITS = {"max_upload_bytes": 200_000, "max_pixels": 4_000_000, "max_batch_files": 4, "drift_window": 20}
TIGHT_QUEUE = 2
SLOW_TIMEOUT_S = 1.0  # the `slow` app's request deadline; its batches wait 5 s for company
BIG_LIMITS = {"max_upload_bytes": 16 * 1024 * 1024, "max_pixels": 64_000_000}
SERVE_APPS = ("", "/secured", "/tight", "/slow")


def deploy_config(bundle: str, api_key_file: str, user_config: dict | None = None,
                  apps: tuple[str, ...] = SERVE_APPS) -> dict:
    """serve_app/config.yaml pointed at the test bundle, one replica (Serve binds 127.0.0.1 in the
    tests, so the open copy needs no key); of `apps`: `""` (open), `/secured` (API key), `/tight`
    (admits one request at a time, queues two: overload), `/slow` (its batches wait longer than its
    request deadline) and `/big` (64-megapixel uploads allowed)."""
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
    out = {"": app}

    def copy_of(prefix: str, args: dict | None = None, deployment: dict | None = None) -> None:
        other = copy.deepcopy(app)
        other.update(name=prefix.strip("/"), route_prefix=prefix)
        other["args"].update(args or {})
        other["deployments"][0].update(deployment or {})
        out[prefix] = other

    copy_of("/secured", {"api_key_file": api_key_file})
    copy_of("/tight", deployment={"max_ongoing_requests": 1, "max_queued_requests": TIGHT_QUEUE})
    copy_of("/slow", {"request_timeout_s": SLOW_TIMEOUT_S}, {"user_config": {
        **(user_config or {}), "max_batch_size": 16, "batch_wait_timeout_s": 5.0}})
    copy_of("/big", BIG_LIMITS)
    return {"applications": [out[a] for a in apps]}


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


# ---------------------------------------------------------------- a real-feature bundle (no Ray)


def folder_images(paths: list[Path], spec: Any) -> np.ndarray:
    """`uint8[N, S, S]` through pneumo's one preprocessing."""
    from pneumo.io.preprocess import load_image

    return np.stack([load_image(p.read_bytes(), p.name, spec) for p in paths])


def folder_labels(paths: list[Path]) -> np.ndarray:
    """1 for files in a PNEUMONIA folder, else 0."""
    return np.array([p.parent.name == "PNEUMONIA" for p in paths], dtype=np.int64)


def make_feature_bundle(out: Path, train: list[Path], val: list[Path], px: int = 96, c: float = 0.05):
    """A bundle written by `export_run` (drift reference included): EfficientNet-Lite0 with its packaged
    weights at `px`, BatchNorm statistics of the training images, and a logistic-regression head fitted
    on their pooled features (scikit-learn; standardisation folded into the head). Returns
    (manifest, outputs, counts). Fast on two cores: one feature pass, no Ray."""
    from types import SimpleNamespace

    from sklearn.linear_model import LogisticRegression

    from pneumo.io.preprocess import to_tensor
    from pneumo.io.storage import Location
    from pneumo.models.adapt import adapt_batchnorm
    from pneumo.models.factory import get_model
    from pneumo.models.zoo import get_spec
    from pneumo.train.export import export_run

    classes = ["NORMAL", "PNEUMONIA"]
    spec = get_spec("efficientnet_lite0").input.replace(size=px)
    model = get_model("efficientnet_lite0", 2, weights="pretrained")
    train_x = folder_images(train, spec)
    batches = [to_tensor(train_x[i: i + 64], spec) for i in range(0, len(train_x), 64)]
    adapt_batchnorm(model, batches[:1])  # BN statistics of the training data, as training leaves them
    with torch.inference_mode():
        feats = torch.cat([model.forward_head(model.forward_features(x), pre_logits=True) for x in batches]).numpy()
    y = folder_labels(train)
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    head = LogisticRegression(C=c, max_iter=2000).fit((feats - mu) / sd, y)
    w, b = head.coef_[0] / sd, head.intercept_[0] - float((head.coef_[0] * mu / sd).sum())
    with torch.no_grad():  # binary models have one logit (sigmoid): the LR's, scaler folded in
        model.classifier.weight.copy_(torch.tensor(w[None], dtype=torch.float32))
        model.classifier.bias.copy_(torch.tensor([b], dtype=torch.float32))
    split = {"train": train, "val": val}
    counts = {s: {k: int(sum(p.parent.name == k for p in split[s])) for k in classes} for s in split}
    cfg = SimpleNamespace(model="efficientnet_lite0", threshold_method="youden", target_sensitivity=0.95, seed=0)
    data = {"val": {"image": folder_images(val, spec), "label": folder_labels(val)}}
    manifest, outputs = export_run(cfg, model, classes, spec, data, {"counts": counts}, Location.of(out))
    return manifest, outputs, counts


class Load:
    """Threads posting `body` to `path` until stopped (a context manager): answers counted by the
    model sha256 that gave them, anything else kept in `failures`. `wait(cond, timeout, what)`
    waits on those counts (no fixed sleeps)."""

    def __init__(self, served: Served, path: str, body: bytes, threads: int = 6):
        import threading

        self.served, self.path, self.body, self.n = served, path, body, threads
        self.seen: dict[str, int] = {}
        self.failures: list[str] = []
        self.changed = threading.Condition()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with self.served.client() as c:
            while not self.stop.is_set():
                try:
                    r = c.post(self.path, content=self.body, headers={"content-type": "image/png"})
                    ok = r.status_code == 200
                    key = r.json()["model"]["sha256"] if ok else f"{r.status_code} {r.text[:200]}"
                except Exception as exc:  # noqa: BLE001 - a dropped connection is a failure too
                    ok, key = False, repr(exc)
                with self.changed:
                    if ok:
                        self.seen[key] = self.seen.get(key, 0) + 1
                    else:
                        self.failures.append(key)
                    self.changed.notify_all()

    def count(self, sha: str) -> int:
        return self.seen.get(sha, 0)

    def wait(self, condition: Callable[[], Any], timeout: float, what: str) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: condition() or self.failures, timeout), \
                f"timed out after {timeout} s waiting for {what}: {self.seen}"

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def replica_pids(app: str) -> list[int]:
    """PIDs of this machine's Serve replica processes of `app` (Ray titles them ServeReplica:APP:...)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"ServeReplica:{app}:".encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def proc_status_kb(pid: int, field: str) -> int:
    """A `VmRSS` / `VmHWM` line of /proc/PID/status, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def png16_bytes(width: int, height: int) -> bytes:
    """A 16-bit grey PNG (smooth ramps and a little texture, so it stays a few MB), built in strips."""
    y = np.arange(height, dtype=np.uint32)[:, None]
    x = np.arange(width, dtype=np.uint32)[None, :]
    px = ((x * 7 + y * 3) % 4096 * 16 + (x ^ y) % 16).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_fragile_bundle(out: Path) -> str:
    """A seed_cnn bundle (64 px) whose first convolution overflows on bright images: their
    probabilities are NaN on ONNX Runtime and torch (the model fails on them), while a black image
    scores normally. OpenVINO saturates the overflow to finite numbers instead: pin the engine."""
    from pneumo.bundle.store import save_bundle
    from pneumo.io.preprocess import InputSpec
    from pneumo.models.factory import get_model

    torch.manual_seed(3)
    spec = InputSpec(**TINY_SPEC_KW)
    model = get_model("seed_cnn", 2, input_spec=spec)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        conv.weight.fill_(1e38)
    return save_bundle(model, out, "seed_cnn", ["NORMAL", "PNEUMONIA"], spec).sha256


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
