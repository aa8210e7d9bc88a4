"""`--adapt`: the driver's passes over a scored run before it commits.

- `adapt_bundle` (AdaBN): BatchNorm statistics re-estimated on a sample of the archive with the
  torch model, saved as a torch-only bundle in `<run_dir>/adapted_bundle/` for the actors (ONNX
  graphs have BatchNorm folded into the convolutions, so ONNX Runtime cannot adapt).
- `adjust_prevalence` (EM, Saerens et al. 2002): the archive's class priors estimated from the
  run's probabilities against the training prior, probabilities re-weighted, labels re-decided
  at the bundle's threshold, parts rewritten; every row says `adapted` and `prevalence_estimate`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pneumo.bundle.manifest import INT8_FILE, ONNX_FILE, Manifest, drift_reference, read_file
from pneumo.config import ConfigError
from pneumo.data.listing import ImageRecord
from pneumo.io.preprocess import to_tensor
from pneumo.io.storage import Location
from pneumo.labels import decide, positive_score
from pneumo.models.adapt import adapt_batchnorm, align_head
from pneumo.models.calibration import head_matrix, set_head
from pneumo.monitor.prevalence import estimate_prevalence_em
from pneumo.score.config import ScoreConfig
from pneumo.score.drift import ok_rows
from pneumo.score.tasks import OUTPUT_SCHEMA, read_and_preprocess

SAFE_SHARE = (0.01, 0.99)  # a predicted share (or prevalence) at or past these: the adaptation refuses itself
MODEL_METHODS = ("adabn", "align")  # the methods that change the model before scoring (EM works on its output)


def _sample_images(cfg: ScoreConfig, manifest: Manifest, store: Location, records: list[ImageRecord]) -> np.ndarray:
    """Up to `adapt_sample` of the archive's images (seeded), read and preprocessed like scoring does."""
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(records), min(cfg.adapt_sample, len(records)), replace=False))
    sample = [records[i] for i in pick]
    pre = read_and_preprocess({"path": np.array([r.path for r in sample], dtype=object),
                               "size_bytes": np.array([r.size for r in sample], dtype=np.int64),
                               "mtime_ns": np.array([r.mtime_ns for r in sample], dtype=np.int64)},
                              manifest.input, store)
    return pre["image"][pre["status"] == "ok"]


def collapsed(share: float) -> bool:
    return share <= SAFE_SHARE[0] or share >= SAFE_SHARE[1]


def adapt_bundle(cfg: ScoreConfig, bundle: Location, manifest: Manifest, store: Location,
                 records: list[ImageRecord], run_dir: Location) -> tuple[Location, dict[str, Any]]:
    """AdaBN and/or align in the driver, on up to `adapt_sample` archive images: the adapted model is
    saved as a bundle `<run_dir>/adapted_bundle` (drift reference copied) for the actors, unless its
    own diagnostics say it is unsafe (the sample's predicted positive share collapses to one class),
    in which case the run scores with the original bundle and the reason is recorded."""
    # start-up time: torch (and the modules built on it) in the driver only with --adapt
    import torch

    from pneumo.bundle.predict import Predictor
    from pneumo.bundle.store import load_model

    asked = [m for m in cfg.adaptations if m in MODEL_METHODS]
    images = _sample_images(cfg, manifest, store, records)
    if len(images) < 2:
        return bundle, {"applied": [], "refused": f"{len(images)} readable image(s) in the adaptation sample"}
    device = "cuda" if cfg.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
    model = load_model(bundle, manifest, device)

    def share() -> tuple[float, np.ndarray]:
        probs, feats = Predictor.from_model(model, manifest, engine="torch", device=device,
                                            precision="fp32").predict_with_features(images)
        return float(np.mean(positive_score(probs, manifest.classes) >= manifest.threshold_value)), feats

    before, feats = share()
    info: dict[str, Any] = {"images": int(len(images)), "positive_share_before": before, "applied": []}
    if "adabn" in asked:
        adapt_batchnorm(model, [to_tensor(images[i: i + 32], manifest.input, device=device)
                                for i in range(0, len(images), 32)])
        info["applied"].append("adabn")
        feats = share()[1]
    if "align" in asked:
        reason = _align(model, bundle, manifest, feats)
        info["applied" if reason is None else "align_refused"] = (
            [*info["applied"], "align"] if reason is None else reason)
    info["positive_share_after"], _ = share()
    if collapsed(info["positive_share_after"]) and not collapsed(before):
        info.update(refused=f"the adapted model calls {info['positive_share_after']:.1%} of the sample positive "
                            f"(unadapted {before:.1%}): the adaptation collapses to one class", applied=[])
        return bundle, info
    return _save_adapted(model, bundle, manifest, run_dir, images, info)


def _align(model: Any, bundle: Location, manifest: Manifest, feats: np.ndarray) -> str | None:
    """Fold the archive-to-reference feature standardisation into the head; the reason when it cannot."""
    ref = drift_reference(bundle, manifest)
    if ref is None or ref.feature_mean is None:
        return "the bundle's drift reference has no feature statistics (retrain to add them)"
    w, b = head_matrix(model, manifest.model)
    new_w, new_b = align_head(w, b, ref.feature_mean, ref.feature_std, feats.mean(axis=0), feats.std(axis=0))
    set_head(model, manifest.model, new_w, new_b)
    return None


def _save_adapted(model: Any, bundle: Location, manifest: Manifest, run_dir: Location, images: np.ndarray,
                  info: dict[str, Any]) -> tuple[Location, dict[str, Any]]:
    from pneumo.bundle.store import save_bundle  # start-up time: see adapt_bundle

    if not info["applied"]:
        return bundle, info
    extra = {name: read_file(bundle, manifest, name) for name in manifest.files if name not in (ONNX_FILE, INT8_FILE)}
    location = run_dir.join("adapted_bundle")
    onnx = "adabn" not in info["applied"]  # a head change exports; re-estimated BatchNorm stays in torch
    adapted = save_bundle(model.cpu(), location, manifest.model, manifest.classes, manifest.input,
                          threshold=manifest.threshold, metrics=manifest.metrics, training=manifest.training,
                          model_options=manifest.model_options,
                          version=f"{manifest.version}+{'+'.join(info['applied'])}", onnx=onnx,
                          parity_images=images[:64], extra_files=extra)
    return location, {**info, "bundle": location.uri, "bundle_sha256": adapted.sha256, "engine_needed": (
        "onnxruntime" if adapted.has_onnx else "torch")}


def training_prior(manifest: Manifest) -> tuple[np.ndarray, str]:
    """The class prior the model's posteriors assume: uniform after balanced training, else the
    training split's class counts (`manifest.training["counts"]`), else val's."""
    classes = manifest.classes
    balance = (manifest.training.get("config") or {}).get("balance", "none")
    if balance in ("weighted_loss", "oversample"):
        return np.full(len(classes), 1.0 / len(classes)), f"uniform (trained with balance={balance})"
    counts = manifest.training.get("counts") or {}
    for split in ("train", "val"):
        c = np.array([float((counts.get(split) or {}).get(k, 0)) for k in classes])
        if c.sum() > 0 and (c > 0).all():
            return c / c.sum(), f"{split} class counts"
    raise ConfigError("--adapt: the bundle records no training class counts (manifest.training.counts); "
                      "cannot estimate the archive's prevalence against an unknown training prior")


def estimate_prior(manifest: Manifest, probs: np.ndarray) -> tuple[np.ndarray | None, dict[str, Any]]:
    """EM's estimate of the archive's class priors from its probabilities (Saerens et al. 2002), or
    None with the reason when its own diagnostic says it is unsafe: a prevalence at the boundary
    (<= 0.01 or >= 0.99), where EM has most likely read a change of appearance as one of prevalence."""
    train, source = training_prior(manifest)
    neg = manifest.negative_index
    prior = estimate_prevalence_em(probs, train)[0] if len(probs) else train
    info = {"training_prior": train.tolist(), "prior_source": source, "class_priors": np.asarray(prior).tolist(),
            "prevalence_estimate": float(1 - prior[neg]), "training_prevalence": float(1 - train[neg])}
    if collapsed(info["prevalence_estimate"]):
        return None, {**info, "em_refused": f"estimated prevalence {info['prevalence_estimate']:.3f} is at the "
                                            "boundary: not re-weighted (EM reads a change of appearance as one "
                                            "of prevalence)"}
    return prior / train, info


def adjust_prevalence(cfg: ScoreConfig, manifest: Manifest, run_dir: Location, files: list[str], table: pa.Table,
                      model_adaptation: dict[str, Any] | None) -> tuple[pa.Table, dict[str, Any]]:
    """The post-pass before the commit: with `em`, estimate the archive's class priors from the run's
    probabilities and re-weight every ok row to them (labels re-decided, parts rewritten), unless EM
    refuses itself; every row records what was applied (`adapted`) and the prevalence estimate."""
    ok = ok_rows(table)
    probs = np.array(ok.column("probabilities").to_pylist(), dtype=np.float64).reshape(len(ok), len(manifest.classes))
    applied = list((model_adaptation or {}).get("applied", []))
    weights, em = (estimate_prior(manifest, probs) if "em" in cfg.adaptations else (None, {}))
    if weights is not None:
        applied.append("em")
    methods = "+".join(applied) or "none"
    tables = []
    for name in files:
        part = pq.read_table(run_dir.join(name).path, filesystem=run_dir.fs, schema=OUTPUT_SCHEMA)
        cols = {c: part.column(c).to_pylist() for c in ("probability", "probabilities", "label")}
        rows = np.flatnonzero(np.array(part.column("status").to_pylist()) == "ok")
        if weights is not None and len(rows):
            w = np.array([cols["probabilities"][i] for i in rows], dtype=np.float64) * weights
            p = w / w.sum(axis=1, keepdims=True)  # Bayes' rule under the estimated prior
            score, label = positive_score(p, manifest.classes), decide(p, manifest.classes, manifest.threshold_value)
            for j, i in enumerate(rows):
                cols["probabilities"][i], cols["probability"][i], cols["label"][i] = p[j].tolist(), float(score[j]), label[j]
        cols["adapted"] = [methods] * len(part)
        cols["prevalence_estimate"] = [em.get("prevalence_estimate") if weights is not None else None] * len(part)
        for c, values in cols.items():
            i = OUTPUT_SCHEMA.get_field_index(c)
            part = part.set_column(i, OUTPUT_SCHEMA.field(c), pa.array(values, type=OUTPUT_SCHEMA.field(c).type))
        sink = pa.BufferOutputStream()
        pq.write_table(part, sink)
        run_dir.join(name).write_bytes(sink.getvalue().to_pybytes())
        tables.append(part)
    info = {"methods": methods, **em, "model": model_adaptation, "line": adaptation_line(methods, em, model_adaptation)}
    return (pa.concat_tables(tables) if tables else table), info


def adaptation_line(methods: str, em: dict[str, Any], model: dict[str, Any] | None) -> str:
    """The summary's `adapt:` line: what was applied, the prevalence estimate, and every refusal."""
    parts = [f"adapt: applied {methods}"]
    if em.get("prevalence_estimate") is not None and "em_refused" not in em:
        parts.append(f"estimated prevalence {em['prevalence_estimate']:.2f} (training "
                     f"{em['training_prevalence']:.2f}, {em['prior_source']})")
    for why in (em.get("em_refused"), (model or {}).get("refused"), (model or {}).get("align_refused")):
        if why:
            parts.append(f"refused: {why}")
    return "; ".join(parts)
