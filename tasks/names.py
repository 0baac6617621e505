"""Readable task run names for the Prefect UI (`train tudui on sample`, `evaluate best.pt`):
`task_run_name` callables that format a template with the task's parameters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePath
from typing import Any


def dataset_name(spec: str) -> str:
    """A dataset spec's short name: its last path component ('sample', 'cifar10', 'flowers' for
    '/data/flowers/')."""
    return PurePath(spec).name or spec


def _dataset_spec(parameters: dict[str, Any]) -> str:
    # The dataset's spec from whichever of the pipeline's parameters the task takes:
    # data (DataConfig), dataset (DatasetRef) or config (PipelineConfig).
    if "data" in parameters:
        return parameters["data"].dataset
    if "dataset" in parameters:
        return parameters["dataset"].data.dataset
    return parameters["config"].data.dataset


def run_name(template: str) -> Callable[..., str]:
    """A `task_run_name` callable: `template` formatted with the task's parameters, plus
    `{dataset_name}` (from its `data`, `dataset` or `config`) and `{checkpoint_name}` (the file
    name of its `checkpoint`), each only where the template uses it."""

    def name(parameters: dict[str, Any]) -> str:
        fields = dict(parameters)
        if "{dataset_name}" in template:
            fields["dataset_name"] = dataset_name(_dataset_spec(parameters))
        if "{checkpoint_name}" in template:
            fields["checkpoint_name"] = PurePath(parameters["checkpoint"].path).name
        return template.format(**fields)

    return name
