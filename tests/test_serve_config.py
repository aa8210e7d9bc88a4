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


# ---------------------------------------------------------------- locked by default


ACCESS = {  # (host, has_key, allow_anonymous) -> refused?
    "loopback_no_key": (("127.0.0.1", False, False), False),
    "localhost_no_key": (("localhost", False, False), False),
    "ipv6_loopback": (("::1", False, False), False),
    "all_interfaces_no_key": (("0.0.0.0", False, False), True),
    "ipv6_all_no_key": (("::", False, False), True),
    "a_lan_address_no_key": (("10.1.2.3", False, False), True),
    "unknown_host_no_key": ((None, False, False), True),
    "all_interfaces_key": (("0.0.0.0", True, False), False),
    "all_interfaces_anonymous": (("0.0.0.0", False, True), False),
}


@pytest.mark.parametrize("case", list(ACCESS))
def test_nothing_listens_beyond_loopback_without_a_key(case):
    from pneumo.serve.config import access_error

    args, refused = ACCESS[case]
    problem = access_error(*args)
    assert (problem is not None) == refused
    if refused:
        assert "api_key_file" in problem and "PNEUMO_API_KEY" in problem and "allow_anonymous" in problem


def test_keys_are_stripped(tmp_path, monkeypatch):
    """A key with a trailing newline (`echo`, `kubectl create secret --from-file`) still matches."""
    from pneumo.serve.config import read_api_key

    key = tmp_path / "key"
    key.write_text("  t0ken\n")
    assert read_api_key(str(key)) == "t0ken"
    monkeypatch.setenv("PNEUMO_API_KEY", "t0ken\r\n")
    assert read_api_key(None) == "t0ken"
    monkeypatch.setenv("PNEUMO_API_KEY", "\n")
    assert read_api_key(None) is None  # whitespace is no key (so a public bind is refused)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_api_key(str(tmp_path / "empty"))


def test_pneumo_serve_on_all_interfaces_without_a_key_exits_with_what_to_set(tmp_path):
    """Before Ray starts: exit 2 and a message naming the three ways out."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PNEUMO_API_KEY"}
    pneumo = Path(sys.executable).with_name("pneumo")
    out = subprocess.run([str(pneumo), "serve", str(tmp_path), "--host", "0.0.0.0"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 2, out.stderr[-1000:]
    assert "--api-key-file" in out.stderr and "PNEUMO_API_KEY" in out.stderr and "--allow-anonymous" in out.stderr
    assert "Ray instance" not in out.stdout + out.stderr  # refused before Ray started


def test_refusal_follows_host_key_and_allow_anonymous(tmp_path, monkeypatch):
    from pneumo.config import parse_config
    from pneumo.serve.cli import ServeConfig, refusal, serve_args

    monkeypatch.delenv("PNEUMO_API_KEY", raising=False)
    key = tmp_path / "key"
    key.write_text("k\n")
    for argv, refused in [(["b"], False), (["b", "--host", "0.0.0.0"], True),
                          (["b", "--host", "0.0.0.0", "--allow-anonymous"], False),
                          (["b", "--host", "0.0.0.0", "--api-key-file", str(key)], False),
                          (["b", "--api-key-file", str(tmp_path / "missing")], True)]:
        cfg = parse_config(ServeConfig, argv)
        assert (refusal(cfg, serve_args(cfg)) is not None) == refused, argv


def test_serve_run_of_the_config_without_a_key_is_refused(monkeypatch):
    """serve_app/config.yaml binds 0.0.0.0: its app, as the replica checks it, refuses to start
    without a key (the message `serve run` / `serve status` shows) and starts with one."""
    from pneumo.serve.config import ServeArgs, access_error, read_api_key

    monkeypatch.delenv("PNEUMO_API_KEY", raising=False)
    doc = yaml.safe_load(CONFIG.read_text())
    host, args = doc["http_options"]["host"], ServeArgs.model_validate(_app()["args"])
    assert host == "0.0.0.0" and not args.allow_anonymous
    problem = access_error(host, read_api_key(args.api_key_file) is not None, args.allow_anonymous)
    assert problem and "refusing to serve on 0.0.0.0" in problem
    monkeypatch.setenv("PNEUMO_API_KEY", "k")
    assert access_error(host, read_api_key(args.api_key_file) is not None, args.allow_anonymous) is None


def test_every_entry_point_has_the_same_proxy_backstop():
    from pneumo.config import parse_config
    from pneumo.serve.cli import ServeConfig, app_config, http_options

    from_file = yaml.safe_load(CONFIG.read_text())["http_options"]["request_timeout_s"]
    with_config = parse_config(ServeConfig, ["b", "--serve-config", str(CONFIG)])
    without = parse_config(ServeConfig, ["b"])
    assert http_options(with_config, app_config(str(CONFIG)))["request_timeout_s"] == from_file
    assert http_options(without, app_config(None))["request_timeout_s"] == from_file


# ---------------------------------------------------------------- isolation inside a replica


def test_a_full_pool_refuses_instead_of_queueing():
    import threading

    from pneumo.serve.runtime import Pool

    pool, gate = Pool("explain", threads=1, queue=1), threading.Event()
    try:
        running, queued = pool.submit(gate.wait), pool.submit(gate.wait)
        assert running is not None and queued is not None and pool.full()
        assert pool.submit(gate.wait) is None and pool.stats()["refused"] == 1
        gate.set()
        running.result(10), queued.result(10)
        assert not pool.full() and pool.submit(lambda: 1).result(10) == 1
    finally:
        gate.set()
        pool.shutdown()


def test_the_decode_budget_holds_decodes_until_their_bytes_fit():
    import asyncio

    from pneumo.serve.runtime import ByteBudget

    async def scenario() -> list[str]:
        budget, order = ByteBudget(100), []

        async def job(name: str, n: int, hold: asyncio.Event) -> None:
            async with budget.hold(n):
                order.append(f"{name} in ({budget.used})")
                await hold.wait()
            order.append(f"{name} out")

        first, second, huge = asyncio.Event(), asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(job("a", 60, first))]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(job("b", 60, second)))
        tasks.append(asyncio.create_task(job("c", 10**9, huge)))  # larger than the budget: waits for all of it
        for _ in range(5):
            await asyncio.sleep(0)
        assert order == ["a in (60)"] and budget.waiting == 2
        first.set()
        second.set()
        huge.set()
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(scenario())
    assert order[:3] == ["a in (60)", "a out", "b in (60)"] and "c in (100)" in order


def test_decode_cost_is_read_from_the_header():
    import io

    from PIL import Image

    from pneumo.serve.runtime import decode_cost

    buf = io.BytesIO()
    Image.new("I;16", (3000, 2000)).save(buf, format="PNG")
    assert decode_cost(buf.getvalue()) == 3000 * 2000 * 2 + 2 * 3000 * 2000
    assert decode_cost(b"not an image") == len(b"not an image")


class _Picky:
    """A predictor that raises on any batch holding an all-255 image (the exception path)."""

    classes = ["NORMAL", "PNEUMONIA"]

    def predict_with_features(self, images):
        if (np.asarray(images).reshape(len(images), -1) == 255).all(axis=1).any():
            raise RuntimeError("boom")
        return np.tile([[0.25, 0.75]], (len(images), 1)).astype(np.float32), np.ones((len(images), 3), np.float32)

    def positive_probability(self, probs):
        return probs[:, 1]


def test_score_items_retries_image_by_image_so_one_failure_is_one_item():
    from pneumo.io.storage import Location
    from pneumo.serve.runtime import Loaded, ModelError, score_items

    loaded = Loaded(_Picky(), Location.of("."))
    images = [np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8), np.ones((4, 4), np.uint8)]
    out, drift = score_items([(im, loaded) for im in images])
    assert isinstance(out[1], ModelError) and "failed on this image" in str(out[1])
    assert [o[0].tolist() for i, o in enumerate(out) if i != 1] == [[0.25, 0.75], [0.25, 0.75]]
    assert drift == []  # no drift window on this model
    out, _ = score_items([(images[1], loaded)])
    assert isinstance(out[0], ModelError)


def test_admission_refuses_by_predicted_wait_and_always_admits_into_an_idle_replica():
    import time

    from pneumo.serve.runtime import Admission

    a = Admission(max_wait_s=1.0, cap=4)
    assert a.admit(1) and a.admit(3) and not a.admit(1)  # no rate yet: at most `cap` waiting
    assert a.refused == 1
    a.done(4)
    assert a.waiting == 0 and a.admit(100)  # an idle replica takes whatever comes
    a = Admission(max_wait_s=1.0, cap=4)
    deadline = time.monotonic() + 10
    while a.rate is None and time.monotonic() < deadline:  # ~1 s busy at 20 answers/s
        a.admit(2)
        time.sleep(0.1)
        a.done(2)
    a.admit(1)
    rate = a.rate
    assert rate is not None and 5 < rate < 40, rate
    assert a.admit(int(rate * 0.5)) and not a.admit(int(rate))  # ~1.5 s of work would wait: refused


def test_pneumo_serve_says_serving_only_once_the_app_is_ready(tmp_path):
    """A real `pneumo serve` (its own local Ray): the moment "serving at" is printed, /readyz is 200
    and /favicon.ico is there; SIGTERM stops it cleanly."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    import httpx
    from helpers import free_port, make_serve_bundle

    make_serve_bundle(tmp_path / "b", seed=1)
    port = free_port()
    pneumo = Path(sys.executable).with_name("pneumo")
    env = {**{k: v for k, v in os.environ.items() if k not in ("PNEUMO_API_KEY", "RAY_ADDRESS")}}
    proc = subprocess.Popen([str(pneumo), "serve", str(tmp_path / "b"), "--port", str(port), "--num-cpus", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    timer = threading.Timer(400, proc.kill)  # a hung start fails the test, never the suite
    timer.start()
    try:
        line = next((ln for ln in proc.stdout if "serving" in ln), "")
        assert f"at http://127.0.0.1:{port}/" in line, line
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30)  # at once, no retry
        icon = httpx.get(f"http://127.0.0.1:{port}/favicon.ico", timeout=30)
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        finally:
            timer.cancel()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0
