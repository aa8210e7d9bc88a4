"""`pneumo score`'s options and result, and the scoring pipeline's own small config.

    cfg = parse_config(ScoreConfig, argv)     # the verb's flags (defaults, then YAML, then flags)
    cfg.pipeline()                            # Pipeline: what `score_dataset` needs, shared with evaluate
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, fields
from typing import Any

from pneumo.bundle.registry import resolve_bundle
from pneumo.config import ConfigError
from pneumo.io.storage import Location
from pneumo.precision import ENGINES, PRECISIONS

ADAPT_METHODS = ("adabn", "align", "em")  # --adapt-methods, in the order they run
RUN_ID = re.compile(r"[A-Za-z0-9._-]+")  # --run-id: one safe path segment (it names the run's side folder)
MAX_FILE_BYTES = 512 * 2**20  # well under a read task's memory: one huge file is a row, not an OOM


@dataclass(frozen=True)
class Pipeline:
    """How `pneumo.score.tasks.score_dataset` reads and scores: batch sizes, the actor pool, the engine.
    `pneumo score` builds it from its flags (`ScoreConfig.pipeline()`), `pneumo evaluate` from its own."""

    engine: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    batch_size: int = 64
    read_batch_size: int = 64
    read_cpus: float = 0.25
    min_actors: int = 1
    max_actors: int = 0
    cpus_per_actor: float = 0.0
    gpus_per_actor: float = 0.0
    threads: int = 0
    max_file_bytes: int = MAX_FILE_BYTES


@dataclass
class ScoreConfig:
    """Batch-score an archive of chest X-rays into a Delta Lake table with Ray Data."""

    data: str | None = field(default=None, metadata={
        "positional": True, "help": "folder or s3:// prefix to score (any nesting); or use --manifest"})
    bundle: str = field(default="", metadata={
        "help": "model bundle: folder, s3:// prefix, models:/NAME/VERSION or models:/NAME@ALIAS (required)"})
    tracking_uri: str = field(default="", metadata={"help": "MLflow registry for models:/ bundles (default: "
                                                            "$MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)"})
    out: str = field(default="", metadata={"help": "the results table: a folder or s3:// prefix (required)"})
    manifest: str | None = field(default=None, metadata={"help": "text file listing paths to score, one per line"})
    s3_endpoint: str | None = field(default=None, metadata={"help": "S3-compatible endpoint URL"})
    incremental: bool = field(default=False, metadata={
        "help": "skip files already scored by the same bundle in earlier committed runs, unchanged since "
                "(from the listing: size, mtime, ctime, inode locally; size and ETag on S3)"})
    verify_content: bool = field(default=False, metadata={
        "help": "with --incremental, also read and sha256 each unchanged-looking file and rescore it if "
                "its bytes differ (for stores whose listing identifies content poorly)"})
    max_file_bytes: int = field(default=MAX_FILE_BYTES, metadata={
        "help": "files listed larger than this are `too_large` error rows, never read"})
    explain: bool = field(default=False, metadata={"help": "write Grad-CAM overlay PNGs for positive predictions"})
    engine: str = field(default="auto", metadata={
        "choices": list(ENGINES),
        "help": "auto = the fastest CPU engine (onnxruntime, openvino) whose gate passed on the bundle, "
                "measured once per machine; torch on GPU and for torch-only bundles"})
    precision: str = field(default="auto", metadata={
        "choices": list(PRECISIONS), "help": "auto = the fastest precision whose gate passed (fp32 without "
                                             "gates); bf16 and int8 run only on gated bundles"})
    channels_last: bool = field(default=True, metadata={"help": "channels_last memory layout (torch engine)"})
    batch_size: int = field(default=64, metadata={"help": "images per model call"})
    read_batch_size: int = field(default=64, metadata={"help": "files per read+preprocess task batch"})
    read_cpus: float = field(default=0.25, metadata={
        "help": "CPUs per read+preprocess task (decoding is cheap next to the model)"})
    min_actors: int = field(default=1, metadata={"help": "actor pool minimum size"})
    max_actors: int = field(default=0, metadata={"help": "actor pool maximum size (0: one per node with CPUs)"})
    cpus_per_actor: float = field(default=0.0, metadata={
        "help": "CPUs per model actor (0: a node's CPUs less one read task's)"})
    gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per model actor (0 = CPU)"})
    threads: int = field(default=0, metadata={
        "help": "engine threads per actor (0: the CPUs of the node the pool is sized for)"})
    run_id: str | None = field(default=None, metadata={
        "help": "run id, [A-Za-z0-9._-]+ and not a committed run's (default: UTC time + random suffix)"})
    adapt: bool = field(default=False, metadata={
        "help": "adapt to this archive without labels (see --adapt-methods); each method refuses itself, and the "
                "run scores unadapted, when its own diagnostics say it is unsafe"})
    adapt_methods: str = field(default="align", metadata={
        "help": "with --adapt, a comma list of: align (the archive's embedding statistics standardised to the "
                "training ones before the head), adabn (BatchNorm statistics re-estimated; torch engine), em "
                "(prevalence re-weighting)"})
    adapt_sample: int = field(default=512, metadata={"help": "archive images align and AdaBN estimate statistics on"})

    def pipeline(self) -> Pipeline:
        """The scoring pipeline's settings (`pneumo.score.tasks.score_dataset`)."""
        return Pipeline(**{f.name: getattr(self, f.name) for f in fields(Pipeline)})

    @property
    def data_location(self) -> Location | None:
        return Location.resolve(self.data, self.s3_endpoint) if self.data is not None else None

    @property
    def manifest_location(self) -> Location | None:
        return Location.resolve(self.manifest, self.s3_endpoint) if self.manifest is not None else None

    @functools.cached_property  # a models:/NAME@ALIAS is resolved once per run, to one version
    def bundle_location(self) -> Location:
        return resolve_bundle(self.bundle, self.s3_endpoint, self.tracking_uri)

    @property
    def out_location(self) -> Location:
        return Location.resolve(self.out, self.s3_endpoint)

    @property
    def adaptations(self) -> tuple[str, ...]:
        """The --adapt methods asked for, in the order they run; () without --adapt."""
        asked = {m.strip() for m in self.adapt_methods.split(",") if m.strip()}
        return tuple(m for m in ADAPT_METHODS if m in asked) if self.adapt else ()

    def validate(self) -> None:
        if not self.bundle:
            raise ConfigError("bundle: required (--bundle PATH)")
        if not self.out:
            raise ConfigError("out: required (--out FOLDER or s3://bucket/prefix)")
        if (self.data is None) == (self.manifest is None):
            raise ConfigError("give exactly one input: DATA (folder or s3:// prefix) or --manifest FILE")
        if self.batch_size < 1 or self.read_batch_size < 1:
            raise ConfigError("batch_size and read_batch_size must be >= 1")
        if self.min_actors < 1 or (self.max_actors and self.min_actors > self.max_actors):
            raise ConfigError(f"need 1 <= min_actors <= max_actors (0: auto), got {self.min_actors}, {self.max_actors}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0 = the actor's CPUs), got {self.threads}")
        if self.cpus_per_actor < 0 or self.read_cpus <= 0 or self.gpus_per_actor < 0:
            raise ConfigError("cpus_per_actor >= 0 (0: auto), read_cpus > 0, gpus_per_actor >= 0")
        asked = {m.strip() for m in self.adapt_methods.split(",") if m.strip()}
        if not asked or asked - set(ADAPT_METHODS):
            raise ConfigError(f"adapt_methods: a comma list of {', '.join(ADAPT_METHODS)}, got {self.adapt_methods!r}")
        if "adabn" in self.adaptations and (self.engine in ("onnxruntime", "openvino") or self.precision == "int8"):
            raise ConfigError("--adapt re-estimates BatchNorm statistics, which needs the torch engine "
                              "(ONNX graphs have BatchNorm folded): use --engine auto or torch, not int8")
        if self.adapt_sample < 2:
            raise ConfigError(f"adapt_sample must be >= 2, got {self.adapt_sample}")
        if self.max_file_bytes < 1:
            raise ConfigError(f"max_file_bytes must be >= 1, got {self.max_file_bytes}")
        if self.verify_content and not self.incremental:
            raise ConfigError("--verify-content checks what --incremental would skip: give --incremental too")
        if self.run_id is not None and (not RUN_ID.fullmatch(self.run_id) or self.run_id in (".", "..")):
            raise ConfigError(f"run_id {self.run_id!r}: use letters, digits, '.', '_' and '-' only "
                              "(it names the run's folder under the table)")


@dataclass
class ScoreResult:
    """What one run did (also its commit's record, with its config: `pneumo.score.runs.committed_runs`)."""

    run_id: str
    table: str  # the Delta table the run committed to (`--out`)
    run_dir: str  # the run's side folder: drift.json, drift.png, explain/, adapted_bundle/
    n_listed: int
    n_skipped: int
    n_scored: int
    counts: dict[str, int]
    labels: dict[str, int]
    errors: dict[str, int]
    wall_s: float
    images_per_s: float
    n_verified: int = 0  # --verify-content: unchanged-looking files read and hashed
    version: int | None = None  # the table version of the run's commit
    files: list[str] = field(default_factory=list)  # the data files the commit added
    drift: dict[str, Any] = field(default_factory=dict)  # drift.json's verdict (+ its path)
    adaptation: dict[str, Any] | None = None  # --adapt: AdaBN and the EM prevalence estimate
    warnings: list[str] = field(default_factory=list)  # late steps that failed without costing the run
    ignored_runs: list[dict[str, str]] = field(default_factory=list)  # damaged old runs the upgrade left out
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage: where the wall time went
