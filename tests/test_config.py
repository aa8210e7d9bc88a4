"""Flat typed configs: defaults < --config YAML < flags, unknown keys and bad values rejected."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pneumo.config import ConfigError, from_dict, load_yaml, parse_config, save_config, to_dict


@dataclass
class TrainLike:
    """A config shaped like the jobs' configs."""

    data: str = field(metadata={"positional": True, "help": "data location"})
    epochs: int = 3
    lr: float = 1e-3
    model: str = field(default="seed_cnn", metadata={"choices": ["seed_cnn", "resnet18"], "help": "model"})
    pretrained: bool = False
    augment: bool = True
    tags: list[str] = field(default_factory=list)
    out: str | None = None

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs={self.epochs}: need at least 1")


def write_yaml(tmp_path: Path, values: dict) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_defaults() -> None:
    cfg = parse_config(TrainLike, ["/d"])
    assert cfg == TrainLike(data="/d")
    assert (cfg.epochs, cfg.model, cfg.pretrained, cfg.augment, cfg.tags, cfg.out) == (3, "seed_cnn", False, True, [], None)


@pytest.mark.parametrize(
    "yaml_values, flags, expected",
    [
        ({}, [], {"epochs": 3, "lr": 1e-3}),
        ({"epochs": 5}, [], {"epochs": 5, "lr": 1e-3}),
        ({"epochs": 5, "lr": 0.1}, ["--epochs", "7"], {"epochs": 7, "lr": 0.1}),
        (None, ["--epochs", "9", "--lr", "0.5"], {"epochs": 9, "lr": 0.5}),
        ({"model": "resnet18", "out": "runs/a"}, ["--model", "seed_cnn"], {"model": "seed_cnn", "out": "runs/a"}),
    ],
)
def test_precedence_defaults_then_yaml_then_flags(tmp_path, yaml_values, flags, expected) -> None:  # noqa: ANN001
    argv = ["/d", *flags]
    if yaml_values is not None:
        argv = ["--config", write_yaml(tmp_path, yaml_values), *argv]
    cfg = parse_config(TrainLike, argv)
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_unknown_yaml_key_is_rejected_listing_valid_keys(tmp_path, capsys) -> None:  # noqa: ANN001
    path = write_yaml(tmp_path, {"epochs": 2, "learning_rate": 0.1})
    with pytest.raises(SystemExit) as info:
        parse_config(TrainLike, ["--config", path, "/d"], prog="pneumo train")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err
    assert "Valid keys: augment, data, epochs, lr, model, out, pretrained, tags" in err


def test_unknown_flag_is_rejected(capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit):
        parse_config(TrainLike, ["/d", "--learning-rate", "0.1"])
    assert "unrecognized arguments: --learning-rate" in capsys.readouterr().err


def test_bad_choice_is_rejected_from_flags_and_yaml(tmp_path, capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit):
        parse_config(TrainLike, ["/d", "--model", "vgg99"])
    assert "invalid choice: 'vgg99'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'vgg99' is not one of seed_cnn, resnet18"):
        from_dict(TrainLike, {"data": "/d", "model": "vgg99"})


@pytest.mark.parametrize(
    "flags, pretrained, augment",
    [([], False, True), (["--pretrained"], True, True), (["--no-augment"], False, False),
     (["--pretrained", "--no-pretrained"], False, True)],
)
def test_bool_flags(flags, pretrained, augment) -> None:  # noqa: ANN001
    cfg = parse_config(TrainLike, ["/d", *flags])
    assert (cfg.pretrained, cfg.augment) == (pretrained, augment)


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"pretrained": "yes"}, {"pretrained": True}),
        ({"pretrained": "false"}, {"pretrained": False}),
        ({"epochs": "4"}, {"epochs": 4}),
        ({"epochs": 4.0}, {"epochs": 4}),
        ({"lr": "0.25"}, {"lr": 0.25}),
        ({"tags": "a,b"}, {"tags": ["a", "b"]}),
        ({"tags": ["x"]}, {"tags": ["x"]}),
        ({"out": None}, {"out": None}),
    ],
)
def test_values_are_coerced_to_field_types(values, expected) -> None:  # noqa: ANN001
    cfg = from_dict(TrainLike, {"data": "/d", **values})
    assert {k: getattr(cfg, k) for k in expected} == expected


@pytest.mark.parametrize(
    "values, message",
    [
        ({"pretrained": "maybe"}, "expected true/false"),
        ({"epochs": 2.5}, "expected an integer"),
        ({"epochs": "three"}, "cannot read 'three'"),
        ({"epochs": None}, "null is not allowed"),
        ({"epochs": 0}, "need at least 1"),  # the dataclass's own validate()
        ({}, "missing required value"),
    ],
)
def test_bad_values_are_rejected(values, message) -> None:  # noqa: ANN001
    base = {} if message.startswith("missing") else {"data": "/d"}
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainLike, {**base, **values})


def test_list_flag() -> None:
    assert parse_config(TrainLike, ["/d", "--tags", "a,b,c"]).tags == ["a", "b", "c"]


def test_save_config_round_trip(tmp_path) -> None:  # noqa: ANN001
    cfg = parse_config(TrainLike, ["/d", "--epochs", "6", "--pretrained", "--tags", "x,y", "--out", "runs/1"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_yaml(path) == to_dict(cfg)
    again = parse_config(TrainLike, ["--config", str(path), "/d"])
    assert again == cfg
    assert from_dict(TrainLike, load_yaml(path)) == cfg


def test_yaml_must_be_a_mapping(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(path)


def test_positional_may_come_from_yaml(tmp_path) -> None:
    from dataclasses import dataclass, field

    from pneumo.config import parse_config

    @dataclass
    class _Job:
        data: str = field(metadata={"positional": True})
        n: int = 3

    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: /from/yaml\nn: 4\n")
    assert parse_config(_Job, ["--config", str(recipe)]) == _Job("/from/yaml", 4)
    assert parse_config(_Job, ["/cli", "--config", str(recipe)]).data == "/cli"
    with pytest.raises(SystemExit):
        parse_config(_Job, [])
