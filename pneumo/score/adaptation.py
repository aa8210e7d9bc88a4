"""`--adapt`: the driver's passes over a scored run before it commits.

- `adapt_bundle` (AdaBN): BatchNorm statistics re-estimated on a sample of the archive with the
  torch model, saved as a torch-only bundle in `<run_dir>/adapted_bundle/` for the actors (ONNX
  graphs have BatchNorm folded into the convolutions, so ONNX Runtime cannot adapt).
- `adjust_prevalence` (EM, Saerens et al. 2002): the archive's class priors estimated from the
  run's probabilities (a uniform sample of at most `SAMPLE_ROWS` ok rows: all of them in all but
  huge runs) against the training prior, then Ray Data tasks re-weight every row's probabilities,
  re-decide its label at the bundle's threshold and rewrite the run's (uncommitted) files; every
  row says `adapted` and `prevalence_estimate`.
- `training_prior` is also the precondition `pneumo score --adapt` checks before it scores anything.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pneumo.bundle.manifest import INT8_FILE, ONNX_FILE, Manifest, read_file
from pneumo.config import ConfigError
from pneumo.io.preprocess import to_tensor
from pneumo.io.storage import Location
from pneumo.labels import decide, positive_score
from pneumo.monitor.prevalence import estimate_prevalence_em
from pneumo.score.config import ScoreConfig
from pneumo.score.drift import ok_rows
from pneumo.score.tasks import OUTPUT_SCHEMA, read_and_preprocess


def adapt_bundle(cfg: ScoreConfig, bundle: Location, manifest: Manifest, store: Location,
                 sample: list[dict[str, Any]], run_dir: Location) -> tuple[Location, dict[str, Any]]:
    """AdaBN in the driver: BatchNorm statistics re-estimated on `sample` (up to `adapt_sample`
    listing rows of the archive, on `store`), saved as a torch-only bundle `<run_dir>/adapted_bundle`
    (drift reference copied) for the actors."""
    # start-up time: torch (and the modules built on it) in the driver only with --adapt
    import torch

    from pneumo.bundle.store import load_model, save_bundle
    from pneumo.models.adapt import adapt_batchnorm

    sample = sorted(sample, key=lambda r: r["path"])
    pre = read_and_preprocess({"path": np.array([r["path"] for r in sample], dtype=object),
                               "size_bytes": np.array([r["size_bytes"] for r in sample], dtype=np.int64)},
                              manifest.input, store, cfg.max_file_bytes)
    images = pre["image"][pre["status"] == "ok"]
    if len(images) < 2:
        return bundle, {"adabn": False, "reason": f"{len(images)} readable image(s) in the sample"}
    device = "cuda" if cfg.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
    model = load_model(bundle, manifest, device)
    batches = [to_tensor(images[i: i + 32], manifest.input, device=device) for i in range(0, len(images), 32)]
    adapt_batchnorm(model, batches)
    extra = {name: read_file(bundle, manifest, name) for name in manifest.files if name not in (ONNX_FILE, INT8_FILE)}
    location = run_dir.join("adapted_bundle")
    adapted = save_bundle(model.cpu(), location, manifest.model, manifest.classes, manifest.input,
                          threshold=manifest.threshold, metrics=manifest.metrics, training=manifest.training,
                          model_options=manifest.model_options, version=f"{manifest.version}+adabn",
                          onnx=False, extra_files=extra)
    return location, {"adabn": True, "images": int(len(images)), "bundle": location.uri,
                      "bundle_sha256": adapted.sha256}


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


def estimate(cfg: ScoreConfig, manifest: Manifest, sample: pa.Table, adabn: dict[str, Any] | None) -> dict[str, Any]:
    """The EM estimate of the archive's class priors from a sample of the run's ok rows (the `adaptation` record)."""
    em = "em" in cfg.adaptations
    train, source = training_prior(manifest) if em else (np.full(len(manifest.classes), np.nan), "not asked")
    ok = ok_rows(sample)
    probs = np.array(ok.column("probabilities").to_pylist(), dtype=np.float64).reshape(len(ok), len(train))
    em = em and len(ok) > 0
    prior = estimate_prevalence_em(probs, train)[0] if em else train
    neg = manifest.negative_index
    prevalence, train_prevalence = float(1 - prior[neg]), float(1 - train[neg])
    methods = "+".join(["adabn"] * bool(adabn and adabn.get("adabn")) + ["em"] * em)
    head = (f"adapt: estimated prevalence {prevalence:.2f} (training {train_prevalence:.2f}, {source}); "
            f"probabilities re-weighted ({methods})") if em else f"adapt: {methods or 'nothing to adapt'}"
    tail = (f"; AdaBN on {adabn['images']} images" if adabn and adabn.get("adabn") else
            f"; AdaBN skipped: {adabn['reason']}" if adabn else "")
    return {"methods": methods, "prevalence_estimate": prevalence if em else None,
            "training_prevalence": train_prevalence if em else None, "training_prior": train.tolist() if em else None,
            "prior_source": source, "class_priors": np.asarray(prior).tolist() if em else None,
            "adabn": adabn, "line": head + tail, "rows_estimated_on": len(ok)}


def adjust_prevalence(cfg: ScoreConfig, manifest: Manifest, out: Location, run_id: str, parts: list[dict[str, Any]],
                      info: dict[str, Any]) -> list[dict[str, Any]]:
    """EM post-pass before the commit: Ray Data tasks rewrite the run's files with every ok row
    re-weighted to `info`'s estimate (`estimate`); the new files (the old ones are deleted)."""
    import ray

    from pneumo.score.parts import PartSink

    if not parts:
        return parts
    em = info["prevalence_estimate"] is not None
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
