"""Data tasks: download/prepare, fingerprint, validate, transform preview.

Cached outputs never hold the dataset's location: the same bytes elsewhere (a moved or copied
folder) reuse them. The location travels in `DatasetRef`, which is recomputed every run.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from tasks.caching import TaskOutput, created_files, outputs_in, verified_cache
from visionflow.cache import load_decoded
from visionflow.fileio import atomic_write_json
from visionflow.config import DataConfig
from visionflow.data import DatasetInfo, resolve_dataset, resolve_folder
from visionflow.fingerprint import fingerprint_dataset
from visionflow.preview import write_preview
from visionflow.reports import write_validation_csvs
from visionflow.runs import RunLayout
from visionflow.tensorboard import log_image
from visionflow.transforms import fill_mean_std
from visionflow.validate import validate_dataset


class DataSource(BaseModel):
    """The slice of the config that says which dataset and how it is split."""

    model_config = ConfigDict(frozen=True)
    dataset: str
    data_dir: str
    val_fraction: float
    split_seed: int

    @classmethod
    def of(cls, data: DataConfig) -> "DataSource":
        return cls(dataset=data.dataset, data_dir=data.data_dir, val_fraction=data.val_fraction, split_seed=data.split_seed)


class DataLocation(TaskOutput):
    """Where a prepared dataset lives."""

    root: str

    def problems(self) -> list[str]:
        return [] if Path(self.root).is_dir() else [f"{self.root} is missing"]


class DatasetRef(BaseModel):
    """A dataset as found this run: its location, split rule and content fingerprint."""

    model_config = ConfigDict(frozen=True)
    source: DataSource
    root: str
    fingerprint: str
    classes: tuple[str, ...]

    def load(self) -> DatasetInfo:
        return resolve_folder(self.root, self.source.dataset, self.source.val_fraction, self.source.split_seed)


def by_fingerprint(dataset: DatasetRef) -> str:
    """Cache identity of a dataset: its content, not where it lives."""
    return dataset.fingerprint


class ValidatedData(TaskOutput):
    """Validation outcome: the files left out (dataset-relative) and the counts that remain."""

    excluded: tuple[str, ...]
    fingerprint: str  # of the dataset without the excluded files
    num_train: int
    num_eval: int
    eval_split: str

    def apply(self, info: DatasetInfo) -> DatasetInfo:
        """`info` without the excluded files."""
        bad = [info.root / relpath for relpath in self.excluded]
        return replace(info, splits={name: split.without(bad) for name, split in info.splits.items()})


def by_exclusions(validated: ValidatedData) -> tuple[str, ...]:
    return validated.excluded


class PreviewOutput(TaskOutput):
    pass


@task(cache_policy=verified_cache("source", modules=("visionflow.data", "visionflow.download")), retries=2,
      retry_delay_seconds=5)
def download_dataset(source: DataSource) -> DataLocation:
    """Download and prepare the dataset if needed (CIFAR-10); retried, since downloads fail transiently."""
    info = resolve_dataset(source.dataset, source.data_dir, source.val_fraction, source.split_seed, download=True)
    get_run_logger().info("dataset %s at %s", source.dataset, info.root)
    return DataLocation(root=str(info.root))


# Never cached: its output is what every other data task is keyed on, so it must see each change.
@task(cache_policy=NO_CACHE)
def fingerprint_data(source: DataSource, location: DataLocation) -> DatasetRef:
    """Resolve the splits and fingerprint every file's content."""
    info = resolve_folder(location.root, source.dataset, source.val_fraction, source.split_seed)
    fingerprint = fingerprint_dataset(info)
    get_run_logger().info("dataset %s: %s", source.dataset, ", ".join(f"{n} {len(s)}" for n, s in info.splits.items()))
    return DatasetRef(source=source, root=str(info.root), fingerprint=fingerprint, classes=info.classes)


@task(cache_policy=verified_cache("on_invalid", dataset=by_fingerprint,
                                  modules=("visionflow.validate", "visionflow.reports", "visionflow.images",
                                           "visionflow.fingerprint", "visionflow.data")))
def validate_data(dataset: DatasetRef, on_invalid: str, run_dir: str) -> ValidatedData:
    """Validate every image (report: validation.json and CSVs); invalid files are left out."""
    report, clean = validate_dataset(dataset.load(), on_invalid=on_invalid)
    layout = RunLayout(Path(run_dir))
    values = report.to_dict()
    atomic_write_json(layout.validation, values)
    tables = write_validation_csvs(values, layout.root)
    if report.invalid:
        get_run_logger().warning("%d invalid file(s) left out: %s", len(report.invalid),
                                 ", ".join(path for path, _ in report.invalid[:5]))
    return ValidatedData(excluded=tuple(path for path, _ in report.invalid), fingerprint=report.fingerprint,
                         num_train=len(clean.train), num_eval=len(clean.eval_split), eval_split=clean.eval_split.name,
                         files=outputs_in(run_dir, [layout.validation.name, *(p.name for p in tables.values())]))


def by_transform(data: DataConfig) -> tuple:
    """What a preview depends on in the data config (not the location or the batching)."""
    return data.image_size, data.augment, data.mean, data.std


@task(cache_policy=verified_cache("seed", dataset=by_fingerprint, validated=by_exclusions, data=by_transform,
                                  modules=("visionflow.preview", "visionflow.transforms", "visionflow.images",
                                           "visionflow.cache", "visionflow.tensorboard", "visionflow.data")))
def preview_transforms(dataset: DatasetRef, validated: ValidatedData, data: DataConfig, seed: int,
                       run_dir: str) -> PreviewOutput:
    """Render what the model sees (original | eval input | train input) to preview.png and TensorBoard."""
    layout = RunLayout(Path(run_dir))
    train = validated.apply(dataset.load()).train
    mean, std = data.mean, data.std
    if mean is None or std is None:  # the train split's statistics, as fit() computes them
        decoded = load_decoded(train, data.image_size, Path(data.data_dir) / "cache")
        mean, std = fill_mean_std(mean, std, decoded.images)
    _, image = write_preview(layout.preview, train, data.image_size, mean, std, bool(data.augment), seed)
    with created_files(run_dir, layout.tensorboard) as events:
        log_image(layout.tensorboard, "data/transform_preview", image)
    return PreviewOutput(files={**outputs_in(run_dir, [layout.preview.name]), **events})
