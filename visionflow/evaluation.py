"""Evaluation reports (loss, accuracy, top-5, per-class metrics, confusion matrix, the most
confidently wrong images) and prediction on image files with a model's own preprocessing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from visionflow.data import transforms
from visionflow.data.decoded import DecodedSplit, FileSplit
from visionflow.data.images import load_rgb, thread_map
from visionflow.data.loaders import eval_batches
from visionflow.errors import DatasetError
from visionflow.reports import PER_CLASS_COLUMNS, confusion_table
from visionflow.tables import Table, text_table
from visionflow.train.device import resolve_device
from visionflow.train.engine import collect_logits
from visionflow.train.records import ModelSpec

CONFIDENTLY_WRONG_K = 16
TOP_K = 5


@dataclass
class EvalReport:
    """Metrics of one model on one labelled split."""

    classes: list[str]
    num_images: int
    loss: float  # mean cross-entropy
    accuracy: float  # top-1, in [0, 1]
    top5: float | None  # None under TOP_K classes
    per_class: Table  # one row per class: reports.PER_CLASS_COLUMNS
    confusion_matrix: list[list[int]]  # [true][predicted]
    confidently_wrong: list[dict]  # {"file", "true", "predicted", "probability"}, most confident first
    probabilities: Tensor = field(repr=False)  # (N, C) softmax, for PR curves; not in to_dict()
    labels: Tensor = field(repr=False)  # (N,) int64

    def to_dict(self) -> dict:
        """JSON-ready: plain floats, ints and strings only."""
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "top5": self.top5,
            "num_images": self.num_images,
            "classes": list(self.classes),
            "per_class": self.per_class.records(),
            "confusion_matrix": self.confusion_matrix,
            "confidently_wrong": self.confidently_wrong,
        }

    def to_text(self) -> str:
        """A readable summary: headline metrics, the per-class table, and the confusion matrix."""
        top5 = "n/a" if self.top5 is None else f"{self.top5:.4f}"
        confusion = confusion_table(self.confusion_matrix, self.classes)
        confusion = Table(("true \\ predicted", *confusion.columns[1:]), confusion.rows, confusion.kinds)
        return "\n".join(
            [
                f"images: {self.num_images}  loss: {self.loss:.4f}  accuracy: {self.accuracy:.4f}  top5: {top5}",
                "",
                text_table(self.per_class),
                "",
                text_table(confusion),
            ]
        )


def _safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, 0.0 where the denominator is 0 (zero-division convention)."""
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-12), torch.zeros_like(numerator))


def confusion_matrix(labels: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted class."""
    flat = labels * num_classes + predictions  # (N,)
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_metrics(confusion: Tensor, classes: Sequence[str]) -> Table:
    """Precision, recall, F1 and support per class from a confusion matrix (zero division -> 0.0)."""
    confusion = confusion.double()
    true_positives = confusion.diag()  # (C,)
    support = confusion.sum(dim=1)  # (C,) images per true class
    predicted = confusion.sum(dim=0)  # (C,) images per predicted class
    precision = _safe_ratio(true_positives, predicted)
    recall = _safe_ratio(true_positives, support)
    f1 = _safe_ratio(2 * precision * recall, precision + recall)
    columns = (list(classes), precision.tolist(), recall.tolist(), f1.tolist(), support.long().tolist())
    return Table(tuple(PER_CLASS_COLUMNS), tuple(zip(*columns)), tuple(PER_CLASS_COLUMNS.values()))


def top_k_accuracy(logits: Tensor, labels: Tensor, k: int = TOP_K) -> float | None:
    """Fraction of images whose label is among the k highest logits; None with fewer than k classes."""
    if logits.shape[1] < k:
        return None
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)  # (N,)
    return hits.double().mean().item()


def confidently_wrong(
    probabilities: Tensor, labels: Tensor, classes: Sequence[str], files: Sequence[str], k: int = CONFIDENTLY_WRONG_K
) -> list[dict]:
    """The k misclassified images with the highest predicted probability, most confident first."""
    confidence, predictions = probabilities.max(dim=1)  # (N,), (N,)
    wrong = (predictions != labels).nonzero().flatten()  # (W,)
    ranked = wrong[confidence[wrong].argsort(descending=True, stable=True)][:k]
    return [
        {
            "file": files[i],
            "true": classes[labels[i]],
            "predicted": classes[predictions[i]],
            "probability": confidence[i].item(),
        }
        for i in ranked.tolist()
    ]


def report_from_logits(
    logits: Tensor, labels: Tensor, classes: Sequence[str], files: Sequence[str], k: int = CONFIDENTLY_WRONG_K
) -> EvalReport:
    """Every metric of an EvalReport from (N, C) logits, (N,) labels and the N files' names."""
    logits, labels = logits.float().cpu(), labels.long().cpu()
    confusion = confusion_matrix(labels, logits.argmax(dim=1), len(classes))
    probabilities = logits.softmax(dim=1)  # (N, C)
    return EvalReport(
        classes=list(classes),
        num_images=len(labels),
        loss=F.cross_entropy(logits, labels).item(),
        accuracy=(confusion.diag().sum() / len(labels)).item(),
        top5=top_k_accuracy(logits, labels),
        per_class=per_class_metrics(confusion, classes),
        confusion_matrix=confusion.tolist(),
        confidently_wrong=confidently_wrong(probabilities, labels, classes, files, k),
        probabilities=probabilities,
        labels=labels,
    )


# ---------------------------------------------------------------------------------------------
# Running a model


def check_classes_match(spec: ModelSpec, classes: Sequence[str]) -> None:
    """A dataset's classes must be the model's class_names, in order (label i = class i); else DatasetError."""
    if tuple(classes) != tuple(spec.class_names):
        raise DatasetError(
            f"Dataset classes {list(classes)} do not match the model's class_names "
            f"{list(spec.class_names)}: evaluate on a dataset with the classes the model was trained on"
        )


def _check_split_fits(spec: ModelSpec, decoded: DecodedSplit | FileSplit) -> None:
    """The split must be non-empty, decoded at the model's input size, with the model's classes."""
    if len(decoded.labels) == 0:
        raise DatasetError("The split to evaluate has no images: expected at least one")
    check_classes_match(spec, decoded.classes)
    size = decoded.image_size
    if size != spec.decode_size:
        raise DatasetError(
            f"Images are decoded at {size}x{size} but the model crops its input from "
            f"{spec.decode_size}x{spec.decode_size}: decode the split at the spec's decode_size"
        )


def evaluate_model(
    model: nn.Module, spec: ModelSpec, decoded: DecodedSplit | FileSplit, device: str = "auto", batch_size: int = 256
) -> EvalReport:
    """Evaluate ``model`` (moved to ``device``) on a decoded split or a streamed one (`cache.FileSplit`),
    normalized with the spec's mean/std."""
    _check_split_fits(spec, decoded)
    target = resolve_device(device)
    batches = eval_batches(decoded, spec.mean, spec.std, target, batch_size, size=spec.input_size)
    logits, labels = collect_logits(model.to(target), batches, target, flip=spec.test_flip)  # (N, C), (N,)
    return report_from_logits(logits, labels, decoded.classes, decoded.files)


def predict_images(
    model: nn.Module, spec: ModelSpec, paths: Sequence[str | Path], device: str = "auto", batch_size: int = 256
) -> list[dict]:
    """Classify image files with the spec's preprocessing (resize to input_size, normalize).

    One entry per path, in order: ``{"image", "label", "probability", "probabilities": {class: p}}``.
    An unreadable image raises DatasetError naming it.
    """
    if not paths:
        return []
    target = resolve_device(device)
    batches = _image_batches(paths, input_pipeline(spec), batch_size)
    logits, _ = collect_logits(model.to(target), batches, target, flip=spec.test_flip)  # (N, C)
    probabilities = logits.softmax(dim=1)  # (N, C)
    return [_prediction(path, row, spec.class_names) for path, row in zip(paths, probabilities)]


def input_pipeline(spec: ModelSpec) -> Callable[[Image.Image], Tensor]:
    """PIL image -> the model's float32 (3, S, S) input, with the spec's preprocessing: what
    prediction, scoring and exports feed a model for one image file."""
    return transforms.eval_pipeline(spec.input_size, spec.mean, spec.std, spec.crop_pct)


def _image_batches(
    paths: Sequence[str | Path], pipeline: Callable[[Image.Image], Tensor], batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """(model-ready (B, 3, S, S) images, (B,) positions in ``paths``), decoded on threads per batch.

    collect_logits carries a tensor beside each batch (labels when evaluating): here, positions.
    """
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        yield (
            torch.stack(thread_map(lambda path: pipeline(load_rgb(path)), chunk)),
            torch.arange(start, start + len(chunk)),
        )


def _prediction(path: str | Path, probabilities: Tensor, classes: Sequence[str]) -> dict:
    best = int(probabilities.argmax())
    return {
        "image": str(path),
        "label": classes[best],
        "probability": probabilities[best].item(),
        "probabilities": dict(zip(classes, probabilities.tolist())),
    }
