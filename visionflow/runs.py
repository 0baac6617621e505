"""Run directories: naming, the `<output>/runs/<run-name>/` layout (every file name of a run,
defined once), creating or resuming a run directory, the run history, and reproduction.

A run directory is complete on its own: a run whose steps were cached gets hard links of the cached
files, so deleting one run never breaks another. Its manifest is `visionflow.manifest.Manifest`.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from visionflow.config import NAME_CHARS, PipelineConfig
from visionflow.data.changes import (
    LISTING_NAME,
    SplitChanges,
    changes_to_dict,
    config_differences,
    diff_listings,
    read_listing,
    summary_line,
)
from visionflow.errors import ConfigError, DatasetError
from visionflow.manifest import MANIFEST_NAME, Manifest
from visionflow.tables import PERCENT, SECONDS, TEXT, Table, text_table

RUNS_SUBDIR = "runs"
# The files of a run directory (the manifest is manifest.MANIFEST_NAME, the data listing
# data.changes.LISTING_NAME): RunLayout and every other module take their names from here.
CHECKPOINTS_SUBDIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"  # rewritten every epoch
BEST_CHECKPOINT = "best.pt"  # rewritten when the monitored metric improves
EXPORT_SUBDIR = "export"  # the deployable model: weights, and the spec beside them
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_SPEC = "model.json"
TENSORBOARD_SUBDIR = "tensorboard"  # also a sweep's, with one folder per trial
PREVIEW_PNG = "preview.png"
VALIDATION_JSON = "validation.json"
VALIDATION_COUNTS_CSV = "validation_counts.csv"
VALIDATION_ISSUES_CSV = "validation_issues.csv"
NEAR_DUPLICATES_PNG = "near_duplicates.png"
MODEL_SUMMARY_TXT = "model.txt"
EVALUATION_JSON = "evaluation.json"
PER_CLASS_CSV = "per_class_metrics.csv"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
MISCLASSIFIED_PNG = "misclassified.png"
# Run-directory-relative paths, as cached task results name their files.
BEST_CHECKPOINT_PATH = f"{CHECKPOINTS_SUBDIR}/{BEST_CHECKPOINT}"
LAST_CHECKPOINT_PATH = f"{CHECKPOINTS_SUBDIR}/{LAST_CHECKPOINT}"
EXPORT_WEIGHTS_PATH = f"{EXPORT_SUBDIR}/{EXPORT_WEIGHTS}"
_UNSAFE = re.compile(f"[^{NAME_CHARS}]+")  # what a generated name replaces with "-"


@dataclass(frozen=True)
class RunLayout:
    """Where everything of one run lives, relative to its directory."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_SUBDIR

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST_CHECKPOINT

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / BEST_CHECKPOINT

    @property
    def export_dir(self) -> Path:
        return self.root / EXPORT_SUBDIR

    @property
    def export_spec(self) -> Path:
        return self.export_dir / EXPORT_SPEC

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_SUBDIR

    @property
    def preview(self) -> Path:
        return self.root / PREVIEW_PNG

    @property
    def validation(self) -> Path:
        return self.root / VALIDATION_JSON

    @property
    def evaluation(self) -> Path:
        return self.root / EVALUATION_JSON

    @property
    def model_summary(self) -> Path:
        return self.root / MODEL_SUMMARY_TXT

    @property
    def confusion_png(self) -> Path:
        return self.root / CONFUSION_PNG

    @property
    def misclassified_png(self) -> Path:
        return self.root / MISCLASSIFIED_PNG

    @property
    def per_class_csv(self) -> Path:
        return self.root / PER_CLASS_CSV

    @property
    def confusion_csv(self) -> Path:
        return self.root / CONFUSION_CSV

    @property
    def validation_counts_csv(self) -> Path:
        return self.root / VALIDATION_COUNTS_CSV

    @property
    def validation_issues_csv(self) -> Path:
        return self.root / VALIDATION_ISSUES_CSV

    @property
    def near_duplicates_png(self) -> Path:
        return self.root / NEAR_DUPLICATES_PNG

    @property
    def data_listing(self) -> Path:
        return self.root / LISTING_NAME


def runs_root(output_dir: Path | str) -> Path:
    return Path(output_dir) / RUNS_SUBDIR


def _slug(text: str) -> str:
    # A folder spec like "/data/my ants/" names the run after its last component.
    name = Path(text.rstrip("/\\")).name or text
    return _UNSAFE.sub("-", name).strip("-._")[:40] or "data"


def generate_run_name(dataset: str, model: str, now: datetime | None = None, suffix: str | None = None) -> str:
    """`train-<dataset>-<model>-<YYYYmmdd-HHMMSS>-<suffix>`: sortable by time; the suffix (4 random
    hex digits unless given, e.g. from a flow run's id) tells apart runs of the same second."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"train-{_slug(dataset)}-{_slug(model)}-{stamp}-{suffix or secrets.token_hex(2)}"


def create_run_dir(
    output_dir: Path | str,
    run_name: str | None,
    dataset: str,
    model: str,
    proposed: str | None = None,
    owner: str | None = None,
) -> tuple[RunLayout, bool]:
    """Create the run directory; returns its layout and whether an interrupted run is resumed.

    A given `run_name` that exists is resumed (see resumable_run). Without one, `proposed` (the
    orchestrator's run name) is tried: when it exists and is an unfinished run of the same `owner`
    (the Prefect flow run id in its manifest: a retried or rescheduled flow run), it is resumed.
    Otherwise generated names are tried until mkdir wins: two runs started in the same second
    still get different directories, and a generated name never resumes another run."""
    root = runs_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    if run_name is not None:
        if (existing := resumable_run(output_dir, run_name)) is not None:
            return existing, True
        layout = RunLayout(root / run_name)
        layout.root.mkdir()
        return layout, False
    name = proposed or generate_run_name(dataset, model)
    while True:
        layout = RunLayout(root / name)
        try:
            layout.root.mkdir()
        except FileExistsError:
            if name == proposed and owner is not None and _unfinished_run_of(layout, owner):
                return layout, True
            name = generate_run_name(dataset, model)
            continue
        return layout, False


def _unfinished_run_of(layout: RunLayout, owner: str) -> bool:
    try:
        manifest = Manifest.load(layout.root)
    except ConfigError:
        return False
    return manifest.prefect_flow_run_id == owner and manifest.status != "completed"


def open_run(
    config: PipelineConfig, started_at: str, prefect_flow_run_id: str | None, proposed: str | None = None
) -> tuple[RunLayout, Path | None]:
    """Create the run directory (or reopen the interrupted run named `config.output.run_name`, or
    the unfinished run directory `proposed` of the same flow run) and write its 'running'
    manifest; returns the layout and the last.pt to resume from (None: a fresh start). `config`
    is resolved."""
    output = config.output
    layout, resumed = create_run_dir(
        output.output_dir,
        output.run_name,
        config.data.dataset,
        config.model.name,
        proposed=proposed,
        owner=prefect_flow_run_id,
    )
    Manifest.start(layout.name, config, started_at, prefect_flow_run_id).save(layout.root)
    resume_from = layout.last_checkpoint.resolve() if resumed and layout.last_checkpoint.is_file() else None
    return layout, resume_from


def resumable_run(output_dir: Path | str, run_name: str) -> RunLayout | None:
    """The interrupted run named `run_name`, None when there is none; ConfigError when that run
    completed (reusing it would mix two runs' outputs)."""
    layout = RunLayout(runs_root(output_dir) / run_name)
    if not layout.root.is_dir():
        return None
    if _status_of(layout) == "completed":
        raise ConfigError(
            f"Run '{run_name}' already completed in {layout.root}; "
            f"choose another --run-name or omit it for a generated one"
        )
    return layout


def _status_of(layout: RunLayout) -> str | None:
    try:
        return Manifest.load(layout.root).status
    except ConfigError:
        return None


# ---------------------------------------------------------------------------------------------
# History


def list_runs(output_dir: Path | str) -> list[dict[str, Any]]:
    """One row per run directory, oldest first: name, date, data, model, accuracy, duration
    (seconds), status and path. A directory without a readable manifest is listed as 'unknown'."""
    root = runs_root(output_dir)
    rows = []
    for run_dir in sorted(root.iterdir()) if root.is_dir() else []:
        if not run_dir.is_dir() or run_dir.name.startswith("."):
            continue
        try:
            manifest: Manifest | None = Manifest.load(run_dir)
        except ConfigError:
            manifest = None
        rows.append(
            {
                "name": run_dir.name,
                "date": manifest.started_at if manifest else None,
                "data": manifest.config.data.dataset if manifest else None,
                "model": manifest.config.model.name if manifest else None,
                "accuracy": manifest.metrics.eval_accuracy if manifest and manifest.metrics else None,
                "duration": manifest.timing.total_seconds if manifest and manifest.timing else None,
                "status": manifest.apparent_status if manifest else "unknown",
                "pid": manifest.pid if manifest else None,
                "path": str(run_dir),
            }
        )
    rows.sort(key=lambda row: (row["date"] or "", row["name"]))
    return rows


def format_runs(rows: list[dict[str, Any]]) -> str:
    """The run history as an aligned text table."""
    columns = {
        "name": TEXT,
        "date": TEXT,
        "data": TEXT,
        "model": TEXT,
        "accuracy": PERCENT,
        "duration": SECONDS,
        "status": TEXT,
    }
    shown = [{**row, "date": row["date"] and row["date"].replace("T", " ")[:19]} for row in rows]  # to the second
    return text_table(Table.of(columns, shown))


# ---------------------------------------------------------------------------------------------
# Reproduction


def reproduction_config(manifest: Manifest, run_dir: Path | str) -> PipelineConfig:
    """The config that reruns a run: its resolved config, caches bypassed, into a new run
    directory beside the original (`reproduce-<original name>-<4 hex>`)."""
    output = manifest.config.output.model_copy(
        update={
            "output_dir": str(Path(run_dir).resolve().parent.parent),
            "run_name": f"reproduce-{manifest.run_name[:80]}-{secrets.token_hex(2)}",
            "refresh": True,
        }
    )
    return manifest.config.model_copy(update={"output": output})


def check_same_data(manifest: Manifest, fingerprint: str) -> None:
    """DatasetError unless the data now has the fingerprint the run recorded."""
    if manifest.data is None:
        raise DatasetError(
            f"Run '{manifest.run_name}' recorded no data fingerprint (status "
            f"{manifest.status}); only a completed run can be reproduced"
        )
    recorded = manifest.data.fingerprint
    if recorded != fingerprint:
        raise DatasetError(
            f"Dataset '{manifest.config.data.dataset}' changed since run '{manifest.run_name}': "
            f"fingerprint {fingerprint[:12]}... now, {recorded[:12]}... then; reproducing needs the same data"
        )


def compare_runs(original: Manifest, reproduced: Manifest) -> dict[str, Any]:
    """Whether two runs produced the same weights, with both runs' metrics."""

    def metrics(manifest: Manifest) -> dict[str, Any]:
        values = manifest.metrics
        return {key: getattr(values, key) if values else None for key in ("eval_accuracy", "eval_loss", "eval_top5")}

    return {
        "identical": original.weights_sha256 is not None and original.weights_sha256 == reproduced.weights_sha256,
        "original_run": original.run_name,
        "reproduced_run": reproduced.run_name,
        "reproduced_run_dir": str(runs_root(reproduced.config.output.output_dir) / reproduced.run_name),
        "original_weights_sha256": original.weights_sha256,
        "reproduced_weights_sha256": reproduced.weights_sha256,
        "metrics": {"original": metrics(original), "reproduced": metrics(reproduced)},
    }


# ---------------------------------------------------------------------------------------------
# Differences


def find_run(output_dir: Path | str, run: str) -> RunLayout:
    """A run given as its directory or as a run name under `output_dir`; ConfigError when neither exists."""
    for candidate in (Path(run), runs_root(output_dir) / run):
        if (candidate / MANIFEST_NAME).is_file():
            return RunLayout(candidate)
    raise ConfigError(
        f"Run '{run}' not found: expected a run directory or the name of a run under {runs_root(output_dir)}"
    )


def diff_runs(before: RunLayout, after: RunLayout) -> tuple[dict[str, SplitChanges], dict[str, list[Any]]]:
    """What changed from one run to another: per split the files added, removed, changed and
    relabelled (their data listings), and every config value that differs."""
    changes = diff_listings(read_listing(before.data_listing), read_listing(after.data_listing))
    configs = [Manifest.load(layout.root).config.model_dump(mode="json") for layout in (before, after)]
    return changes, config_differences(*configs)


def diff_to_dict(before: RunLayout, after: RunLayout) -> dict[str, Any]:
    """`diff_runs` as JSON: the two runs, a one-line summary, the data per split and the config."""
    changes, config = diff_runs(before, after)
    return {
        "before": str(before.root),
        "after": str(after.root),
        "summary": summary_line(changes),
        "data": changes_to_dict(changes),
        "config": config,
    }
