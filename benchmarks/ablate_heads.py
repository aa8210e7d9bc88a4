"""Which augmented views should the default ensemble's head learn from? Head variants on cached features.

    python benchmarks/ablate_heads.py embed [--bundle B]    # features of train, val, proxies, augmented copies
    python benchmarks/ablate_heads.py fit [--seeds 3]       # every variant: val, proxies, LOSO, paired verdicts

Every candidate of the `aug_views` family keeps the default's three frozen backbones, so it differs
only in the linear head and in which augmented copies of the training images it learns from. Their
features are computed once here through the bundle's own `Predictor` (ONNX Runtime fp32), so a
variant costs a head fit (seconds) instead of a `pneumo train` run (15-25 min on 2 cores). This is
a screen: the variants worth it are then trained for real by `ablate_external.py train`.

- `embed` caches, under `$ABLATE/heads/`: the canonical carve's train images plain, val and every
  proxy of `proxies.py`, and the augmented copies of the train images the variants use, drawn by
  `pneumo.train.augment.Augment` with the `efficientnet_lite_ensemble_views.yaml` strengths, one
  file per family and seed: `photometric` (gamma, window, blur, sharpen, noise), `fov` (crop,
  aspect), `geometry` (`fov` + border), `photometric+fov`, `photometric+border`, `all` (every one).
- `fit` trains each variant's head as `pneumo train` does on cached features (a linear layer on the
  3,840 features, Adam lr 0.01, weight decay 1e-3, batch 64, class-weighted BCE, reduce-on-plateau,
  early stopping on val loss, patience 10), `--seeds` times, chooses its threshold at 95%
  sensitivity on val, and reports val, every proxy and LOSO (the head refitted without the
  `NORMAL2-IM` series' NORMAL images, scored on all 668 of them and val PNEUMONIA), and the paired
  verdict against the bundle's own head (`ablate_external.paired`).

Nothing is chosen on a test split; the published test split is never read.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import proxies as PX  # noqa: E402
from ablate_external import ABLATE, paired  # noqa: E402

CACHE = ABLATE / "heads"
STRENGTHS = {"gamma": 1.6, "window": 0.1, "blur": 1.5, "sharpen": 1.0, "noise": 0.04, "crop": 0.75, "aspect": 1.2,
             "border": 0.1}  # efficientnet_lite_ensemble_views.yaml
PHOTOMETRIC = ("gamma", "window", "blur", "sharpen", "noise")
FAMILIES = {"photometric": PHOTOMETRIC, "fov": ("crop", "aspect"), "geometry": ("crop", "aspect", "border"),
            "photometric+fov": (*PHOTOMETRIC, "crop", "aspect"), "photometric+border": (*PHOTOMETRIC, "border"),
            "all": tuple(STRENGTHS)}
VARIANTS = {  # name: the augmented copies (family-seed) each training image adds
    "plain (the default's head)": [],
    "all x1": ["all-1"], "all x3 (the views recipe)": ["all-1", "all-2", "all-3"],
    "photometric x1": ["photometric-1"], "photometric x2": ["photometric-1", "photometric-2"],
    "fov x1": ["fov-1"], "geometry x1": ["geometry-1"], "photometric+fov x1": ["photometric+fov-1"],
    "photometric+border x1": ["photometric+border-1"],
    "photometric, fov (aug_families: alternate)": ["photometric-1", "fov-1"],
}
HELD = "NORMAL2-IM series"


def embed(bundle: str) -> None:
    import torch

    from pneumo.bundle.predict import Predictor
    from pneumo.io.preprocess import load_image
    from pneumo.train.augment import Augment

    p = Predictor(bundle, engine="onnxruntime", precision="fp32")
    CACHE.mkdir(parents=True, exist_ok=True)

    def features(images: np.ndarray) -> np.ndarray:
        return np.concatenate([p.predict_with_features(images[s:s + 256])[1] for s in range(0, len(images), 256)])

    train = [r for r in PX.canonical_records() if r.split == "train"]
    if not (CACHE / "train.npz").exists():
        images = np.stack([load_image(open(r.path, "rb").read(), r.path, p.spec) for r in train])
        np.savez(CACHE / "train.npz", x=features(images), y=[r.label == "PNEUMONIA" for r in train],
                 g=[PX.series(r.path) for r in train])
        print(f"[ablate_heads] train: {len(train)} images", flush=True)
    if not (CACHE / "proxies.npz").exists():
        sets = PX.build(p.spec)
        np.savez(CACHE / "proxies.npz", **{s.name: features(s.images) for s in sets},
                 **{"y_" + s.name: s.labels for s in sets}, **{"g_" + s.name: np.array(s.groups) for s in sets})
        print(f"[ablate_heads] val and {len(sets) - 1} proxies", flush=True)
    raw = None
    for copy in sorted({c for copies in VARIANTS.values() for c in copies}):
        family, _, seed = copy.rpartition("-")
        aug = Augment(**{k: STRENGTHS[k] for k in FAMILIES[family]})
        path = CACHE / f"{copy}.npz"
        if not path.exists():
            if raw is None:  # every family has an acquisition change: read un-equalised, equalised after
                raw = torch.from_numpy(np.stack([load_image(open(r.path, "rb").read(), r.path, aug.raw_spec(p.spec))
                                                 for r in train]))
            g = torch.Generator().manual_seed(int(seed))
            images = torch.cat([aug(raw[s:s + 64], g, p.spec.equalize) for s in range(0, len(raw), 64)]).numpy()
            np.savez(path, x=features(images))
            print(f"[ablate_heads] {copy}: {len(images)} augmented train images", flush=True)


def fit_head(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """A linear head as pneumo's cached-feature loop trains it (see the module docstring)."""
    import torch

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    Xv, Yv = torch.from_numpy(xv).float(), torch.from_numpy(yv).float()
    pos_weight = (Y == 0).sum() / (Y == 1).sum()  # class_weights_for: n / (k n_c), as a BCE pos_weight
    head = torch.nn.Linear(X.shape[1], 1)
    opt = torch.optim.Adam(head.parameters(), lr=0.01, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=3)
    best, state, bad = np.inf, None, 0
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for _ in range(150):
        order = torch.randperm(len(Y), generator=g)
        for s in range(0, len(Y), 64):
            i = order[s:s + 64]
            loss = bce(head(X[i])[:, 0], Y[i], pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            val_loss = float(bce(head(Xv)[:, 0], Yv, pos_weight=pos_weight))
        sched.step(val_loss)
        if val_loss < best - 1e-6:
            best, state, bad = val_loss, {k: v.clone() for k, v in head.state_dict().items()}, 0
        elif (bad := bad + 1) >= 10:
            break
    head.load_state_dict(state)
    return head.weight.detach().numpy()[0], float(head.bias.detach()[0])


def fit(seeds: int, bundle: str) -> str:
    from pneumo.bundle.predict import Predictor
    from pneumo.bundle.store import load_model
    from pneumo.models.calibration import head_matrix
    from pneumo.report.thresholds import choose_threshold

    P, T = np.load(CACHE / "proxies.npz"), np.load(CACHE / "train.npz")
    names = [k for k in P.files if not k.startswith(("y_", "g_"))]
    yv, gv = P["y_val"], P["g_val"]

    def at(w: np.ndarray, b: float, keep: np.ndarray | None = None) -> tuple[dict, float]:
        scores = {n: P[n] @ w + b for n in names}
        k = slice(None) if keep is None else keep
        return scores, choose_threshold(yv[k], scores["val"][k], "target_sensitivity", 0.95)

    p = Predictor(bundle, engine="onnxruntime", precision="fp32")
    w0, b0 = head_matrix(load_model(bundle, p.manifest), p.manifest.model)
    ref, t_ref = at(w0[0], float(b0[0]))
    held_normal = np.r_[T["x"][(T["y"] == 0) & (T["g"] == HELD)], P["val"][(yv == 0) & (gv == HELD)]]
    loso_x = np.r_[held_normal, P["val"][yv == 1]]
    loso_y = np.r_[np.zeros(len(held_normal)), np.ones(int(yv.sum()))]
    lines = ["| variant | seed | " + " | ".join(_md(n) for n in names) + " | LOSO NORMAL2 | worse (AUC, J) | better (AUC, J) |",
             "| --- | ---: |" + " ---: |" * (len(names) + 3)]
    figures: dict[str, list[dict[str, tuple[float, float]]]] = {}  # variant: per seed, set: (AUC, J)
    for variant, copies in VARIANTS.items():
        views = [np.load(CACHE / f"{c}.npz")["x"] for c in copies]
        x, y, g = np.concatenate([T["x"], *views]), np.tile(T["y"], 1 + len(views)), np.tile(T["g"], 1 + len(views))
        for seed in range(seeds):
            w, b = fit_head(x, y, P["val"], yv, seed)
            scores, t = at(w, b)
            cells, worse, better, seed_figures = [], [], [], {}
            for n in names:
                d = paired(P["y_" + n], scores[n], t, ref[n], t_ref, n=300)
                s = scores[n]
                sens, spec = (s[P["y_" + n] == 1] >= t).mean(), (s[P["y_" + n] == 0] < t).mean()
                cells.append(f"{_auc(P['y_' + n], s):.3f} / {sens:.2f} / {spec:.2f}")
                seed_figures[n] = (_auc(P["y_" + n], s), sens + spec - 1)
                worse += [f"{n} {k}" for k in ("auc", "J") if d[k][2] < 0]
                better += [f"{n} {k}" for k in ("auc", "J") if d[k][1] > 0]
            keep = ~((y == 0) & (g == HELD))
            vkeep = ~((yv == 0) & (gv == HELD))
            lw, lb = fit_head(x[keep], y[keep], P["val"][vkeep], yv[vkeep], seed)
            lt = choose_threshold(yv[vkeep], P["val"][vkeep] @ lw + lb, "target_sensitivity", 0.95)
            ls = loso_x @ lw + lb
            seed_figures["LOSO NORMAL2"] = (_auc(loso_y, ls), (ls[loso_y == 1] >= lt).mean() + (ls[loso_y == 0] < lt).mean() - 1)
            figures.setdefault(variant, []).append(seed_figures)
            loso = f"{_auc(loso_y, ls):.3f} / {(ls[loso_y == 1] >= lt).mean():.2f} / {(ls[loso_y == 0] < lt).mean():.2f}"
            lines.append(f"| {variant} | {seed} | " + " | ".join(cells) + f" | {loso} | {len(worse)}: "
                         f"{_md(', '.join(worse)) or '-'} | {len(better)} |")
            print(lines[-1], flush=True)
    return "\n".join(lines) + "\n\n" + seed_summary(figures)


def seed_summary(figures: dict[str, list[dict[str, tuple[float, float]]]]) -> str:
    """Each variant's mean over seeds of AUC and J per set, against the seed range of the first
    variant (the plain head): ▼ below its lowest seed, ▲ above its highest. Re-fitting the plain head
    with another seed already moves single-run paired tests past significance on a few proxies, so
    a verdict is taken against the seed range."""
    base = next(iter(figures.values()))
    sets = list(base[0])
    lines = ["| variant | " + " | ".join(_md(n) for n in sets) + " | below | above |", "| --- |" + " ---: |" * (len(sets) + 2)]
    for variant, runs in figures.items():
        cells, below, above = [], 0, 0
        for n in sets:
            marks = []
            for k in (0, 1):
                mean = float(np.mean([r[n][k] for r in runs]))
                lo, hi = min(r[n][k] for r in base), max(r[n][k] for r in base)
                mark = "▼" if mean < lo - 1e-9 else "▲" if mean > hi + 1e-9 else ""
                below, above = below + (mark == "▼"), above + (mark == "▲")
                marks.append(f"{mean:.3f}{mark}")
            cells.append(" / ".join(marks))
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {below} | {above} |")
    return "\n".join(lines)


def _md(text: str) -> str:
    return text.replace("|", "\\|")  # `gamma-0.45|2.2` inside a Markdown table


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["embed", "fit"])
    ap.add_argument("--bundle", default=os.environ.get("BUNDLE", str(ABLATE / "bundles" / "default0")))
    ap.add_argument("--seeds", type=int, default=3, help="fit: head seeds per variant")
    a = ap.parse_args()
    if a.cmd == "embed":
        embed(a.bundle)
    else:
        print(fit(a.seeds, a.bundle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
