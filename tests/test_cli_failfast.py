"""Operator experience: every config error fails before Ray starts, exit 2, listing the valid choices;
and each model trains with its own default weights (real `pneumo` processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PNEUMO = str(Path(sys.executable).parent / "pneumo")


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PNEUMO, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RAY_ADDRESS": ""})


@pytest.mark.parametrize("args, message", [
    (["train", "DATA", "--model", "nope"], "invalid choice"),
    (["train", "DATA", "--model", "seed_cnn", "--weights", "pretrained"], "has no pretrained weights"),
    (["train", "DATA", "--weights", "/no/such/file.safetensors"], "no such file"),
    (["train", "/no/such/data", "--model", "seed_cnn"], "no such folder"),
    (["train", "DATA", "--optimizer", "lbfgs"], "adam"),
    (["score", "DATA", "--bundle", "B"], "out: required"),
    (["score", "DATA", "--bundle", "B", "--out", "O", "--precision", "fp8"], "int8"),
    (["score", "DATA", "--bundle", "B", "--out", "O", "--engine", "tensorrt"], "onnxruntime"),
    (["evaluate", "B", "DATA", "--split", "holdout"], "val"),
    (["export", "/no/such/bundle"], "no manifest.json"),
    (["quantize", "/no/such/bundle"], "no manifest.json"),
])
def test_config_errors_fail_before_ray_starts(args: list[str], message: str, tmp_path: Path) -> None:
    r = _run(args, tmp_path)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Started a local Ray instance" not in r.stdout + r.stderr  # Ray never started
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("model, expected", [("seed_cnn", "none"), ("efficientnet_lite0", "pretrained")])
def test_default_weights_are_the_models_own(model: str, expected: str) -> None:
    from pneumo.config import parse_config
    from pneumo.train.config import TrainConfig

    assert parse_config(TrainConfig, ["DATA", "--model", model]).weights == expected
