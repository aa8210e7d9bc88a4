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

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pneumo.bundle.registry import resolve_bundle
from pneumo.io.preprocess import DEFAULT_MAX_PIXELS
from pneumo.io.storage import Location
from pneumo.precision import ENGINES, PRECISIONS

__all__ = ["ServeArgs", "UserConfig", "DEPLOYMENT_DEFAULTS", "DEPLOYMENT_NAME", "API_KEY_ENV"]

MAX_BATCH_SIZE = 16  # the one default of @serve.batch's size ...
BATCH_WAIT_S = 0.01  # ... and wait; user_config changes both live
RETRY_AFTER_S = 1.0
DEPLOYMENT_NAME = "PneumoService"
API_KEY_ENV = "PNEUMO_API_KEY"
DEPLOYMENT_DEFAULTS: dict[str, Any] = {  # where the YAML / .options() say nothing
    "max_ongoing_requests": 2 * MAX_BATCH_SIZE,  # one batch running, the next one filling
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
    engine: Literal[ENGINES] = Field("auto", description="auto, torch or onnxruntime")  # type: ignore[valid-type]
    precision: Literal[PRECISIONS] = Field("auto", description="scoring precision")  # type: ignore[valid-type]
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    channels_last: bool = Field(True, description="torch engine: channels_last memory format")
    threads: int = Field(0, ge=0, description="ONNX Runtime / torch threads; 0: the replica's num_cpus")
    api_key_file: str | None = Field(
        None, description=f"file holding the bearer token; else env {API_KEY_ENV}; neither: no key needed")
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0, description="largest accepted image, bytes")
    max_batch_files: int = Field(16, gt=0, description="most files in one /v1/predict/batch request")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="decoded pixels above this are a bomb: 413")
    request_timeout_s: float = Field(30.0, gt=0, description="a request not scored by then: 503 + Retry-After")
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
