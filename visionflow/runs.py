"""Run directories and manifests: naming, the `<output>/runs/<run-name>/` layout, the manifest
written (atomically) at the start and end of every run, the run history, and the provenance
recorded with each run (library versions, git commit).

A run directory is complete on its own: a run whose steps were cached gets copies of the cached
files, so deleting one run never breaks another.
"""

from __future__ import annotations

import json
import platform
import re
import secrets
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from visionflow.fileio import atomic_write_json
from visionflow.config import PipelineConfig, build_config
from visionflow.errors import ConfigError, DatasetError

RUNS_SUBDIR = "runs"
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
STATUSES = ("running", "completed", "failed")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_PACKAGES = ("torch", "torchvision", "prefect")


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
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def preview(self) -> Path:
        return self.root / "preview.png"

    @property
    def validation(self) -> Path:
        return self.root / "validation.json"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"


def runs_root(output_dir: Path | str) -> Path:
    return Path(output_dir) / RUNS_SUBDIR


def _slug(text: str) -> str:
    # A folder spec like "/data/my ants/" names the run after its last component.
    name = Path(text.rstrip("/\\")).name or text
    return _UNSAFE.sub("-", name).strip("-._")[:40] or "data"


def generate_run_name(dataset: str, model: str, now: datetime | None = None) -> str:
    """`train-<dataset>-<model>-<YYYYmmdd-HHMMSS>-<4 hex>`: sortable by time, unique by the suffix."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"train-{_slug(dataset)}-{_slug(model)}-{stamp}-{secrets.token_hex(2)}"


def create_run_dir(output_dir: Path | str, run_name: str | None, dataset: str, model: str,
                   proposed: str | None = None) -> tuple[RunLayout, bool]:
    """Create the run directory; returns its layout and whether an interrupted run is resumed.

    A given `run_name` that exists is resumed (see resumable_run). Without one, `proposed` (e.g. the orchestrator's run name) is tried,
    then generated names, until mkdir wins: two runs started in the same second still get
    different directories, and a generated name never resumes another run."""
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
            name = generate_run_name(dataset, model)
            continue
        return layout, False


def resumable_run(output_dir: Path | str, run_name: str) -> RunLayout | None:
    """The interrupted run named `run_name`, None when there is none; ConfigError when that run
    completed (reusing it would mix two runs' outputs)."""
    layout = RunLayout(runs_root(output_dir) / run_name)
    if not layout.root.is_dir():
        return None
    if _status_of(layout) == "completed":
        raise ConfigError(f"Run '{run_name}' already completed in {layout.root}; "
                          f"choose another --run-name or omit it for a generated one")
    return layout


def _status_of(layout: RunLayout) -> str | None:
    try:
        return json.loads(layout.manifest.read_text()).get("status")
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Provenance


def package_versions() -> dict[str, str]:
    """Python and the libraries a result depends on (read from metadata: importing prefect is slow)."""
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def git_commit(path: Path | str | None = None) -> str | None:
    """The commit checked out where this code lives (suffix `-dirty` with local changes);
    None outside a git work tree or without git."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Manifest


def build_manifest(run_name: str, config: dict[str, Any], status: str, *, started_at: str,
                   prefect_flow_run_id: str | None, data: dict[str, Any] | None = None,
                   model: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                   timing: dict[str, Any] | None = None, checkpoint: dict[str, Any] | None = None,
                   weights_sha256: str | None = None, tasks: dict[str, str] | None = None,
                   device: str | None = None, resumed_from: str | None = None,
                   error: str | None = None) -> dict[str, Any]:
    """The manifest of a run. `config` is the fully resolved config (a dict); sections not known
    yet (a run that failed early) stay None, so every manifest has the same keys."""
    if status not in STATUSES:
        raise ValueError(f"Invalid run status '{status}'. Choose from: {', '.join(STATUSES)}")
    return {
        "manifest_version": MANIFEST_VERSION,
        "run_name": run_name,
        "status": status,
        "started_at": started_at,
        "finished_at": None if status == "running" else utc_now(),
        "config": config,
        "seed": config["training"]["seed"],
        "data": data,
        "model": model,
        "metrics": metrics,
        "timing": timing,
        "checkpoint": checkpoint,
        "weights_sha256": weights_sha256,
        "tasks": tasks or {},
        "device": device,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "prefect_flow_run_id": prefect_flow_run_id,
        "resumed_from": resumed_from,  # last.pt of the interrupted run this one continued
        "error": error,
    }


def write_manifest(run_dir: Path | str, manifest: dict[str, Any]) -> Path:
    return atomic_write_json(Path(run_dir) / MANIFEST_NAME, manifest)


def read_manifest(run_dir: Path | str) -> dict[str, Any]:
    """The manifest of a run directory; ConfigError naming the directory when there is none."""
    path = Path(run_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"Run directory '{run_dir}' has no {MANIFEST_NAME}: expected a directory "
                          f"created by 'visionflow train' (<output>/{RUNS_SUBDIR}/<run-name>)") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"Manifest '{path}' is unreadable: {err}") from None
    if not isinstance(manifest, dict) or "config" not in manifest:
        raise ConfigError(f"Manifest '{path}' is not a visionflow run manifest (no 'config')")
    return manifest


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
            manifest = read_manifest(run_dir)
        except ConfigError:
            manifest = {}
        config = manifest.get("config") or {}
        rows.append({
            "name": run_dir.name,
            "date": manifest.get("started_at"),
            "data": (config.get("data") or {}).get("dataset"),
            "model": (config.get("model") or {}).get("name"),
            "accuracy": (manifest.get("metrics") or {}).get("eval_accuracy"),
            "duration": (manifest.get("timing") or {}).get("total_seconds"),
            "status": manifest.get("status", "unknown"),
            "path": str(run_dir),
        })
    rows.sort(key=lambda row: (row["date"] or "", row["name"]))
    return rows


def format_runs(rows: list[dict[str, Any]]) -> str:
    """The run history as an aligned text table."""
    headers = ("name", "date", "data", "model", "accuracy", "duration", "status")
    cells = [[row["name"], (row["date"] or "-").replace("T", " ")[:19], row["data"] or "-", row["model"] or "-",
              "-" if row["accuracy"] is None else f"{row['accuracy']:.2%}",
              "-" if row["duration"] is None else f"{row['duration']:.1f}s", row["status"]] for row in rows]
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *cells)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in [headers, *cells])


# ---------------------------------------------------------------------------------------------
# Reproduction


def reproduction_config(manifest: dict[str, Any], run_dir: Path | str) -> PipelineConfig:
    """The config that reruns a run: its resolved config, caches bypassed, into a new run
    directory beside the original (`reproduce-<original name>-<4 hex>`)."""
    config = build_config(manifest["config"])
    output = config.output.model_copy(update={
        "output_dir": str(Path(run_dir).resolve().parent.parent),
        "run_name": f"reproduce-{manifest['run_name'][:80]}-{secrets.token_hex(2)}",
        "refresh": True})
    return config.model_copy(update={"output": output})


def check_same_data(manifest: dict[str, Any], fingerprint: str) -> None:
    """DatasetError unless the data now has the fingerprint the run recorded."""
    recorded = (manifest.get("data") or {}).get("fingerprint")
    spec = manifest["config"]["data"]["dataset"]
    if recorded is None:
        raise DatasetError(f"Run '{manifest['run_name']}' recorded no data fingerprint (status "
                           f"{manifest.get('status')}); only a completed run can be reproduced")
    if recorded != fingerprint:
        raise DatasetError(f"Dataset '{spec}' changed since run '{manifest['run_name']}': fingerprint "
                           f"{fingerprint[:12]}... now, {recorded[:12]}... then; reproducing needs the same data")


def compare_runs(original: dict[str, Any], reproduced: dict[str, Any]) -> dict[str, Any]:
    """Whether two runs produced the same weights, with both runs' metrics."""
    def metrics(manifest: dict[str, Any]) -> dict[str, Any]:
        values = manifest.get("metrics") or {}
        return {key: values.get(key) for key in ("eval_accuracy", "eval_loss", "eval_top5")}

    return {
        "identical": original.get("weights_sha256") is not None
                     and original.get("weights_sha256") == reproduced.get("weights_sha256"),
        "original_run": original["run_name"],
        "reproduced_run": reproduced["run_name"],
        "reproduced_run_dir": str(Path(runs_root(reproduced["config"]["output"]["output_dir"])) / reproduced["run_name"]),
        "original_weights_sha256": original.get("weights_sha256"),
        "reproduced_weights_sha256": reproduced.get("weights_sha256"),
        "metrics": {"original": metrics(original), "reproduced": metrics(reproduced)},
    }
