"""Flat, typed configs: dataclass defaults, then a YAML file, then CLI flags.

Every job describes its options as one flat dataclass. `parse_config` turns that dataclass
into an argparse parser (one `--flag` per field), applies a YAML file given with
`--config`, then the flags the user typed, and rejects unknown keys with the list of valid
ones. `save_config` writes the resolved config next to the run.

    @dataclass
    class ScoreConfig:
        data: str = field(metadata={"positional": True, "help": "folder or s3:// prefix"})
        batch_size: int = 64
        precision: str = field(default="auto", metadata={"choices": ["auto", "fp32", "bf16"]})

    cfg = parse_config(ScoreConfig, argv, prog="pneumo score")
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

__all__ = ["UserError", "ConfigError", "parse_config", "from_dict", "to_dict", "save_config", "load_yaml"]


class UserError(Exception):
    """A mistake in what the user asked for (a bad option, a file, folder or bundle that is not
    there, an unreachable cluster, a wrong token), not a fault of pneumo's: every verb reports it as
    one line and exits 2 (`PNEUMO_DEBUG=1` shows the traceback). The errors of each package
    (`ConfigError`, `DataError`, `BundleError`, `StorageError`, ...) derive from it."""


class ConfigError(UserError, ValueError):
    """A config key or value is invalid; the message lists the valid choices."""


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Return (inner type, optional?) for `X | None` / `Optional[X]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, tp: Any, value: Any, choices: list | None) -> Any:
    inner, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: null is not allowed")
    origin = typing.get_origin(inner)
    try:
        if origin in (list, tuple):
            (elem,) = typing.get_args(inner)[:1] or (str,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
            out = [_coerce(name, elem, v, None) for v in value]
            value = tuple(out) if origin is tuple else out
        elif inner is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ConfigError(f"{name}: expected true/false, got {value!r}")
                value = low in ("true", "1", "yes")
            else:
                value = bool(value)
        elif inner in (int, float, str):
            if inner is int and isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{name}: expected an integer, got {value!r}")
            value = inner(value)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{name}: cannot read {value!r} as {inner}") from exc
    if choices is not None and value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def from_dict(cls: type[T], values: dict[str, Any], base: T | None = None, source: str = "config") -> T:
    """Build `cls` from `values` on top of `base` (or the defaults); unknown keys are errors."""
    fields = _fields(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) in {source}: {', '.join(unknown)}. Valid keys: {', '.join(sorted(fields))}"
        )
    current = to_dict(base) if base is not None else {}
    for name, value in values.items():
        f = fields[name]
        current[name] = _coerce(name, f.type, value, f.metadata.get("choices"))
    missing = [
        n for n, f in fields.items()
        if n not in current and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required value(s): {', '.join(missing)}")
    obj = cls(**current)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain dict (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def config_text(cfg: Any) -> str:
    """The resolved config as YAML (the run's `config.yaml`)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (the run's `config.yaml`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_text(cfg))
    return path


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one line and exit 2, not a screen of usage text."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}; see `{self.prog} --help`\n")


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field; defaults are left out so we can see what was typed."""
    parser = _Parser(
        prog=prog, description=description or (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None,
        argument_default=argparse.SUPPRESS, allow_abbrev=False,  # `--epoch 2` is an error, not `--epochs 2`
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file of options (flags override it)")
    for name, f in _fields(cls).items():
        inner, _ = _base_type(f.type)
        meta = f.metadata
        default = None if f.default is dataclasses.MISSING else f.default
        help_text = meta.get("help", "")
        if default is not None and f.default is not dataclasses.MISSING:
            help_text = f"{help_text} (default: {default})".strip()
        kwargs: dict[str, Any] = {"help": help_text}
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("positional"):
            kwargs.pop("help")
            # optional on the command line: a YAML file may give it; `from_dict` reports it missing
            parser.add_argument(name, metavar=name.upper(), help=help_text, nargs="?")
            continue
        flag = "--" + name.replace("_", "-")
        if inner is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(inner) in (list, tuple):
            parser.add_argument(flag, dest=name, metavar="A,B,..", **kwargs)
        else:
            parser.add_argument(flag, dest=name, metavar=inner.__name__.upper() if isinstance(inner, type) else "X", **kwargs)
    return parser


def parse_config(
    cls: type[T], argv: list[str] | None, prog: str | None = None, description: str | None = None
) -> T:
    """Resolve `cls` from defaults, then `--config YAML`, then flags. Exits with a message on error."""
    parser = build_parser(cls, prog=prog, description=description)
    ns = vars(parser.parse_args(argv))
    yaml_path = ns.pop("config", None)
    try:
        values: dict[str, Any] = {}
        if yaml_path:
            values.update(load_yaml(yaml_path))
        values.update(ns)
        return from_dict(cls, values, source=yaml_path or "flags")
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable
