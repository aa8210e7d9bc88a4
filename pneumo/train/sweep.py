"""`pneumo sweep`: a Ray Tune sweep of `pneumo train` runs, ranked on validation.

    pneumo sweep ../shared/data/chest_xray_224 --config ray_jobs/sweeps/r5_cnn_ablation.yaml --out sweeps/r5
    pneumo sweep DATA --config SWEEP.yaml --out DIR --scheduler asha [--searcher optuna] [--register pneumo-cxr]
    table = run_sweep(parse_config(SweepConfig, [...]))["trials"]     # from Python (e.g. an ablation)

Ray 2.60's pattern for Ray Train V2 under Tune: `Tuner(trainable, param_space, tune_config)` where
the trainable (`trial_main`, one per trial) runs the whole `pneumo train` job
(`pneumo.train.driver.run`: ingest, a `TorchTrainer` over `pneumo.train.worker.train_func`,
export, reports) with `ray.tune.integration.ray_train.TuneReportCallback`, which hands every
epoch's `ray.train.report` to Tune, so ASHA (`--scheduler asha`) and Optuna (`--searcher optuna`)
see val loss / AUC per epoch. The trainable itself holds no CPU (`with_resources`):
its TorchTrainer's workers do, and `max_concurrent_trials` (0: as many trials as the cluster's CPUs
and GPUs hold at once) keeps the trials from queueing behind each other's placement groups.

Each trial writes a full run folder `<out>/trials/<trial_id>/` (bundle, report, summary.json) and
is an MLflow run nested under the sweep's run. A trial that fails is reported in the table, not
fatal. Re-running the same command after an interruption restores the sweep (`Tuner.restore`):
finished trials keep their results (a trial whose folder already holds its summary only replays
its history to Tune), unfinished ones resume from their last epoch checkpoint. The result
(`pneumo.train.sweep_table`): `trials.md`, `trials.csv`, `trials.png` and the best trial's bundle in
`<out>/bundle`, chosen on validation only (the carved test split is never read for choosing).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from pneumo.config import ConfigError, from_dict, parse_config, to_dict
from pneumo.data.listing import DataError
from pneumo.io.storage import is_s3
from pneumo.labels import LABEL_SETS
from pneumo.train.config import TrainConfig
from pneumo.train.sweep_config import COMBO, TRIALS_DIR, SweepConfig, combinations, param_space

__all__ = ["SweepConfig", "run_sweep", "trial_main", "main"]

# The trainable itself holds no CPU (its TorchTrainer's workers hold them: any fraction here would leave
# a worker group of whole CPUs one short); Ray refuses an empty request, so it asks for memory instead.
TRIAL_RESOURCES = {"cpu": 0, "memory": 512 * 2**20}


def trial_dirname(trial: Any) -> str:
    return trial.trial_id


def _plan(cfg: SweepConfig, parent: str | None) -> dict[str, Any]:
    """What every trial needs, with absolute paths (Tune runs trials in other working directories)."""
    return {"sweep": to_dict(cfg), "data": cfg.data if is_s3(cfg.data) else os.path.abspath(cfg.data),
            "out": os.path.abspath(cfg.out), "name": cfg.sweep_name, "parent_run": parent,
            "tracking_uri": _uri(cfg)}


def _uri(cfg: SweepConfig) -> str:
    from pneumo.track.tracking import tracking_uri

    return tracking_uri(cfg.tracking_uri) if cfg.tracking else ""


def trial_config(plan: dict[str, Any], values: dict[str, Any], trial_id: str) -> TrainConfig:
    """The TrainConfig of one trial: its options, in its own run folder, tracked under the sweep."""
    sweep = SweepConfig(**plan["sweep"])
    options = sweep.trial_options(values)
    out = os.path.join(plan["out"], TRIALS_DIR, trial_id)
    return from_dict(TrainConfig, {
        **options, "data": plan["data"], "out": out, "name": trial_id, "storage_path": os.path.join(out, "ray_results"),
        "tracking": sweep.tracking, "tracking_uri": plan["tracking_uri"], "experiment": plan["name"],
        "s3_endpoint": sweep.s3_endpoint, "register": ""})


def _finished(out: str) -> dict[str, Any] | None:
    """The summary of a trial whose run folder is complete (its bundle's manifest is there)."""
    try:
        summary = json.loads(open(os.path.join(out, "summary.json")).read())
    except (OSError, ValueError):
        return None
    return summary if os.path.exists(os.path.join(summary.get("bundle", ""), "manifest.json")) else None


def _replay(summary: dict[str, Any]) -> None:
    """A finished trial met again after a restore: its epochs, reported to Tune, nothing retrained."""
    from ray import tune

    from pneumo.bundle.manifest import read_manifest

    history = read_manifest(summary["bundle"]).training.get("history") or []
    for row in history:
        tune.report({k: v for k, v in row.items() if isinstance(v, int | float | str | bool)})


def trial_main(config: dict[str, Any], plan: dict[str, Any]) -> None:
    """One trial (a Tune function trainable): the `pneumo train` job with these option values."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pneumo.train.driver import run

    trial_id = tune.get_context().get_trial_id()
    config = config.get(COMBO, config)
    cfg = trial_config(plan, config, trial_id)
    done = _finished(cfg.out)
    if done is not None:
        _replay(done)
        return
    tags = {"pneumo.sweep": plan["name"], "pneumo.trial_id": trial_id,
            **{f"pneumo.option.{k}": v for k, v in config.items()}}
    if plan.get("parent_run"):
        tags["mlflow.parentRunId"] = plan["parent_run"]
    import torch

    torch.set_num_threads(max(1, cfg.num_workers * cfg.cpus_per_worker))  # the export, once the workers are done
    run(cfg, callbacks=[TuneReportCallback()], tags=tags)


def trial_configs(cfg: SweepConfig, limit: int = 64) -> list[TrainConfig]:
    """The TrainConfigs of the first `limit` combinations (numeric ranges at both ends)."""
    return [from_dict(TrainConfig, {**cfg.trial_options(c), "data": cfg.data, "tracking": False})
            for c in combinations(cfg.search)[:limit]]


def check_models(cfgs: list[TrainConfig]) -> None:
    """Build every distinct model (on torch's meta device: no memory, no weights) so that an option
    the architecture cannot take (stride 2 at too small an input) fails before Ray starts."""
    import torch

    from pneumo.models.factory import get_model

    seen = set()
    for c in cfgs:
        key = (c.model, repr(sorted(c.model_options().items())), c.input_spec(), c.label_set)
        if key in seen:
            continue
        seen.add(key)
        try:
            with torch.device("meta"):
                get_model(c.model, len(LABEL_SETS[c.label_set]), weights="none",
                          input_spec=c.input_spec(), **c.model_options())
        except ValueError as exc:
            raise ConfigError(f"{c.model} with {c.model_options() or 'its defaults'} at {c.input_spec().size} px: {exc}") from None


def check_data(c: TrainConfig) -> None:
    """The data is there and gives a val split (as `pneumo train` checks before Ray starts)."""
    from pneumo.data.datasets import labelled_splits

    records = labelled_splits(c.data_location, c.label_set, c.val_frac, c.test_frac, c.seed, c.limit)
    if not any(r.split == "val" for r in records):
        raise ConfigError("no validation images: set val_frac > 0 or provide <data>/val/")


def concurrency(cfg: SweepConfig, cfgs: list[TrainConfig]) -> int:
    """`max_concurrent_trials`, or as many trials as the cluster's CPUs (and GPUs) hold at once."""
    if cfg.max_concurrent_trials:
        return cfg.max_concurrent_trials
    import ray

    have = ray.cluster_resources()
    cpus = max(c.num_workers * c.cpus_per_worker for c in cfgs)
    n = max(1, int(have.get("CPU", 1) // max(cpus, 1)))
    gpus = max(c.num_workers * c.gpus_per_worker for c in cfgs)
    if gpus > 0:
        n = max(1, min(n, int(have.get("GPU", 0) // gpus)))
    return n


def _tune_config(cfg: SweepConfig, n: int, cfgs: list[TrainConfig]) -> Any:
    from ray import tune

    scheduler = search = None
    if cfg.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        epochs = max(c.epochs for c in cfgs)
        # never STOP at max_t: a trial that reaches its last epoch must still export its bundle
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(epochs, cfg.grace_period + 1),
                                  grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor,
                                  stop_last_trials=False)
    if cfg.searcher == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as exc:  # pragma: no cover - the extra is missing
            raise ConfigError(f"searcher optuna needs the extra: pip install 'pneumo[optuna]' ({exc})") from None
        search, limit = OptunaSearch(seed=cfg.seed), n  # Tune wraps a Searcher in a ConcurrencyLimiter
    else:
        from ray.tune.search import BasicVariantGenerator

        # a SearchGenerator limits itself: Tune ignores max_concurrent_trials for one
        search, limit = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=n), None
    return tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, scheduler=scheduler, search_alg=search,
                           num_samples=cfg.num_samples, max_concurrent_trials=limit,
                           trial_dirname_creator=trial_dirname)


def _tuner(cfg: SweepConfig, plan: dict[str, Any], progress: Any) -> tuple[Any, bool]:
    """A new Tuner, or the interrupted sweep's, restored (and whether it was restored)."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(trial_main, plan=plan), TRIAL_RESOURCES)
    storage = os.path.join(plan["out"], "tune")
    path = os.path.join(storage, plan["name"])
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False), True
    cfgs = trial_configs(cfg)
    n = concurrency(cfg, cfgs)
    run_config = tune.RunConfig(name=plan["name"], storage_path=storage, callbacks=[progress], verbose=0,
                                failure_config=tune.FailureConfig(max_failures=0))
    return tune.Tuner(trainable, param_space=param_space(cfg.search, cfg.max_trials), tune_config=_tune_config(cfg, n, cfgs),
                      run_config=run_config), False


def _progress() -> Any:
    """One line per finished, stopped or failed trial (quiet by default)."""
    from ray.tune import Callback

    class Lines(Callback):
        ended = 0

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            r, self.ended = trial.last_result or {}, self.ended + 1
            print(f"[pneumo sweep] trial {trial.trial_id} ended after epoch {r.get('epoch', '?')}: "
                  f"val_auc {r.get('val_auc', float('nan')):.4f} ({self.ended} ended so far)", flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.ended += 1
            print(f"[pneumo sweep] trial {trial.trial_id} FAILED ({self.ended} ended so far; see the table)",
                  flush=True)

    return Lines()


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Run (or resume) the sweep; returns {"trials": the ranked table (a list of rows), "best": the best
    row or None, "files": the table/plot/bundle paths, "restored": bool}."""
    from pneumo.ray_env import ensure_ray
    from pneumo.train.sweep_table import (  # matplotlib: only once the options are good
        finish_sweep,
        open_sweep_run,
    )

    cfgs = trial_configs(cfg, limit=512)
    check_models(cfgs)
    check_data(cfgs[0])
    os.makedirs(cfg.out, exist_ok=True)
    ensure_ray()
    parent = open_sweep_run(cfg, _uri(cfg))
    plan = _plan(cfg, parent.run_id)
    tuner, restored = _tuner(cfg, plan, _progress())
    print(f"[pneumo sweep] {cfg.sweep_name}: {'resuming' if restored else 'starting'}; trials in "
          f"{os.path.join(plan['out'], TRIALS_DIR)}", flush=True)
    results = tuner.fit()
    return {**finish_sweep(cfg, plan, results, parent), "restored": restored}


def main(argv: list[str] | None = None) -> int:
    """`pneumo sweep DATA --config SWEEP.yaml --out DIR [flags]`; exit 1 when no trial finished."""
    cfg = parse_config(SweepConfig, argv, prog="pneumo sweep")
    try:
        result = run_sweep(cfg)
    except (ConfigError, DataError) as exc:
        print(f"pneumo sweep: error: {exc}", file=sys.stderr)
        return 2
    return 0 if result["best"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
