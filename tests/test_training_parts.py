"""Training building blocks: config, augmentation, ingest, worker setup and both loops without Ray,
checkpoint fallback, and every recipe through the real TorchTrainer + `train_func`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ListShard, pretrained_available, tiny_rows

from pneumo.config import parse_config
from pneumo.labels import LABEL_SETS
from pneumo.train.augment import Augment
from pneumo.train.checkpoints import (
    OPTIM_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    latest_checkpoint,
    read_state,
    save_checkpoint,
)
from pneumo.train.config import TrainConfig
from pneumo.train.driver import fit
from pneumo.train.engine import run_epoch
from pneumo.train.parts import class_weights_for, make_loss
from pneumo.train.worker import make_loop, setup_training

RECIPES = sorted((Path(__file__).resolve().parents[1] / "ray_jobs" / "recipes").glob("*.yaml"))
# the smallest input each architecture takes (CPU time), for a one-step smoke
SMOKE_SIZE = {"inception_v3": 75, "xception": 71, "resnetv2_50": 64}


# ---------------------------------------------------------------- config


def test_config_precedence_defaults_yaml_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: seed_cnn\nlr: 0.01\nepochs: 7\n")
    cfg = parse_config(TrainConfig, ["DATA", "--config", str(recipe), "--lr", "0.5"], prog="t")
    assert (cfg.model, cfg.epochs, cfg.lr) == ("seed_cnn", 7, 0.5)  # yaml over default, flag over yaml
    assert cfg.patience == 5 and cfg.batch_size == 32  # defaults kept


def test_config_rejects_unknown_keys_and_bad_values(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: seed_cnn\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["DATA", "--config", str(recipe)], prog="t")
    assert "learning_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["DATA", "--optimizer", "lbfgs"], prog="t")
    assert "adamax" in capsys.readouterr().err  # lists the valid choices
    with pytest.raises(SystemExit):  # feature caching needs a frozen backbone and fixed inputs
        parse_config(TrainConfig, ["DATA", "--cache-features", "--finetune", "full"], prog="t")
    with pytest.raises(SystemExit):  # cached features of augmented images need aug_views
        parse_config(TrainConfig, ["DATA", "--cache-features", "--finetune", "head", "--aug-noise", "0.1"], prog="t")
    assert "aug_views" in capsys.readouterr().err


def test_class_weights_balance_the_classes():
    w = class_weights_for({"NORMAL": 100, "PNEUMONIA": 300}, ["NORMAL", "PNEUMONIA"])
    assert w[0] * 100 == pytest.approx(w[1] * 300)
    loss = make_loss(2, w)
    assert float(loss.pos_weight) == pytest.approx(1 / 3)


# ---------------------------------------------------------------- augmentation


def test_augment_is_seeded_shape_preserving_and_identity_when_off():
    images = torch.zeros((4, 32, 32), dtype=torch.uint8)
    images[:, 8:24, 12:20] = 200
    aug = Augment(rotation=15, shift=0.1, zoom=0.1, hflip=True)
    a = aug(images, torch.Generator().manual_seed(1))
    b = aug(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, images)
    assert Augment()(images) is images
    with pytest.raises(ValueError, match="shift"):
        Augment(shift=1.5)


ACQUISITION_CASES = {  # one acquisition augmentation at a time: each changes the image, seeded
    "gamma": Augment(gamma=1.8),
    "window": Augment(window=0.2),
    "blur": Augment(blur=2.0),
    "sharpen": Augment(sharpen=3.0),
    "noise": Augment(noise=0.1),
    "crop+aspect": Augment(crop=0.6, aspect=1.4),
    "border": Augment(border=0.2),
}


@pytest.mark.parametrize("name", list(ACQUISITION_CASES))
def test_each_acquisition_augmentation_changes_the_image_seeded(name: str):
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(40, 220, (8, 48, 48), dtype=np.uint8))
    aug = ACQUISITION_CASES[name]
    a = aug(images, torch.Generator().manual_seed(3))
    b = aug(images, torch.Generator().manual_seed(3))
    assert a.shape == images.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, images), name
    assert aug.acquisition and not aug.geometric


def test_acquisition_augmentation_runs_before_equalisation():
    """The model equalises: training reads the train split un-equalised and equalises after the
    augmentation, with the same `equalize` as the shared preprocessing."""
    from pneumo.io.preprocess import InputSpec, equalize_array

    spec = InputSpec(size=48, channels=1, mean=(0.0,), std=(1.0,), equalize="hist")
    aug = Augment(gamma=1.8, noise=0.05)
    assert aug.raw_spec(spec).equalize == "none" and Augment(rotation=5).raw_spec(spec) == spec
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 255, (4, 48, 48), dtype=np.uint8))
    out = aug(images, torch.Generator().manual_seed(0), equalize="hist")
    for x in out.numpy():  # every output is already equalised: equalising again changes (almost) nothing
        assert np.abs(equalize_array(x, "hist").astype(int) - x.astype(int)).mean() < 2.0
    with pytest.raises(ValueError, match="gamma"):
        Augment(gamma=0.5)


def test_alternate_views_take_turns_between_the_photometric_and_the_field_of_view_family(capsys):
    """`aug_families: alternate`: the first cached copy of a batch is only exposure-shifted and noisy
    (no dark border anywhere), the second only bordered (grey levels untouched elsewhere), the third
    photometric again; every copy equalised when the batch was read un-equalised."""
    from pneumo.train.feature_cache import augmented_views

    aug = Augment(gamma=1.8, noise=0.1, border=0.3)
    photometric, field = aug.families()
    assert photometric == Augment(gamma=1.8, noise=0.1) and field == Augment(border=0.3)
    images = torch.full((16, 40, 40), 128, dtype=torch.uint8)
    batches = [{"image": images.numpy(), "label": np.zeros(16, np.int64)}]
    plain, *copies = [b["image"] for b in augmented_views(batches, aug, 3, torch.Generator().manual_seed(0),
                                                           "none", alternate=True)]
    def banded(x: torch.Tensor) -> bool:  # a whole dark row or column in some image
        dark = x == 0
        return bool(dark.all(dim=1).any() or dark.all(dim=2).any())

    assert torch.equal(plain, images) and len(copies) == 3
    assert not banded(copies[0]) and copies[0].float().std() > 5  # noise, no border
    assert not banded(copies[2]) and copies[2].float().std() > 5
    assert set(copies[1].unique().tolist()) <= {0, 128} and banded(copies[1])  # border, nothing else
    together = [b["image"] for b in augmented_views(batches, aug, 1, torch.Generator().manual_seed(0), "none")][1]
    assert banded(together) and together.float().std() > 5  # one copy with both families
    raw = [{"image": np.random.default_rng(2).integers(0, 120, (4, 40, 40), dtype=np.uint8), "label": np.zeros(4)}]
    geometric = Augment(noise=0.1, rotation=10)  # its second family is geometry only, no acquisition change
    _, _, turned = [b["image"] for b in augmented_views(raw, geometric, 2, torch.Generator().manual_seed(0), "hist",
                                                        alternate=True)]
    assert (turned.amax(dim=(1, 2)) == 255).all()  # read un-equalised (grey levels < 120): equalised all the same
    for bad in (["--aug-views", "1"], ["--aug-views", "2", "--aug-border", "0"]):  # one copy, or one family only
        with pytest.raises(SystemExit):
            parse_config(TrainConfig, ["DATA", "--cache-features", "--finetune", "head", "--aug-noise", "0.1",
                                       "--aug-border", "0.1", "--aug-families", "alternate", *bad], prog="t")
        assert "aug_families=alternate" in capsys.readouterr().err


def test_label_smoothing_moves_binary_targets_toward_one_half():
    logits, y = torch.tensor([8.0, -8.0]), torch.tensor([1.0, 0.0])
    plain, smooth = make_loss(2), make_loss(2, label_smoothing=0.2)
    assert float(plain(logits, y)) < 0.01 < float(smooth(logits, y))  # confident and right: smoothing penalises it
    assert float(make_loss(3, label_smoothing=0.2)(torch.tensor([[9.0, 0, 0]]), torch.tensor([0]))) > 0.1


def test_ema_weights_are_checkpointed_evaluated_and_resumed(tmp_path):
    """With `ema`, the checkpoint's model is the average (what is evaluated and exported); resuming
    restores the live weights and the average separately."""
    from pneumo.train.checkpoints import (
        load_weights,
        restore_average,
        restore_checkpoint,
        save_checkpoint,
    )
    from pneumo.train.parts import make_ema

    model = torch.nn.Linear(3, 1)
    ema = make_ema(model, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(4, 3)).sum().backward()
        opt.step()
        ema.update_parameters(model)
    assert not torch.equal(ema.module.weight, model.weight)
    save_checkpoint(str(tmp_path), model, opt, None, {"epoch": 1}, ema)
    assert torch.equal(load_weights(str(tmp_path))["weight"], ema.module.weight)
    again, opt2 = torch.nn.Linear(3, 1), None
    opt2 = torch.optim.SGD(again.parameters(), lr=0.1)
    restore_checkpoint(str(tmp_path), again, opt2, None)
    assert torch.equal(again.weight, model.weight)  # the live weights
    ema2 = make_ema(again, 0.5)
    restore_average(str(tmp_path), ema2)
    assert torch.equal(ema2.module.weight, ema.module.weight)
    assert make_ema(model, 0.0) is None


# ---------------------------------------------------------------- ingest


def _small_set_with_corrupt_file(synth_data: Path, root: Path, per_class: int, bad_name: str) -> Path:
    """`per_class` synthetic images per class under root/train/, plus a corrupt JPEG `bad_name` (returned)."""
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / "train" / cls).mkdir(parents=True)
        for p in sorted((synth_data / "train" / cls).glob("*.jpeg"))[:per_class]:
            shutil.copy(p, root / "train" / cls / p.name)
    bad = root / "train" / "PNEUMONIA" / bad_name
    bad.write_bytes(b"\xff\xd8\xff" + b"not really a jpeg")
    return bad


def test_ingest_reports_undecodable_files(ray_local, synth_data, tmp_path):
    from pneumo.data.datasets import labelled_splits
    from pneumo.data.ingest import build_datasets
    from pneumo.io.preprocess import InputSpec
    from pneumo.io.storage import Location

    root = tmp_path / "data"
    bad = _small_set_with_corrupt_file(synth_data, root, 6, "person999_virus_1.jpeg")
    records = labelled_splits(str(root), "binary", 0.0, 0.0, 0)
    ingest = build_datasets(records, ["NORMAL", "PNEUMONIA"], InputSpec(size=32, channels=1, mean=(0.0,), std=(1.0,)),
                            Location.of(root))
    assert [e["path"] for e in ingest.errors] == [str(bad)]
    assert ingest.errors[0]["error"].startswith("corrupt")
    assert ingest.counts["train"] == {"NORMAL": 6, "PNEUMONIA": 6}
    rows = ingest.datasets["train"].take_all()
    assert len(rows) == 12 and rows[0]["image"].shape == (32, 32) and rows[0]["image"].dtype == np.uint8


# ---------------------------------------------------------------- worker setup, loops, checkpoints


@pytest.mark.parametrize("model, extra, views", [
    ("seed_cnn", [], 1),
    ("efficientnet_lite0", ["--finetune", "head", "--cache-features"], 1),
    # augmented views of the frozen features: 2 noisy, exposure-shifted copies of each image, equalised after
    ("efficientnet_lite0", ["--finetune", "head", "--cache-features", "--aug-views", "2", "--aug-noise", "0.05",
                            "--aug-gamma", "1.5", "--equalize", "hist"], 3),
], ids=["image_loop", "feature_loop", "feature_loop_views"])
def test_setup_training_runs_epochs_and_resumes_without_ray(tmp_path, model, extra, views):
    cfg = parse_config(TrainConfig, ["DATA", "--model", model, "--weights", "none", "--image-size", "32",
                                     "--batch-size", "4", "--epochs", "3", "--patience", "0", *extra], prog="t")
    classes = ["NORMAL", "PNEUMONIA"]
    train, val = ListShard(tiny_rows(8, 32, 2)), ListShard(tiny_rows(6, 32, 2, seed=1))
    ts = setup_training(cfg, classes, cfg.input_spec(), [1.0, 1.0])
    loop = make_loop(ts)
    trainable = [p for p in ts.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    rows = [run_epoch(ts, loop, train, val, n) for n in (1, 2)]
    assert [r["epoch"] for r in rows] == [1, 2] and all(np.isfinite(r["train_loss"]) for r in rows)
    assert rows[0]["val_images"] == 6 and rows[0]["train_images"] == 8 * views
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, trainable)), "no parameter changed"
    save_checkpoint(str(tmp_path), ts.model, ts.optimizer, ts.scheduler, ts.state)
    again = setup_training(cfg, classes, cfg.input_spec(), [1.0, 1.0], resume=str(tmp_path))
    assert again.state["epoch"] == 2 and again.state["starts"] == [0, 2]
    assert all(torch.equal(a, b) for a, b in zip(ts.model.state_dict().values(), again.model.state_dict().values()))


def _two_checkpoints(root: Path) -> None:
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    for epoch in (1, 2):
        d = root / "run" / f"epoch_{epoch:04d}"
        d.mkdir(parents=True)
        save_checkpoint(str(d), model, opt, None, {"epoch": epoch, "history": []})


@pytest.mark.parametrize("torn", [WEIGHTS_FILE, STATE_FILE, OPTIM_FILE])
def test_latest_checkpoint_falls_back_past_a_torn_checkpoint(tmp_path, torn):
    """Real files on disk: the newest checkpoint's `torn` file cut in half -> the epoch before."""
    from ray.train import Checkpoint

    _two_checkpoints(tmp_path)
    assert Path(latest_checkpoint(None, str(tmp_path), "run").path).name == "epoch_0002"  # intact: newest
    path = tmp_path / "run" / "epoch_0002" / torn
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    chosen = latest_checkpoint(None, str(tmp_path), "run")
    assert Path(chosen.path).name == "epoch_0001" and read_state(chosen.path)["epoch"] == 1
    given = Checkpoint.from_directory(str(tmp_path / "run" / "epoch_0002"))  # Ray's pick, torn as well
    assert Path(latest_checkpoint(given, str(tmp_path), "run").path).name == "epoch_0001"


# ---------------------------------------------------------------- recipes


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_runs_through_train_func(ray_local, tmp_path, recipe):
    """Every recipe through the real TorchTrainer and `train_func` (one worker, 1-step epochs, tiny
    inputs; `head_epochs + 1` epochs so two-stage recipes switch stage). A recipe whose pretrained
    weights are not on this machine trains from `weights: none` instead (pneumo never downloads)."""
    import ray

    probe = parse_config(TrainConfig, ["DATA", "--config", str(recipe)], prog="t")
    size = SMOKE_SIZE.get(probe.model, 32)
    weights = probe.weights if probe.weights != "pretrained" or pretrained_available(probe.model) else "none"
    cfg = parse_config(TrainConfig, [
        "DATA", "--config", str(recipe), "--out", str(tmp_path / "run"), "--weights", weights,
        "--image-size", str(size), "--epochs", str(probe.head_epochs + 1), "--max-steps-per-epoch", "1",
        "--batch-size", "4", "--num-workers", "1", "--patience", "0", "--num-to-keep", "1"], prog="t")
    classes = list(LABEL_SETS[cfg.label_set])
    k = len(classes)
    datasets = {"train": ray.data.from_items(tiny_rows(8, size, k)),
                "val": ray.data.from_items(tiny_rows(6, size, k, seed=1))}
    weights_by_class = class_weights_for({c: 1 + i for i, c in enumerate(classes)}, classes)
    result = fit(cfg, datasets, classes, cfg.input_spec(), weights_by_class)
    assert result.error is None, result.error
    with result.checkpoint.as_directory() as d:
        history = read_state(d)["history"]
    assert [h["epoch"] for h in history] == list(range(1, cfg.epochs + 1))
    assert [h["stage"] for h in history] == ["head"] * cfg.head_epochs + [cfg.finetune]
    assert all(np.isfinite(h["train_loss"]) and h["train_images"] > 0 and h["val_images"] == 6 for h in history)


def test_write_reports_to_s3_lands_every_file(s3_server, tmp_path):
    """`run` with `--out s3://...` writes the reports there too (written locally, then copied)."""
    from pneumo.io.storage import Location
    from pneumo.train.export import write_reports

    bucket = s3_server.make_bucket("pneumo-train-out")
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 10)
    p1 = np.clip(labels * 0.6 + rng.random(20) * 0.4, 0, 1)
    probs = np.stack([1 - p1, p1], axis=1).astype(np.float32)
    threshold = {"value": 0.5, "method": "youden", "target": None}
    out = Location.resolve(f"{bucket}/run", s3_server.endpoint)
    paths = write_reports(out, {"val": {"label": labels}}, {"val": probs}, ["NORMAL", "PNEUMONIA"], threshold, [])
    assert paths == {"val": f"{out}/report/val"}
    assert b"NORMAL" in out.join("report", "val", "report.json").read_bytes()
    assert out.join("report", "val", "roc.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- privacy


def test_run_names_skipped_files_by_hash_not_path(ray_local, synth_data, tmp_path, capfd, caplog, monkeypatch):
    """A corrupt file whose name carries a (fake) patient id: the id is in no log line, manifest,
    summary or report of the run; the file is named by `pneumo.privacy.redact` (PNEUMO_LOG_PATHS unset)."""
    import json
    import logging

    from pneumo.privacy import LOG_PATHS_ENV, redact
    from pneumo.train.driver import run

    monkeypatch.delenv(LOG_PATHS_ENV, raising=False)
    root = tmp_path / "data"
    bad = _small_set_with_corrupt_file(synth_data, root, 8, "person999_bacteria_1.jpeg")
    out = tmp_path / "run"
    cfg = parse_config(TrainConfig, [str(root), "--out", str(out), "--model", "seed_cnn", "--weights", "none",
                                     "--image-size", "32", "--epochs", "1", "--num-workers", "1",
                                     "--batch-size", "8", "--val-frac", "0.3", "--test-frac", "0"], prog="test")
    caplog.set_level(logging.INFO)
    summary = run(cfg)
    logs = "".join(capfd.readouterr()) + caplog.text
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    (skipped,) = manifest["training"]["skipped_files"]
    assert skipped["path"] == redact(str(bad)) and skipped["path"].startswith("file#"), skipped
    assert summary["skipped_files"] == 1 and redact(str(bad)) in logs
    written = [logs] + [p.read_text() for p in out.rglob("*") if p.suffix in (".json", ".md", ".yaml")]
    for text in written:
        assert "person999" not in text
