"""What one replica runs, without Serve's decorators: the loaded model, its probe, per-item scoring,
and the limits that keep one client from taking the replica down.

- `Loaded` / `load(args, location)`: a Predictor, its bundle and drift window, swapped as one object;
  a bundle that cannot score a blank image is refused before it serves.
- `score_items(items)`: one forward pass per loaded model in a `@serve.batch` batch; if it raises,
  image by image (as batch scoring does), so one image the model fails on is an error for that
  item only. Drift bookkeeping is returned, not done: the caller records it after answering.
- `Pool`: a bounded thread pool; `try_run` refuses (returns None) when its queue is full.
  The replica has one each for decoding, scoring, Grad-CAM, health probes and drift, so a few
  `explain=true` requests or a `/readyz` flood cannot starve the others.
- `ProbeCache`: `/readyz`, `/v2/health/ready` and `check_health` share one probe result for
  `PROBE_CACHE_S` seconds (one forward pass, on the health pool, whatever the request rate).
- `Admission`: refuses at once (before the body is read) a request whose predicted wait for the
  model exceeds `max_queue_wait_s`, from the images admitted and not yet answered and the rate the
  replica scores at; Serve's own queue cannot tell a health probe from a scoring request, this can.
- `ByteBudget` / `decode_cost(data)`: concurrent decodes are capped by the bytes they decode to
  (estimated from the header, before any pixel is decoded).
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pneumo.bundle.manifest import WEIGHTS_FILE, drift_reference, read_file
from pneumo.bundle.predict import Predictor
from pneumo.io.preprocess import decoded_bytes, sniff_format, to_tensor
from pneumo.io.storage import Location
from pneumo.models.gradcam import gradcam, overlay_png
from pneumo.monitor.window import DriftWindow
from pneumo.serve.config import PROBE_CACHE_S, ServeArgs

__all__ = ["Loaded", "load", "probe", "score_items", "ModelError", "Pool", "ProbeCache", "ByteBudget",
           "Admission", "decode_cost", "explain_png"]


class ModelError(RuntimeError):
    """The model failed on one image (an exception, or probabilities that are not finite)."""


@dataclass
class Loaded:
    """A Predictor, its bundle and its drift window (swapped as one object)."""

    predictor: Any
    location: Location
    drift: DriftWindow | None = None  # when the bundle has a drift reference
    features: int = 0  # width of the embedding (the `features` output)
    explain_lock: threading.Lock = field(default_factory=threading.Lock)


def load(args: ServeArgs, location: Location) -> Loaded:
    """Load and probe a bundle; raises when it cannot be read or cannot score."""
    p = Predictor(location, device=args.device, precision=args.precision, engine=args.engine,
                  channels_last=args.channels_last, threads=args.threads)
    if p.engine != "torch":  # Grad-CAM reads the weights later: a bundle whose weights are broken is refused now
        read_file(location, p.manifest, WEIGHTS_FILE)
    reference = drift_reference(location, p.manifest) if args.drift_window else None
    window = DriftWindow(reference, size=args.drift_window, every_s=args.drift_every_s) if reference else None
    features = probe(p)  # a bundle that cannot score is refused before it serves
    return Loaded(p, location, window, features)


def probe(predictor: Any) -> int:
    """Score one blank image: raises when the model cannot score; returns the embedding width."""
    size = predictor.spec.size
    blank = np.zeros((1, size, size), np.uint8)
    if hasattr(predictor, "predict_with_features"):
        probs, feats = predictor.predict_with_features(blank)
    else:
        probs, feats = predictor.predict(blank), np.zeros((1, 0), np.float32)
    if probs.shape != (1, len(predictor.classes)) or not np.isfinite(probs).all():
        raise RuntimeError(f"the model answered {probs!r} for a blank image")
    return int(feats.shape[1]) if feats.ndim == 2 else 0


# ---------------------------------------------------------------- scoring


Scored = tuple[np.ndarray, np.ndarray]  # (probabilities, embedding) of one image


def _forward(predictor: Any, images: np.ndarray) -> list[Scored | Exception]:
    probs, feats = predictor.predict_with_features(images)
    if feats.ndim != 2 or len(feats) != len(probs):
        feats = np.zeros((len(probs), 0), np.float32)
    return [(p, f) if np.isfinite(p).all() else ModelError("the model returned non-finite probabilities")
            for p, f in zip(probs, feats)]


def _one_by_one(predictor: Any, images: np.ndarray) -> list[Scored | Exception]:
    out: list[Scored | Exception] = []
    for j in range(len(images)):
        try:
            out.extend(_forward(predictor, images[j:j + 1]))
        except Exception as exc:  # noqa: BLE001 - this image's own error
            out.append(ModelError(f"the model failed on this image ({type(exc).__name__})"))
    return out


def score_items(items: list[tuple[np.ndarray, Loaded]]) -> tuple[list[Scored | Exception], list[tuple]]:
    """(per item: (probs, features) or the exception for that item; drift records to add later).

    One forward pass per loaded model in the batch (two only while a swap is under way); if it
    raises, image by image, so one image the model fails on costs only its own answer."""
    out: list[Scored | Exception | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for i, (_, loaded) in enumerate(items):
        groups.setdefault(id(loaded), []).append(i)
    drift: list[tuple] = []
    for idx in groups.values():
        loaded = items[idx[0]][1]
        images = np.stack([items[i][0] for i in idx])
        try:
            rows = _forward(loaded.predictor, images)
        except Exception:  # noqa: BLE001 - retried image by image
            rows = _one_by_one(loaded.predictor, images) if len(idx) > 1 else [
                ModelError("the model failed on this image")]
        ok = [r for r in rows if not isinstance(r, Exception)]
        if loaded.drift is not None and ok:
            probs = np.stack([p for p, _ in ok])
            drift.append((loaded, np.stack([f for _, f in ok]), loaded.predictor.positive_probability(probs)))
        for i, row in zip(idx, rows):
            out[i] = row
    return out, drift  # type: ignore[return-value]


def explain_png(loaded: Loaded, image: np.ndarray) -> str:
    """A Grad-CAM overlay of one preprocessed image, as base64 PNG."""
    p = loaded.predictor
    with loaded.explain_lock:  # the Grad-CAM hooks must not see another request's pass
        x = to_tensor(image[None], p.spec, device=p.device)
        heat = gradcam(p.explain_model, x, p.manifest.negative_index)
    return base64.b64encode(overlay_png(image, heat)).decode("ascii")


# ---------------------------------------------------------------- limits


class Pool:
    """A thread pool of `threads` that holds at most `queue` more jobs; `try_run` returns None
    (and runs nothing) when it is full."""

    def __init__(self, name: str, threads: int, queue: int | None = None):
        self.name, self.threads, self.limit = name, threads, None if queue is None else threads + queue
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"pneumo-{name}")
        self._lock = threading.Lock()
        self.pending = self.refused = 0

    def _done(self, _fut: Future) -> None:
        with self._lock:
            self.pending -= 1

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future | None:
        with self._lock:
            if self.limit is not None and self.pending >= self.limit:
                self.refused += 1
                return None
            self.pending += 1
        fut = self._pool.submit(fn, *args)
        fut.add_done_callback(self._done)
        return fut

    def full(self) -> bool:
        return self.limit is not None and self.pending >= self.limit

    def try_run(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any] | None:
        fut = self.submit(fn, *args)
        return None if fut is None else asyncio.wrap_future(fut)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        fut = self.try_run(fn, *args)
        if fut is None:
            raise RuntimeError(f"the {self.name} pool is full")
        return await fut

    def stats(self) -> dict[str, Any]:
        return {"threads": self.threads, "pending": self.pending, "limit": self.limit, "refused": self.refused}

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class ProbeCache:
    """One probe result shared for `ttl` seconds; concurrent callers share one probe in flight."""

    def __init__(self, pool: Pool, ttl: float = PROBE_CACHE_S, timeout: float = 20.0):
        self.pool, self.ttl, self.timeout = pool, ttl, timeout
        self._at, self._key, self._error = -float("inf"), None, "not probed yet"
        self._task: asyncio.Future | None = None
        self.probes = 0

    async def _refresh(self, predictor: Any) -> str | None:
        self.probes += 1
        try:
            await asyncio.wait_for(self.pool.run(probe, predictor), self.timeout)
            error = None
        except Exception as exc:  # noqa: BLE001 - reported, never raised here
            error = f"the model cannot score ({type(exc).__name__})"
        self._at, self._key, self._error = time.monotonic(), id(predictor), error
        return error

    async def check(self, predictor: Any) -> str | None:
        """None when the model scores, else why not (from a probe at most `ttl` s old)."""
        if self._key == id(predictor) and time.monotonic() - self._at < self.ttl:
            return self._error
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._refresh(predictor))
        return await asyncio.shield(self._task)


class ByteBudget:
    """An asyncio semaphore counted in bytes: `hold(n)` waits until `n` more bytes fit in `total`
    (an image larger than the whole budget waits until it has it to itself)."""

    def __init__(self, total: int):
        self.total, self.used, self.waiting = total, 0, 0
        self._cond: asyncio.Condition | None = None

    @asynccontextmanager
    async def hold(self, n: int):  # noqa: ANN201 - an async context manager
        n = max(0, min(int(n), self.total))
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            self.waiting += 1
            try:
                await self._cond.wait_for(lambda: self.used + n <= self.total)
            finally:
                self.waiting -= 1
            self.used += n
        try:
            yield
        finally:
            async with self._cond:
                self.used -= n
                self._cond.notify_all()


class Admission:
    """Images admitted for scoring and not yet answered (`waiting`), and the rate the replica answers
    them at while busy (answers per busy second, both decayed over `tau_s`: Little's law, so decode,
    batching and a starved CPU all count). `admit(n)` refuses when `(waiting + n) / rate` exceeds
    `max_wait_s` (before a rate is known: more than `cap` waiting); an idle replica always admits.
    Written here because Serve sheds load by queue length, not by predicted wait."""

    def __init__(self, max_wait_s: float, cap: int, tau_s: float = 10.0):
        self.max_wait_s, self.cap, self.tau_s = max_wait_s, cap, tau_s
        self.waiting, self.refused = 0, 0
        self._answered = self._busy_s = 0.0
        self._last = time.monotonic()

    def _tick(self) -> None:
        now = time.monotonic()
        dt, self._last = now - self._last, now
        decay = float(np.exp(-dt / self.tau_s))
        self._answered *= decay
        self._busy_s = self._busy_s * decay + (dt if self.waiting > 0 else 0.0)

    @property
    def rate(self) -> float | None:
        return self._answered / self._busy_s if self._busy_s > 0.5 and self._answered >= 1 else None

    def admit(self, n: int) -> bool:
        self._tick()
        rate = self.rate
        if self.waiting == 0:
            ok = True
        elif rate is None:
            ok = self.waiting + n <= self.cap
        else:
            ok = (self.waiting + n) / rate <= self.max_wait_s
        if ok:
            self.waiting += n
        else:
            self.refused += 1
        return ok

    def done(self, n: int) -> None:
        self._tick()
        self.waiting -= n
        self._answered += n

    def stats(self) -> dict[str, Any]:
        rate = self.rate
        return {"waiting": self.waiting, "rate_img_s": None if rate is None else round(rate, 2),
                "max_wait_s": self.max_wait_s, "refused": self.refused}


def decode_cost(data: bytes) -> int:
    """Peak bytes decoding `data` takes, from its header (no pixel decoded): the decoded planes
    plus the 8-bit gray plane; input the decoder will refuse costs its own size."""
    fmt = sniff_format(data)
    try:
        if fmt in ("JPEG", "PNG"):
            from PIL import Image

            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                return decoded_bytes(img) + 2 * w * h
        if fmt == "DICOM":
            import pydicom

            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
            return rows * cols * samples * 11  # raw + float64 after the LUTs + the 8-bit plane
    except Exception:  # noqa: BLE001 - the decoder gives the real error
        pass
    return len(data)
