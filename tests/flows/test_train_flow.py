"""The training flow end to end on tiny data: manifest, run directory, TensorBoard events,
artifacts and task states, and the cache behaviour (hit, data change, epochs change, vanished
or changed file, refresh) plus reproduction."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from prefect import get_client
from prefect.exceptions import ParameterTypeError
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flows.cli import main
from flows.reproduce import reproduce_run
from flows.train import train_pipeline
from tasks.artifacts import (
    ARTIFACT_KEYS,
    DATA_CHANGES_KEY,
    HISTORY_KEY,
    PROGRESS_KEY,
    RUN_DIRECTORY_KEY,
    TENSORBOARD_KEY,
)
from tests.helpers import (
    HEAVY_TASKS,
    artifact_data,
    artifact_keys,
    log_messages,
    run_dir_of,
    task_run_names,
    task_states,
    tiny_config,
    train,
)
from visionflow.checkpoints import load_checkpoint
from visionflow.config import RECIPES
from visionflow.errors import DatasetError
from visionflow.fileio import file_sha256
from visionflow.runs import list_runs
from visionflow.train.stopping import TrainingTimedOut

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow, pytest.mark.timeout(300)]

MANIFEST_KEYS = {
    "run_name",
    "config",
    "seed",
    "data",
    "model",
    "metrics",
    "timing",
    "checkpoint",
    "weights_sha256",
    "tasks",
    "device",
    "versions",
    "git_commit",
    "prefect_flow_run_id",
    "status",
}


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("output")


@pytest.fixture(scope="module")
def first(tiny_data: Path, output: Path) -> dict[str, Any]:
    """The first run in the module's output directory: nothing cached yet."""
    return train(tiny_config(tiny_data, output))


def statuses(manifest: dict[str, Any], names: tuple[str, ...] = HEAVY_TASKS) -> dict[str, str]:
    return {name: manifest["tasks"][name] for name in names}


def test_manifest_records_the_run(first: dict[str, Any], tiny_data: Path) -> None:
    run_dir = run_dir_of(first)
    on_disk = json.loads((run_dir / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(first))
    assert MANIFEST_KEYS <= set(on_disk)
    assert on_disk["status"] == "completed" and on_disk["run_name"] == run_dir.name
    assert on_disk["run_name"].startswith("train-data-tudui-")
    assert on_disk["config"]["optim"]["optimizer"] == RECIPES["default"]["optimizer"]  # recipe fields resolved
    assert on_disk["config"]["data"]["test_flip"] == RECIPES["default"]["test_flip"]
    assert len(on_disk["config"]["data"]["mean"]) == 3  # normalization as computed
    assert on_disk["seed"] == 0
    data = on_disk["data"]
    assert (data["num_train"], data["num_eval"], len(data["fingerprint"])) == (32, 16, 64)
    assert data["classes"] == ["airplane", "automobile", "cat", "ship"]
    assert on_disk["model"]["name"] == "tudui" and on_disk["model"]["num_parameters"] > 100_000
    metrics = on_disk["metrics"]
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_loss"] > 0
    assert [row["class"] for row in metrics["per_class"]] == data["classes"]
    assert set(metrics["time_to_accuracy"]) == {"50%", "60%", "70%"}
    for reached in filter(None, metrics["time_to_accuracy"].values()):  # 1 epoch on tiny data: may reach none
        assert reached["epoch"] == 1 and 0 < reached["seconds"] <= on_disk["timing"]["total_seconds"]
    trained = on_disk["config"]["training"]  # what auto meant on this machine, recorded
    assert trained["precision"] in ("fp32", "bf16") and isinstance(trained["channels_last"], bool)
    timing = on_disk["timing"]
    assert timing["train_seconds"] > 0 and timing["train_images_per_second"] > 0
    assert timing["total_seconds"] >= timing["train_seconds"]
    phases = timing["seconds_per_epoch"]  # 1 epoch trained by this flow run
    assert set(phases) == {"data", "forward", "backward", "optimizer", "evaluation", "checkpoint", "callbacks"}
    assert phases["forward"] > 0 and phases["callbacks"] > 0  # the flow's epoch-end artifacts and log line
    assert timing["other_seconds"] == pytest.approx(timing["total_seconds"] - sum(phases.values()))
    assert 0 < timing["other_seconds"] < timing["total_seconds"]
    checkpoint = on_disk["checkpoint"]
    assert Path(checkpoint["path"]) == run_dir / "checkpoints" / "best.pt"
    assert file_sha256(checkpoint["path"]) == checkpoint["sha256"]
    assert on_disk["weights_sha256"] == json.loads((run_dir / "export" / "model.json").read_text())["weights_sha256"]
    assert statuses(on_disk) == {name: "completed" for name in HEAVY_TASKS}
    assert on_disk["device"] == "cpu"
    assert set(on_disk["versions"]) == {"python", "torch", "torchvision", "prefect"}
    assert on_disk["prefect_flow_run_id"]


def test_run_directory_is_complete(first: dict[str, Any]) -> None:
    run_dir = run_dir_of(first)
    for relpath in (
        "manifest.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "export/model.safetensors",
        "export/model.json",
        "preview.png",
        "model.txt",
        "validation.json",
        "evaluation.json",
        "per_class_metrics.csv",
        "confusion_matrix.csv",
        "validation_counts.csv",
        "confusion_matrix.png",
        "misclassified.png",
    ):
        assert (run_dir / relpath).is_file(), relpath
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_events_read_back(first: dict[str, Any]) -> None:
    events = EventAccumulator(str(run_dir_of(first) / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss/train", "loss/eval", "accuracy/eval", "hparam/eval_accuracy"} <= set(tags["scalars"])
    assert {"data/transform_preview", "eval/confusion_matrix"} <= set(tags["images"])
    assert tags["graph"]
    assert [e.step for e in events.Scalars("accuracy/eval")] == [2]  # 32 images / batch 16 = 2 steps
    assert events.Scalars("hparam/eval_accuracy")[0].value == pytest.approx(first["metrics"]["eval_accuracy"])


def test_pr_curves_are_logged_per_class(first: dict[str, Any]) -> None:
    events = EventAccumulator(str(run_dir_of(first) / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert {f"pr/{name}" for name in first["data"]["classes"]} <= set(events.Tags()["tensors"])


def test_artifacts_task_states_and_logs_in_prefect(first: dict[str, Any]) -> None:
    flow_run_id = first["prefect_flow_run_id"]
    assert set(ARTIFACT_KEYS) <= artifact_keys(flow_run_id)
    states = task_states(flow_run_id)
    assert {states[name] for name in HEAVY_TASKS} == {"Completed"}
    assert [m.split(" train_loss")[0] for m in log_messages(flow_run_id, "train_loss")] == ["epoch 1/1"]


def test_task_runs_have_readable_names(first: dict[str, Any], tiny_data: Path) -> None:
    dataset = tiny_data.name  # the dataset spec's last path component
    assert task_run_names(first["prefect_flow_run_id"]) == {
        "locate_weights": "locate weights none",
        "download_dataset": f"download {dataset}",
        "fingerprint_data": f"fingerprint {dataset}",
        "start_run": "start run",
        "validate_data": f"validate {dataset}",
        "compute_normalization": f"normalize {dataset}",
        "preview_transforms": f"preview {dataset}",
        "describe_model": "describe tudui",
        "train_model": f"train tudui on {dataset}",
        "evaluate_checkpoint": "evaluate best.pt",
        "evaluate_with_leaked": "evaluate best.pt with leaked",
        "export_checkpoint": "export best.pt",
        "finish_run": "finish run",
        "publish_run": "publish run",
        "challenge_champion": "challenge champion",
        "collect_garbage": "collect garbage",
    }


def test_identical_rerun_is_cached_and_complete(first: dict[str, Any], tiny_data: Path, output: Path) -> None:
    # Where outputs are shown is not part of any result: still every step cached.
    again = train(tiny_config(tiny_data, output, **{"output.tensorboard_url": "http://127.0.0.1:6006/"}))
    assert statuses(again) == {name: "cached" for name in HEAVY_TASKS}
    assert {task_states(again["prefect_flow_run_id"])[name] for name in HEAVY_TASKS} == {"Cached"}
    assert again["run_name"] != first["run_name"]
    assert again["weights_sha256"] == first["weights_sha256"]
    assert again["metrics"] == first["metrics"]
    timing = again["timing"]  # no epoch trained here: all of the run's time is outside training
    assert timing["seconds_per_epoch"] == {} and timing["other_seconds"] == timing["total_seconds"]
    run_dir = run_dir_of(again)
    for relpath in ("checkpoints/last.pt", "checkpoints/best.pt", "export/model.safetensors", "preview.png"):
        assert file_sha256(run_dir / relpath) == file_sha256(run_dir_of(first) / relpath), relpath
    assert again["checkpoint"]["path"] == str(run_dir / "checkpoints" / "best.pt")
    # Training is cached: no progress bar, no history table.
    assert set(ARTIFACT_KEYS) - {PROGRESS_KEY, HISTORY_KEY} <= artifact_keys(again["prefect_flow_run_id"])
    assert run_dir.as_uri() in artifact_data(again["prefect_flow_run_id"], RUN_DIRECTORY_KEY)
    (url,) = re.findall(r"\((http[^)]+)\)", artifact_data(again["prefect_flow_run_id"], TENSORBOARD_KEY))
    assert url.startswith("http://127.0.0.1:6006/#timeseries&runFilter=")
    run_filter = unquote(url.partition("runFilter=")[2])  # TensorBoard's run filter: a regex on run folders
    assert re.search(run_filter, f"{again['run_name']}/tensorboard")
    assert not re.search(run_filter, f"{first['run_name']}/tensorboard")
    assert TENSORBOARD_KEY not in artifact_keys(first["prefect_flow_run_id"])  # only with output.tensorboard_url


def test_changing_epochs_retrains_but_keeps_data_steps(first: dict[str, Any], tiny_data: Path, output: Path) -> None:
    longer = train(tiny_config(tiny_data, output, **{"training.epochs": 3}))
    assert statuses(longer) == {
        "download_dataset": "cached",
        "validate_data": "cached",
        "preview_transforms": "cached",
        "describe_model": "cached",
        "train_model": "completed",
        "evaluate_checkpoint": "completed",
        "export_checkpoint": "completed",
    }
    assert longer["metrics"]["epochs_trained"] == 3


def test_changed_image_revalidates_retrains_explains_and_blocks_reproduce(
    first: dict[str, Any], tiny_data: Path, output: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = shutil.copytree(tiny_data, tmp_path / "data")
    one, other = sorted((data / "train" / "cat").iterdir())[:2]
    shutil.copyfile(other, one)  # same name, different content
    moved = sorted((data / "train" / "automobile").iterdir())[0]
    moved.rename(data / "train" / "cat" / f"relabelled{moved.suffix}")  # the same image, now a cat
    changed = train(tiny_config(data, output))
    assert changed["data"]["fingerprint"] != first["data"]["fingerprint"]
    assert {changed["tasks"][n] for n in ("validate_data", "train_model", "evaluate_checkpoint")} == {"completed"}
    assert changed["tasks"]["describe_model"] == "cached"

    # What changed, against the previous run (the same data as `first`): the artifact and `visionflow diff`.
    report = artifact_data(changed["prefect_flow_run_id"], DATA_CHANGES_KEY)
    assert "trained on 1 changed, 1 relabelled; val split unchanged" in report
    assert f"`train/automobile/{moved.name} -> train/cat/relabelled{moved.suffix}`" in report
    capsys.readouterr()
    assert main(["diff", first["run_name"], str(run_dir_of(changed)), "--output", str(output), "--json"]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff["summary"] == "trained on 1 changed, 1 relabelled; val split unchanged"
    changed_files = diff["data"]["train"]["changed"]
    assert changed_files == {"total": 1, "classes": {"cat": 1}, "examples": [f"train/cat/{one.name}"]}
    assert diff["data"]["train"]["relabelled"]["classes"] == {"cat": 1}
    assert diff["config"]["data.dataset"] == [str(tiny_data), str(data)]
    assert set(diff["config"]) <= {"data.dataset", "data.mean", "data.std"}  # the normalization is measured

    shutil.copyfile(sorted((data / "val" / "ship").iterdir())[0], one)
    with pytest.raises(DatasetError, match="changed since run"):
        reproduce_run(str(run_dir_of(changed)))
    assert not list((output / "runs").glob("reproduce-*"))


def test_vanished_or_changed_file_is_a_miss(tiny_data: Path, tmp_path: Path) -> None:
    before = train(tiny_config(tiny_data, tmp_path))
    (run_dir_of(before) / "checkpoints" / "best.pt").unlink()
    (run_dir_of(before) / "validation.json").write_text("{}")
    after = train(tiny_config(tiny_data, tmp_path))
    assert after["status"] == "completed"
    assert after["tasks"]["validate_data"] == after["tasks"]["train_model"] == "completed"
    assert after["tasks"]["preview_transforms"] == "cached"
    assert after["weights_sha256"] == before["weights_sha256"]  # retrained, deterministically
    assert (run_dir_of(after) / "checkpoints" / "best.pt").is_file()


def test_refresh_recomputes_everything(first: dict[str, Any], tiny_data: Path, output: Path) -> None:
    refreshed = train(tiny_config(tiny_data, output, **{"output.refresh": True}))
    assert statuses(refreshed) == {name: "completed" for name in HEAVY_TASKS}
    assert refreshed["weights_sha256"] == first["weights_sha256"]


def test_reproduce_gives_identical_weights(first: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", str(run_dir_of(first)), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["identical"] is True
    assert result["original_weights_sha256"] == result["reproduced_weights_sha256"] == first["weights_sha256"]
    assert result["metrics"]["original"] == result["metrics"]["reproduced"]
    assert result["metrics"]["original"]["eval_accuracy"] == first["metrics"]["eval_accuracy"]
    reproduced = json.loads((Path(result["reproduced_run_dir"]) / "manifest.json").read_text())
    assert reproduced["run_name"].startswith("reproduce-" + first["run_name"])
    assert statuses(reproduced) == {name: "completed" for name in HEAVY_TASKS}  # caches bypassed


def test_failed_run_is_recorded_as_failed(tiny_data: Path, tmp_path: Path) -> None:
    data = shutil.copytree(tiny_data, tmp_path / "data")
    broken = sorted((data / "train" / "ship").iterdir())[0]
    broken.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=broken.name):
        train(tiny_config(data, tmp_path / "out", **{"data.on_invalid": "fail"}))
    [row] = list_runs(tmp_path / "out")
    assert row["status"] == "failed"
    manifest = json.loads((Path(row["path"]) / "manifest.json").read_text())
    assert broken.name in manifest["error"] and "validate_data" not in manifest["tasks"]
    assert manifest["tasks"]["download_dataset"] == "completed" and manifest["metrics"] is None


def test_parameter_schema_is_the_config_and_bad_values_fail_before_any_work(tmp_path: Path) -> None:
    schema = train_pipeline.parameters.model_dump()
    assert schema["properties"]["config"]["$ref"].endswith("/PipelineConfig")
    assert {"data", "model", "optim", "training", "output"} <= set(
        schema["definitions"]["PipelineConfig"]["properties"]
    )
    with pytest.raises(ParameterTypeError, match="epochs"):
        train_pipeline(config={"training": {"epochs": 0}, "output": {"output_dir": str(tmp_path)}})
    assert not (tmp_path / "runs").exists()


def test_timeout_ends_the_run_timed_out_and_a_rerun_resumes(tiny_data: Path, tmp_path: Path) -> None:
    output, epochs = tmp_path / "out", 30
    limited = tiny_config(
        tiny_data, output, **{"training.epochs": epochs, "training.timeout_minutes": 0.005, "output.run_name": "slow"}
    )  # 0.3 s of training: a few epochs on an idle 2-core machine, 30 take seconds (and longer when it is busy)
    with pytest.raises(TrainingTimedOut):
        train(limited)
    run_dir = output / "runs" / "slow"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    last = run_dir.resolve() / "checkpoints" / "last.pt"
    reached = load_checkpoint(last)["epoch"] if last.exists() else 0  # 0 on a machine too busy to end epoch 1
    assert reached < epochs
    assert manifest["status"] == "timed_out" and f"timed out after epoch {reached}" in manifest["error"]
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(manifest["prefect_flow_run_id"]).state.name == "TimedOut"

    resumed = train(tiny_config(tiny_data, output, **{"training.epochs": epochs, "output.run_name": "slow"}))
    assert resumed["status"] == "completed"
    assert resumed["resumed_from"] == (str(last) if reached else None)
    # The resumed run's history table holds the epochs before the resume too.
    history = artifact_data(resumed["prefect_flow_run_id"], HISTORY_KEY)
    assert [row["epoch"] for row in history] == list(range(1, resumed["metrics"]["epochs_trained"] + 1))
    uninterrupted = train(tiny_config(tiny_data, tmp_path / "fresh", **{"training.epochs": epochs}))
    assert resumed["weights_sha256"] == uninterrupted["weights_sha256"]
