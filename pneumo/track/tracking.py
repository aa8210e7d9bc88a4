"""MLflow tracking: the tracking URI, the store made ready once, and a run that never fails a job.

    uri = tracking_uri("")                    # $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment_id = prepare(uri, "pneumo")    # schema created once, before any worker or trial logs
    run = Tracker.start(uri, experiment_id, "seed-1", key="runs/x/ray_results/seed-1", tags={...})
    run.log_params({...}); run.log_metrics({"val_auc": 0.93}, step=3); run.log_artifacts(bundle, "bundle")
    run.finish()
    Tracker(uri, run_id).log_metrics(...)     # the same run from a Ray Train worker (rank 0 only)

Any MLflow tracking URI works (`sqlite:///path.db`, `http://host:5000`, `databricks`, ...). The default
is MLflow's own (`sqlite:///mlflow.db` in the working directory), made absolute here because Ray
workers and Tune trials run in other folders. For a SQLite store, experiments keep their artifacts
beside the database (`<db folder>/mlartifacts/<experiment>`), not in `./mlruns` of whatever folder
a process happened to start in.

A store that cannot be reached is one warning line, then the tracker is off for the rest of the
run: training never fails because of tracking. pneumo lowers MLflow's HTTP retries (unless the
environment sets them) so a server that is down costs seconds, not minutes.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

RUN_KEY_TAG = "pneumo.run"  # storage/name of the Ray Train run: a resumed run logs to the same MLflow run
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}

__all__ = ["tracking_uri", "prepare", "Tracker", "warn", "is_sqlite"]


def warn(text: str) -> None:
    print(f"[pneumo] warning: tracking: {text}", file=sys.stderr, flush=True)


def is_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:")


def tracking_uri(text: str = "") -> str:
    """`text`, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/mlflow.db`; a relative SQLite path
    or a plain folder made absolute."""
    uri = text or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if is_sqlite(uri):
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        if path and not path.startswith("/") and path != ":memory:":
            uri = "sqlite:///" + os.path.abspath(path)
    elif "://" not in uri and uri not in ("databricks",):
        uri = os.path.abspath(uri)
    return uri


def _quiet() -> None:
    """MLflow's INFO lines (database migrations, registrations) out of a quiet job's output."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def client(uri: str) -> Any:
    """An `MlflowClient` for `uri` (tracking and registry on the same store)."""
    from mlflow import MlflowClient

    _quiet()  # after importing mlflow, which sets its own logger up
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def artifact_root(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a SQLite database; the server's default otherwise."""
    if not is_sqlite(uri):
        return None
    db = urlparse(uri).path if ":///" in uri else ""
    return os.path.join(os.path.dirname(db) or os.getcwd(), "mlartifacts", experiment) if db else None


def prepare(uri: str, experiment: str) -> str | None:
    """Create the store's schema (once, before parallel workers or trials race to migrate it) and
    the experiment; its id, or None (with a warning) when the store cannot be used."""
    try:
        c = client(uri)
        found = c.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        return c.create_experiment(experiment, artifact_location=artifact_root(uri, experiment))
    except Exception as exc:  # noqa: BLE001 - any store failure: tracking off, training on
        warn(f"{_display(uri)} cannot be used ({type(exc).__name__}: {str(exc)[:200]}); this run is not tracked")
        return None


def _display(uri: str) -> str:
    """The URI without credentials, for messages."""
    p = urlparse(uri)
    return uri if not p.password else uri.replace(f"{p.username}:{p.password}@", "")


def _value(v: Any) -> str:
    return "" if v is None else str(v)[:6000]


class Tracker:
    """One MLflow run: params, metrics by step, tags, artifacts. Every call warns instead of raising,
    and the first failure turns the tracker off."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.uri, self.run_id = uri, run_id
        self._client: Any = None
        self._pending: list[Any] = []  # asynchronous logs not confirmed yet (see `flush`)

    @property
    def on(self) -> bool:
        return bool(self.uri and self.run_id)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.on:
            return None
        try:
            if self._client is None:
                self._client = client(self.uri)
            return fn(self._client, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking never fails a job
            warn(f"{what} failed ({type(exc).__name__}: {str(exc)[:200]}); no more tracking for this run")
            self.run_id = None
            return None

    @classmethod
    def start(cls, uri: str, experiment_id: str, name: str, key: str, tags: Mapping[str, Any],
              create: bool = True) -> Tracker:
        """The run tagged `key` (a resumed training run logs on), else a new one named `name`
        (with `create=False`: a tracker that is off)."""
        tracker = cls(uri, "pending")

        def open_run(c: Any) -> str | None:
            found = c.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'",
                                  max_results=1, order_by=["attributes.start_time DESC"])
            if found:
                if create:
                    c.update_run(found[0].info.run_id, status="RUNNING")
                return found[0].info.run_id
            if not create:
                return None
            return c.create_run(experiment_id, run_name=name,
                                tags={RUN_KEY_TAG: key, **{k: _value(v) for k, v in tags.items()}}).info.run_id

        tracker.run_id = tracker._call("starting the run", open_run)
        return tracker

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params not logged yet (MLflow params are immutable: a resumed run keeps its first values)."""

        def log(c: Any) -> None:
            from mlflow.entities import Param

            have = c.get_run(self.run_id).data.params
            new = [Param(k, _value(v)) for k, v in params.items() if k not in have]
            for i in range(0, len(new), 100):
                c.log_batch(self.run_id, params=new[i:i + 100])

        self._call("logging params", log)

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0, wait: bool = True) -> None:
        """The numeric entries of `metrics` (NaN kept: MLflow stores it) at `step`. With `wait=False`
        MLflow's asynchronous logging sends them in the background (a training loop does not wait
        on the store); `flush` waits for them."""

        def log(c: Any) -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            rows = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)]
            op = c.log_batch(self.run_id, metrics=rows, synchronous=wait)
            if op is not None and not wait:
                self._pending.append(op)

        self._call("logging metrics", log)

    def flush(self) -> None:
        """Wait for the asynchronous logs (a failure among them is a warning)."""
        pending, self._pending = self._pending, []
        for op in pending:
            self._call("logging metrics", lambda c, op=op: op.wait())

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        def log(c: Any) -> None:
            from mlflow.entities import RunTag

            c.log_batch(self.run_id, tags=[RunTag(k, _value(v)) for k, v in tags.items()])

        self._call("setting tags", log)

    def log_artifacts(self, local_dir: str, path: str | None = None) -> None:
        self._call(f"logging artifacts {path or ''}".strip(), lambda c: c.log_artifacts(self.run_id, local_dir, path))

    def log_artifact(self, local_file: str, path: str | None = None) -> None:
        self._call("logging an artifact", lambda c: c.log_artifact(self.run_id, local_file, path))

    def finish(self, status: str = "FINISHED") -> None:
        self._call("ending the run", lambda c: c.set_terminated(self.run_id, status))
