"""serve_app/config.yaml, the typed builder and the generated CLI, without starting Serve (fast).

The Serve schema of the file (and of the RayService made from it) is checked in
tests/test_cluster_configs.py; the running app is tested over HTTP in tests/test_serve.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "serve_app" / "config.yaml"


def _app() -> dict:
    return yaml.safe_load(CONFIG.read_text())["applications"][0]


def test_config_is_one_deployment_with_scaling_overload_and_batching():
    from pneumo.serve.app import PneumoService, ServeArgs, UserConfig

    app = _app()
    ServeArgs.model_validate(app["args"])
    (dep,) = app["deployments"]
    assert dep["name"] == PneumoService.name == "PneumoService"
    auto = dep["autoscaling_config"]
    assert 1 <= auto["min_replicas"] < auto["max_replicas"] and auto["target_ongoing_requests"] > 0
    user = UserConfig.model_validate(dep["user_config"])
    assert dep["max_ongoing_requests"] >= user.max_batch_size  # a full batch fits in a replica
    assert dep["max_queued_requests"] > 0
    assert dep["backpressure_config"]["status_code"] == 503 and dep["backpressure_config"]["retry_after_s"] >= 1


def test_builder_sets_no_deployment_options():
    """Scaling and batching come from the YAML / .options() or the decorator's defaults, never from args."""
    from pneumo.serve.app import DEPLOYMENT_DEFAULTS, PneumoService, ServeArgs, build_app

    app = build_app(ServeArgs(bundle="b"))
    dep = app._bound_deployment
    assert dep.name == "PneumoService"
    assert dep.max_ongoing_requests == DEPLOYMENT_DEFAULTS["max_ongoing_requests"] == PneumoService.max_ongoing_requests
    assert dep.user_config == DEPLOYMENT_DEFAULTS["user_config"]
    scaling = {"min_replicas", "max_replicas", "max_batch_size", "num_cpus", "max_ongoing_requests", "user_config"}
    assert not scaling & set(ServeArgs.model_fields)


def test_batch_defaults_are_one_constant():
    from pneumo.serve import app as serving

    assert serving.UserConfig().max_batch_size == serving.MAX_BATCH_SIZE == serving.DEPLOYMENT_DEFAULTS[
        "user_config"]["max_batch_size"]
    assert serving.UserConfig().batch_wait_timeout_s == serving.BATCH_WAIT_S
    assert serving.PneumoService.func_or_class._batch._get_max_batch_size() == serving.MAX_BATCH_SIZE


BUILDER_CASES = {  # args -> error match (None: valid)
    "valid": ({"bundle": "some/bundle", "engine": "onnxruntime", "precision": "int8"}, None),
    "typo": ({"bundel": "typo"}, "bundel"),
    "precision": ({"bundle": "b", "precision": "fp8"}, "precision"),
    "engine": ({"bundle": "b", "engine": "tensorrt"}, "engine"),
    "scaling_is_not_an_arg": ({"bundle": "b", "max_replicas": 3}, "max_replicas"),
}


@pytest.mark.parametrize("case", list(BUILDER_CASES))
def test_import_path_is_the_typed_builder(monkeypatch, case):
    """Serve's own builder call validates args with the annotated pydantic model."""
    monkeypatch.syspath_prepend(str(REPO))  # `serve run` runs from the repo root
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from serve_app.app import build_app

    args, error = BUILDER_CASES[case]
    if error is None:
        assert isinstance(call_user_app_builder_with_args_if_necessary(build_app, args), Application)
    else:
        with pytest.raises(Exception, match=error):
            call_user_app_builder_with_args_if_necessary(build_app, args)


def test_cli_has_a_flag_per_serve_arg_plus_cli_keys():
    from pneumo.config import build_parser
    from pneumo.serve.app import ServeArgs
    from pneumo.serve.cli import ServeConfig

    flags = {a.dest for a in build_parser(ServeConfig)._actions}
    assert set(ServeArgs.model_fields) | {"host", "port", "num_cpus", "address", "serve_config"} <= flags


def test_cli_flags_override_the_serve_config_args():
    from pneumo.config import parse_config
    from pneumo.serve.cli import ServeConfig, app_config, deployment_options, serve_args

    cfg = parse_config(ServeConfig, ["runs/x/bundle", "--port", "9001", "--precision", "fp32", "--engine", "torch",
                                     "--api-key-file", "/run/secrets/k", "--serve-config", str(CONFIG)])
    app = app_config(cfg.serve_config)
    args = serve_args(cfg, app)
    assert (cfg.port, args.bundle, args.precision, args.engine, args.api_key_file) == (
        9001, "runs/x/bundle", "fp32", "torch", "/run/secrets/k")
    assert args.max_pixels == _app()["args"]["max_pixels"]  # from the file, not typed
    assert deployment_options(app)["max_queued_requests"] == _app()["deployments"][0]["max_queued_requests"]
    assert serve_args(parse_config(ServeConfig, ["b"])).precision == "auto"  # no file: ServeArgs' defaults
    with pytest.raises(SystemExit):
        parse_config(ServeConfig, ["b", "--precision", "fp8"])


class _Broken:
    classes = ["NORMAL", "PNEUMONIA"]

    class spec:  # noqa: N801
        size = 8

    def __init__(self, answer):
        self.answer = answer

    def predict(self, images):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize("answer", [RuntimeError("CUDA error"), np.full((1, 2), np.nan), np.zeros((1, 3))])
def test_probe_fails_for_a_model_that_cannot_score(answer):
    """check_health and /readyz run this probe: a replica that cannot score is reported and replaced."""
    from pneumo.serve.app import probe

    with pytest.raises(RuntimeError):
        probe(_Broken(answer))
    probe(_Broken(np.array([[0.3, 0.7]], np.float32)))
