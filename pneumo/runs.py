"""Reading batch-scoring results: `from pneumo.runs import read_results` (kept for existing code;
the readers live in `pneumo.score.runs`)."""

from pneumo.score.runs import (
    BadRun,
    committed_runs,
    read_committed,
    read_results,
    run_version,
    upgrade,
)

__all__ = ["BadRun", "committed_runs", "read_committed", "read_results", "run_version", "upgrade"]
