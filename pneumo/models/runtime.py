"""The ONNX engines' sessions, without torch: ONNX Runtime and OpenVINO over the same graph file.

    session = ort_session(onnx_bytes, threads=2)
    probs, feats = run_session(session, x)                  # x: float32[N, C, S, S]
    compiled = ov_compiled(onnx_bytes, "bf16", threads=2)   # OpenVINO CPU, bf16 inference precision
    probs, feats = run("openvino", compiled, x)
    session = engine_session("openvino", onnx_bytes, "fp32", threads=2, key=sha256)   # cached per process

Both run the graph `pneumo.models.onnx` exports (`input -> (probs, features)`). Both use exactly
`threads` intra-op threads and do not busy-wait between runs: in an actor or a replica the same
cores also decode, proxy and answer HTTP (measured in BENCHMARKS.md). This module imports
neither torch nor the engines at import time, so a scoring actor on the ONNX path never loads torch.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

PARITY_TOL = 1e-4  # an engine's fp32 probabilities against torch's (or ORT's), at every export
INPUT_NAME = "input"
OUTPUT_NAMES = ("probs", "features")
OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: QDQ ops int8, the rest f32

CACHE_ENV = "PNEUMO_CACHE_DIR"
OV_CACHE_CAP_ENV = "PNEUMO_OPENVINO_CACHE_GB"  # compiled graphs kept on disk (default 2 GB, oldest go first)
OV_CACHE_CAP_GB = 2.0

_CACHE: dict[tuple[str, str, str, int], Any] = {}
_LOCK = threading.Lock()


def cache_dir() -> Path:
    """pneumo's machine-local cache (`$PNEUMO_CACHE_DIR`, else `~/.cache/pneumo`): the engine
    choice's measurements and OpenVINO's compiled graphs. Safe to delete."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pneumo")
    return Path(root)


def ort_session(model: bytes | str, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session; `threads` intra-op threads (0: ORT's default, all cores)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    # No busy-waiting between runs: in an actor or a replica the same cores also decode, proxy and
    # answer HTTP, and spinning intra-op threads would take those cycles (measured in BENCHMARKS.md).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def run_session(session: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, feats = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
    return probs.astype(np.float32), feats.astype(np.float32)


def ov_compiled(model: bytes, precision: str = "fp32", threads: int = 0) -> Any:
    """An OpenVINO CPU compiled model of an ONNX graph at `precision` (fp32, bf16, or int8 for a
    QDQ graph), one stream of `threads` threads (0: OpenVINO's default).

    The inference precision is always set: OpenVINO's CPU default is bf16 on AMX CPUs, and fp32
    must mean fp32. One stream, latency hint, no CPU pinning: the actor's cores are shared with
    its read tasks. OpenVINO's TBB threads sleep between runs (measured: no CPU time when idle).
    Compiled graphs are cached on disk (`cache_dir()/openvino`, OpenVINO's own model cache), so a
    new scoring actor or replica of the same graph skips most of the compile.
    """
    import openvino as ov

    if precision not in OV_PRECISION:
        raise ValueError(f"openvino precision={precision!r}; valid: {', '.join(OV_PRECISION)}")
    core = ov.Core()
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY",
                              "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        ov_cache = cache_dir() / "openvino"
        ov_cache.mkdir(parents=True, exist_ok=True)
        prune_cache(ov_cache, float(os.environ.get(OV_CACHE_CAP_ENV, OV_CACHE_CAP_GB)))
        config["CACHE_DIR"] = str(ov_cache)
    except OSError:  # a read-only home: compiled every time, nothing else lost
        pass
    return OVModel(core.compile_model(core.read_model(model), "CPU", config))


def prune_cache(folder: Path, cap_gb: float) -> None:
    """Delete the least recently written files of `folder` until it holds at most `cap_gb`.

    OpenVINO's model cache never evicts (one blob of ~100 MB per graph and precision, for every
    bundle ever scored); by hand because OpenVINO has no cap. A blob deleted under a running
    process is only compiled again by the next one.
    """
    files = []
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            stat = entry.stat(follow_symlinks=False)
            files.append((stat.st_mtime, stat.st_size, entry.path))
    total, cap = sum(size for _, size, _ in files), cap_gb * 2**30
    for _, size, path in sorted(files):
        if total <= cap:
            break
        try:
            os.remove(path)
        except FileNotFoundError:  # another process pruned it first
            pass
        total -= size


class OVModel:
    """A compiled OpenVINO model with one infer request per calling thread (requests are not
    thread-safe; Serve may score from more than one thread)."""

    def __init__(self, compiled: Any):
        self.compiled = compiled
        self.outputs = [compiled.output(name) for name in OUTPUT_NAMES]
        self._local = threading.local()

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        result = request.infer({INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
        return (np.array(result[self.outputs[0]], dtype=np.float32),
                np.array(result[self.outputs[1]], dtype=np.float32))


def engine_session(engine: str, model: bytes, precision: str, threads: int, key: str) -> Any:
    """A session of `engine` for the graph `model` (whose sha256 is `key`), cached per process:
    a second Predictor of the same bundle (a Serve swap back, evaluate after score) reuses it."""
    cache_key = (engine, key, precision, int(threads))
    with _LOCK:
        if cache_key not in _CACHE:
            _CACHE[cache_key] = (ov_compiled(model, precision, threads) if engine == "openvino"
                                 else ort_session(model, threads))
        return _CACHE[cache_key]


def drop_session(engine: str, key: str, precision: str, threads: int) -> None:
    """Forget one cached session (the engine choice drops the candidates it measured and did not pick)."""
    with _LOCK:
        _CACHE.pop((engine, key, precision, int(threads)), None)


def run(engine: str, session: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probs, features) of float32[N, C, S, S] on a session of `engine`."""
    return session.run(x) if engine == "openvino" else run_session(session, x)


def versions() -> dict[str, str]:
    """The installed engines' versions (absent ones left out), without importing torch."""
    out = {}
    for mod in ("onnxruntime", "openvino"):
        try:
            out[mod] = str(__import__(mod).__version__)
        except Exception:  # noqa: BLE001 - an engine that is not installed has no version
            pass
    return out
