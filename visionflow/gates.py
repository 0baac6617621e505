"""Promotion gates: the checks a challenger must pass to replace the champion, computed from both
models' predictions on the same eval images (config: champion.gates; guide:
docs/guides/promotion.md). Each check is a `manifest.GateCheck`: pass or fail, its figure, its
rule and threshold, and what was measured.

- Paired significance: McNemar's exact test. Both models answer the same images, so only the
  images where exactly one of them is right tell them apart: b (the challenger alone right) and
  c (the champion alone right). Under "no better than the champion" each such image is a coin
  flip, so the one-sided p-value is P(X >= b) for X ~ Binomial(b + c, 1/2)
  (`scipy.stats.binomtest`). Chosen over a paired bootstrap because it is exact on small eval
  sets (where the bootstrap's normal-ish tails are least trustworthy), needs no seed or resample
  count, and asks the user's question: does it get more images right? It tests correctness
  whatever training.monitor is; the gain check holds the monitored metric.
- Gain: the monitored metric's gain (accuracy up, or loss down) must reach min_gain. With
  data.near_duplicates and gates.leak_free it is the "leak-free gain", and every check is
  computed on the eval images without a near-duplicate in train (`leaked` leaves them out):
  a model that memorised leaked copies gains nothing there.
- No class left behind: the largest drop of a class's recall, and of its F1, within a bound
  (`evaluation.per_class_metrics`, the run's own per-class table).
- Calibration: the expected calibration error (15 equal-width confidence bins, L1:
  torchmetrics' `MulticlassCalibrationError`) may rise at most max_ece_rise;
  `reliability_diagram` draws both models' bins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy.stats import binomtest
from torchmetrics.classification import MulticlassCalibrationError

from visionflow.config import GatesConfig, monitor_mode
from visionflow.evaluation import confusion_matrix, per_class_metrics
from visionflow.manifest import GateCheck
from visionflow.reports import BLACK, FONT_SIZE, WHITE, default_font, write_png

ECE_BINS = 15  # confidence bins of the calibration error: the usual choice (Guo et al., 2017)


@dataclass(frozen=True)
class Predictions:
    """One model's softmax probabilities (N, C) on the eval images, and their labels (N,)."""

    probabilities: np.ndarray
    labels: np.ndarray

    @classmethod
    def of(cls, probabilities: object, labels: object) -> Predictions:
        """From arrays or tensors (an `EvalReport`'s probabilities and labels)."""
        return cls(np.asarray(probabilities, dtype=np.float64), np.asarray(labels, dtype=np.int64))

    def correct(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1) == self.labels

    def subset(self, keep: np.ndarray) -> Predictions:
        return Predictions(self.probabilities[keep], self.labels[keep])


def _accuracy(p: Predictions) -> float:
    return float(p.correct().mean())


def _loss(p: Predictions) -> float:
    """Mean cross-entropy of the probabilities (the eval loss, from softmax outputs)."""
    return float(-np.log(np.clip(p.probabilities[np.arange(len(p.labels)), p.labels], 1e-12, None)).mean())


SCORES: dict[str, Callable[[Predictions], float]] = {"eval_accuracy": _accuracy, "eval_loss": _loss}


def score(predictions: Predictions, metric: str) -> float:
    """training.monitor `metric` (config.MONITOR_MODES) of the predictions."""
    monitor_mode(metric, "champion metric")  # an unknown metric: ConfigError naming the valid ones
    return SCORES[metric](predictions)


def significance(challenger: Predictions, champion: Predictions, alpha: float, images: str) -> GateCheck:
    """McNemar's exact one-sided test on the disagreements (see the module's docstring)."""
    mine, theirs = challenger.correct(), champion.correct()
    b, c = int((mine & ~theirs).sum()), int((theirs & ~mine).sum())
    p_value = binomtest(b, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
    detail = f"challenger alone right on {b}, champion alone on {c} of {images}"
    return GateCheck(
        check="significance", passed=p_value <= alpha, figure=p_value, rule="<=", threshold=alpha, detail=detail
    )


def gain(
    challenger: Predictions, champion: Predictions, metric: str, min_gain: float, name: str, images: str
) -> GateCheck:
    """The monitored metric's gain (higher is better: challenger - champion; lower: the reverse)."""
    ours, theirs = score(challenger, metric), score(champion, metric)
    change = ours - theirs if monitor_mode(metric) == "max" else theirs - ours
    detail = f"{metric} {theirs:.4f} -> {ours:.4f} on {images}"
    return GateCheck(check=name, passed=change >= min_gain, figure=change, rule=">=", threshold=min_gain, detail=detail)


def class_drop(
    challenger: Predictions,
    champion: Predictions,
    classes: tuple[str, ...],
    column: Literal["recall", "f1"],
    bound: float,
) -> GateCheck:
    """The largest drop of one class's `column` (recall or F1) from the champion to the challenger."""

    def values(p: Predictions) -> np.ndarray:
        counts = confusion_matrix(torch.from_numpy(p.labels), torch.from_numpy(p.probabilities.argmax(1)), len(classes))
        return np.asarray(per_class_metrics(counts, classes).column(column))

    drops = values(champion) - values(challenger)
    worst = int(drops.argmax())
    detail = f"{classes[worst]}: {values(champion)[worst]:.4f} -> {values(challenger)[worst]:.4f}"
    name = "class recall" if column == "recall" else "class F1"
    return GateCheck(
        check=name, passed=drops[worst] <= bound, figure=float(drops[worst]), rule="<=", threshold=bound, detail=detail
    )


def expected_calibration_error(predictions: Predictions) -> float:
    """ECE over ECE_BINS equal-width confidence bins (torchmetrics)."""
    metric = MulticlassCalibrationError(num_classes=predictions.probabilities.shape[1], n_bins=ECE_BINS, norm="l1")
    return float(metric(torch.from_numpy(predictions.probabilities), torch.from_numpy(predictions.labels)))


def calibration(challenger: Predictions, champion: Predictions, bound: float) -> GateCheck:
    ours, theirs = expected_calibration_error(challenger), expected_calibration_error(champion)
    return GateCheck(
        check="calibration",
        passed=ours - theirs <= bound,
        figure=ours - theirs,
        rule="<=",
        threshold=bound,
        detail=f"ECE {theirs:.4f} -> {ours:.4f}",
    )


def gate_checks(
    challenger: Predictions,
    champion: Predictions,
    classes: tuple[str, ...],
    metric: str,
    gates: GatesConfig,
    leaked: np.ndarray | None = None,
) -> list[GateCheck]:
    """Every check of `gates` on the two models' predictions for the same eval images; `leaked`
    marks the images with a near-duplicate in train (None: not searched). With gates.leak_free
    and a search, all checks are on the others."""
    leak_free = leaked is not None and gates.leak_free
    if leak_free:
        challenger, champion = challenger.subset(~leaked), champion.subset(~leaked)
        images = f"{len(challenger.labels)} leak-free eval images ({int(leaked.sum())} with a near-duplicate left out)"
    else:
        images = f"{len(challenger.labels)} eval images"
    return [
        gain(challenger, champion, metric, gates.min_gain, "leak-free gain" if leak_free else "gain", images),
        significance(challenger, champion, gates.alpha, images),
        class_drop(challenger, champion, classes, "recall", gates.max_recall_drop),
        class_drop(challenger, champion, classes, "f1", gates.max_f1_drop),
        calibration(challenger, champion, gates.max_ece_rise),
    ]


def _reliability_bins(predictions: Predictions) -> tuple[np.ndarray, np.ndarray]:
    """Per confidence bin ([lo, hi), ECE_BINS equal widths, as the ECE's): the accuracy and the share of images."""
    confidence = predictions.probabilities.max(axis=1)
    index = np.clip(np.floor(confidence * ECE_BINS).astype(int), 0, ECE_BINS - 1)
    counts = np.bincount(index, minlength=ECE_BINS)
    hits = np.bincount(index, weights=predictions.correct(), minlength=ECE_BINS)
    return np.divide(hits, counts, out=np.zeros(ECE_BINS), where=counts > 0), counts / max(1, len(confidence))


def _panel(predictions: Predictions, title: str, size: int) -> Image.Image:
    margin, plot = FONT_SIZE + 8, size - 2 * (FONT_SIZE + 8)
    image = Image.new("RGB", (size, size), WHITE)
    draw = ImageDraw.Draw(image)
    accuracy, share = _reliability_bins(predictions)
    width = plot / ECE_BINS
    for i in range(ECE_BINS):
        x0, bottom = margin + i * width, margin + plot
        expected = bottom - (i + 0.5) / ECE_BINS * plot  # a calibrated model's bar reaches the diagonal
        draw.rectangle((x0, expected, x0 + width - 1, bottom), fill=(230, 230, 230))
        if share[i] > 0:
            shade = int(200 - 160 * min(1.0, share[i] * 4))  # darker: more images in the bin
            draw.rectangle((x0, bottom - accuracy[i] * plot, x0 + width - 1, bottom), fill=(shade, shade, 255))
    draw.line((margin, margin + plot, margin + plot, margin), fill=(200, 0, 0), width=1)
    draw.rectangle((margin, margin, margin + plot, margin + plot), outline=BLACK)
    font = default_font()
    draw.text((margin, 4), title, font=font, fill=BLACK)
    draw.text((margin, margin + plot + 4), "confidence 0 -> 1; bars: accuracy", font=font, fill=BLACK)
    return image


def reliability_diagram(challenger: Predictions, champion: Predictions, path: Path | str, size: int = 320) -> Path:
    """Both models' reliability diagrams side by side (accuracy per confidence bin against the
    diagonal a calibrated model follows; grey: the diagonal's height), written as a PNG."""
    image = Image.new("RGB", (2 * size, size), WHITE)
    for column, (name, predictions) in enumerate((("champion", champion), ("challenger", challenger))):
        title = f"{name}: ECE {expected_calibration_error(predictions):.4f}"
        image.paste(_panel(predictions, title, size), (column * size, 0))
    return write_png(image, path)
