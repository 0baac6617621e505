"""Data tasks: download/prepare, fingerprint, validate, normalization statistics, transform preview.

Cached outputs never hold the dataset's location: the same bytes elsewhere (a moved or copied
folder) reuse them. The location travels in `DatasetRef`, which is recomputed every run.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from tasks.caching import FileRef, TaskOutput, cached_task, record_outcome, written_files
from tasks.names import run_name
from visionflow.config import DataConfig
from visionflow.data.fingerprint import fingerprint_dataset
from visionflow.data.splits import DatasetInfo, resolve_dataset, resolve_folder
from visionflow.data.validate import ValidationReport
from visionflow.manifest import DataRecord
from visionflow.steps import fill_normalization, preview_into, validate_into


class DataLocation(TaskOutput):
    """Where a prepared dataset lives."""

    root: str

    def problems(self) -> list[str]:
        return [] if Path(self.root).is_dir() else [f"{self.root} is missing"]


class DatasetRef(BaseModel):
    """A dataset as found this run: its config (which dataset, how it is split), its location
    and its content fingerprint."""

    model_config = ConfigDict(frozen=True)
    data: DataConfig
    root: str
    fingerprint: str
    classes: tuple[str, ...]

    def load(self) -> DatasetInfo:
        return resolve_folder(self.root, self.data.dataset, self.data.val_fraction, self.data.split_seed)


class ValidatedData(TaskOutput):
    """Validation outcome: the files left out (dataset-relative) and the counts that remain."""

    excluded: tuple[str, ...]  # invalid files, and leaked eval images with on_leak="drop-eval"
    fingerprint: str  # of the dataset without the excluded files
    num_train: int
    num_eval: int
    eval_split: str
    leaked: tuple[str, ...] = ()  # eval images with a near-duplicate in train (left out or not)
    eval_leakage_rate: float | None = None  # None: near-duplicates not searched

    @classmethod
    def of(cls, report: ValidationReport, clean: DatasetInfo, files: dict[str, FileRef]) -> ValidatedData:
        """The outcome of `steps.validate_into`: its report and the dataset it left."""
        near = report.near_duplicates
        return cls(
            excluded=tuple(path for path, _ in report.invalid) + report.dropped,
            fingerprint=report.fingerprint,
            num_train=len(clean.train),
            num_eval=len(clean.eval_split),
            eval_split=clean.eval_split.name,
            leaked=near.leaked_eval if near is not None else (),
            eval_leakage_rate=near.eval_leakage_rate if near is not None else None,
            files=files,
        )

    @property
    def dropped_leaked(self) -> tuple[str, ...]:
        """Leaked eval images left out (on_leak="drop-eval")."""
        excluded = set(self.excluded)
        return tuple(path for path in self.leaked if path in excluded)

    def apply(self, dataset: DatasetRef, keep_leaked: bool = False) -> DatasetInfo:
        """The dataset's splits without the excluded files (`keep_leaked`: the leaked eval images
        that on_leak="drop-eval" left out stay in)."""
        info = dataset.load()
        kept = set(self.leaked) if keep_leaked else set()
        bad = [info.root / relpath for relpath in self.excluded if relpath not in kept]
        return replace(info, splits={name: split.without(bad) for name, split in info.splits.items()})

    def record(self, dataset: DatasetRef) -> DataRecord:
        """The manifest's data section: the dataset as found this run, as validated."""
        return DataRecord(
            spec=dataset.data.dataset,
            root=dataset.root,
            fingerprint=dataset.fingerprint,
            validated_fingerprint=self.fingerprint,
            num_train=self.num_train,
            num_eval=self.num_eval,
            eval_split=self.eval_split,
            classes=list(dataset.classes),
            excluded=list(self.excluded),
            eval_leakage_rate=self.eval_leakage_rate,
            leaked_eval=list(self.leaked),
        )


class Normalization(TaskOutput):
    """Per-channel normalization of the model's inputs."""

    mean: list[float]
    std: list[float]

    def apply(self, data: DataConfig) -> DataConfig:
        """`data` normalized with these statistics."""
        return data.model_copy(update={"mean": self.mean, "std": self.std})


def by_source(data: DataConfig) -> tuple:
    """What a download depends on: which dataset, where downloads go, how it is split."""
    return data.dataset, data.data_dir, data.val_fraction, data.split_seed


def by_fingerprint(dataset: DatasetRef) -> str:
    """Cache identity of a dataset: its content, not where it lives."""
    return dataset.fingerprint


def by_exclusions(validated: ValidatedData) -> tuple[str, ...]:
    return validated.excluded


def by_transform(data: DataConfig) -> tuple:
    """What normalization and the preview depend on in the data config (not the location or the batching)."""
    return data.image_size, data.augment, data.crop_padding, data.mean, data.std, data.crop_pct, data.train_crop


# Downloads fail transiently: retried.
@cached_task(data=by_source, retries=2, retry_delay_seconds=[2, 10], task_run_name=run_name("download {dataset_name}"))
def download_dataset(data: DataConfig) -> DataLocation:
    """Download and prepare the dataset if needed (CIFAR-10)."""
    info = resolve_dataset(data.dataset, data.data_dir, data.val_fraction, data.split_seed, download=True)
    get_run_logger().info("dataset %s at %s", data.dataset, info.root)
    return DataLocation(root=str(info.root))


# Never cached: its output is what every other data task is keyed on, so it must see each change.
@task(cache_policy=NO_CACHE, on_completion=[record_outcome], task_run_name=run_name("fingerprint {dataset_name}"))
def fingerprint_data(data: DataConfig, location: DataLocation) -> DatasetRef:
    """Resolve the splits and fingerprint every file's content."""
    info = resolve_folder(location.root, data.dataset, data.val_fraction, data.split_seed)
    get_run_logger().info("dataset %s: %s", data.dataset, ", ".join(f"{n} {len(s)}" for n, s in info.splits.items()))
    return DatasetRef(data=data, root=str(info.root), fingerprint=fingerprint_dataset(info), classes=info.classes)


def by_validation(data: DataConfig) -> tuple:
    """What validation depends on in the data config: the invalid-file policy, the near-duplicate
    search and its policy (their settings do not matter while the search is off)."""
    search = (True, data.near_duplicate_threshold, data.on_leak) if data.near_duplicates else (False,)
    return data.on_invalid, *search


@cached_task(dataset=by_fingerprint, data=by_validation, task_run_name=run_name("validate {dataset_name}"))
def validate_data(dataset: DatasetRef, data: DataConfig, run_dir: str) -> ValidatedData:
    """Validate every image (report: validation.json and CSVs); invalid files are left out, and
    with data.near_duplicates the near-duplicates are searched (see data.on_leak)."""
    with written_files(run_dir) as files:
        report, clean = validate_into(run_dir, dataset.load(), data)
    for line in report.warnings():
        get_run_logger().warning(line)
    return ValidatedData.of(report, clean, files)


@cached_task(
    dataset=by_fingerprint,
    validated=by_exclusions,
    data=by_transform,
    task_run_name=run_name("normalize {dataset_name}"),
)
def compute_normalization(dataset: DatasetRef, validated: ValidatedData, data: DataConfig) -> Normalization:
    """The train split's per-channel mean and std where the config leaves them empty (computed once per run)."""
    filled = fill_normalization(validated.apply(dataset), data)
    return Normalization(mean=filled.mean, std=filled.std)


@cached_task(
    "seed",
    "normalization",
    dataset=by_fingerprint,
    validated=by_exclusions,
    data=by_transform,
    task_run_name=run_name("preview {dataset_name}"),
)
def preview_transforms(
    dataset: DatasetRef,
    validated: ValidatedData,
    data: DataConfig,
    normalization: Normalization,
    seed: int,
    run_dir: str,
) -> TaskOutput:
    """Render what the model sees (original | eval input | train input) to preview.png and TensorBoard."""
    with written_files(run_dir) as files:
        preview_into(run_dir, validated.apply(dataset).train, normalization.apply(data), seed)
    return TaskOutput(files=files)
