"""The run manifest: one typed record per run directory (`manifest.json`), written atomically
when the run starts and when it ends, read back with `Manifest.load`. This model is the single
definition of every field; `docs/manifest.schema.json` is generated from it.

Provenance recorded with each run (library versions, every imported package, git commit) is
collected here too.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    computed_field,
    model_serializer,
    model_validator,
)

from visionflow.config import MODEL_RENAMES, PipelineConfig, stored_config
from visionflow.errors import ConfigError, field_problem
from visionflow.fileio import atomic_write_json, user_cache_dir
from visionflow.tables import CODE, NUMBER, TEXT, Table, markdown_table

MANIFEST_NAME = "manifest.json"
# 2: typed model (1 was the untyped dict, its "manifest_version" is read as schema_version); 3: model
# names as config.MODEL_RENAMES has them (older manifests are read with their names renamed).
SCHEMA_VERSION = 3
# interrupted: Ctrl-C, SIGTERM or a dead process; cancelled: by Prefect (UI, API); timed_out:
# training.timeout_minutes. Rerunning a run that stopped in any of these ways resumes it.
RunStatus = Literal["running", "completed", "failed", "interrupted", "cancelled", "timed_out"]
STOPPED_STATUSES = ("interrupted", "cancelled", "timed_out")
TaskStatus = Literal["completed", "cached"]
HEADLINE_PACKAGES = ("torch", "torchvision", "prefect")
MODULE_OWNERS_FILE = "module-owners.json"  # in fileio.user_cache_dir(): see _module_owners


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataRecord(_Record):
    """The data a run trained on."""

    spec: str = Field(description="Dataset SPEC as given (sample, cifar10 or a folder).")
    root: str = Field(description="Where the dataset was found, absolute.")
    fingerprint: str = Field(description="Content fingerprint of every split (sha256 hex).")
    validated_fingerprint: str = Field(description="Fingerprint after invalid files were left out.")
    num_train: int = Field(description="Training images used.")
    num_eval: int = Field(description="Evaluation images used.")
    eval_split: str = Field(description="Name of the evaluation split: val or test.")
    classes: list[str] = Field(description="Class names; label i is classes[i].")
    excluded: list[str] = Field(
        description="Files left out, dataset-relative: invalid ones, and leaked eval images with "
        "data.on_leak='drop-eval'."
    )
    eval_leakage_rate: float | None = Field(
        None,
        description="Fraction of the eval split with a near-duplicate in train; None when near-duplicates "
        "were not searched (data.near_duplicates).",
    )
    leaked_eval: list[str] = Field(
        default_factory=list, description="Eval images with a near-duplicate in train, dataset-relative."
    )


class ModelRecord(_Record):
    """The architecture a run trained."""

    name: str = Field(description="model.name: the backbone.")
    num_parameters: int
    trainable_parameters: int
    weights: str = Field("none", description="model.weights: what the run started from.")
    weights_sha256: str | None = Field(None, description="sha256 of that weights file.")
    head: str | None = Field(None, description="The classifier head layer, made for the dataset's classes.")
    head_parameters: int | None = Field(None, description="Parameters of the head: all that trains while frozen.")
    frozen: str = Field("nothing", description="What model.freeze_epochs freezes, and in which epochs.")


class Milestone(_Record):
    """When training first reached an eval accuracy."""

    epoch: int = Field(description="First epoch (1-based) whose eval accuracy reached the milestone.")
    seconds: float = Field(
        description="Training wall time until the end of that epoch: training loops and per-epoch evaluation, "
        "every session of a resumed run (checkpoint writes and data preparation excluded)."
    )


class MetricsRecord(_Record):
    """What the run's best checkpoint scored on the evaluation split."""

    eval_accuracy: float = Field(description="Top-1 accuracy in [0, 1].")
    eval_loss: float = Field(description="Mean cross-entropy per image.")
    eval_top5: float | None = Field(description="Top-5 accuracy; None with fewer than 5 classes.")
    best_epoch: int | None = Field(description="Epoch of the best checkpoint (1-based).")
    epochs_trained: int
    per_class: list[dict[str, Any]] = Field(description="Rows of class, precision, recall, f1, support.")
    eval_accuracy_with_leaked: float | None = Field(
        None,
        description="Top-1 accuracy on the eval split with the leaked images that data.on_leak='drop-eval' "
        "left out; None when none were left out.",
    )
    time_to_accuracy: dict[str, Milestone | None] = Field(
        default_factory=dict,
        description="Eval accuracy milestone ('50%', '60%', '70%') -> when training first reached it; None: never.",
    )


class TimingRecord(_Record):
    """Seconds of the run (training fields are None when the run failed before training)."""

    train_seconds: float | None = Field(None, description="Training loops only, every session of a resumed run.")
    train_images_per_second: float | None = None
    total_seconds: float = Field(description="From the flow run's start (data preparation included) to the end.")
    seconds_per_epoch: dict[str, float] = Field(
        default_factory=dict,
        description="Where an epoch's time went: mean seconds per epoch by phase (data, forward, backward, "
        "optimizer, evaluation, checkpoint, callbacks: TensorBoard, artifacts, log lines) over the epochs this "
        "flow run trained (GPU time on CUDA); empty when it trained none (training cached).",
    )
    other_seconds: float | None = Field(
        None,
        description="total_seconds minus the epochs this flow run trained: data preparation, model build, "
        "evaluation and export, Prefect's task runs and API calls, a temporary server's start.",
    )


class CheckpointRecord(_Record):
    """The checkpoint the run's metrics and export come from (best.pt)."""

    path: str
    sha256: str


class DistributedRecord(_Record):
    """The ranks of a data-parallel training (training.distributed)."""

    backend: str = Field(description="torch.distributed backend: gloo or nccl.")
    world_size: int = Field(description="Ranks in all: nproc_per_node x nnodes.")
    nnodes: int
    devices: list[str] = Field(description="Device of each rank, by rank: cpu, cuda:0, ...")


class GateCheck(_Record):
    """One check of a promotion gate (visionflow.gates): it passes when `figure` compares to
    `threshold` as `rule` says."""

    check: str = Field(description="significance, gain, leak-free gain, class recall, class F1 or calibration.")
    passed: bool
    figure: float = Field(description="What was measured: a p-value, a gain, the largest drop, a rise.")
    rule: Literal["<=", ">="] = Field(description="How the figure must compare to the threshold to pass.")
    threshold: float = Field(description="Its bound, from champion.gates.")
    detail: str = Field(description="The measurement in words: both models' values, the class, the images.")

    def failure(self) -> str:
        """Why it failed, in one phrase: the check, the figure, the bound and the detail."""
        return f"{self.check} {self.figure:.4g} is not {self.rule} {self.threshold:.4g} ({self.detail})"


class ChampionDecision(_Record):
    """Whether a run was promoted into a champion slot, both scores on the same split, and why
    (visionflow.champion decides; the manifest, decision.json and the promotion event record it)."""

    slot: str
    metric: str = Field(description="training.monitor name both models were scored on.")
    promoted: bool
    reason: str
    challenger_run: str
    challenger_score: float
    challenger_weights_sha256: str
    champion_run: str | None = Field(description="The champion before this decision; None: the slot was empty.")
    champion_score: float | None
    champion_weights_sha256: str | None
    eval_split: str
    eval_images: int
    decided_at: str = Field(description="ISO 8601, UTC.")
    data_changes: str | None = Field(
        None,
        description="The challenger's data against the champion's (data.changes.summary_line); None when either "
        "has no data listing (an empty slot, a champion promoted before listings existed).",
    )
    checks: list[GateCheck] = Field(
        default_factory=list,
        description="The gate's checks (champion.gates), all of them, passed or not; empty when the slot was "
        "empty, the weights were the same or the gates are off.",
    )
    review: str | None = Field(
        None,
        description="With champion.approval manual: the reviewer's answer (approved, rejected with a reason, "
        "or no answer in time); None: no review was asked for.",
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_outcome(cls, values: Any) -> Any:
        """`outcome` is written beside the fields (to_dict) and derived again when read back."""
        if isinstance(values, dict) and "outcome" in values:
            values = {k: v for k, v in values.items() if k != "outcome"}
        return values

    @model_serializer(mode="wrap")
    def _without_unused(self, handler: Any) -> dict[str, Any]:
        """No `checks` when there were none and no `review` when none was asked for: a decision made
        without gates is written with the keys it had before they existed."""
        values = handler(self)
        return {k: v for k, v in values.items() if not (k in ("checks", "review") and v in ([], None))}

    @computed_field  # type: ignore[prop-decorator]
    @property
    def outcome(self) -> str:
        return "promoted" if self.promoted else "kept"

    def to_dict(self) -> dict[str, Any]:
        """The fields and `outcome`, as JSON values."""
        return self.model_dump(mode="json")

    def checks_table(self) -> Table:
        """Every check: whether it passed, its figure, rule and threshold, and what was measured."""
        rows = tuple(
            (c.check, "pass" if c.passed else "FAIL", c.figure, c.rule, c.threshold, c.detail) for c in self.checks
        )
        return Table(
            ("check", "result", "figure", "rule", "threshold", "detail"), rows, (TEXT, TEXT, NUMBER, TEXT, NUMBER, TEXT)
        )

    def to_markdown(self, title: str | None = None) -> str:
        """A small report for the Prefect UI: the outcome (or `title`), the reason, a score table and
        the checks."""

        def score(value: float | None) -> float | str:
            return "n/a" if value is None else value

        champion_sha = self.champion_weights_sha256[:12] if self.champion_weights_sha256 else None
        rows = (
            ("challenger", self.challenger_run, score(self.challenger_score), self.challenger_weights_sha256[:12]),
            ("champion", self.champion_run or "(none)", score(self.champion_score), champion_sha),
        )
        scores = Table(("model", "run", self.metric, "weights sha256"), rows, (TEXT, TEXT, NUMBER, CODE))
        return "\n".join(
            [
                f"## {title or f'Champion `{self.slot}`: challenger **{self.outcome}**'}",
                "",
                f"Reason: {self.reason}",
                "",
                markdown_table(scores),
                "",
                f"Both scored on the `{self.eval_split}` split ({self.eval_images} images); decided {self.decided_at}.",
                *(
                    ["", f"Data: challenger {self.data_changes}, against the champion's data."]
                    if self.data_changes
                    else []
                ),
                *(["", markdown_table(self.checks_table())] if self.checks else []),
                *(["", f"Review: {self.review}"] if self.review else []),
            ]
        )


class Manifest(_Record):
    """Everything recorded about one run (`<output>/runs/<run-name>/manifest.json`)."""

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this schema.")
    run_name: str
    status: RunStatus
    started_at: str = Field(description="ISO 8601, UTC: when the flow run started.")
    finished_at: str | None = Field(None, description="ISO 8601, UTC; None while running.")
    config: PipelineConfig = Field(description="The config as the run used it: recipe and normalization filled in.")
    seed: int
    data: DataRecord | None = None
    model: ModelRecord | None = None
    metrics: MetricsRecord | None = None
    timing: TimingRecord | None = None
    checkpoint: CheckpointRecord | None = None
    weights_sha256: str | None = Field(None, description="sha256 of the final weights, independent of file format.")
    tasks: dict[str, TaskStatus] = Field(default_factory=dict, description="Pipeline task -> completed or cached.")
    device: str | None = None
    distributed: DistributedRecord | None = Field(
        None, description="The ranks of a data-parallel training; None: one process."
    )
    versions: dict[str, str] = Field(default_factory=dict, description="Python, torch, torchvision and prefect.")
    packages: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Every installed package the run's process imported (a fully cached run does not import torch; "
            "`versions` names it)."
        ),
    )
    git_commit: str | None = Field(None, description="Commit of this code, '-dirty' with local changes.")
    prefect_flow_run_id: str | None = None
    pid: int | None = Field(None, description="Process that runs the flow (see apparent_status).")
    host: str | None = Field(None, description="Host name of that process.")
    resumed_from: str | None = Field(None, description="last.pt of the interrupted run this one continued.")
    error: str | None = Field(None, description="One line: why the run failed or stopped.")
    champion: ChampionDecision | None = Field(None, description="The champion/challenger decision, when made.")

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, values: Any) -> Any:
        """Schema 1 (untyped) manifests: `manifest_version` is the schema version; their
        data.num_workers (a loader setting of that time, whose value meant something else) is dropped.
        Schemas before 3: model names of their time renamed (config.stored_config)."""
        if isinstance(values, dict) and "manifest_version" in values:
            values = {k: v for k, v in values.items() if k != "manifest_version"}
            values["schema_version"] = 1
            data = (values.get("config") or {}).get("data")
            if isinstance(data, dict):
                data.pop("num_workers", None)
        if isinstance(values, dict) and values.get("schema_version", SCHEMA_VERSION) < 3:
            values = {**values, "config": stored_config(values.get("config") or {}, renamed=False)}
            model = values.get("model")
            if isinstance(model, dict) and model.get("name") in MODEL_RENAMES:
                values["model"] = {**model, "name": MODEL_RENAMES[model["name"]]}
        return values

    @classmethod
    def start(cls, run_name: str, config: PipelineConfig, started_at: str, prefect_flow_run_id: str | None) -> Manifest:
        """The manifest of a run that just started."""
        return cls(
            run_name=run_name,
            status="running",
            started_at=started_at,
            config=config,
            seed=config.training.seed,
            prefect_flow_run_id=prefect_flow_run_id,
            pid=os.getpid(),
            host=socket.gethostname(),
            **provenance(),
        )

    @property
    def apparent_status(self) -> RunStatus:
        """The status, except that a run still marked running whose process on this host no longer
        exists (killed without a word: kill -9, power loss) is interrupted."""
        if self.status != "running" or self.pid is None or self.host != socket.gethostname():
            return self.status
        try:
            os.kill(self.pid, 0)  # signal 0: only checks that the process exists
        except ProcessLookupError:
            return "interrupted"
        except PermissionError:  # exists, owned by another user
            pass
        return self.status

    def finish(self, status: RunStatus, **fields: Any) -> Manifest:
        """This manifest ended with `status` now, `fields` filled in, provenance refreshed."""
        return self.model_validate(
            {**self.model_dump(), **provenance(), **fields, "status": status, "finished_at": utc_timestamp()}
        )

    def save(self, run_dir: Path | str) -> Path:
        """Write `run_dir/manifest.json` atomically."""
        return atomic_write_json(Path(run_dir) / MANIFEST_NAME, self.model_dump(mode="json"))

    @classmethod
    def load(cls, run_dir: Path | str) -> Manifest:
        """The manifest of a run directory; ConfigError naming the directory or file when there is
        none or it is not a visionflow manifest."""
        path = Path(run_dir) / MANIFEST_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"Run directory '{run_dir}' has no {MANIFEST_NAME}: expected a directory "
                f"created by 'visionflow train' (<output>/runs/<run-name>)"
            ) from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"Manifest '{path}' is unreadable: {err}") from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as err:
            problem = field_problem(err, "manifest")
            raise ConfigError(
                f"Manifest '{path}' is not a visionflow run manifest: field '{problem.field}': {problem.message}"
            ) from None


def utc_timestamp(moment: datetime | None = None) -> str:
    """`moment` (default: now) in UTC, ISO 8601 to the second: every timestamp a run records."""
    return (moment or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    """Python and the headline libraries (read from metadata: importing prefect is slow)."""
    versions = {"python": platform.python_version()}
    for package in HEADLINE_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


@functools.cache
def _module_owners() -> Mapping[str, dict[str, str]]:
    """Top-level module -> {distribution providing it: its version}. Computing it reads every
    installed package's file list (0.3-1 s), so it is kept in the user cache until a folder on
    sys.path changes (installing, upgrading or removing a package changes its site-packages folder)."""
    folders = sorted({str(Path(entry or ".").resolve()) for entry in sys.path})
    key = [[folder, os.stat(folder).st_mtime_ns] for folder in folders if os.path.isdir(folder)]
    path = user_cache_dir() / MODULE_OWNERS_FILE
    try:
        stored = json.loads(path.read_text())
        if stored["key"] == key:
            return stored["owners"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or unreadable: compute it again
    owners: dict[str, dict[str, str]] = {}
    for module, distributions in packages_distributions().items():
        for distribution in distributions:
            try:
                owners.setdefault(module, {})[distribution] = version(distribution)
            except PackageNotFoundError:
                continue
    try:
        atomic_write_json(path, {"key": key, "owners": owners})
    except OSError:
        pass  # a read-only cache folder: the next process computes it again
    return owners


def imported_packages() -> dict[str, str]:
    """Distribution name -> installed version of every package this process has imported."""
    owners = _module_owners()
    found: dict[str, str] = {}
    for module in {name.partition(".")[0] for name in list(sys.modules)}:
        found.update(owners.get(module, {}))
    return dict(sorted(found.items(), key=lambda item: item[0].lower()))


def git_commit(path: Path | str | None = None) -> str | None:
    """The commit checked out where this code lives (suffix `-dirty` with local changes);
    None outside a git work tree or without git."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def provenance() -> dict[str, Any]:
    """The manifest's provenance fields as of now: versions, imported packages, git commit."""
    return {"versions": package_versions(), "packages": imported_packages(), "git_commit": git_commit()}


if __name__ == "__main__":  # python -m visionflow.manifest > docs/manifest.schema.json
    import json

    print(json.dumps(Manifest.model_json_schema(), indent=2, sort_keys=True))
