"""Label issues: training images whose given label looks wrong (config: label_issues; guide:
docs/guides/promotion.md#label-issues).

Out-of-fold predicted probabilities: the train split is cut into `label_issues.folds` stratified
folds (seeded with training.seed); for each fold a model is trained on the other folds with the
run's own config (`steps.train_run`: recipe, epochs, model) and predicts the held-out fold from
its last checkpoint (the held-out fold is the fit's eval split for its curves, but no choice is
made on it). Every image is thus predicted by a model that never saw it, which is what
`cleanlab.filter.find_label_issues` needs (confident learning). Each fold's probabilities are
cached (`<output_dir>/.label-issues/<key>.npz`, the key covering both sides' file fingerprints
and every config field that changes a training), so a rerun or the flow after `visionflow
validate --label-issues` trains nothing again.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.config import PipelineConfig, flatten, free_fields
from visionflow.data.fingerprint import fingerprint_split
from visionflow.data.splits import DatasetInfo, Split
from visionflow.fileio import atomic_write_bytes, atomic_write_json
from visionflow.tables import Table

CACHE_SUBDIR = ".label-issues"  # under output.output_dir: each fold's out-of-fold probabilities
REPORT_NAME = "label_issues.json"
GRID_NAME = "label_issues.png"
GRID_LIMIT = 16  # suspects drawn in the image grid: four rows of four


@dataclass(frozen=True)
class LabelIssue:
    """A suspected mislabelled image: its given label, the label the out-of-fold model suggests
    and cleanlab's label quality score (self-confidence: low is suspicious)."""

    file: str  # relative to the split's root, e.g. "cat/0001.jpg"
    given: str
    suggested: str
    score: float
    suggested_probability: float


@dataclass(frozen=True)
class LabelIssueReport:
    issues: list[LabelIssue]  # most suspicious first
    num_train: int
    folds: int

    def to_dict(self) -> dict[str, Any]:
        return {"num_train": self.num_train, "folds": self.folds, "issues": [asdict(issue) for issue in self.issues]}

    def table(self, limit: int | None = None) -> Table:
        """The first `limit` suspects (None: all), one row each."""
        columns = ("file", "given", "suggested", "score", "suggested_probability")
        return Table.of(columns, map(asdict, self.issues[:limit]))


def fold_indices(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """The held-out indices of each stratified fold (sklearn's StratifiedKFold, shuffled with `seed`)."""
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [held for _, held in splitter.split(np.zeros(len(labels)), labels)]


def _fold_key(train: Split, held: Split, config: PipelineConfig) -> str:
    free = free_fields("cache")
    training = {k: v for k, v in flatten(config.model_dump(mode="json")).items() if k not in free}
    text = json.dumps([fingerprint_split(train), fingerprint_split(held), training], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _subset(split: Split, indices: np.ndarray) -> Split:
    return replace(split, files=tuple(split.files[i] for i in indices), labels=tuple(split.labels[i] for i in indices))


def fold_probabilities(dataset: DatasetInfo, held: np.ndarray, config: PipelineConfig) -> np.ndarray:
    """Train on the train split without `held` (the run's config), predict `held`: (len(held), C),
    cached under output.output_dir."""
    from visionflow.champion import evaluate_export
    from visionflow.steps import train_run

    train = dataset.train
    rest = _subset(train, np.setdiff1d(np.arange(len(train)), held))
    held_split = replace(_subset(train, held), name="val")
    cache = Path(config.output.output_dir) / CACHE_SUBDIR / f"{_fold_key(rest, held_split, config)}.npz"
    if cache.is_file():
        return np.load(cache)["probabilities"]
    folds = replace(dataset, splits={"train": rest, "val": held_split})
    with tempfile.TemporaryDirectory(prefix="fold-") as run_dir:  # its checkpoints are not kept
        fit = train_run(run_dir, folds, config)
        report = evaluate_export(Path(fit.last_checkpoint), held_split, config.data, config.training.device)
    probabilities = report.probabilities.numpy().astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, probabilities=probabilities)
    atomic_write_bytes(cache, buffer.getvalue())
    return probabilities


def out_of_fold_probabilities(dataset: DatasetInfo, config: PipelineConfig, folds: int) -> np.ndarray:
    """(N, C) probabilities of every train image from the fold model that did not train on it."""
    labels = np.asarray(dataset.train.labels)
    probabilities = np.zeros((len(labels), len(dataset.classes)), dtype=np.float32)
    for held in fold_indices(labels, folds, config.training.seed):
        probabilities[held] = fold_probabilities(dataset, held, config)
    return probabilities


def rank_label_issues(split: Split, probabilities: np.ndarray, folds: int) -> LabelIssueReport:
    """cleanlab's suspects among the split's images, most suspicious (lowest self-confidence) first."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(split.labels)
    ranked = find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence")
    scores = get_label_quality_scores(labels, probabilities, method="self_confidence")
    suggested = probabilities.argmax(axis=1)
    issues = [
        LabelIssue(
            file=split.relpath(i),
            given=split.classes[labels[i]],
            suggested=split.classes[suggested[i]],
            score=float(scores[i]),
            suggested_probability=float(probabilities[i, suggested[i]]),
        )
        for i in ranked.tolist()
    ]
    return LabelIssueReport(issues=issues, num_train=len(labels), folds=folds)


def find_issues(dataset: DatasetInfo, config: PipelineConfig) -> LabelIssueReport:
    """The train split's suspected label issues (label_issues.folds folds of the run's config)."""
    folds = config.label_issues.folds
    return rank_label_issues(dataset.train, out_of_fold_probabilities(dataset, config, folds), folds)


def write_issues(report: LabelIssueReport, train: Split, out_dir: Path | str) -> Path:
    """REPORT_NAME (JSON) and GRID_NAME (the top GRID_LIMIT suspects: caption "true" is the given
    label, "pred" the suggested one) in `out_dir`; returns the JSON's path."""
    from visionflow.reports import render_misclassified, write_png

    examples = [
        {"file": i.file, "true": i.given, "predicted": i.suggested, "probability": i.suggested_probability}
        for i in report.issues[:GRID_LIMIT]
    ]
    write_png(render_misclassified(examples, train.root), Path(out_dir) / GRID_NAME)
    return atomic_write_json(Path(out_dir) / REPORT_NAME, report.to_dict())
