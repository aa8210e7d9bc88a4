"""`pneumo.drift`: reference round trip, shift alarms, the false-alarm rate, the serving window,
prevalence EM and AdaBN, on real synthetic images (`pneumo synth`) and a real pretrained backbone.

Embeddings are EfficientNet-Lite0's pooled features (ImageNet weights, input 128 px to stay fast);
the scores come from a logistic-regression head fitted on the train split, the threshold is 0.5
(fixed, chosen on no split), and the reference is built from the val split. Held-out data from the
training distribution is the test split plus a fresh archive drawn with another seed.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumo.data.synth import Acquisition, synthesize
from pneumo.models.adapt import adapt_batchnorm
from pneumo.monitor.drift import FILE_NAME, FORMAT, MIN_IMAGES, DriftReference, compare
from pneumo.monitor.prevalence import estimate_prevalence_em
from pneumo.monitor.window import DriftWindow
from pneumo.score.drift import write_run_drift

SIZE = (96, 128)
THRESHOLD = 0.5
SHIFTS = {
    "contrast": Acquisition(contrast=0.5),
    "blur": Acquisition(blur=0.02),
    "crop": Acquisition(crop=0.7),
}


class Embedder:
    """EfficientNet-Lite0 (pretrained) pooled features of image files."""

    def __init__(self) -> None:
        from pneumo.models.factory import get_model
        from pneumo.models.zoo import get_spec

        self.spec = get_spec("efficientnet_lite0").input.replace(size=128)
        self.model = get_model("efficientnet_lite0", 2, weights="pretrained").eval()

    def tensors(self, paths: list[Path], batch: int = 32) -> list[torch.Tensor]:
        from pneumo.io.preprocess import load_image, to_tensor

        out = []
        for i in range(0, len(paths), batch):
            imgs = np.stack([load_image(p.read_bytes(), p.name, self.spec) for p in paths[i: i + batch]])
            out.append(to_tensor(imgs, self.spec))
        return out

    def features(self, paths: list[Path]) -> np.ndarray:
        with torch.inference_mode():
            feats = [self.model.forward_head(self.model.forward_features(x), pre_logits=True)
                     for x in self.tensors(paths)]
        return torch.cat(feats).numpy().astype(np.float32)


def _split(paths: list[Path], split: str) -> tuple[list[Path], np.ndarray]:
    """The images of one split in a fixed shuffled order (folders sort NORMAL before PNEUMONIA)."""
    chosen = sorted(p for p in paths if p.parent.parent.name == split)
    chosen = [chosen[i] for i in np.random.default_rng(len(chosen)).permutation(len(chosen))]
    return chosen, np.array([p.parent.name == "PNEUMONIA" for p in chosen], dtype=np.int64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):  # noqa: ANN001, ANN201
    """Synthetic archives, their embeddings, a fitted head, and the reference from val."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    root = tmp_path_factory.mktemp("drift")
    emb = Embedder()
    base = synthesize(root / "base", 600, seed=0, size_range=SIZE, splits=("train", "val", "test"))
    sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in ("train", "val", "test"):
        paths, y = _split(base, split)
        sets[split] = (emb.features(paths), y)
    archives = {"iid": synthesize(root / "iid", 100, seed=1, size_range=SIZE),
                "prevalence": synthesize(root / "prev", 120, seed=3, size_range=SIZE, pneumonia_frac=0.2)}
    for name, acq in SHIFTS.items():
        archives[name] = synthesize(root / name, 60, seed=2, size_range=SIZE, acquisition=acq)
    for name, paths in archives.items():
        paths, y = _split(paths, "train")
        sets[name] = (emb.features(paths), y)
    head = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
    head.fit(*sets["train"])
    scores = {name: head.predict_proba(x)[:, 1].astype(np.float32) for name, (x, _) in sets.items()}
    ref = DriftReference.build(sets["val"][0], scores["val"], THRESHOLD, seed=0)
    return {"emb": emb, "sets": sets, "scores": scores, "ref": ref, "root": root,
            "shift_paths": _split(archives["contrast"], "train")[0]}


def _run(world, name: str):  # noqa: ANN001, ANN202
    return world["sets"][name][0], world["scores"][name]


# ---------------------------------------------------------------- reference


def test_reference_round_trips(world) -> None:  # noqa: ANN001
    ref: DriftReference = world["ref"]
    back = DriftReference.from_bytes(ref.to_bytes())
    for name in ("mean", "components", "sample", "scores", "feature_mean", "feature_std"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ref, name))
        assert getattr(back, name).dtype == np.float32
    assert (back.threshold, back.n, back.n_positive, back.meta) == (ref.threshold, ref.n, ref.n_positive, ref.meta)
    assert ref.to_bytes() == back.to_bytes()  # deterministic: the bundle can hash it
    files = ref.to_files()
    assert list(files) == [FILE_NAME]
    np.testing.assert_array_equal(DriftReference.from_files(files).sample, ref.sample)
    # the PCA is fitted on half of val, the other half is the reference sample
    assert ref.meta["n_fit"] + len(ref.sample) == ref.n == len(world["sets"]["val"][0])
    assert ref.sample.shape[1] == ref.components.shape[0] <= 32
    with pytest.raises(ValueError):
        DriftReference.from_bytes(ref.to_bytes().replace(FORMAT.encode(), b"pneumo-drift-reference/9"))
    # a reference from before feature statistics still reads (no `align` for it)
    old = DriftReference(ref.mean, ref.components, ref.sample, ref.scores, ref.threshold, ref.n, ref.n_positive,
                         dict(ref.meta)).to_bytes().replace(FORMAT.encode(), b"pneumo-drift-reference/1")
    assert DriftReference.from_bytes(old).feature_mean is None


def test_reference_extended_by_a_site_cohort(world) -> None:  # noqa: ANN001
    ref: DriftReference = world["ref"]
    x, s = world["sets"]["test"][0][:30], world["scores"]["test"][:30]
    grown = ref.extend(x, s, threshold=0.4)
    assert len(grown.sample) == len(ref.sample) + 30 and grown.n == ref.n + 30 == len(grown.scores)
    assert grown.n_positive == int((grown.scores >= 0.4).sum()) and grown.threshold == 0.4
    assert grown.meta["cohorts"][-1] == "site (30)" and grown.feature_mean is ref.feature_mean
    np.testing.assert_array_equal(grown.sample[-30:], ref.project(x))


def test_reference_rebuild_is_deterministic(world) -> None:  # noqa: ANN001
    x, _ = world["sets"]["val"]
    again = DriftReference.build(x, world["scores"]["val"], THRESHOLD, seed=0)
    assert again.to_bytes() == world["ref"].to_bytes()


# ---------------------------------------------------------------- compare


def test_archive_from_training_distribution_does_not_alarm(world, tmp_path: Path) -> None:  # noqa: ANN001
    x, s = _run(world, "iid")
    report = write_run_drift(tmp_path, world["ref"], x, s)
    assert not report.shift and report.status == "ok", report.line()
    assert report.line().startswith("drift: this run looks like the training data")
    saved = json.loads((tmp_path / "drift.json").read_text())
    assert saved["shift"] is False and saved["line"] == report.line()
    assert set(saved["tests"]) == {"mmd", "ks", "positive_rate"}
    assert (tmp_path / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_acquisition_shift_raises_the_alarm(world, shift: str) -> None:  # noqa: ANN001
    x, s = _run(world, shift)
    report = compare(world["ref"], x, s)
    assert report.shift and report.status == "drift", report.line()
    assert report.tests["mmd"]["fired"], report.tests["mmd"]
    assert report.line().startswith("DRIFT: ")
    assert json.loads(json.dumps(report.to_dict()))["shift"] is True


def test_false_alarms_at_most_5_percent_on_held_out_resamples(world) -> None:  # noqa: ANN001
    """Subsamples of held-out data from the training distribution (test split + a fresh archive)."""
    x = np.concatenate([world["sets"]["test"][0], world["sets"]["iid"][0]])
    s = np.concatenate([world["scores"]["test"], world["scores"]["iid"]])
    rng = np.random.default_rng(0)
    draws, alarms, fired = 200, 0, {"mmd": 0, "ks": 0, "positive_rate": 0}
    for i in range(draws):
        n = int(rng.integers(MIN_IMAGES, 80))
        idx = rng.choice(len(s), n, replace=False)
        report = compare(world["ref"], x[idx], s[idx], seed=i)
        alarms += report.shift
        for name, t in report.tests.items():
            fired[name] += t["fired"]
    print(f"false alarms: {alarms}/{draws} = {alarms / draws:.3f}; per test {fired}")
    assert alarms / draws <= 0.05


@pytest.mark.parametrize("n", [0, 1, MIN_IMAGES - 1])
def test_small_runs_are_not_judged(world, n: int, tmp_path: Path) -> None:  # noqa: ANN001
    x, s = _run(world, "contrast")  # even a shifted run: too few to say
    report = write_run_drift(tmp_path, world["ref"], x[:n], s[:n])
    assert not report.shift and report.status == "too_few"
    assert "too few images to judge" in report.line()
    assert json.loads((tmp_path / "drift.json").read_text())["positive_rate"] is None
    assert (tmp_path / "drift.png").exists()


@pytest.mark.parametrize("name,shift", [("iid", False), ("contrast", True)])
def test_scores_only(world, name: str, shift: bool) -> None:  # noqa: ANN001
    """Without embeddings only KS and the positive rate run (Bonferroni over two)."""
    report = compare(world["ref"], None, world["scores"][name])
    assert set(report.tests) == {"ks", "positive_rate"}
    assert report.tests["ks"]["level"] == pytest.approx(0.025)
    if not shift:
        assert not report.shift, report.line()


def test_projected_features_give_the_same_report(world) -> None:  # noqa: ANN001
    """Large runs keep only `reference.project(batch)` per batch; the verdict is the same."""
    x, s = _run(world, "crop")
    ref = world["ref"]
    z = np.concatenate([ref.project(x[i: i + 16]) for i in range(0, len(x), 16)])
    a, b = compare(ref, z, s, projected=True).to_dict(), compare(ref, x, s).to_dict()
    assert (a["shift"], a["line"], a["tests"].keys()) == (b["shift"], b["line"], b["tests"].keys())
    for name, t in a["tests"].items():  # batched matmuls round differently in the last bits
        assert t == pytest.approx(b["tests"][name], rel=1e-5)
    with pytest.raises(ValueError):
        compare(ref, x, s, projected=True)  # raw features are not projections


# ---------------------------------------------------------------- serving window


def test_window_is_lazy_thread_safe_and_sees_a_shift(world) -> None:  # noqa: ANN001
    ref = world["ref"]
    win = DriftWindow(ref, size=60, every_s=3600.0)
    assert win.snapshot()["status"] == "too_few"
    x, s = _run(world, "iid")
    threads = [threading.Thread(target=lambda i=i: [win.add(x[j: j + 1], s[j: j + 1]) for j in range(i, 60, 4)])
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = win.snapshot()
    assert first["window"] == 60 and first["added"] == 60 and not first["shift"], first["line"]
    assert set(first["gauges"]) >= {"drift_shift", "drift_mmd_p_value", "drift_ks_p_value", "drift_positive_rate"}
    xs, ss = _run(world, "contrast")
    win.add(xs[:30], ss[:30])
    assert win.snapshot()["computed_at"] == first["computed_at"]  # not due: 30 new < 60, within every_s
    win.add(xs[30:60], ss[30:60])
    second = win.snapshot()
    assert second["window"] == 60 and second["added"] == 120
    assert second["shift"] and second["gauges"]["drift_shift"] == 1.0, second["line"]


# ---------------------------------------------------------------- adaptation


def test_em_moves_prevalence_toward_the_truth_on_model_posteriors(world) -> None:  # noqa: ANN001
    train_prior = float(world["sets"]["train"][1].mean())
    truth = float(world["sets"]["prevalence"][1].mean())
    prior, adjusted = estimate_prevalence_em(world["scores"]["prevalence"], train_prior)
    print(f"train prior {train_prior:.3f}, truth {truth:.3f}, EM {prior:.3f}")
    assert abs(prior - truth) < abs(train_prior - truth) / 2
    assert adjusted.shape == world["scores"]["prevalence"].shape
    assert adjusted.mean() == pytest.approx(prior, abs=1e-5)


@pytest.mark.parametrize("truth", [0.1, 0.3, 0.85])
def test_em_recovers_prevalence_of_calibrated_posteriors(truth: float) -> None:
    """Exactly calibrated posteriors: class-conditional scores N(+-1, 1), train prior 0.6."""
    rng = np.random.default_rng(1)
    y = rng.random(4000) < truth
    z = rng.normal(np.where(y, 1.0, -1.0), 1.0)
    train = 0.6
    posterior = 1 / (1 + np.exp(-(2 * z + np.log(train / (1 - train)))))
    prior, _ = estimate_prevalence_em(posterior, train)
    assert prior == pytest.approx(y.mean(), abs=0.03)
    prior2, adj2 = estimate_prevalence_em(np.stack([1 - posterior, posterior], 1), [1 - train, train])
    assert prior2[1] == pytest.approx(prior, abs=1e-9) and adj2.shape == (4000, 2)


def test_adabn_moves_running_stats_to_the_new_domain(world) -> None:  # noqa: ANN001
    from pneumo.models.factory import get_model

    emb: Embedder = world["emb"]
    model = get_model("efficientnet_lite0", 2, weights="pretrained").eval()
    bn = model.bn1  # the stem's BatchNorm
    seen: list[torch.Tensor] = []
    batches = emb.tensors(world["shift_paths"][:32], batch=16)
    with torch.no_grad():
        hook = bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
        model(torch.cat(batches))
        hook.remove()
    target = seen[0].mean(dim=(0, 2, 3))
    before = bn.running_mean.clone()
    out_before = model(batches[0]).detach()
    adapted = adapt_batchnorm(model, batches)
    assert adapted is model and not model.training and bn.momentum == 0.1
    assert (bn.running_mean - target).abs().max() < 1e-4 < (before - target).abs().max()
    assert int(bn.num_batches_tracked) == len(batches)
    assert not torch.allclose(model(batches[0]).detach(), out_before)


# ---------------------------------------------------------------- synth acquisition shift


def _edge_mean(a: np.ndarray) -> float:
    return float(a[:, : a.shape[1] // 10].mean())


def _sharpness(a: np.ndarray) -> float:
    return float(np.abs(np.diff(a, axis=1)).mean())


@pytest.mark.parametrize("acq,measure,direction", [
    (Acquisition(contrast=0.5), lambda a: float(a.std()), -1),
    (Acquisition(brightness=0.15), lambda a: float(a.mean()), +1),
    (Acquisition(gamma=2.0), lambda a: float(a.mean()), -1),
    (Acquisition(blur=0.02), _sharpness, -1),
    (Acquisition(noise=0.08), _sharpness, +1),
    (Acquisition(crop=0.7), _edge_mean, +1),  # the dark background at the sides is cropped away
])
def test_synth_acquisition_shift(tmp_path: Path, acq: Acquisition, measure, direction: int) -> None:  # noqa: ANN001
    from PIL import Image

    plain = sorted(synthesize(tmp_path / "plain", 6, seed=4, size_range=(96, 96)))
    shifted = sorted(synthesize(tmp_path / "shifted", 6, seed=4, size_range=(96, 96), acquisition=acq))
    again = sorted(synthesize(tmp_path / "again", 6, seed=4, size_range=(96, 96), acquisition=acq))
    assert [p.read_bytes() for p in shifted] == [p.read_bytes() for p in again]  # deterministic
    for a, b in zip(plain, shifted):
        assert a.name == b.name
        x, y = (np.asarray(Image.open(p), dtype=np.float32) / 255 for p in (a, b))
        assert x.shape == y.shape
        assert np.sign(measure(y) - measure(x)) == direction


def test_synth_default_acquisition_is_identity(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", 5, seed=6, size_range=(64, 80))
    b = synthesize(tmp_path / "b", 5, seed=6, size_range=(64, 80), acquisition=Acquisition())
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    with pytest.raises(ValueError):
        synthesize(tmp_path / "c", 5, acquisition=Acquisition(crop=0.0))
