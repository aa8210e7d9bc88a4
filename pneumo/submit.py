"""`pneumo submit`: submit, follow, inspect or stop a job on a Ray cluster (the Ray Jobs API).

A thin wrapper over `ray.job_submission.JobSubmissionClient`; the cluster address is the
dashboard's HTTP address (`--address`, else `$RAY_ADDRESS`, else http://127.0.0.1:8265, e.g.
after `kubectl port-forward svc/pneumo-head-svc 8265`). Everything after `--` is the entrypoint,
run on the cluster from the uploaded working directory:

    pneumo submit submit --working-dir . --env-from AWS_REGION --follow -- \\
        python ray_jobs/batch_score.py s3://xrays/archive --bundle s3://models/seed --out s3://scores
    pneumo submit status JOB_ID
    pneumo submit logs JOB_ID [--follow]
    pneumo submit stop JOB_ID
    pneumo submit list

The runtime environment is built from flags: `working_dir` (files ignored by .gitignore are
not uploaded), `pip`, `py_modules`, `env_vars` (`--env KEY=VALUE`, or `--env-from NAME` to copy a
variable from this shell), and `image_uri`. With `--follow`, `submit` and `logs` stream the
job's logs until it ends and exit 0 only when it SUCCEEDED.

Clusters with Ray token authentication (`RAY_AUTH_MODE=token` on every node) refuse requests
without their token. The token is sent as `Authorization: Bearer ...` and read from `--token-file`
(e.g. a Kubernetes Secret mounted as a file), else `$RAY_AUTH_TOKEN`, else the file named by
`$RAY_AUTH_TOKEN_PATH` (Ray's own variables); otherwise Ray's defaults apply (~/.ray/auth_token
when `RAY_AUTH_MODE=token`). The token is never printed; a refusal exits 2 with what to set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from pneumo import logs
from pneumo.config import ConfigError, parse_config

ACTIONS = ("submit", "status", "logs", "stop", "list")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class SubmitConfig:
    """Submit, follow, inspect or stop a job on a Ray cluster (Ray Jobs API)."""

    action: str = field(default="submit", metadata={
        "positional": True, "choices": list(ACTIONS), "help": "what to do"})
    job_id: str | None = field(default=None, metadata={
        "positional": True, "help": "submission id (status, logs, stop)"})
    address: str | None = field(default=None, metadata={
        "help": f"Ray dashboard address (default: $RAY_ADDRESS or {DEFAULT_ADDRESS})"})
    working_dir: str | None = field(default=".", metadata={
        "help": "local folder uploaded as the job's working_dir (empty = none)"})
    excludes: list[str] = field(default_factory=list, metadata={
        "help": "extra patterns left out of the upload (on top of .gitignore)"})
    pip: list[str] = field(default_factory=list, metadata={"help": "pip requirements installed for the job"})
    py_modules: list[str] = field(default_factory=list, metadata={
        "help": "local packages or wheels shipped to every worker"})
    env: list[str] = field(default_factory=list, metadata={"help": "env_vars for the job: KEY=VALUE,..."})
    env_from: list[str] = field(default_factory=list, metadata={
        "help": "names of variables copied from this shell into env_vars (e.g. AWS_REGION)"})
    image_uri: str | None = field(default=None, metadata={
        "help": "container image for the job's workers (runtime_env image_uri)"})
    token_file: str | None = field(default=None, metadata={
        "help": "file holding the cluster's Ray auth token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH)"})
    submission_id: str | None = field(default=None, metadata={"help": "id to give the job (default: Ray's)"})
    entrypoint_num_cpus: float = field(default=0.0, metadata={"help": "CPUs reserved for the entrypoint"})
    entrypoint_num_gpus: float = field(default=0.0, metadata={"help": "GPUs reserved for the entrypoint"})
    follow: bool = field(default=False, metadata={"help": "stream logs until the job ends"})
    timeout_s: float = field(default=0.0, metadata={"help": "with --follow: give up after this many seconds (0 = never)"})
    entrypoint: str = field(default="", metadata={"help": "command run on the cluster (normally given after --)"})

    def validate(self) -> None:
        if self.action == "submit" and not self.entrypoint.strip():
            raise ConfigError("submit: give the entrypoint after --, e.g. -- python ray_jobs/train.py --help")
        if self.action in ("status", "logs", "stop") and not self.job_id:
            raise ConfigError(f"{self.action}: give the JOB_ID (see `pneumo submit list`)")
        for item in self.env:
            if "=" not in item:
                raise ConfigError(f"env: {item!r} is not KEY=VALUE")
        if self.working_dir and not os.path.isdir(self.working_dir):
            raise ConfigError(f"working_dir: {self.working_dir!r} is not a folder")
        if self.token_file and not os.path.isfile(self.token_file):
            raise ConfigError(f"token_file: {self.token_file!r} is not a file")


def resolve_address(address: str | None) -> str:
    """`--address`, else $RAY_ADDRESS, else the local default; bare host:port gets http://."""
    addr = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    return addr if "://" in addr else f"http://{addr}"


def build_runtime_env(cfg: SubmitConfig) -> dict[str, Any]:
    """The job's runtime_env from the flags (only the keys that were asked for)."""
    env: dict[str, Any] = {}
    if cfg.working_dir:
        env["working_dir"] = os.path.abspath(cfg.working_dir)
    if cfg.excludes:
        env["excludes"] = list(cfg.excludes)
    if cfg.pip:
        env["pip"] = list(cfg.pip)
    if cfg.py_modules:
        env["py_modules"] = [m if "://" in m else os.path.abspath(m) for m in cfg.py_modules]
    env_vars = dict(item.split("=", 1) for item in cfg.env)
    missing = [name for name in cfg.env_from if name not in os.environ]
    if missing:
        raise ConfigError(f"env_from: not set in this shell: {', '.join(missing)}")
    env_vars.update({name: os.environ[name] for name in cfg.env_from})
    if env_vars:
        env["env_vars"] = env_vars
    if cfg.image_uri:
        env["image_uri"] = cfg.image_uri
    return env


def _read_token(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path!r} ({exc.strerror or type(exc).__name__})") from exc
    if not token:
        raise ConfigError(f"{what}: {path!r} is empty")
    return token


def resolve_token(token_file: str | None = None) -> str | None:
    """The cluster's Ray auth token: `--token-file`, else $RAY_AUTH_TOKEN, else the file at
    $RAY_AUTH_TOKEN_PATH; None when none is given (Ray's own defaults then apply)."""
    if token_file:
        return _read_token(token_file, "token_file")
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return _read_token(os.environ["RAY_AUTH_TOKEN_PATH"], "RAY_AUTH_TOKEN_PATH")
    return None


def make_client(address: str | None = None, token_file: str | None = None):  # noqa: ANN201 - lazily imported
    """A JobSubmissionClient for the dashboard at `address`, sending the cluster's auth token if one is given."""
    from ray.job_submission import JobSubmissionClient

    token = resolve_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(resolve_address(address), headers=headers)


def submit(cfg: SubmitConfig, client: Any = None, agent_wait_s: float = 60.0) -> str:
    """Submit `cfg.entrypoint` with the runtime_env from `cfg`; returns the submission id.

    Retries for up to `agent_wait_s` while a freshly started head has no job agent yet.
    """
    cfg.validate()
    client = client or make_client(cfg.address, cfg.token_file)
    kwargs: dict[str, Any] = {}
    if cfg.entrypoint_num_cpus:
        kwargs["entrypoint_num_cpus"] = cfg.entrypoint_num_cpus
    if cfg.entrypoint_num_gpus:
        kwargs["entrypoint_num_gpus"] = cfg.entrypoint_num_gpus
    runtime_env = build_runtime_env(cfg)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(entrypoint=cfg.entrypoint, runtime_env=runtime_env,
                                     submission_id=cfg.submission_id, **kwargs)
        except RuntimeError as exc:  # a just-started head answers 500 until its job agent is up
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def wait(client: Any, job_id: str, timeout_s: float = 0.0, poll_s: float = 1.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns that status (TimeoutError after timeout_s)."""
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def follow(client: Any, job_id: str, timeout_s: float = 0.0, out: Any = None) -> str:
    """Stream the job's logs to `out` until it ends; returns its final status."""
    out = out or sys.stdout

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(asyncio.wait_for(_tail(), timeout_s) if timeout_s > 0 else _tail())
    except TimeoutError as exc:
        raise TimeoutError(f"job {job_id}: still running after {timeout_s:.0f}s of --follow") from exc
    return wait(client, job_id, timeout_s=30)


def _info_dict(info: Any) -> dict[str, Any]:
    keys = ("submission_id", "job_id", "status", "entrypoint", "message", "start_time", "end_time",
            "driver_node_id", "driver_exit_code")
    out = {k: getattr(info, k, None) for k in keys}
    out["status"] = str(getattr(out["status"], "value", out["status"]))
    return out


def main(argv: list[str] | None = None) -> int:
    """`pneumo submit ACTION [JOB_ID] [options] [-- ENTRYPOINT...]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    entry: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, entry = argv[:cut], argv[cut + 1:]
    if entry:
        argv += ["--entrypoint", shlex.join(entry)]
    cfg = parse_config(SubmitConfig, argv, prog="pneumo submit")
    from ray.exceptions import AuthenticationError  # what the Jobs client raises on 401/403

    if not logs.interactive():  # Ray's packaging lines ("Uploading package ...") stay out of the output
        logging.getLogger("ray").setLevel(logging.WARNING)

    try:
        return _run(cfg)
    except ConfigError as exc:
        print(f"pneumo submit: {exc}", file=sys.stderr)
        return 2
    except AuthenticationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"pneumo submit: {resolve_address(cfg.address)} refused the request ({first}). The cluster uses "
              "Ray token authentication: set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or --token-file to its token.",
              file=sys.stderr)
        return 2
    except ConnectionError as exc:  # what JobSubmissionClient raises when nothing answers at the address
        print(f"pneumo submit: cannot reach a Ray cluster at {resolve_address(cfg.address)} ({type(exc).__name__}). "
              "Start a local one with `pneumo cluster up`, or pass --address (or set RAY_ADDRESS) to a running "
              "cluster's dashboard address.", file=sys.stderr)
        return 2


def _run(cfg: SubmitConfig) -> int:
    client = make_client(cfg.address, cfg.token_file)
    if cfg.action == "submit":
        job_id = submit(cfg, client)
        print(f"submitted {job_id} to {resolve_address(cfg.address)}", flush=True)
        if not cfg.follow:
            print(f"  pneumo submit logs {job_id} --follow   |   pneumo submit stop {job_id}")
            return 0
        status = follow(client, job_id, cfg.timeout_s)
        print(f"\njob {job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    if cfg.action == "status":
        print(json.dumps(_info_dict(client.get_job_info(cfg.job_id)), indent=2, default=str))
        return 0
    if cfg.action == "logs":
        if not cfg.follow:
            sys.stdout.write(client.get_job_logs(cfg.job_id))
            return 0
        status = follow(client, cfg.job_id, cfg.timeout_s)
        print(f"\njob {cfg.job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    if cfg.action == "stop":
        stopped = client.stop_job(cfg.job_id)
        print(f"job {cfg.job_id}: {'stop requested' if stopped else 'was not running'}")
        return 0
    jobs = sorted(client.list_jobs(), key=lambda i: i.start_time or 0)
    if not jobs:
        print(f"no jobs on {resolve_address(cfg.address)}")
    for info in jobs:
        d = _info_dict(info)
        print(f"{d['submission_id'] or d['job_id']}\t{d['status']}\t{d['entrypoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
