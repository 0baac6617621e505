"""The reproduction flow: rerun a finished run from its manifest, caches bypassed, into a new run
directory, and compare the weights. On CPU the same data, config and code give identical weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.train import train_pipeline
from tasks.caching import durable_results
from tasks.data import download_dataset, fingerprint_data
from tasks.run import check_reproducible, compare_reproduction, plan_reproduction


def reproduction_name() -> str:
    return f"reproduce-{Path(flow_run.get_parameters()['run_dir']).name}"


@flow(name="reproduce-run", flow_run_name=reproduction_name, validate_parameters=True)
def reproduce_run(run_dir: str) -> dict[str, Any]:
    """Retrain the run in `run_dir` from its manifest; returns whether the weights are identical."""
    plan = plan_reproduction(run_dir)
    with durable_results(plan.config.output):
        location = download_dataset(plan.config.data)
        check_reproducible(plan, fingerprint_data(plan.config.data, location))
    return compare_reproduction(plan, train_pipeline(plan.config))
