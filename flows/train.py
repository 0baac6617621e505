"""The training flow: data -> validation -> transform preview -> model -> training -> evaluation
-> export -> manifest and artifacts, every heavy step cached (see tasks/caching.py), then, with
output.champion set, the champion/challenger decision (tasks/champion.py)."""

from __future__ import annotations

from typing import Any

from prefect import flow, tags
from prefect.runtime import flow_run

from tasks.caching import TaskLedger, bind
from tasks.champion import challenge_champion
from tasks.data import DataSource, download_dataset, fingerprint_data, preview_transforms, validate_data
from tasks.evaluation import evaluate_checkpoint, export_checkpoint
from tasks.model import describe_model
from tasks.run import fail_run, finish_run, publish_run, start_run
from tasks.training import BEST, train_model
from visionflow.config import PipelineConfig
from visionflow.runs import generate_run_name


def run_name() -> str:
    """The flow run's name: the run directory's, when it is given."""
    config = PipelineConfig.model_validate(flow_run.get_parameters()["config"])
    return config.output.run_name or generate_run_name(config.data.dataset, config.model.name)


@flow(name="train-pipeline", flow_run_name=run_name, validate_parameters=True)
def train_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Train, evaluate and export an image classifier; returns the run's manifest."""
    with tags(f"dataset:{config.data.dataset}", f"model:{config.model.name}"):  # on every task run
        config = config.resolved()
        output, refresh = config.output.output_dir, config.output.refresh
        ledger = TaskLedger()
        source = DataSource.of(config.data)
        location = ledger.run(bind(download_dataset, output, refresh), source)
        dataset = ledger.run(fingerprint_data, source, location)
        run = ledger.run(start_run, config)
        try:
            run_dir = run.run_dir
            validated = ledger.run(bind(validate_data, output, refresh), dataset, config.data.on_invalid, run_dir,
                                   run_dir=run_dir)
            ledger.run(bind(preview_transforms, output, refresh), dataset, validated, config.data, config.training.seed,
                       run_dir, run_dir=run_dir)
            model = ledger.run(bind(describe_model, output, refresh), config.model.name, len(dataset.classes),
                               config.data.image_size, run_dir, run_dir=run_dir)
            training = ledger.run(bind(train_model, output, refresh), dataset, validated, config, run_dir, run.resume_from,
                                  run_dir=run_dir)
            best = training.files[BEST]
            evaluation = ledger.run(bind(evaluate_checkpoint, output, refresh), dataset, validated, best,
                                    config.training.device, config.data.data_dir, run_dir, run_dir=run_dir)
            export = ledger.run(bind(export_checkpoint, output, refresh), best, run_dir, run_dir=run_dir)
            manifest = finish_run(run, config, dataset, validated, model, training, evaluation, export, ledger.statuses)
            publish_run(run, manifest)
            if config.output.champion is not None:
                manifest["champion"] = challenge_champion(run_dir, dataset, validated, config)
            return manifest
        except Exception as err:
            fail_run(run, config, " ".join(str(err).split()) or type(err).__name__, ledger.statuses)
            raise
