"""`pneumo serve`: the Serve app of `pneumo.serve.app` on this machine's Ray (blocking; Ctrl-C stops).

    pneumo serve BUNDLE --port 8000 --engine onnxruntime --precision int8
    pneumo serve --serve-config serve_app/config.yaml           # its args, deployment options, timeout

The flags are generated from `pneumo.serve.config.ServeArgs` (one per field, same names, choices and
help), plus the CLI's own keys (host, port, num_cpus, address, serve_config). With
`--serve-config`, the file's app `args` are the base that typed flags override, and its
`PneumoService` deployment entry gives the deployment options; without it, the deployment takes
`pneumo.serve.config.DEPLOYMENT_DEFAULTS`.

Locked by default: without an API key (`--api-key-file` or `PNEUMO_API_KEY`) it listens on
127.0.0.1 only; `--host 0.0.0.0` (or any address that is not loopback) without a key exits 2,
before Ray starts, saying what to set, unless `--allow-anonymous`. The bundle's manifest is read
before Ray starts too (`pneumo.bundle.manifest.read_manifest`, no torch): a missing or malformed
bundle exits 2 with one line. The proxy's backstop
(`http_options.request_timeout_s`) is the same with or without `--serve-config`.
"""

import signal
import sys
import time
import urllib.request
from dataclasses import field, make_dataclass
from typing import Any, Literal

from pneumo.bundle.manifest import read_manifest
from pneumo.config import load_yaml, parse_config
from pneumo.serve.config import (
    DEPLOYMENT_NAME,
    HTTP_REQUEST_TIMEOUT_S,
    ServeArgs,
    access_error,
    read_api_key,
)

__all__ = ["ServeConfig", "serve_args", "deployment_options", "http_options", "refusal", "main"]

READY_TIMEOUT_S = 300.0  # a cold start on two busy cores loads the model and scores a probe image

CLI_ONLY = [
    ("host", str, field(default="127.0.0.1", metadata={"help": "HTTP host (0.0.0.0: all interfaces)"})),
    ("port", int, field(default=8000, metadata={"help": "HTTP port"})),
    ("num_cpus", int | None, field(default=None, metadata={"help": "CPUs for the local Ray (default: all)"})),
    ("address", str | None, field(default=None, metadata={"help": "an existing Ray cluster (default: a local one)"})),
    ("serve_config", str | None, field(default=None, metadata={
        "help": "a Serve config (serve_app/config.yaml): its app's args (flags override them), deployment "
                "options and http_options; default: DEPLOYMENT_DEFAULTS"})),
]


def _cli_fields() -> list[tuple[str, Any, Any]]:
    """One CLI field per ServeArgs field (default None: 'not typed'; the help shows the real default)."""
    out = []
    for name, f in ServeArgs.model_fields.items():
        meta: dict[str, Any] = {"help": f"{f.description or ''} (default: {f.default})".strip()}
        tp = f.annotation
        if getattr(tp, "__origin__", None) is Literal:
            meta["choices"], tp = list(tp.__args__), str
        if name == "bundle":
            meta = {"positional": True, "help": f.description}
        out.append((name, tp | None, field(default=None, metadata=meta)))
    return out


ServeConfig = make_dataclass("ServeConfig", _cli_fields() + CLI_ONLY)
ServeConfig.__doc__ = "Serve a model bundle with Ray Serve on this machine (blocking; Ctrl-C stops)."


def app_config(path: str | None) -> dict[str, Any]:
    """The first application of a Serve config file ({} without one), and its http_options."""
    if not path:
        return {}
    doc = load_yaml(path)
    return {**(doc.get("applications") or [{}])[0], "http_options": doc.get("http_options") or {}}


def serve_args(cfg: Any, app: dict[str, Any] | None = None) -> ServeArgs:
    """ServeArgs from a Serve config's app `args` (if any), overridden by the flags typed."""
    typed = {k: getattr(cfg, k) for k in ServeArgs.model_fields if getattr(cfg, k) is not None}
    return ServeArgs.model_validate({**((app or {}).get("args") or {}), **typed})


def deployment_options(app: dict[str, Any]) -> dict[str, Any]:
    """The PneumoService entry of a Serve config app's `deployments:` ({}: the decorator's defaults)."""
    for dep in app.get("deployments") or []:
        if dep.get("name") == DEPLOYMENT_NAME:
            return {k: v for k, v in dep.items() if k != "name"}
    return {}


def http_options(cfg: Any, app: dict[str, Any]) -> dict[str, Any]:
    """Serve's HTTP options: the CLI's host and port, the config's backstop (else the default one)."""
    timeout = (app.get("http_options") or {}).get("request_timeout_s") or HTTP_REQUEST_TIMEOUT_S
    return {"host": cfg.host, "port": cfg.port, "request_timeout_s": timeout}


def refusal(cfg: Any, args: ServeArgs) -> str | None:
    """Why this `pneumo serve` must not start (a missing key file, or no key on a public address)."""
    try:
        key = read_api_key(args.api_key_file)
    except (OSError, ValueError) as exc:
        return f"api_key_file: {exc}"
    return access_error(cfg.host, key is not None, args.allow_anonymous)


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """`pneumo serve BUNDLE [--host --port --engine --precision --serve-config YAML ...]`."""
    cfg = parse_config(ServeConfig, argv, prog="pneumo serve")
    app_cfg = app_config(cfg.serve_config)
    args = serve_args(cfg, app_cfg)
    problem = refusal(cfg, args)
    if problem:
        print(f"pneumo serve: {problem}", file=sys.stderr)
        return 2
    read_manifest(args.location)  # a missing or bad bundle: BundleError, one line, before Ray starts
    # start-up time: Ray, Serve and torch only once the flags are known to be good
    import ray
    from ray import serve

    from pneumo.serve.app import bind

    if not ray.is_initialized():
        ray.init(address=cfg.address, num_cpus=cfg.num_cpus, include_dashboard=False)
    serve.start(http_options=http_options(cfg, app_cfg))
    app = bind(args, **deployment_options(app_cfg))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where a parent shell ignored it
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops Serve cleanly too
    try:
        serve.run(app, name="pneumo", route_prefix="/", blocking=False)
        wait_ready(cfg.host, cfg.port)
        print(f"pneumo: serving {args.bundle} at http://{cfg.host}:{cfg.port}/ (API docs at /docs); Ctrl-C stops",
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


def wait_ready(host: str, port: int, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll the app's `/readyz` over HTTP until it answers 200 (the model scores a probe image):
    "serving at" is printed only then."""
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{probe_host}:{port}/readyz"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:  # not listening yet, or a 503 while the replica starts
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the app did not become ready at {url} within {timeout_s:.0f}s")
        time.sleep(0.2)
