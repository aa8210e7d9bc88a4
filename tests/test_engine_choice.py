"""`--engine auto`: the fastest engine whose gate passed, its cached micro-benchmark, and the
fallbacks (missing package, failed gate, no native bf16), each with a logged reason. Real bundles,
real sessions; the gate figures are written into the manifest as `pneumo quantize` writes them."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from pneumo.bundle import engines
from pneumo.bundle.manifest import INT8_FILE, add_file, read_file, read_manifest, write_manifest
from pneumo.bundle.predict import EngineError, Predictor
from pneumo.bundle.store import save_bundle
from pneumo.io.preprocess import InputSpec
from pneumo.models.factory import get_model
from pneumo.models.onnx import quantize_onnx
from pneumo.precision import PrecisionError

CLASSES = ["NORMAL", "PNEUMONIA"]
SPEC = InputSpec(size=48, channels=1, mean=(0.5,), std=(0.25,))
PASSED = {"passed": True, "reason": None}
FAILED = {"passed": False, "reason": "val AUC 0.9000 vs fp32 0.9900 (drop 0.0900 > 0.002)"}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test measures into its own cache."""
    monkeypatch.setenv(engines.CACHE_ENV, str(tmp_path / "cache"))


def _images(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, SPEC.size, SPEC.size)).astype(np.uint8)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A seed_cnn bundle with model.onnx and a model.int8.onnx (gates filled in per test)."""
    import torch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("choice") / "b"
    model = get_model("seed_cnn", 2, input_spec=SPEC).eval()
    m = save_bundle(model, str(root), "seed_cnn", CLASSES, SPEC)
    add_file(str(root), m, INT8_FILE, quantize_onnx(read_file(str(root), m, "model.onnx"), SPEC, _images(16)))
    write_manifest(str(root), m)
    return root


@pytest.mark.parametrize("n", [1, 5, 64, 65])
def test_int8_calibrates_on_any_number_of_images(base, n: int) -> None:
    """64 images (4 batches of 16) once failed: onnxruntime's calibrator dropped its data every 4 batches."""
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    m = read_manifest(str(base))
    seen = []
    collect = MinMaxCalibrater.collect_data

    def counting(self, reader):  # noqa: ANN001 - wraps the real calibrator, counting the images it is fed
        original = reader.get_next

        def get_next():
            batch = original()
            if batch:
                seen.append(len(next(iter(batch.values()))))
            return batch
        reader.get_next = get_next
        return collect(self, reader)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MinMaxCalibrater, "collect_data", counting)
        assert quantize_onnx(read_file(str(base), m, "model.onnx"), SPEC, _images(n))
    assert sum(seen) == n  # every image reaches the calibrator


def _bundle(base, tmp_path, gates: dict) -> str:
    import shutil

    out = tmp_path / "b"
    shutil.copytree(base, out)
    m = read_manifest(str(out))
    m.gates = gates
    write_manifest(str(out), m)
    return str(out)


ALL_PASSED = {"onnxruntime": {"int8": PASSED}, "openvino": {"fp32": PASSED, "bf16": PASSED, "int8": PASSED}}


def test_auto_measures_every_gated_candidate_and_caches_the_choice(base, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pneumo.bundle.engines")
    bundle = _bundle(base, tmp_path, ALL_PASSED)
    p = Predictor(bundle, threads=1)
    measured = set(p.choice.images_per_s)
    expect = {"onnxruntime fp32", "onnxruntime int8", "openvino fp32", "openvino int8"}
    assert expect <= measured and measured <= expect | {"openvino bf16"}
    assert p.choice.how == "benchmark" and f"{p.engine} {p.precision}" in measured
    assert p.describe()["engine_choice"]["engine"] == p.engine
    assert f"engine {p.engine} {p.precision} (benchmark: " in caplog.text
    again = Predictor(bundle, threads=1)
    assert (again.choice.how, again.engine, again.precision) == ("cached", p.engine, p.precision)
    assert json.loads((tmp_path / "cache" / engines.CACHE_FILE).read_text())  # on disk, for the next process
    other_threads = Predictor(bundle, threads=2)
    assert other_threads.choice.how == "benchmark"  # the threads are part of what it depends on


def test_fastest_prefers_the_earlier_candidate_within_the_margin() -> None:
    pairs = [("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "int8")]
    assert engines.fastest(pairs, {"onnxruntime fp32": 100, "openvino fp32": 103, "openvino int8": 300}) == \
        ("openvino", "int8")
    assert engines.fastest(pairs, {"onnxruntime fp32": 100, "openvino fp32": 103, "openvino int8": 90}) == \
        ("onnxruntime", "fp32")


FALLBACKS = {  # name: (gates, bf16_native, what hides, excluded pair, words in its reason)
    "failed gate": ({"onnxruntime": {"int8": FAILED}, "openvino": {"int8": FAILED, "bf16": FAILED}}, True, None,
                    "openvino bf16", "gate on openvino failed"),
    "gate not run": ({"openvino": {"int8": {"passed": False, "ran": False, "reason": "not run: no data"}}},
                     True, None, "openvino int8", "not run"),
    "no gate record": ({}, True, None, "onnxruntime int8", "no int8 gate was run"),
    "no native bf16": (ALL_PASSED, False, None, "openvino bf16", "no native bf16"),
    "missing package": (ALL_PASSED, True, "openvino", "openvino int8", "openvino is not importable"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_auto_falls_back_with_a_logged_reason(base, tmp_path, monkeypatch, caplog, case: str) -> None:
    gates, bf16, hide, pair, words = FALLBACKS[case]
    caplog.set_level(logging.INFO, logger="pneumo.bundle.engines")
    if hide:
        monkeypatch.setitem(sys.modules, hide, None)  # `import openvino` raises ImportError, as when absent
    manifest = read_manifest(_bundle(base, tmp_path, gates))
    pairs, excluded = engines.candidates(manifest, "auto", "auto", bf16_native=bf16)
    assert pair not in {f"{e} {p}" for e, p in pairs} and words in excluded[pair], excluded
    choice = engines.choose(manifest, "auto", "auto", "cpu", 1, lambda e, p: _session(manifest, tmp_path, e, p),
                            bf16_native=bf16)
    assert f"{choice.engine} {choice.precision}" != pair and pair in choice.excluded
    assert words in caplog.text  # the reason is in the log line of the choice
    if case == "failed gate":  # a failed gate is refused even when asked for by name
        with pytest.raises(PrecisionError, match="failed"):
            engines.choose(manifest, "openvino", "bf16", "cpu", 1, lambda e, p: None, bf16_native=True)


def _session(manifest, tmp_path, engine: str, precision: str):
    from pneumo.models.runtime import engine_session

    name = INT8_FILE if precision == "int8" else "model.onnx"
    blob = read_file(str(tmp_path / "b"), manifest, name)
    return engine_session(engine, blob, precision, 1, manifest.files[name])


def test_no_onnx_engine_at_all_falls_back_to_torch(base, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    p = Predictor(_bundle(base, tmp_path, ALL_PASSED))
    assert (p.engine, p.precision) == ("torch", "fp32") and "onnxruntime is not importable" in p.fallback
    assert "engine auto -> torch" in caplog.text
    with pytest.raises(EngineError, match="openvino is not importable"):
        Predictor(_bundle(base, tmp_path / "x", ALL_PASSED), engine="openvino")


def test_an_ungated_precision_runs_only_when_asked_for_by_name(base, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pneumo.bundle.engines")
    bundle = _bundle(base, tmp_path, {})
    assert Predictor(bundle).precision == "fp32"
    p = Predictor(bundle, engine="openvino", precision="int8")
    assert (p.engine, p.precision, p.choice.how) == ("openvino", "int8", "requested")
    assert "as asked, although no int8 gate was run" in caplog.text
    assert p.predict(_images()).shape == (4, 2)


def test_torch_stays_the_engine_on_cuda(base) -> None:
    manifest = read_manifest(str(base))
    choice = engines.choose(manifest, "auto", "auto", "cuda", 1, lambda e, p: None)
    assert (choice.engine, choice.how) == ("torch", "cuda")
    with pytest.raises(EngineError, match="runs on the CPU"):
        engines.choose(manifest, "openvino", "auto", "cuda", 1, lambda e, p: None)


def test_the_onnx_path_never_imports_torch(base, tmp_path) -> None:
    code = ("import sys, numpy as np; from pneumo.bundle.predict import Predictor; "
            f"p = Predictor({str(base)!r}); p.predict(np.zeros((2, 48, 48), np.uint8)); "
            "print(p.engine, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PNEUMO_CACHE_DIR": str(tmp_path / "c"), "PATH": "/usr/bin:/bin",
                              "CUDA_VISIBLE_DEVICES": ""})
    engine, torch_loaded = out.stdout.split()
    assert engine in ("onnxruntime", "openvino") and torch_loaded == "False", out.stderr


@pytest.mark.parametrize("n", [16, 64, 72], ids=["one-batch", "multiple-of-4-batches", "4-batches-and-a-half"])
def test_int8_calibration_uses_every_image(base, n: int) -> None:
    """Calibration takes any number of images (bright ones first, then dark) and the int8 graph
    follows fp32 on the bright ones. ONNX Runtime's CalibMaxIntermediateOutputs, which pneumo used,
    drops its buffered batches (onnxruntime#18893): it raised on 64 images (4 batches of 16)."""
    from pneumo.models.runtime import ort_session, run_session

    m = read_manifest(str(base))
    fp32 = read_file(str(base), m, "model.onnx")
    bright = np.full((16, SPEC.size, SPEC.size), 255, np.uint8)
    images = np.concatenate([bright, np.zeros((n - 16, SPEC.size, SPEC.size), np.uint8)]) if n > 16 else bright
    int8 = quantize_onnx(fp32, SPEC, images)
    got = run_session(ort_session(int8, threads=1), _norm(bright[:4]))[0]
    want = run_session(ort_session(fp32, threads=1), _norm(bright[:4]))[0]
    assert np.abs(got - want).max() < 0.05, (got, want)


def _norm(images: np.ndarray) -> np.ndarray:
    from pneumo.io.preprocess import to_array

    return to_array(images, SPEC)


def test_the_compiled_graph_cache_keeps_the_newest_files_under_its_cap(tmp_path) -> None:
    from pneumo.models.runtime import prune_cache

    for age, name in enumerate(["newest", "middle", "oldest"]):
        path = tmp_path / name
        path.write_bytes(b"x" * 1024)
        os.utime(path, (1_000_000 - age * 100, 1_000_000 - age * 100))
    prune_cache(tmp_path, cap_gb=2048 / 2**30)             # room for two of the three
    assert sorted(p.name for p in tmp_path.iterdir()) == ["middle", "newest"]
    prune_cache(tmp_path, cap_gb=0)
    assert list(tmp_path.iterdir()) == []
