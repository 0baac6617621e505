"""TensorBoard's HPARAMS tab for one run: the hyperparameters with the run's final metrics.

Written with TensorBoard's own protos and event writer, not torch's `SummaryWriter`: the step
that writes them also ends a fully cached run, which never imports torch (~2 s of its start).
The summaries are the three that torch's `SummaryWriter.add_hparams` writes (experiment, session
start, session end), but into the run's own folder rather than a timestamped subfolder, so the
tab links them to the run's curves.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import metadata
from tensorboard.plugins.hparams.api_pb2 import DataType, Experiment, HParamInfo, MetricInfo, MetricName, Status
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo, SessionStartInfo
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from visionflow.config import flatten

HPARAM_METRIC_PREFIX = "hparam/"


def flatten_hparams(values: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Flatten nested mappings to dotted keys ({'optim': {'lr': 0.1}} -> {'optim.lr': 0.1});
    lists become strings (the HPARAMS tab shows numbers, strings and booleans only) and None
    values are left out (an unset field has no value to compare)."""
    flat: dict[str, bool | int | float | str] = {}
    for name, value in flatten(values, prefix).items():
        if isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif isinstance(value, (list, tuple)):
            flat[name] = str(list(value))
        elif value is not None:
            raise ValueError(
                f"Invalid hyperparameter '{name}' = {value!r}: expected a number, string, bool, list or None"
            )
    return flat


def _plugin_summary(tag: str, data: HParamsPluginData) -> Summary:
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString())
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])


def log_hparams(log_dir: Path | str, hparams: Mapping[str, Any], metrics: Mapping[str, float], step: int = 0) -> None:
    """Log hyperparameters (nested mappings allowed, e.g. the resolved config's model_dump())
    with final metrics into the run folder (the HPARAMS tab); metrics become ``hparam/<name>``
    scalars. Call it once per run, when the final metrics are known."""
    tagged = {f"{HPARAM_METRIC_PREFIX}{name}": float(value) for name, value in metrics.items()}
    start, infos = SessionStartInfo(), []
    for name, value in flatten_hparams(hparams).items():
        if isinstance(value, str):
            start.hparams[name].string_value, kind = value, "DATA_TYPE_STRING"
        elif isinstance(value, bool):
            start.hparams[name].bool_value, kind = value, "DATA_TYPE_BOOL"
        else:
            start.hparams[name].number_value, kind = value, "DATA_TYPE_FLOAT64"
        infos.append(HParamInfo(name=name, type=DataType.Value(kind)))
    experiment = Experiment(hparam_infos=infos, metric_infos=[MetricInfo(name=MetricName(tag=tag)) for tag in tagged])
    version = metadata.PLUGIN_DATA_VERSION
    summaries = [
        _plugin_summary(metadata.EXPERIMENT_TAG, HParamsPluginData(experiment=experiment, version=version)),
        _plugin_summary(metadata.SESSION_START_INFO_TAG, HParamsPluginData(session_start_info=start, version=version)),
        _plugin_summary(
            metadata.SESSION_END_INFO_TAG,
            HParamsPluginData(session_end_info=SessionEndInfo(status=Status.Value("STATUS_SUCCESS")), version=version),
        ),
        *(Summary(value=[Summary.Value(tag=tag, simple_value=value)]) for tag, value in tagged.items()),
    ]
    writer = EventFileWriter(str(log_dir))  # a new, uniquely named event file, as every writer here
    try:
        for summary in summaries:
            writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))
    finally:
        writer.close()
