"""The sweep flow: the data steps once (download, fingerprint, validation, normalization and the
decoded cache), then one task per trial, `.submit()`ted to the flow's task runner (prefect-dask's
DaskTaskRunner: a local cluster of `parallel` worker processes, or an existing one by address).
Each trial is the training flow itself (`train_pipeline`, a child flow run) into
`<output>/runs/<trial>/`, so it is an ordinary, reproducible run; trials are cached like runs. The
leaderboard is updated as trials finish; with output.champion set, the best trial challenges that
slot.

Dask workers are other processes: the flow run's result store (durable storage and flock locks)
reaches them inside Prefect's serialized context, see tasks/caching.py `durable_results`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, tags
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner

from flows.train import train_pipeline
from tasks.caching import FileRef, TaskOutput, cached_task, durable_results, own_transactions
from tasks.champion import challenge_champion
from tasks.data import (
    DatasetRef,
    by_fingerprint,
    compute_normalization,
    download_dataset,
    fingerprint_data,
    validate_data,
)
from tasks.model import locate_weights
from tasks.prefect_compat import current_dask_scheduler
from tasks.run import RunInfo
from tasks.sweep import publish_sweep_summary, record_trial
from tasks.training import by_training_fields
from visionflow.config import PipelineConfig, monitor_mode
from visionflow.errors import VisionflowError, one_line
from visionflow.manifest import Manifest
from visionflow.runs import BEST_CHECKPOINT_PATH, EXPORT_WEIGHTS, EXPORT_WEIGHTS_PATH, RunLayout, runs_root
from visionflow.sweep import (
    SweepConfig,
    SweepResult,
    TrialProposer,
    TrialRow,
    check_space,
    ranked,
    sweep_dir,
    sweep_metric,
    sweep_name,
    trial_config,
    trial_threads,
)

if TYPE_CHECKING:
    from distributed import LocalCluster


class TrialOutput(TaskOutput):
    manifest: Manifest


def by_trial(config: PipelineConfig) -> dict[str, Any]:
    """A trial's identity: its run directory and what it trains with."""
    output = config.output
    return {"output_dir": output.output_dir, "run_name": output.run_name, "training": by_training_fields(config)}


def run_trial(dataset: DatasetRef, config: PipelineConfig, parallel: int) -> TrialOutput:
    """Train and evaluate one trial with the training flow (a child flow run) into run directory
    config.output.run_name, on this worker's share of its cores (`trial_threads`). `dataset`, the
    sweep's data fingerprinted once, keys the cache on the data's content. The training flow's
    cached steps commit as in a `visionflow train` (`own_transactions`), not with the trial."""
    import torch

    torch.set_num_threads(trial_threads(parallel))
    with own_transactions():
        manifest = train_pipeline(config)
    layout = RunLayout(runs_root(config.output.output_dir) / manifest.run_name)
    files = {
        BEST_CHECKPOINT_PATH: FileRef.of(layout.best_checkpoint),
        EXPORT_WEIGHTS_PATH: FileRef.of(layout.export_dir / EXPORT_WEIGHTS),
    }
    return TrialOutput(manifest=manifest, files=files)


# Decorated here rather than in place: the task's function stays importable by its own name, so
# Dask ships it to workers by reference (cloudpickle would copy a function whose module name is
# taken by its Task by value, without the source its cache key hashes or its module's names).
trial_task = cached_task(dataset=by_fingerprint, config=by_trial, task_run_name="trial {config.output.run_name}")(
    run_trial
)


def running_sweep() -> SweepConfig:
    """The `sweep` parameter of the sweep flow run this is called in."""
    return SweepConfig.model_validate(flow_run.get_parameters()["sweep"])


def sweep_cluster() -> LocalCluster:
    """The sweep flow's local Dask cluster, made by its task runner at the first trial (unless
    sweep.dask_address names one): `parallel` worker processes with one thread each (a trial at a
    time per worker)."""
    from distributed import LocalCluster

    return LocalCluster(n_workers=running_sweep().parallel, threads_per_worker=1, processes=True)


def absolute_paths(config: PipelineConfig) -> PipelineConfig:
    """`config` with data_dir and output_dir absolute: trials run in other processes (or machines
    sharing the file system)."""
    data = config.data.model_copy(update={"data_dir": str(Path(config.data.data_dir).resolve())})
    output = config.output.model_copy(update={"output_dir": str(Path(config.output.output_dir).resolve())})
    return config.model_copy(update={"data": data, "output": output})


def trial_outcome(
    future: PrefectFuture[TrialOutput], config: PipelineConfig, params: dict[str, Any], metric: str
) -> tuple[TrialRow, Manifest | None]:
    """A finished trial's leaderboard row and manifest, or its failed row (the error in one line)."""
    run_dir = runs_root(config.output.output_dir) / str(config.output.run_name)
    try:
        manifest = future.result().manifest
    except Exception as err:
        return TrialRow.of(run_dir.name, params, "failed", run_dir, metric, error=one_line(err)), None
    state = "cached" if future.state.name == "Cached" else "completed"
    return TrialRow.of(run_dir.name, params, state, run_dir, metric, manifest), manifest


def sweep_run_name() -> str:
    """The flow run's name: the sweep's."""
    return sweep_name(running_sweep())


@flow(
    name="sweep-pipeline",
    flow_run_name=sweep_run_name,
    validate_parameters=True,
    task_runner=DaskTaskRunner(cluster_class=sweep_cluster),
)
def sweep_pipeline(base: PipelineConfig, sweep: SweepConfig) -> SweepResult:
    """Train `base` with each trial's values of `sweep.space`, `sweep.parallel` at a time on Dask;
    returns the ranked leaderboard. Fails only when no trial finished."""
    space = check_space(base, sweep)  # a bad key or value stops the sweep before any trial
    base = absolute_paths(base)
    name, metric, root = sweep_name(sweep), sweep_metric(base, sweep), sweep_dir(base, sweep)
    root.mkdir(parents=True, exist_ok=True)
    proposer = TrialProposer(space, sweep, monitor_mode(metric))
    rows: list[TrialRow] = []
    manifests: dict[str, Manifest] = {}
    with tags(f"sweep:{name}", f"dataset:{base.data.dataset}"), durable_results(base.output):
        base = locate_weights(base)  # pretrained weights fill what they say before any recipe
        data = base.resolved().data  # as the trials' training flows see it: their data steps are cached
        location = download_dataset(data)
        dataset = fingerprint_data(data, location)
        validated = validate_data(dataset, data, str(root))
        compute_normalization(dataset, validated, data)  # and the decoded cache every trial reads
        with current_dask_scheduler(sweep.dask_address):
            while batch := proposer.next_batch():
                configs = [trial_config(base, params, name, len(rows) + i) for i, params in enumerate(batch)]
                futures = {
                    trial_task.submit(dataset=dataset, config=config, parallel=sweep.parallel): i
                    for i, config in enumerate(configs)
                }
                finished: dict[int, TrialRow] = {}
                for future in as_completed(list(futures)):
                    i = futures[future]
                    row, manifest = trial_outcome(future, configs[i], batch[i], metric)
                    finished[i] = row
                    rows.append(row)
                    if manifest is not None:
                        manifests[row.trial] = manifest
                    record_trial(name, str(root), rows, row, metric)
                proposer.report([finished[i].metric for i in range(len(batch))])
        leaderboard = ranked(rows, metric)
        best = manifests.get(leaderboard[0].trial) if leaderboard else None
        publish_sweep_summary(name, leaderboard, metric, best)
        champion = None
        if best is not None and base.output.champion is not None:
            champion = challenge_best(best, leaderboard[0], dataset, validated, base, metric).champion
    if best is None:
        raise VisionflowError(
            f"Every trial of sweep {name} failed; first: {leaderboard[0].error if leaderboard else '-'}"
        )
    return SweepResult(
        name=name, metric=metric, sweep_dir=str(root), rows=leaderboard, best=best.run_name, champion=champion
    )


def challenge_best(
    best: Manifest, row: TrialRow, dataset: DatasetRef, validated: Any, base: PipelineConfig, metric: str
) -> Manifest:
    """The best trial challenges base.output.champion, ranked on the sweep's metric."""
    config = best.config.model_copy(
        update={
            "output": best.config.output.model_copy(update={"champion": base.output.champion}),
            "training": best.config.training.model_copy(update={"monitor": metric}),
        }
    )
    run = RunInfo(
        run_dir=row.run_dir, resume_from=None, started_time=datetime.fromisoformat(best.started_at).timestamp()
    )
    return challenge_champion(run, dataset, validated, config)
