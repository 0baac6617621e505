"""The training flow: pretrained weights (with model.weights set) -> data -> validation ->
normalization -> transform preview -> model -> training -> evaluation -> export -> manifest and
artifacts -> champion decision (with output.champion set) -> gc of old runs (with output.keep_last
or output.keep_days set). Every heavy step is a cached task (tasks/caching.py)."""

from __future__ import annotations

from prefect import flow, tags
from prefect.context import FlowRunContext

from tasks.caching import durable_results
from tasks.champion import challenge_champion
from tasks.data import compute_normalization, download_dataset, fingerprint_data, preview_transforms, validate_data
from tasks.evaluation import evaluate_checkpoint, evaluate_with_leaked, export_checkpoint
from tasks.label_issues import search_label_issues
from tasks.model import describe_model, locate_weights
from tasks.run import collect_garbage, failure_recorded, finish_run, publish_run, start_run
from tasks.training import train_model
from visionflow.config import PipelineConfig
from visionflow.manifest import Manifest
from visionflow.runs import generate_run_name


def run_name() -> str:
    """The flow run's name: output.run_name when given, else one made of the flow run's creation
    time and id. The same flow run run again (a retry, a crashed run rescheduled) gets the same
    name, so it reopens its run directory and resumes from its last.pt (visionflow.runs.open_run)."""
    context = FlowRunContext.get()  # Prefect calls this inside the flow run's context
    config, run = PipelineConfig.model_validate(context.parameters["config"]), context.flow_run
    created = run.created.astimezone() if run.created else None  # local time, as generated names are
    return config.output.run_name or generate_run_name(
        config.data.dataset, config.model.name, now=created, suffix=run.id.hex[-4:]
    )


@flow(name="train-pipeline", flow_run_name=run_name, validate_parameters=True)
def train_pipeline(config: PipelineConfig) -> Manifest:
    """Train, evaluate and export an image classifier; returns the run's manifest."""
    # Task runs are tagged with the dataset and model; cached results live under the output directory.
    with tags(f"dataset:{config.data.dataset}", f"model:{config.model.name}"), durable_results(config.output):
        config = locate_weights(config).resolved()  # pretrained weights first: they fill what the recipe would
        location = download_dataset(config.data)
        dataset = fingerprint_data(config.data, location)
        run = start_run(config)
        with failure_recorded(run):  # a failing step marks the run failed in its manifest
            validated = validate_data(dataset, config.data, run.run_dir)
            if config.label_issues.enabled:  # suspected mislabels, left out of training with on_issue drop-train
                validated = search_label_issues(dataset, validated, config, run.run_dir)
            normalization = compute_normalization(dataset, validated, config.data)
            preview = preview_transforms(
                dataset, validated, config.data, normalization, config.training.seed, run.run_dir
            )
            model = describe_model(config.model, len(dataset.classes), config.data.image_size, run.run_dir)
            training = train_model(dataset, validated, config, normalization, run.run_dir, run.resume_from)
            used = training.used_config(config).data  # its loader resolved: evaluation reads the same way
            evaluation = evaluate_checkpoint(
                dataset, validated, training.best_checkpoint, config.training.device, used, run.run_dir
            )
            with_leaked = evaluate_with_leaked(
                dataset, validated, training.best_checkpoint, config.training.device, used
            )
            export = export_checkpoint(training.best_checkpoint, run.run_dir)
            manifest = finish_run(run, dataset, validated, preview, model, training, evaluation, with_leaked, export)
            publish_run(run, manifest)
            manifest = challenge_champion(run, dataset, validated, config)
        collect_garbage(config, run)  # after the run is complete: its problems are warnings, not failures
    return manifest
