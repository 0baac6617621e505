"""The pipeline's steps as plain functions, one per Prefect task: each writes its outputs into a
run directory (`runs.RunLayout`) and returns what the next steps and the manifest need. No
Prefect here: `tasks/` wraps each function in a cached task, `bench/` calls them directly.

The steps that compute import torch (and what builds on it) inside the function: a fully cached
run calls only the others, and never pays torch's import (~2 s of every command's start).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from visionflow.config import DataConfig, ModelConfig, PipelineConfig, world_size
from visionflow.data.changes import write_listing
from visionflow.data.splits import DatasetInfo, Split
from visionflow.data.validate import ValidationReport, validate_dataset
from visionflow.fileio import atomic_write_json, atomic_write_text
from visionflow.hparams import log_hparams
from visionflow.manifest import Manifest, ModelRecord
from visionflow.reports import render_near_duplicates, write_png, write_validation_csvs
from visionflow.runs import RunLayout
from visionflow.train.records import Callback, FitResult, ModelSpec

if TYPE_CHECKING:
    from visionflow.evaluation import EvalReport


def validate_into(run_dir: Path | str, dataset: DatasetInfo, data: DataConfig) -> tuple[ValidationReport, DatasetInfo]:
    """Validate every image; write validation.json, its CSVs and the data listing
    (data_listing.csv.gz: every file used, with its label, sha256 and size). Returns the report and the
    dataset without the invalid files (`data.on_invalid="fail"` raises on the first one instead).
    With `data.near_duplicates`, near-duplicates too (`data.near_duplicate_threshold`,
    `data.on_leak`: leaked eval images reported, left out or an error) and near_duplicates.png,
    the worst pairs side by side."""
    layout = RunLayout(Path(run_dir))
    options = dict(threshold=data.near_duplicate_threshold, on_leak=data.on_leak) if data.near_duplicates else {}
    report, clean = validate_dataset(
        dataset, on_invalid=data.on_invalid, near_duplicates=data.near_duplicates, **options
    )
    values = report.to_dict()
    atomic_write_json(layout.validation, values)
    write_validation_csvs(values, layout.root)
    write_listing(report.listing, layout.data_listing)
    if report.near_duplicates is not None:
        write_png(render_near_duplicates(report.near_duplicates, dataset.root), layout.near_duplicates_png)
    return report, clean


def accuracy_on(checkpoint: Path | str, split: Split, device: str, data: DataConfig) -> float:
    """Top-1 accuracy of a checkpoint on a split (no files written), read by `data.loader`
    (`cache.open_eval_split`)."""
    from visionflow.checkpoints import load_model
    from visionflow.data.decoded import open_eval_split
    from visionflow.evaluation import evaluate_model

    model, spec = load_model(checkpoint)
    return evaluate_model(model, spec, open_eval_split(split, data, spec.decode_size), device=device).accuracy


def fill_normalization(dataset: DatasetInfo, data: DataConfig) -> DataConfig:
    """`data` with mean/std filled from the train split's pixels where empty (computed once per
    run: preview and training both take the result), read by the loader training will use
    (`cache.choose_loader`)."""
    from visionflow.data.decoded import choose_loader, open_split
    from visionflow.data.loaders import with_train_statistics

    if data.mean is not None and data.std is not None:
        return data  # opening the split would decode it for nothing
    return with_train_statistics(
        data, open_split(dataset.train, data, choose_loader(data, dataset.train, dataset.eval_split))
    )


def preview_into(run_dir: Path | str, train: Split, data: DataConfig, seed: int) -> Path:
    """Render what the model sees (original | eval input | train input) to preview.png and
    TensorBoard; `data` has its normalization filled in."""
    from visionflow.data.preview import build_preview
    from visionflow.tensorboard import log_image

    layout = RunLayout(Path(run_dir))
    image = build_preview(
        train,
        data.image_size,
        data.mean,
        data.std,
        bool(data.augment),
        seed,
        crop_padding=data.crop_padding,
        crop_pct=data.crop_pct,
        train_crop=data.train_crop,
    )
    log_image(layout.tensorboard, "data/transform_preview", image)
    return write_png(image, layout.preview)


def describe_into(run_dir: Path | str, model: ModelConfig, num_classes: int, image_size: int) -> ModelRecord:
    """Build the model (resolved config) once: its layer summary, weights and what is frozen to
    model.txt, its graph to TensorBoard; returns the manifest's record of it."""
    from visionflow.models import build_model, summarize
    from visionflow.tensorboard import log_model_graph

    layout = RunLayout(Path(run_dir))
    network = build_model(model.name, num_classes)
    summary = summarize(network, image_size)
    frozen = "nothing"
    if model.freeze_epochs:
        frozen = f"all but the head {summary.head} in epochs 1-{model.freeze_epochs}, BatchNorm statistics included"
    lines = (summary.to_text(), f"weights: {model.weights} (sha256 {model.weights_sha256})", f"frozen: {frozen}")
    atomic_write_text(layout.model_summary, "\n".join(lines) + "\n")
    log_model_graph(layout.tensorboard, network, image_size)
    return ModelRecord(
        name=model.name,
        num_parameters=summary.num_parameters,
        trainable_parameters=summary.trainable_parameters,
        weights=model.weights,
        weights_sha256=model.weights_sha256,
        head=summary.head,
        head_parameters=summary.head_parameters,
        frozen=frozen,
    )


def train_run(
    run_dir: Path | str,
    dataset: DatasetInfo,
    config: PipelineConfig,
    resume_from: Path | str | None = None,
    callbacks: Sequence[Callback] = (),
    progress_stream: TextIO | None = None,
) -> FitResult:
    """Train on the dataset's decoded splits with checkpoints in run_dir/checkpoints and curves
    in TensorBoard; `resume_from` continues an interrupted run (see `engine.fit`). With a
    training.distributed world size above 1 it starts the ranks (torchrun, `launch.launch_fit`),
    each of which calls this again inside its process group; rank 0 writes TensorBoard.
    data.loader picks how the splits are read (`cache.choose_loader`: memory or stream)."""
    from visionflow.data.decoded import choose_loader, open_split
    from visionflow.tensorboard import TensorBoardCallback
    from visionflow.train.distributed import Ranks
    from visionflow.train.engine import fit
    from visionflow.train.launch import TrainRequest, launch_fit
    from visionflow.train.rng import seed_everything
    from visionflow.weights import load_pretrained, locate, with_weights

    ranks = Ranks.current()
    if not ranks.initialized and world_size(config.training.distributed) > 1:
        resume = str(resume_from) if resume_from else None
        request = TrainRequest(run_dir=str(run_dir), dataset=dataset, config=config, resume_from=resume)
        return launch_fit(request, callbacks, progress_stream)
    layout = RunLayout(Path(run_dir))
    weights = locate(config.model, config.output.output_dir, download=False)  # the file the run starts from
    config = with_weights(config, weights).resolved()
    data = config.data
    loader = choose_loader(data, dataset.train, dataset.eval_split)
    train, evaluation = (open_split(split, data, loader) for split in (dataset.train, dataset.eval_split))
    spec = ModelSpec.of(config, dataset.classes)
    seed_everything(config.training.seed)  # before building: the initial weights are part of the result
    model = spec.build()
    if weights is not None and resume_from is None:  # a resumed run's weights come from its checkpoint
        load_pretrained(model, weights)
    return fit(
        model,
        train,
        evaluation,
        config,
        spec,
        checkpoint_dir=layout.checkpoints,
        resume_from=Path(resume_from) if resume_from else None,
        callbacks=[TensorBoardCallback(layout.tensorboard), *callbacks] if ranks.is_main else callbacks,
        progress_stream=progress_stream,
    )


def write_evaluation(
    run_dir: Path | str, checkpoint: Path | str, eval_split: Split, device: str, data: DataConfig
) -> EvalReport:
    """Evaluate a checkpoint on the eval split: evaluation.json, per-class and confusion CSVs,
    the confusion matrix (PNG and TensorBoard), per-class PR curves (TensorBoard) and the most
    confidently wrong images. `data`: the data config training used (`cache.open_eval_split`)."""
    from visionflow.checkpoints import load_model
    from visionflow.data.decoded import open_eval_split
    from visionflow.evaluation import evaluate_model
    from visionflow.reports import render_misclassified, write_evaluation_csvs
    from visionflow.tensorboard import log_confusion_matrix, log_pr_curves

    layout = RunLayout(Path(run_dir))
    model, spec = load_model(checkpoint)
    report = evaluate_model(model, spec, open_eval_split(eval_split, data, spec.decode_size), device=device)
    values = report.to_dict()
    atomic_write_json(layout.evaluation, values)
    write_evaluation_csvs(values, layout.root)
    write_png(log_confusion_matrix(layout.tensorboard, report.confusion_matrix, report.classes), layout.confusion_png)
    log_pr_curves(layout.tensorboard, report.probabilities, report.labels, report.classes)
    write_png(render_misclassified(values["confidently_wrong"], root=eval_split.root), layout.misclassified_png)
    return report


def export_into(run_dir: Path | str, checkpoint: Path | str) -> str:
    """Export the checkpoint's weights (safetensors) and spec (json) for serving; returns the
    weights' sha256."""
    from visionflow.checkpoints import export_model, load_model

    model, spec = load_model(checkpoint)
    return export_model(model, spec, RunLayout(Path(run_dir)).export_dir)["weights_sha256"]


def finish_into(run_dir: Path | str, manifest: Manifest) -> Manifest:
    """Write the final manifest, and the run's hyperparameters with its final metrics to
    TensorBoard (the HPARAMS tab) when it completed."""
    layout = RunLayout(Path(run_dir))
    manifest.save(layout.root)
    if manifest.metrics is not None:
        log_hparams(
            layout.tensorboard,
            manifest.config.model_dump(mode="json"),
            {"eval_accuracy": manifest.metrics.eval_accuracy, "eval_loss": manifest.metrics.eval_loss},
        )
    return manifest
