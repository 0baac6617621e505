"""Label-issue task (the flow calls it with label_issues.enabled): the train split's suspected mislabels before
training (visionflow.label_issues), as files in the run folder and Prefect artifacts; with
on_issue drop-train the training that follows leaves them out.

Not cached as a task: each fold's probabilities are cached on disk by the core (keyed on the
fold's files and the training fields), so a rerun only ranks and writes again. The folds train
holding the device's slots, as training does (tasks.training.device_slots); a rerun whose folds
are all cached takes them too, for as long as ranking takes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.artifacts import publish_image, publish_table
from tasks.caching import record_outcome
from tasks.data import DatasetRef, ValidatedData
from tasks.training import device_slots
from visionflow.config import PipelineConfig
from visionflow.data.fingerprint import fingerprint_dataset
from visionflow.label_issues import GRID_LIMIT, GRID_NAME, find_issues, write_issues
from visionflow.train.device_limits import device_claim

ISSUES_KEY = "label-issues"  # the ranked suspects, a table artifact
GRID_KEY = "label-issues-grid"  # the top GRID_LIMIT suspects' images


@task(cache_policy=NO_CACHE, on_completion=[record_outcome], task_run_name="search label issues")
def search_label_issues(
    dataset: DatasetRef, validated: ValidatedData, config: PipelineConfig, run_dir: str
) -> ValidatedData:
    """The validated data, with the suspects added to `excluded` under label_issues.on_issue drop-train."""
    info = validated.apply(dataset)
    logger = get_run_logger()
    with device_slots(device_claim(config.training), logger):  # the folds train on the run's device
        report = find_issues(info, config)
    write_issues(report, info.train, run_dir)
    publish_table(ISSUES_KEY, report.table(), f"{len(report.issues)} suspected label issues of {report.num_train}")
    publish_image(GRID_KEY, Path(run_dir) / GRID_NAME, f"Top {GRID_LIMIT} suspects: true = given, pred = suggested")
    logger.info(
        "label issues: %d of %d train images suspected (%d folds), %s",
        len(report.issues),
        report.num_train,
        report.folds,
        "left out of training" if config.label_issues.on_issue == "drop-train" else "reported",
    )
    if config.label_issues.on_issue != "drop-train" or not report.issues:
        return validated
    suspects = [info.train.root / issue.file for issue in report.issues]
    kept = replace(info, splits={**info.splits, "train": info.train.without(suspects)})
    dropped = tuple(path.relative_to(info.root).as_posix() for path in suspects)
    return validated.model_copy(
        update={
            "excluded": validated.excluded + dropped,
            "fingerprint": fingerprint_dataset(kept),
            "num_train": len(kept.train),
        }
    )
