"""serve_app/config.yaml and the typed builder, without starting Serve (fast).

The running app is tested over HTTP in tests/test_serve.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "serve_app" / "config.yaml"


def _config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_config_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(_config())
    (app,) = schema.applications
    assert app.import_path == "serve_app.app:build_app" and app.route_prefix == "/"
    deps = {d.name: d for d in app.deployments}
    assert set(deps) == {"PneumoModel", "PneumoIngress"}
    auto = deps["PneumoModel"].autoscaling_config
    assert auto["min_replicas"] >= 1 and auto["max_replicas"] > auto["min_replicas"]
    assert auto["target_ongoing_requests"] > 0
    assert set(deps["PneumoModel"].user_config) >= {"max_batch_size", "batch_wait_timeout_s"}


def test_config_args_and_user_config_validate():
    from pneumo.serving import ModelUserConfig, ServeArgs

    app = _config()["applications"][0]
    args = ServeArgs.model_validate(app["args"])
    assert args.bundle and args.max_upload_bytes > 0
    model = next(d for d in app["deployments"] if d["name"] == "PneumoModel")
    assert ModelUserConfig.model_validate(model["user_config"]).max_batch_size >= 1


def test_import_path_is_the_typed_builder(monkeypatch):
    """Serve's own builder call: validates args with the annotated pydantic model."""
    monkeypatch.syspath_prepend(str(REPO))  # `serve run` runs from the repo root
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from serve_app.app import build_app

    app = call_user_app_builder_with_args_if_necessary(build_app, {"bundle": "some/bundle", "max_replicas": 3})
    assert isinstance(app, Application)
    with pytest.raises(Exception, match="bundel"):
        call_user_app_builder_with_args_if_necessary(build_app, {"bundel": "typo"})
    with pytest.raises(Exception, match="precision"):
        call_user_app_builder_with_args_if_necessary(build_app, {"bundle": "b", "precision": "fp8"})
    with pytest.raises(ValueError, match="max_replicas"):
        build_app({"bundle": "b", "min_replicas": 3, "max_replicas": 2})


def test_cli_flags_become_serve_args():
    from pneumo.config import parse_config
    from pneumo.serving import ServeConfig, serve_args

    cfg = parse_config(ServeConfig, ["runs/x/bundle", "--port", "9001", "--precision", "fp32",
                                     "--max-batch-size", "8", "--api-key-file", "/run/secrets/k"])
    args = serve_args(cfg)
    assert (cfg.port, args.bundle, args.precision, args.max_batch_size, args.api_key_file) == (
        9001, "runs/x/bundle", "fp32", 8, "/run/secrets/k")
    with pytest.raises(SystemExit):
        parse_config(ServeConfig, ["b", "--precision", "fp8"])
