"""Which engine and precision score a bundle on this machine (`choose`), without torch.

    choice = choose(manifest, "auto", "auto", "cpu", threads=2, load=session_for)
    choice.engine, choice.precision, choice.how, choice.excluded     # e.g. openvino int8, "benchmark"

Candidates on a CPU are the ONNX engines (`pneumo.precision.ENGINE_PRECISIONS`) at each precision
they run. One is left out, with its reason kept in `excluded` and logged, when:

- the bundle has no `model.onnx` (or no gated `model.int8.onnx` for int8);
- its engine's package is not importable;
- it is a reduced precision whose gate on this bundle failed or was not run (`pneumo.bundle.gates`),
  or bf16 on a CPU without native bf16 (the gate figures may come from another machine);
- OpenVINO fp32 was measured and disagreed with ONNX Runtime.

With one candidate left, that is the choice; with several, a short micro-benchmark (the bundle's
own graphs, seeded images, the actor's threads; images per CPU-second, so a busy machine does not
skew it) picks the fastest, preferring the earlier
candidate (fp32 before reduced precision, ONNX Runtime before OpenVINO) within `TIE_MARGIN`. The
result is cached on disk per bundle graph, CPU, threads and engine versions
(`$PNEUMO_CACHE_DIR`, default `~/.cache/pneumo/engines.json`), so only the first process on a
machine pays for it. With none left, torch runs the bundle and the fallback says why. On CUDA
torch is the engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumo import precision as P
from pneumo.bundle.manifest import INT8_FILE, ONNX_FILE, Manifest
from pneumo.config import UserError
from pneumo.io.preprocess import to_array
from pneumo.models.runtime import CACHE_ENV, cache_dir, run, versions

log = logging.getLogger(__name__)

__all__ = ["CACHE_ENV", "CACHE_FILE", "Choice", "EngineError", "candidates", "choose", "fastest"]

CACHE_FILE = "engines.json"
TIE_MARGIN = 0.05  # a later candidate must be this much faster to be preferred
BENCH_BATCH = 16
BENCH_SECONDS = 0.5


class EngineError(UserError, RuntimeError):
    """The engine asked for cannot run this bundle here."""


@dataclass
class Choice:
    """The engine and precision chosen, how (`requested`, `only candidate`, `benchmark`, `cached`,
    `fallback`), why others were left out, and the micro-benchmark's images/s per candidate."""

    engine: str
    precision: str
    how: str
    fallback: str | None = None
    excluded: dict[str, str] = field(default_factory=dict)
    images_per_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "precision": self.precision, "how": self.how, "fallback": self.fallback,
                "excluded": dict(self.excluded), "images_per_s": dict(self.images_per_s)}


def importable(engine: str) -> str | None:
    """Why `engine`'s package cannot be imported here, or None."""
    try:
        __import__(engine)
    except ImportError as exc:
        return f"{engine} is not importable ({exc})"
    return None


def _gate_reason(manifest: Manifest, engine: str, precision: str, bf16_native: bool) -> tuple[str | None, bool]:
    """(why `precision` on `engine` may not run this bundle or None, whether only an explicit request may)."""
    if precision == "int8" and INT8_FILE not in manifest.files:
        return "the bundle has no gated model.int8.onnx (`pneumo quantize BUNDLE`)", False
    gate = manifest.gate(engine, precision)
    if gate is not None and not gate.get("passed") and gate.get("ran") is not False:
        return f"its {precision} gate on {engine} failed: {gate.get('reason')}", False
    if precision == "bf16" and not bf16_native:
        return "this CPU has no native bf16 (AVX-512 bf16 / AMX): emulated bf16 is slower than fp32", True
    if precision in P.REDUCED and (gate is None or not gate.get("passed")):
        return (f"no {precision} gate was run on {engine} for this bundle (`pneumo quantize BUNDLE`)"
                if gate is None else f"its {precision} gate on {engine} {gate.get('reason')}"), True
    return None, False


def candidates(manifest: Manifest, engine: str, precision: str, bf16_native: bool | None = None,
               in_memory: bool = False) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(the CPU (engine, precision) pairs that may run, in order of preference; why each other was left out).

    A precision asked for by name on an engine asked for by name may run without a gate (a warning;
    for an in-memory graph, whose caller checks it itself, an info line); never one whose gate failed."""
    bf16 = P.cpu_bf16_native() if bf16_native is None else bf16_native
    explicit = engine != "auto" and precision != "auto"
    engines = P.CPU_ENGINES if engine == "auto" else (engine,)
    ok, excluded = [], {}
    for e in engines:
        for p in P.ENGINE_PRECISIONS[e]:
            if precision != "auto" and p != precision:
                continue
            if not manifest.has_onnx:
                why, soft = f"the bundle has no {ONNX_FILE} ({manifest.onnx.get('refused', 'run `pneumo export BUNDLE`')})", False
            else:
                missing = importable(e)
                why, soft = (missing, False) if missing else _gate_reason(manifest, e, p, bf16)
            if why and soft and explicit:
                (log.info if in_memory else log.warning)("pneumo: %s %s as asked, although %s", e, p, why)
            elif why:
                excluded[f"{e} {p}"] = why
                continue
            ok.append((e, p))
    ok.sort(key=lambda c: (P.REDUCED.index(c[1]) + 1 if c[1] in P.REDUCED else 0))  # fp32 first, stable
    return ok, excluded


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


def machine_key(manifest: Manifest, pairs: list[tuple[str, str]], threads: int) -> str:
    """What a measured choice depends on: the graphs, the candidates, this CPU, the threads, the engines."""
    graphs = {n: manifest.files.get(n, "") for n in (ONNX_FILE, INT8_FILE)}
    cpu = {"machine": platform.machine(), "processor": platform.processor(),
           "flags": hashlib.sha256(" ".join(sorted(P.cpu_flags())).encode()).hexdigest()[:16],
           "cpus": os.cpu_count()}
    blob = json.dumps({"graphs": graphs, "pairs": pairs, "cpu": cpu, "threads": threads, "versions": versions(),
                       "batch": BENCH_BATCH}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_cache() -> dict[str, Any]:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, value: dict[str, Any]) -> None:
    """Add one entry, atomically (several actors of a node may write at once; the last one wins)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = value
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(data, f, indent=1)
        os.replace(f.name, path)
    except OSError as exc:  # a read-only home: measured again next time, nothing else lost
        log.info("engine choice not cached (%s)", exc)


def images_per_s(engine: str, session: Any, x: np.ndarray, seconds: float = BENCH_SECONDS) -> float:
    """Images per CPU-second of `engine` on `x`: one warm-up run, then runs until `seconds` of
    this process's CPU time (at least two). CPU time, not wall time: on a machine shared with
    other work the wall clock measures the neighbours, and a choice cached for good must not."""
    run(engine, session, x)
    n, t0 = 0, time.process_time()
    while n < 2 * len(x) or time.process_time() - t0 < seconds:
        run(engine, session, x)
        n += len(x)
    return n / max(1e-9, time.process_time() - t0)


def bench_images(manifest: Manifest, n: int = BENCH_BATCH) -> np.ndarray:
    """Seeded stand-in X-rays at the bundle's input size, normalised as the engines take them."""
    size = manifest.input.size
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, size, dtype=np.float32)[None, None, :]
    return to_array(np.clip(rng.normal(0, 40, (n, size, size)) + ramp, 0, 255).astype(np.uint8), manifest.input)


def measure(pairs: list[tuple[str, str]], load: Callable[[str, str], Any], manifest: Manifest) -> dict[str, float]:
    x = bench_images(manifest)
    return {f"{e} {p}": images_per_s(e, load(e, p), x) for e, p in pairs}


def fastest(pairs: list[tuple[str, str]], measured: dict[str, float]) -> tuple[str, str]:
    """The fastest pair, or an earlier one within `TIE_MARGIN` of it."""
    best = max(measured.values())
    return next(pair for pair in pairs if measured[f"{pair[0]} {pair[1]}"] >= (1 - TIE_MARGIN) * best)


def choose(manifest: Manifest, engine: str, precision: str, device_type: str, threads: int,
           load: Callable[[str, str], Any], bf16_native: bool | None = None, in_memory: bool = False) -> Choice:
    """The engine and precision for this bundle here (see the module's docstring)."""
    P.check_engine(engine, precision)
    if device_type == "cuda" or engine == "torch":
        if engine not in ("auto", "torch"):
            raise EngineError(f"engine={engine!r} runs on the CPU here; use device=cpu or --engine torch")
        return Choice("torch", precision, "requested" if engine == "torch" else "cuda")
    pairs, excluded = candidates(manifest, engine, precision, bf16_native, in_memory)
    if not pairs:
        return _no_candidate(manifest, engine, precision, excluded)
    if len(pairs) == 1:
        return _logged(Choice(*pairs[0], "requested" if engine != "auto" and precision != "auto"
                              else "only candidate", excluded=excluded))
    key = machine_key(manifest, pairs, threads)
    cached = None if in_memory else _read_cache().get(key)
    if cached and tuple(cached.get("choice", ())) in [tuple(p) for p in pairs]:
        return _logged(Choice(*cached["choice"], "cached", excluded=excluded, images_per_s=cached["images_per_s"]))
    measured = measure(pairs, load, manifest)
    chosen = fastest(pairs, measured)
    if not in_memory:
        _write_cache(key, {"choice": list(chosen), "images_per_s": measured, "at": time.time()})
    return _logged(Choice(*chosen, "benchmark", excluded=excluded, images_per_s=measured))


def _no_candidate(manifest: Manifest, engine: str, precision: str, excluded: dict[str, str]) -> Choice:
    """Nothing on the CPU engines may run: torch for `auto`, an error for an engine asked by name."""
    reasons = "; ".join(f"{k}: {v}" for k, v in excluded.items())
    if engine == "auto" and precision in ("auto", "fp32", "bf16"):
        fallback = reasons or "no CPU engine runs this bundle"
        log.warning("pneumo: engine auto -> torch: %s", fallback)
        return Choice("torch", precision, "fallback", fallback=fallback, excluded=excluded)
    if precision == "int8" or (precision != "auto" and any(precision in k for k in excluded)):
        raise P.PrecisionError(f"precision={precision!r} cannot run this bundle here: {reasons}")
    raise EngineError(f"engine={engine!r} cannot run this bundle here: {reasons}; use --engine torch")


def _logged(choice: Choice) -> Choice:
    measured = ", ".join(f"{k} {v:.0f} img/CPU-s" for k, v in choice.images_per_s.items())
    log.info("pneumo: engine %s %s (%s%s)%s", choice.engine, choice.precision, choice.how,
             f": {measured}" if measured else "",
             "; left out: " + "; ".join(f"{k}: {v}" for k, v in choice.excluded.items()) if choice.excluded else "")
    return choice
