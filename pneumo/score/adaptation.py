"""`--adapt`: the driver's passes over a scored run before it commits.

- `adapt_bundle` (AdaBN and/or align, on a uniform sample of the archive): BatchNorm statistics
  re-estimated with the torch model (a torch-only bundle: ONNX graphs have BatchNorm folded into
  the convolutions), and/or the archive's embedding statistics standardised to the training ones
  in the head (exported to ONNX); saved in `<run_dir>/adapted_bundle/` for the actors, unless the
  adapted model collapses the sample to one class, when the run scores unadapted.
- `estimate` + `adjust_prevalence` (EM, Saerens et al. 2002): the archive's class priors estimated
  from the run's probabilities (a uniform sample of ok rows) against the training prior, refused
  at the boundary; then Ray Data tasks re-weight every row's probabilities, re-decide its label at
  the bundle's threshold and rewrite the run's (uncommitted) files; every row says `adapted` and
  `prevalence_estimate`.
- `training_prior` is also the precondition `pneumo score --adapt` checks before it scores anything.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pneumo.bundle.manifest import INT8_FILE, ONNX_FILE, Manifest, drift_reference, read_file
from pneumo.config import ConfigError
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
ALIGN_MARGIN = 0.02  # align runs only when the archive's predicted share is this far above val's
MODEL_METHODS = ("adabn", "align")  # the methods that change the model before scoring (EM works on its output)


def _sample_images(cfg: ScoreConfig, manifest: Manifest, store: Location, sample: list[dict[str, Any]]) -> np.ndarray:
    """The sampled listing rows' images, read and preprocessed like scoring does (unreadable ones left out)."""
    sample = sorted(sample, key=lambda r: r["path"])
    pre = read_and_preprocess({"path": np.array([r["path"] for r in sample], dtype=object),
                               "size_bytes": np.array([r["size_bytes"] for r in sample], dtype=np.int64)},
                              manifest.input, store, cfg.max_file_bytes)
    return pre["image"][pre["status"] == "ok"]


def collapsed(share: float) -> bool:
    return share <= SAFE_SHARE[0] or share >= SAFE_SHARE[1]


def adapt_bundle(cfg: ScoreConfig, bundle: Location, manifest: Manifest, store: Location,
                 sample: list[dict[str, Any]], run_dir: Location) -> tuple[Location, dict[str, Any]]:
    """AdaBN and/or align in the driver, on `sample` (up to `adapt_sample` listing rows of the archive): the adapted model is
    saved as a bundle `<run_dir>/adapted_bundle` (drift reference copied) for the actors, unless its
    own diagnostics say it is unsafe (the sample's predicted positive share collapses to one class),
    in which case the run scores with the original bundle and the reason is recorded."""
    # start-up time: torch (and the modules built on it) in the driver only with --adapt
    import torch

    from pneumo.bundle.predict import Predictor
    from pneumo.bundle.store import load_model

    asked = [m for m in cfg.adaptations if m in MODEL_METHODS]
    images = _sample_images(cfg, manifest, store, sample)
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
    if "align" in asked:
        current, feats = share() if info["applied"] else (before, feats)
        reason = _align(model, bundle, manifest, feats, current)
        info["applied" if reason is None else "align_refused"] = (
            [*info["applied"], "align"] if reason is None else reason)
    info["positive_share_after"], _ = share()
    if collapsed(info["positive_share_after"]) and not collapsed(before):
        info.update(refused=f"the adapted model calls {info['positive_share_after']:.1%} of the sample positive "
                            f"(unadapted {before:.1%}): the adaptation collapses to one class", applied=[])
        return bundle, info
    return _save_adapted(model, bundle, manifest, run_dir, images, info)


def align_refusal(share: float, reference_share: float) -> str | None:
    """Why align must not run (None: it may), from the unadapted model's predicted pneumonia share
    on the archive against its share on val. align standardises the archive's embeddings to val's,
    so it assumes the archive's class mix is val's; the shift it repairs (on every proxy where it
    helped) showed as false positives, a share above val's. At or below val's share there is no
    such excess, and a lower prevalence is the likelier reason, where align cut specificity (val
    at 20% pneumonia: 0.985 -> 0.470; benchmarks/ablation_external.md)."""
    if share < reference_share + ALIGN_MARGIN:
        return (f"the archive's predicted pneumonia share {share:.1%} is not above val's {reference_share:.1%}: "
                "no excess of positives for align to correct, and align assumes the archive's class mix is val's")
    return None


def _align(model: Any, bundle: Location, manifest: Manifest, feats: np.ndarray, share: float) -> str | None:
    """Fold the archive-to-reference feature standardisation into the head; the reason when it cannot
    or must not (`align_refusal`)."""
    ref = drift_reference(bundle, manifest)
    if ref is None or ref.feature_mean is None:
        return "the bundle's drift reference has no feature statistics (retrain to add them)"
    reason = align_refusal(share, ref.n_positive / max(ref.n, 1))
    if reason:
        return reason
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


def _reweight(t: pa.Table, prior: np.ndarray | None, train: np.ndarray, classes: list[str], threshold: float,
              methods: str, prevalence: float | None) -> pa.Table:
    """Ray Data task: a run's rows re-weighted to the estimated `prior` (Bayes' rule), labels re-decided."""
    cols = {c: t.column(c).to_pylist() for c in ("probability", "probabilities", "label")}
    rows = np.flatnonzero(np.array(t.column("status").to_pylist(), dtype=object) == "ok")
    if prior is not None and len(rows):
        w = np.array([cols["probabilities"][i] for i in rows], dtype=np.float64) * (prior / train)
        p = w / w.sum(axis=1, keepdims=True)
        score, label = positive_score(p, classes), decide(p, classes, threshold)
        for j, i in enumerate(rows):
            cols["probabilities"][i], cols["probability"][i], cols["label"][i] = p[j].tolist(), float(score[j]), label[j]
    cols["adapted"] = [methods or "none"] * len(t)
    cols["prevalence_estimate"] = [prevalence] * len(t)
    for c, values in cols.items():
        field = OUTPUT_SCHEMA.field(c)
        t = t.set_column(t.schema.get_field_index(c), field, pa.array(values, type=field.type))
    return t


def estimate_prior(manifest: Manifest, probs: np.ndarray) -> tuple[np.ndarray | None, dict[str, Any]]:
    """EM's estimate of the archive's class priors from its probabilities (Saerens et al. 2002):
    (the weights prior / training prior, or None when its own diagnostic says it is unsafe, the
    figures). Unsafe: a prevalence at the boundary (<= 0.01 or >= 0.99), where EM has most likely
    read a change of appearance as one of prevalence."""
    train, source = training_prior(manifest)
    prior = estimate_prevalence_em(probs, train)[0] if len(probs) else train
    neg = manifest.negative_index
    info = {"prevalence_estimate": float(1 - prior[neg]), "training_prevalence": float(1 - train[neg]),
            "training_prior": train.tolist(), "prior_source": source, "class_priors": np.asarray(prior).tolist()}
    if collapsed(info["prevalence_estimate"]):
        return None, {**info, "em_refused": f"estimated prevalence {info['prevalence_estimate']:.3f} is at the "
                                            "boundary: not re-weighted (EM reads a change of appearance as one "
                                            "of prevalence)"}
    return np.asarray(prior) / train, info


def estimate(cfg: ScoreConfig, manifest: Manifest, sample: pa.Table, model: dict[str, Any] | None) -> dict[str, Any]:
    """The `adaptation` record: what the model adaptation applied or refused (`model`, from
    `adapt_bundle`) and, with `em`, EM's estimate from a sample of the run's ok rows (`estimate_prior`)."""
    applied = list((model or {}).get("applied", []))
    info: dict[str, Any] = {"prevalence_estimate": None, "training_prevalence": None, "training_prior": None,
                            "class_priors": None, "prior_source": "not asked", "model": model}
    ok = ok_rows(sample)
    info["rows_estimated_on"] = len(ok)
    if "em" in cfg.adaptations and len(ok):
        probs = np.array(ok.column("probabilities").to_pylist(), dtype=np.float64).reshape(len(ok), len(manifest.classes))
        weights, em = estimate_prior(manifest, probs)
        if weights is None:
            info["em_refused"], info["prevalence_estimate_refused"] = em["em_refused"], em["prevalence_estimate"]
        else:
            info.update(em)
            applied.append("em")
    info["methods"] = "+".join(applied) or "none"
    info["line"] = adaptation_line(info)
    return info


def adaptation_line(info: dict[str, Any]) -> str:
    """The summary's `adapt:` line: what was applied, the prevalence estimate, and every refusal."""
    parts = [f"adapt: applied {info['methods']}"]
    if info.get("prevalence_estimate") is not None:
        parts.append(f"estimated prevalence {info['prevalence_estimate']:.2f} (training "
                     f"{info['training_prevalence']:.2f}, {info['prior_source']})")
    model = info.get("model") or {}
    for why in (info.get("em_refused"), model.get("refused"), model.get("align_refused")):
        if why:
            parts.append(f"refused: {why}")
    return "; ".join(parts)


def adjust_prevalence(cfg: ScoreConfig, manifest: Manifest, out: Location, run_id: str, parts: list[dict[str, Any]],
                      info: dict[str, Any]) -> list[dict[str, Any]]:
    """EM post-pass before the commit: Ray Data tasks rewrite the run's files with every ok row
    re-weighted to `info`'s estimate (`estimate`); the new files (the old ones are deleted)."""
    import ray

    from pneumo.score.parts import PartSink

    if not parts:
        return parts
    em = info["prevalence_estimate"] is not None  # None: not asked, or refused
    kwargs = {"prior": np.asarray(info["class_priors"]) if em else None,
              "train": np.asarray(info["training_prior"]) if em else np.ones(len(manifest.classes)),
              "classes": manifest.classes, "threshold": manifest.threshold_value, "methods": info["methods"],
              "prevalence": info["prevalence_estimate"]}
    ds = ray.data.read_parquet([out.join(p["path"]).path for p in parts], filesystem=out.fs)
    sink = PartSink(out, run_id, OUTPUT_SCHEMA, tag="em-")
    ds.map_batches(_reweight, fn_kwargs=kwargs, batch_format="pyarrow").write_datasink(sink)
    for p in parts:
        out.join(p["path"]).delete()
    return sink.parts
