"""Ray, started or joined in one place, and kept quiet when nobody watches a terminal.

    ensure_ray()                  # RAY_ADDRESS (e.g. under `ray job submit`) or an embedded local Ray
    ensure_ray(address="local", num_cpus=2, include_dashboard=False)
    quiet_ray()                   # Ray Data's and Tune's progress output off in non-interactive runs
    job_submission_id()           # the Ray job this driver runs in (KubeRay: one per RayJob)

In a non-interactive run (CI, `ray job submit`, cron: stdout is not a TTY) Ray Data would print
its progress as a page of `logging_progress` lines per dataset. `quiet_ray` turns those progress
reports off and lowers Ray Data's console handler to warnings; the full INFO log still goes to
`ray-data.log` in Ray's session log folder (`/tmp/ray/session_latest/logs/`). Interactive runs
keep Ray's progress bars. Non-interactive drivers also start Ray with `log_to_driver=False` (see
`ensure_ray`). `PNEUMO_VERBOSE=1` keeps everything.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from typing import Any

from pneumo import logs


def ensure_ray(**init_kwargs: Any) -> None:
    """`ray.init(**init_kwargs)` unless Ray is up in this process already; then `quiet_ray`.

    Non-interactive, Ray starts with `log_to_driver=False` and its driver logger at ERROR: the
    workers' output (Ray Train's reports, Ray's warnings) stays in Ray's log folder, and pneumo's own
    worker lines come through `logs.start_console`.
    """
    import ray

    if not ray.is_initialized():
        if not logs.interactive():
            init_kwargs.setdefault("log_to_driver", False)
            init_kwargs.setdefault("logging_level", logging.ERROR)
        ray.init(**init_kwargs)
        if not init_kwargs.get("log_to_driver", True):
            logs.start_console()
    quiet_ray()


def quiet_ray() -> None:
    if logs.interactive():
        return
    import ray.data
    from ray.util.debug import log_once

    warnings.filterwarnings("ignore", message="Use 'expr' instead of 'fn'")  # Ray Data's advice on filter()
    ray.data.DataContext.get_current().enable_progress_bars = False
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's new output prints header boxes even at verbose=0
    log_once("ray_data_progress_manager_disabled")  # Ray's "progress bars disabled" notice: deliberate here
    for handler in logging.getLogger("ray.data").handlers:
        if not hasattr(handler, "baseFilename") and type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.WARNING)


def job_submission_id() -> str:
    """The submission id of the Ray job this driver runs in (KubeRay: one per RayJob), read from the
    job config Ray's job supervisor hands its entrypoint; outside a Ray job, a UTC timestamp."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        job = str((config.get("metadata") or {}).get("job_submission_id") or "")
    except (ValueError, AttributeError):
        job = ""
    return job or time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def cluster_cpus_per_node() -> list[float]:
    """CPUs of every live node with CPUs (for sizing actor pools and trial concurrency)."""
    import ray

    return [n["Resources"]["CPU"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]


def wait_for_free_cpu(timeout_s: float = 30.0) -> bool:
    """Wait (at most `timeout_s`) until the cluster has a free CPU: a finished TorchTrainer gives its
    workers' CPUs back a moment after `fit()` returns, and a Dataset started before then warns that it
    "will hang". True when a CPU is free; False on timeout (the Dataset then waits on its own)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while not ray.available_resources().get("CPU"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
