"""Drift statistics: does a run (an archive, or serving traffic) still look like the training data?

- `DriftReference.build(features, scores, threshold)` at training time, from the bundle's val split:
  a PCA of the pooled embeddings (fitted on one half of val), the other half projected as the
  reference sample, the val positive scores and the positive rate at the bundle's threshold.
  One pickle-free file: `to_bytes()` / `from_bytes()` (safetensors arrays + JSON metadata).
- `compare(reference, features, scores) -> DriftReport`: three tests, Bonferroni-corrected, each
  also needing a minimum effect size before it may fire:
  MMD (RBF kernel, median-heuristic bandwidth, permutation p-value) on the embeddings,
  Kolmogorov-Smirnov on the scores, and Fisher's exact test on the positive rate.
- `pneumo.monitor.window.DriftWindow(reference)`: a thread-safe sliding window for serving, recomputed lazily.
- Batch scoring writes a run's `drift.json` + `drift.png` (`pneumo.score.drift`); label-shift
  estimation is `pneumo.monitor.prevalence`, BatchNorm adaptation `pneumo.models.adapt`.

Why PCA on one half of val and the reference sample from the other: points a PCA was fitted on
keep more of their variance in its top components than new points do, so projecting the same
points that fitted it would make every new run look shifted.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

FORMAT = "pneumo-drift-reference/2"
FORMATS = ("pneumo-drift-reference/1", FORMAT)  # /1: no feature statistics (no `--adapt-methods align`)
FILE_NAME = "drift_reference.safetensors"
MIN_IMAGES = 20  # below this a run is "too few images to judge"
# Smallest effects worth an alarm (a significant but smaller change does not fire).
MIN_EFFECT = {"mmd": 0.0, "ks": 0.1, "positive_rate": 0.05}


# ---------------------------------------------------------------- reference


@dataclass
class DriftReference:
    """What the val split looked like: PCA of the embeddings, a projected sample, scores, positive rate."""

    mean: np.ndarray  # float32[F], PCA centre
    components: np.ndarray  # float32[k, F], PCA axes
    sample: np.ndarray  # float32[m, k], val embeddings (not used to fit the PCA), projected
    scores: np.ndarray  # float32[s], val positive scores (sorted)
    threshold: float
    n: int  # val images
    n_positive: int  # val images with score >= threshold
    meta: dict[str, Any] = field(default_factory=dict)
    feature_mean: np.ndarray | None = None  # float32[F]: the val embeddings' mean and standard deviation,
    feature_std: np.ndarray | None = None  # what `--adapt-methods align` aligns an archive's to

    @classmethod
    def build(
        cls,
        features: np.ndarray,
        scores: np.ndarray,
        threshold: float,
        seed: int = 0,
        n_components: int = 32,
        max_sample: int = 500,
        max_scores: int = 5000,
    ) -> DriftReference:
        """From val `features: float32[N, F]` (pooled embeddings) and `scores: float32[N]` (positive class)."""
        from sklearn.decomposition import PCA

        x = np.asarray(features, dtype=np.float32)
        s = np.asarray(scores, dtype=np.float32).ravel()
        if x.ndim != 2 or len(x) != len(s) or len(x) < 4:
            raise ValueError(f"need features [N, F] and scores [N] with N >= 4, got {x.shape} and {s.shape}")
        if not (np.isfinite(x).all() and np.isfinite(s).all()):
            raise ValueError("features and scores must be finite")
        rng = np.random.default_rng([seed, 9101])
        order = rng.permutation(len(x))
        fit, rest = order[: len(x) // 2], order[len(x) // 2:]
        k = int(min(n_components, len(fit) - 1, x.shape[1]))
        pca = PCA(n_components=k, random_state=seed).fit(x[fit])
        ref = cls(pca.mean_.astype(np.float32), pca.components_.astype(np.float32), np.empty((0, k), np.float32),
                  np.sort(s if len(s) <= max_scores else rng.choice(s, max_scores, replace=False)),
                  float(threshold), len(s), int((s >= threshold).sum()))
        ref.sample = ref.project(x[rest[:max_sample]])
        ref.meta = {"seed": seed, "n_features": int(x.shape[1]), "n_fit": len(fit),
                    "explained_variance": float(pca.explained_variance_ratio_.sum())}
        ref.feature_mean, ref.feature_std = x.mean(axis=0), x.std(axis=0)
        return ref

    def extend(self, features: np.ndarray, scores: np.ndarray, threshold: float,
               reference_scores: np.ndarray | None = None, cohort: str = "site") -> DriftReference:
        """A reference that also holds a new cohort (a site's labelled sample): its embeddings join
        the sample (on the same PCA) and its scores join the reference scores. `reference_scores`
        replaces the old scores (e.g. mapped through a new calibration; None keeps them)."""
        z = self.project(features)
        s = np.asarray(scores, dtype=np.float32).ravel()
        old = self.scores if reference_scores is None else np.asarray(reference_scores, dtype=np.float32)
        allscores = np.sort(np.concatenate([old, s]))
        cohorts = [*self.meta.get("cohorts", ["val"]), f"{cohort} ({len(s)})"]
        return DriftReference(self.mean, self.components, np.concatenate([self.sample, z]), allscores,
                              float(threshold), len(allscores), int((allscores >= threshold).sum()),
                              {**self.meta, "cohorts": cohorts}, self.feature_mean, self.feature_std)

    @property
    def positive_rate(self) -> float:
        return self.n_positive / self.n if self.n else float("nan")

    def project(self, features: np.ndarray) -> np.ndarray:
        """`float32[N, F]` embeddings -> `float32[N, k]` coordinates on the reference PCA."""
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features {x.shape}: the reference expects [N, {self.mean.shape[0]}]")
        return (x - self.mean) @ self.components.T

    def to_bytes(self) -> bytes:
        """One pickle-free file (`drift_reference.safetensors`): arrays + JSON metadata."""
        from safetensors.numpy import save

        meta = {"format": FORMAT, "threshold": self.threshold, "n": self.n, "n_positive": self.n_positive,
                **self.meta}
        arrays = {"mean": self.mean, "components": self.components, "sample": self.sample, "scores": self.scores}
        if self.feature_mean is not None and self.feature_std is not None:
            arrays.update(feature_mean=self.feature_mean, feature_std=self.feature_std)
        return save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()},
                    metadata={"drift": json.dumps(meta, sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes) -> DriftReference:
        from safetensors.numpy import load

        arrays = load(data)
        # safetensors.numpy.load drops the header metadata; read it from the header itself.
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8: 8 + header_len])["__metadata__"]["drift"])
        if meta.pop("format", None) not in FORMATS:
            raise ValueError(f"not a {FORMAT} file")
        return cls(arrays["mean"], arrays["components"], arrays["sample"], arrays["scores"],
                   float(meta.pop("threshold")), int(meta.pop("n")), int(meta.pop("n_positive")), meta,
                   arrays.get("feature_mean"), arrays.get("feature_std"))

    def to_files(self) -> dict[str, bytes]:
        return {FILE_NAME: self.to_bytes()}

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> DriftReference:
        return cls.from_bytes(files[FILE_NAME])


# ---------------------------------------------------------------- tests


def mmd_permutation(x: np.ndarray, y: np.ndarray, permutations: int = 200, seed: int = 0) -> tuple[float, float]:
    """Biased MMD^2 (RBF kernel, median-heuristic bandwidth) and its permutation p-value."""
    from scipy.spatial.distance import cdist

    # No maintained library ships an MMD two-sample test on plain arrays; the distances come from
    # scipy (not sklearn's pairwise module: its import cost every scoring run 1.2 s more).
    pooled = np.concatenate([x, y]).astype(np.float64)
    d2 = cdist(pooled, pooled, "sqeuclidean")
    med = float(np.median(d2[np.triu_indices(len(pooled), 1)]))
    kernel = np.exp(-d2 / (med if med > 0 else 1.0))
    m, n = len(x), len(y)
    base = np.concatenate([np.full(m, 1.0 / m), np.full(n, -1.0 / n)])
    rng = np.random.default_rng([seed, 9102])
    weights = np.stack([base] + [rng.permutation(base) for _ in range(permutations)], axis=1)
    stats = np.einsum("ip,ip->p", weights, kernel @ weights)  # w^T K w per column
    return float(stats[0]), float((1 + np.sum(stats[1:] >= stats[0] - 1e-12)) / (1 + permutations))


def _test(statistic: float, p: float, effect: float, min_effect: float, level: float) -> dict[str, Any]:
    return {"statistic": statistic, "p_value": p, "effect": effect, "min_effect": min_effect,
            "level": level, "fired": bool(p < level and effect >= min_effect)}


@dataclass
class DriftReport:
    """The verdict on one run; `line()` is the one-line summary, `to_dict()` is JSON-ready."""

    shift: bool
    status: str  # "ok" | "drift" | "too_few"
    n: int
    n_reference: int
    alpha: float
    positive_rate: float | None
    reference_positive_rate: float
    threshold: float
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)

    def line(self) -> str:
        if self.status == "too_few":
            return f"drift: too few images to judge ({self.n}; need {MIN_IMAGES})"
        parts = [f"{name.upper()} p={t['p_value']:.2g}" for name, t in self.tests.items() if name != "positive_rate"]
        parts.append(f"positive rate {self.positive_rate:.2f} vs {self.reference_positive_rate:.2f}")
        fired = [name.replace("_", " ") for name, t in self.tests.items() if t["fired"]]
        if self.shift:
            return f"DRIFT: this run differs from the training data ({', '.join(fired)}; {', '.join(parts)})"
        return f"drift: this run looks like the training data ({', '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["line"] = self.line()
        return _json_ready(d)


def _json_ready(x: Any) -> Any:
    """Floats stay floats, NaN/inf become None (strict JSON), numpy scalars become Python ones."""
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_ready(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    return None if isinstance(x, float) and not math.isfinite(x) else x


def compare(
    reference: DriftReference,
    features: np.ndarray | None,
    scores: np.ndarray,
    alpha: float = 0.05,
    permutations: int = 200,
    max_run: int = 500,
    min_effect: dict[str, float] | None = None,
    seed: int = 0,
    projected: bool = False,
) -> DriftReport:
    """Compare a run's `features: float32[N, F]` (or None: scores only) and `scores: float32[N]`
    with the reference. Each test runs at `alpha / n_tests` (Bonferroni) and fires only if its
    effect also reaches `min_effect`; `shift` is any test firing. With `projected=True`,
    `features` are already `reference.project(...)` outputs `float32[N, k]` (large runs can keep
    only those, batch by batch)."""
    s = np.asarray(scores, dtype=np.float32).ravel()
    z = _project(reference, features, projected, len(s))
    return _compare_projected(reference, z, s, alpha, permutations,
                              max_run, {**MIN_EFFECT, **(min_effect or {})}, seed)


def _project(ref: DriftReference, features: np.ndarray | None, projected: bool, n: int) -> np.ndarray | None:
    if features is None or n == 0:
        return None
    if not projected:
        return ref.project(features)
    z = np.asarray(features, dtype=np.float32)
    if z.ndim != 2 or z.shape[1] != ref.components.shape[0]:
        raise ValueError(f"projected features {z.shape}: expected [N, {ref.components.shape[0]}]")
    return z


def _compare_projected(ref: DriftReference, z: np.ndarray | None, s: np.ndarray, alpha: float, permutations: int,
                       max_run: int, min_effect: dict[str, float], seed: int) -> DriftReport:
    from scipy.stats import fisher_exact, ks_2samp

    if z is not None and len(z) != len(s):
        raise ValueError(f"{len(z)} feature rows but {len(s)} scores")
    report = DriftReport(False, "too_few", len(s), ref.n, alpha, None, ref.positive_rate, ref.threshold)
    if len(s) < MIN_IMAGES:
        return report
    use_mmd = z is not None and len(ref.sample) >= 2
    level = alpha / (3 if use_mmd else 2)
    if use_mmd:
        run = z if len(z) <= max_run else z[np.random.default_rng([seed, 9103]).choice(len(z), max_run, False)]
        mmd2, p = mmd_permutation(ref.sample, run, permutations, seed)
        report.tests["mmd"] = _test(mmd2, p, mmd2, min_effect["mmd"], level)
    ks = ks_2samp(ref.scores, s)
    report.tests["ks"] = _test(float(ks.statistic), float(ks.pvalue), float(ks.statistic), min_effect["ks"], level)
    k = int((s >= ref.threshold).sum())
    report.positive_rate = k / len(s)
    _, p = fisher_exact([[k, len(s) - k], [ref.n_positive, ref.n - ref.n_positive]])
    diff = report.positive_rate - ref.positive_rate
    report.tests["positive_rate"] = _test(diff, float(p), abs(diff), min_effect["positive_rate"], level)
    report.shift = any(t["fired"] for t in report.tests.values())
    report.status = "drift" if report.shift else "ok"
    return report
