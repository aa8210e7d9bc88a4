"""`pneumo serve`'s settings, readable without Ray or torch: the app's arguments (`ServeArgs`, the
`args:` of serve_app/config.yaml), the live `UserConfig`, and the deployment defaults.

Configuration lives in two places, never mixed:
- `ServeArgs` (the builder's `args:`): what the app serves and how it treats requests.
- The deployment options (`deployments:` in serve_app/config.yaml, or `.options()`): replicas,
  `max_ongoing_requests`, `max_queued_requests`, `ray_actor_options` and `user_config` (batch
  settings, live; a new `bundle` there is loaded aside and swapped in without downtime). The
  defaults in `DEPLOYMENT_DEFAULTS` apply where the YAML says nothing; the builder sets none.
"""

# No `from __future__ import annotations`: pydantic and Serve read these annotations as classes.

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pneumo.bundle.registry import resolve_bundle
from pneumo.io.preprocess import DEFAULT_MAX_PIXELS
from pneumo.io.storage import Location
from pneumo.precision import ENGINES, PRECISIONS

__all__ = ["ServeArgs", "UserConfig", "DEPLOYMENT_DEFAULTS", "DEPLOYMENT_NAME", "API_KEY_ENV", "read_api_key",
           "access_error", "is_loopback", "HTTP_REQUEST_TIMEOUT_S"]

MAX_BATCH_SIZE = 16  # the one default of @serve.batch's size ...
BATCH_WAIT_S = 0.01  # ... and wait; user_config changes both live
RETRY_AFTER_S = 1.0
DEPLOYMENT_NAME = "PneumoService"
API_KEY_ENV = "PNEUMO_API_KEY"
HTTP_REQUEST_TIMEOUT_S = 60.0  # the proxy's backstop (http_options.request_timeout_s) on every entry point
PROBE_CACHE_S = 5.0  # /readyz and check_health share one probe result for this long
DEPLOYMENT_DEFAULTS: dict[str, Any] = {  # where the YAML / .options() say nothing
    # in flight per replica: room for health probes beside the scoring work the app admits
    # (ServeArgs.max_queue_wait_s sheds scoring at once, so probes never wait behind it)
    "max_ongoing_requests": 4 * MAX_BATCH_SIZE,
    "max_queued_requests": 4 * MAX_BATCH_SIZE,  # per caller (proxy); above: 503 + Retry-After
    "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S},
    "autoscaling_config": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 2,
                           "target_ongoing_requests": MAX_BATCH_SIZE // 2},
    "ray_actor_options": {"num_cpus": 1},
    "user_config": {"max_batch_size": MAX_BATCH_SIZE, "batch_wait_timeout_s": BATCH_WAIT_S},
    "graceful_shutdown_timeout_s": 10,
    "health_check_period_s": 10,
    "health_check_timeout_s": 30,
}


class ServeArgs(BaseModel):
    """Arguments of the Serve application (`args:` in serve_app/config.yaml): app settings only."""

    model_config = ConfigDict(extra="forbid")

    bundle: str = Field(description="model bundle: a folder, s3://bucket/prefix, models:/NAME/VERSION or "
                                    "models:/NAME@ALIAS")
    tracking_uri: str = Field("", description="MLflow registry of models:/ bundles ('': $MLFLOW_TRACKING_URI, "
                                              "else sqlite:///<cwd>/mlflow.db)")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint, e.g. http://host:8333")
    engine: Literal[ENGINES] = Field("auto", description="auto, torch, onnxruntime or openvino")  # type: ignore[valid-type]
    precision: Literal[PRECISIONS] = Field("auto", description="scoring precision")  # type: ignore[valid-type]
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    channels_last: bool = Field(True, description="torch engine: channels_last memory format")
    threads: int = Field(0, ge=0, description="ONNX Runtime / torch threads; 0: the replica's num_cpus")
    api_key_file: str | None = Field(
        None, description=f"file holding the bearer token; else env {API_KEY_ENV}; neither: no key (loopback only)")
    allow_anonymous: bool = Field(
        False, description="serve without an API key on a non-loopback address (refused otherwise)")
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0, description="largest accepted image, bytes")
    max_batch_files: int = Field(16, gt=0, description="most files in one /v1/predict/batch request")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="decoded pixels above this are a bomb: 413")
    request_timeout_s: float = Field(
        30.0, gt=0, description="whole request (body read, decode, scoring): 408 if the body is late, else 503")
    max_decode_bytes: int = Field(
        512 * 1024 * 1024, gt=0, description="decoded bytes in flight per replica; further decodes wait")
    decode_threads: int = Field(2, gt=0, description="decode threads per replica")
    explain_queue: int = Field(4, ge=0, description="Grad-CAM requests waiting behind the one running; more: 503")
    max_queue_wait_s: float = Field(
        3.0, gt=0, description="a request whose predicted wait for the model is longer is refused at once (503)")
    drift_window: int = Field(500, ge=0, description="served images in the drift window (0: off)")
    drift_every_s: float = Field(60.0, gt=0, description="drift statistics recomputed at most this often")

    @property
    def location(self) -> Location:
        """The bundle's location, resolved from `bundle` and `s3_endpoint`."""
        return resolve_bundle(self.bundle, self.s3_endpoint, self.tracking_uri)


class UserConfig(BaseModel):
    """The deployment's `user_config` (changeable live with `serve deploy`)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(MAX_BATCH_SIZE, gt=0)
    batch_wait_timeout_s: float = Field(BATCH_WAIT_S, ge=0)
    bundle: str | None = Field(None, description="a new bundle here is loaded and swapped in without downtime")
    s3_endpoint: str | None = None

    def location(self, current: Location, tracking_uri: str = "") -> Location | None:
        """The bundle asked for (None: keep the current one); the endpoint defaults to the current one's."""
        if not self.bundle:
            return None
        return resolve_bundle(self.bundle, self.s3_endpoint if self.s3_endpoint is not None else current.endpoint,
                              tracking_uri)


# ---------------------------------------------------------------- who may call


def read_api_key(api_key_file: str | None) -> str | None:
    """The API key: the file's content, else env PNEUMO_API_KEY, stripped (a trailing newline from
    `kubectl create secret --from-file` or `echo` must not lock everyone out); None when neither."""
    if api_key_file:
        key = Path(api_key_file).read_text().strip()
        if not key:
            raise ValueError(f"api key file {api_key_file} is empty")
        return key
    return (os.environ.get(API_KEY_ENV) or "").strip() or None


def is_loopback(host: str | None) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def access_error(host: str | None, has_key: bool, allow_anonymous: bool) -> str | None:
    """Why serving on `host` must not start (None: it may): nothing listens beyond loopback
    without an API key unless `allow_anonymous` says so."""
    if has_key or allow_anonymous or is_loopback(host):
        return None
    return (f"refusing to serve on {host or 'an address that is not loopback'} without an API key: "
            f"set api_key_file (pneumo serve --api-key-file FILE) or {API_KEY_ENV} in the replicas' "
            f"environment, or set allow_anonymous: true (--allow-anonymous) to serve without a key")
