"""README.md is checked against the code: the defaults it states, and its shell blocks.

Shell blocks: every ```bash / ```sh / ```shell block runs as written, in README order, in one
fresh folder (the repository's ray_jobs/, serve_app/ and cluster/ copied in, HOME a fresh folder,
this venv first on PATH), with `bash -e -o pipefail`, as a newcomer pastes them. A block that cannot
run here says why in a `<!-- skip: REASON -->` line just above it, and is reported as skipped with
that reason. A small runner of our own: pytest-markdown-docs and pytest-examples run Python code
fences only, not shell.

Defaults: in the prose of the Training, Batch scoring and Online scoring sections (fenced blocks are
examples), every "`--flag` (N)" / "`name` (N)" and every numeric or one-word value in a span of
`--flag value` pairs is compared with the default of that section's config dataclass. A span that
shows a non-default value on purpose (an example) must be listed in EXAMPLES, so a new claim is
checked from the day it is written.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK_TIMEOUT_S = 300

# spans of `--flag value` pairs in the prose that show an example, not the default
EXAMPLES = {
    "--precision bf16", "--gpus-per-worker 1", "--engine onnxruntime", "--adapt-methods em", "--host 0.0.0.0",
    "--weights pretrained", "--split test", "--rule point", "--rule lower_bound", "--calibration platt|temperature",
}
UNITS = {"": 1, "MiB": 2**20, "GiB": 2**30, "s": 1, "images": 1}


def _dataclass_defaults(cls: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def section_defaults() -> dict[str, dict[str, Any]]:
    """README section heading prefix -> {option name: default} from the config classes."""
    from pneumo.score.config import ScoreConfig
    from pneumo.serve.cli import ServeConfig
    from pneumo.serve.config import DEPLOYMENT_DEFAULTS, ServeArgs
    from pneumo.train.config import TrainConfig

    serve = {k: v for k, v in _dataclass_defaults(ServeConfig).items() if v is not None}
    serve.update({name: f.default for name, f in ServeArgs.model_fields.items()})
    serve.update({k: v for k, v in DEPLOYMENT_DEFAULTS.items() if not isinstance(v, dict)})
    return {"## Training": _dataclass_defaults(TrainConfig), "## Batch scoring": _dataclass_defaults(ScoreConfig),
            "## Online scoring": serve}


def _prose_sections() -> dict[str, str]:
    prose = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)
    parts = re.split(r"(?m)^(## .*)$", prose)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def readme_claims() -> list[tuple[str, str, str, str]]:
    """(section, option, stated value, the text it came from) for every default README states."""
    claims = []
    for head, body in _prose_sections().items():
        for m in re.finditer(r"((?:`--?[a-z0-9_-]+`/)*`--?[a-z0-9_-]+`|`[a-z_][a-z0-9_]*`)\s+\(([0-9][^)]*)\)", body):
            names = [n.strip("`") for n in m.group(1).split("/")]
            values = m.group(2).split("=")[0].strip().split("/")
            for name, value in zip(names, values if len(values) == len(names) else values[:1] * len(names)):
                claims.append((head, name.lstrip("-").replace("-", "_"), value.strip(), m.group(0)))
        for m in re.finditer(r"`((?:--[a-z0-9-]+\s+[^`\s-][^`\s]*\s*)+)`", body):
            span = " ".join(m.group(1).split())
            if span in EXAMPLES:
                continue
            for name, value in re.findall(r"--([a-z0-9-]+)\s+([^`\s]+)", span):
                if re.fullmatch(r"[0-9.]+|[a-z_]+(,[a-z_]+)*", value):
                    claims.append((head, name.replace("-", "_"), value, span))
    return claims


def _parse(value: str) -> Any:
    m = re.fullmatch(r"([0-9][0-9.,]*)\s*([A-Za-z]*)", value)
    if not m:
        return value
    number = float(m.group(1).replace(",", ""))
    return number * UNITS.get(m.group(2), 1)


def test_readme_states_defaults_that_the_config_classes_have() -> None:
    defaults = section_defaults()
    checked, wrong = 0, []
    for head, name, value, text in readme_claims():
        section = next((d for prefix, d in defaults.items() if head.startswith(prefix)), None)
        if section is None or name not in section:
            continue
        default, stated = section[name], _parse(value)
        ok = (float(default) == stated) if isinstance(stated, float) and not isinstance(default, str) else (
            str(default) == str(stated))
        checked += 1
        if not ok:
            wrong.append(f"{head.strip()}: {text!r} says {name} = {value}, the code's default is {default!r}")
    assert not wrong, "README.md states defaults the code does not have:\n" + "\n".join(wrong)
    assert checked >= 15, f"only {checked} default claims found: has the README's wording changed?"


@pytest.mark.parametrize("section, line", [("## Batch scoring", "`--batch-size` (32)"),
                                           ("## Training", "`--patience 7`"),
                                           ("## Online scoring", "`drift_window` (50)")])
def test_a_wrong_default_in_the_readme_is_caught(section: str, line: str, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """The check can fail: the README with one more sentence stating a default the code does not have."""
    fake = tmp_path / "README.md"
    fake.write_text(README.read_text() + f"\n{section} (again)\n\nOptions: {line}.\n")
    monkeypatch.setitem(globals(), "README", fake)
    with pytest.raises(AssertionError, match="states defaults the code does not have"):
        test_readme_states_defaults_that_the_config_classes_have()


# ---------------------------------------------------------------- the shell blocks

def shell_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line, script, skip reason or None) for every bash/sh/shell fence, indented ones included."""
    blocks = []
    for m in re.finditer(r"(?m)^( *)```(?:bash|sh|shell)\n(.*?)^\1```", text, flags=re.S):
        before = text[:m.start()].rstrip("\n ").rsplit("\n", 1)[-1].strip()
        skip = re.fullmatch(r"<!-- skip: (.+?) -->", before)
        indent = len(m.group(1))
        script = "\n".join(line[indent:] for line in m.group(2).splitlines())
        blocks.append((text[:m.start()].count("\n") + 1, script, skip.group(1) if skip else None))
    return blocks


BLOCKS = shell_blocks(README.read_text())


@pytest.fixture(scope="module")
def readme_workspace() -> Iterator[tuple[Path, dict[str, str]]]:
    """A fresh folder with what README's commands name (the repository root's ray_jobs/, serve_app/,
    cluster/), a fresh HOME (short: `pneumo cluster` puts Ray's sockets under ~/.pneumo/cluster)."""
    root = Path(tempfile.mkdtemp(prefix="pnr", dir="/tmp"))
    work, home = root / "w", root / "h"
    home.mkdir()
    for name in ("ray_jobs", "serve_app", "cluster"):
        shutil.copytree(REPO / name, work / name)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "PNEUMO_", "MLFLOW_")) and k not in ("VIRTUAL_ENV",)}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    try:
        yield work, env
    finally:
        from pneumo.cluster import LocalCluster

        cluster = LocalCluster.load(home / ".pneumo" / "cluster")
        if cluster is not None:  # a cluster block that failed half-way
            cluster.down()
        shutil.rmtree(root, ignore_errors=True)


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("line, script, skip", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_shell_block_runs_as_written(line: int, script: str, skip: str | None,
                                            readme_workspace: tuple[Path, dict[str, str]]) -> None:
    if skip:
        pytest.skip(f"README.md:{line}: {skip}")
    if "127.0.0.1:8265" in script and _port_taken(8265):
        pytest.skip(f"README.md:{line}: port 8265 is taken on this machine (another Ray dashboard)")
    work, env = readme_workspace
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=work, env=env,
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert proc.returncode == 0, (f"README.md:{line}: the block exited {proc.returncode}\n{script}\n"
                                  f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")


def test_every_shell_block_is_run_or_says_why_not() -> None:
    """Each block either runs or carries a reason; and at least the quick-start path runs."""
    assert len(BLOCKS) >= 15, "README's shell blocks were not found"
    assert all(skip is None or len(skip) > 10 for _, _, skip in BLOCKS)
    run = [script for _, script, skip in BLOCKS if skip is None]
    assert any("pneumo synth" in s for s in run) and any("pneumo train" in s for s in run)
    assert any("pneumo cluster up" in s for s in run)
