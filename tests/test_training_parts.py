"""Training building blocks without a Ray Train run: config, augmentation, ingest, every recipe's step."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumo.augment import Augment
from pneumo.config import parse_config
from pneumo.models import get_model, set_finetune
from pneumo.training import (
    TrainConfig,
    backbone_features,
    class_weights_for,
    evaluate,
    evaluate_head,
    make_loss,
    make_optimizer,
    make_scheduler,
    train_head_epoch,
    train_one_epoch,
)

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


# ---------------------------------------------------------------- ingest


def test_ingest_reports_undecodable_files(ray_local, synth_data, tmp_path):
    from pneumo.data import labelled_splits
    from pneumo.ingest import build_datasets
    from pneumo.preprocess import InputSpec

    root = tmp_path / "data"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / "train" / cls).mkdir(parents=True)
        for p in sorted((synth_data / "train" / cls).glob("*.jpeg"))[:6]:
            shutil.copy(p, root / "train" / cls / p.name)
    bad = root / "train" / "PNEUMONIA" / "person999_virus_1.jpeg"
    bad.write_bytes(b"\xff\xd8\xff" + b"not really a jpeg")
    records = labelled_splits(str(root), "binary", 0.0, 0.0, 0)
    ingest = build_datasets(records, ["NORMAL", "PNEUMONIA"], InputSpec(size=32, channels=1, mean=(0.0,), std=(1.0,)))
    assert [e["path"] for e in ingest.errors] == [str(bad)]
    assert ingest.errors[0]["error"].startswith("corrupt")
    assert ingest.counts["train"] == {"NORMAL": 6, "PNEUMONIA": 6}
    rows = ingest.datasets["train"].take_all()
    assert len(rows) == 12 and rows[0]["image"].shape == (32, 32) and rows[0]["image"].dtype == np.uint8


# ---------------------------------------------------------------- recipes


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_trains_one_step(recipe):
    """Every recipe parses and its model/optimizer/loss/schedule take a training step and evaluate."""
    probe = parse_config(TrainConfig, ["DATA", "--config", str(recipe)], prog="t")
    size = SMOKE_SIZE.get(probe.model, 32)
    cfg = parse_config(TrainConfig, ["DATA", "--config", str(recipe), "--image-size", str(size)], prog="t")
    classes = ["NORMAL", "PNEUMONIA"] if cfg.label_set == "binary" else ["NORMAL", "BACTERIA", "VIRUS"]
    spec = cfg.input_spec()
    torch.manual_seed(0)
    model = get_model(cfg.model, len(classes), weights=cfg.weights, input_spec=spec)
    set_finetune(model, cfg.model, "head" if cfg.head_epochs else cfg.finetune, cfg.n_blocks)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, trainable)
    scheduler = make_scheduler(cfg, optimizer)
    loss_fn = make_loss(len(classes), class_weights_for({c: 1 + i for i, c in enumerate(classes)}, classes))
    batch = {"image": torch.randint(0, 255, (2, size, size), dtype=torch.uint8),
             "label": torch.tensor([0, len(classes) - 1])}
    before = [p.detach().clone() for p in trainable]
    device = torch.device("cpu")
    if cfg.cache_features:
        feats, labels = backbone_features(model, [batch], spec, device)
        head = model.get_classifier()
        tr = train_head_epoch(head, feats, labels, optimizer, loss_fn, len(classes), 2, torch.Generator())
        ev = evaluate_head(head, feats, labels, loss_fn, len(classes))
    else:
        model.train()
        tr = train_one_epoch(model, [batch], optimizer, loss_fn, spec, len(classes), device,
                             augment=cfg.augment(), generator=torch.Generator().manual_seed(0), max_steps=1)
        ev = evaluate(model, [batch], loss_fn, spec, len(classes), device)
    if scheduler is not None:
        scheduler.step(tr["loss"]) if cfg.scheduler == "plateau" else scheduler.step()
    assert tr["images"] == 2 and np.isfinite(tr["loss"])
    assert ev["probs"].shape == (2, len(classes)) and np.allclose(ev["probs"].sum(1), 1, atol=1e-5)
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, trainable)), "no parameter changed"
