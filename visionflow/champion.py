"""Champion / challenger: compare a finished run (the challenger) with the model in a champion
slot on the same evaluation split and the configured metric, and promote the challenger when
it is at least as good.

Layout of a slot (``<output_dir>/models/<slot>``)::

    models/<slot>  ->  .<slot>/<version>/      # a relative symlink, swapped atomically
    models/.<slot>/<version>/
        model.safetensors, model.json          # the run's export (weights + ModelSpec)
        manifest.json                          # the run's manifest, with the decision
        decision.json                          # the decision that promoted it

Decisions:
- Promotion never exposes a half-written champion: the new version folder is built under a
  temporary name, renamed into place, and only then is the slot link replaced with
  ``os.replace`` (an atomic rename). Readers of ``models/<slot>`` see the old champion or the
  new one, never a mix; the previous ``KEEP_PREVIOUS`` versions stay on disk for readers that
  resolved the old link and for rollback (``ln -sfn .<slot>/<version> models/<slot>``).
- Both models are scored on the challenger's evaluation split: the challenger's score is the
  one its run measured (``manifest.metrics``), the champion is re-evaluated on that split, so a
  champion promoted on older data is judged on today's data.
- One run at a time per slot: a file lock (``models/.<slot>.lock``) covers reading the champion,
  scoring it and swapping the link, so concurrent challengers are judged one after the other.
- Identical weights (same ``weights_sha256``, e.g. a cached run on unchanged data) are "kept"
  without evaluating anything: this keeps a scheduled run on unchanged data cheap.
- With champion.gates on (the default) both exports predict the eval split and the challenger is
  promoted only when every check of `visionflow.gates` passes (significance beyond chance, gain,
  no class left behind, calibration, on the leak-free images when near-duplicates were searched);
  a failed check keeps the champion and the reason names it with its figure and bound. With the
  gates off, "at least as good on the metric" promotes. The decision is also written to the run
  folder (``decision.json``, with the reliability diagrams ``reliability.png``).
- With champion.approval manual, a promotion waits for a reviewer (`challenge`'s `review`), with
  the slot unlocked meanwhile (an answer can take hours); it is promoted only when approved and
  the slot still holds the champion it was judged against. A rejection or no answer in time keeps
  the champion; the decision's ``review`` records the answer either way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from visionflow.config import DataConfig, GatesConfig, is_improvement, monitor_mode
from visionflow.data.changes import LISTING_NAME, changes_markdown, diff_listings, read_listing, summary_line
from visionflow.data.splits import Split
from visionflow.errors import CheckpointError, ConfigError
from visionflow.fileio import atomic_write_bytes, atomic_write_json, locked
from visionflow.manifest import MANIFEST_NAME, ChampionDecision, GateCheck, Manifest, utc_timestamp
from visionflow.runs import EXPORT_SPEC, EXPORT_WEIGHTS, RunLayout, list_runs
from visionflow.tables import NUMBER, Table, markdown_table

if TYPE_CHECKING:
    from visionflow.evaluation import EvalReport

MODELS_SUBDIR = "models"
DECISION = "decision.json"
RELIABILITY = "reliability.png"  # in the run folder: both models' reliability diagrams (gates.reliability_diagram)
UNGATED = GatesConfig(enabled=False)  # the rule before gates: at least as good on the metric
KEEP_PREVIOUS = 2


@dataclass(frozen=True)
class Review:
    """A reviewer's answer to a promotion (champion.approval manual): approved or not, and why; with
    `answered` False nobody answered in time and `reason` says so."""

    approved: bool
    reason: str = ""
    answered: bool = True

    @classmethod
    def timed_out(cls, minutes: float) -> Review:
        return cls(approved=False, reason=f"no answer within {minutes:g} minutes", answered=False)

    def summary(self) -> str:
        """The answer in one phrase, as ChampionDecision.review records it."""
        if not self.answered:
            return self.reason
        return f"{'approved' if self.approved else 'rejected'}: {self.reason or '(no reason given)'}"


# Asks for a review of a decision to promote and returns the answer (tasks/champion.py pauses the
# flow run for it).
Reviewer = Callable[["ChampionDecision"], Review]


@dataclass(frozen=True)
class Champion:
    """The model currently in a slot."""

    slot: str
    path: Path  # the version folder the slot link points to; load_model(path) works on it
    version: str  # the version folder it points to
    run_name: str
    weights_sha256: str


def slot_path(output_dir: Path | str, slot: str) -> Path:
    """``<output_dir>/models/<slot>``: the link readers use."""
    return Path(output_dir) / MODELS_SUBDIR / slot


def _versions_dir(output_dir: Path | str, slot: str) -> Path:
    return Path(output_dir) / MODELS_SUBDIR / f".{slot}"


def _read_json(path: Path, expected: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"File '{path}' not found: expected {expected}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"'{path}' is not valid JSON: {err}") from None


def metric_direction(metric: str) -> tuple[str, bool]:
    """(EvalReport field, higher is better) of a training.monitor name (config.MONITOR_MODES)."""
    return metric.removeprefix("eval_"), monitor_mode(metric, "champion metric") == "max"


def read_champion(output_dir: Path | str, slot: str) -> Champion | None:
    """The champion in ``slot``, or None when the slot is empty."""
    path = slot_path(output_dir, slot)
    if not path.exists():
        return None
    if not path.is_symlink():
        raise CheckpointError(
            f"Champion slot '{path}' is a plain folder: expected a link to "
            f"{_versions_dir(output_dir, slot)}/<version> managed by visionflow; move it away"
        )
    version = path.resolve()  # one version for the whole comparison, even if the link is swapped meanwhile
    expected = f"a champion folder with {EXPORT_WEIGHTS}, {EXPORT_SPEC}, {MANIFEST_NAME} and {DECISION}"
    spec = _read_json(version / EXPORT_SPEC, expected)
    decision = _read_json(version / DECISION, expected)
    return Champion(
        slot=slot,
        path=version,
        version=version.name,
        run_name=str(decision["challenger_run"]),
        weights_sha256=str(spec["weights_sha256"]),
    )


def evaluate_export(path: Path, eval_split: Split, data: DataConfig, device: str = "auto") -> EvalReport:
    """Evaluate an exported model on ``eval_split`` at the model's own input size, read by
    data.loader (`cache.open_eval_split`: streamed when it would not fit the memory budget)."""
    from visionflow.checkpoints import load_model
    from visionflow.data.decoded import open_eval_split  # torch: only when a champion is evaluated
    from visionflow.evaluation import check_classes_match, evaluate_model

    model, spec = load_model(path)
    check_classes_match(spec, eval_split.classes)
    return evaluate_model(model, spec, open_eval_split(eval_split, data, spec.decode_size), device=device)


def evaluate_champion(
    output_dir: Path | str, slot: str | None, eval_split: Split, data: DataConfig, device: str = "auto"
) -> tuple[Champion, EvalReport]:
    """The champion in ``slot`` and its report on ``eval_split``; no slot or an empty one is an error."""
    if slot is None:
        raise ConfigError(
            "Invalid config field 'output.champion': None; expected the champion slot to evaluate, e.g. 'nightly'"
        )
    champion = read_champion(output_dir, slot)
    if champion is None:
        raise CheckpointError(
            f"Champion slot '{slot_path(output_dir, slot)}' is empty: "
            f"train with output.champion={slot} to promote a model into it"
        )
    return champion, evaluate_export(champion.path, eval_split, data, device)


def champion_report_markdown(champion: Champion, report: EvalReport, split_name: str) -> str:
    """The champion's evaluation for the Prefect UI: headline metrics and the per-class table."""
    top5 = "n/a" if report.top5 is None else report.top5
    headline = Table(("accuracy", "loss", "top-5"), ((report.accuracy, report.loss, top5),), (NUMBER,) * 3)
    return "\n".join(
        [
            f"## Champion `{champion.slot}`: run {champion.run_name}",
            "",
            f"Version `{champion.version}`, evaluated on the `{split_name}` split ({report.num_images} images).",
            "",
            markdown_table(headline),
            "",
            markdown_table(report.per_class),
        ]
    )


def _should_promote(challenger: float, champion: float, metric: str) -> bool:
    """At least as good: >= for a higher-is-better metric, <= for a lower-is-better one."""
    metric_direction(metric)  # an unknown metric is a ConfigError naming the champion
    return is_improvement(challenger, champion, metric, ties=True)


def _reason(
    challenger: float,
    champion: float | None,
    metric: str,
    promoted: bool,
    same_weights: bool,
    checks: Sequence[GateCheck] | None,
) -> str:
    if champion is None:
        return "no champion in the slot yet"
    if same_weights:
        return "same weights"
    if checks is not None:
        failed = [check.failure() for check in checks if not check.passed]
        return "failed: " + "; ".join(failed) if failed else f"passed all {len(checks)} checks"
    better = "higher" if metric_direction(metric)[1] else "lower"
    verdict = "is at least as good as" if promoted else "is worse than"
    return f"challenger {metric} {challenger:.4f} {verdict} champion {champion:.4f} ({better} is better)"


def decide(
    slot: str,
    metric: str,
    challenger_run: str,
    challenger_score: float,
    challenger_sha: str,
    champion: Champion | None,
    champion_score: float | None,
    eval_split: Split,
    data_changes: str | None = None,
    checks: Sequence[GateCheck] | None = None,
) -> ChampionDecision:
    """The decision for a challenger against the current champion (None: empty slot), citing
    what changed in the data (`data_changes`, when known): all `checks` must pass (None: the
    gates are off, at least as good on `metric` promotes)."""
    same_weights = champion is not None and champion.weights_sha256 == challenger_sha
    if same_weights:
        champion_score = challenger_score  # identical weights score identically on one split
    if champion is None or same_weights:
        promoted, checks = champion is None, None
    elif checks is not None:
        promoted = all(check.passed for check in checks)
    else:
        promoted = _should_promote(challenger_score, champion_score, metric)
    return ChampionDecision(
        slot=slot,
        metric=metric,
        promoted=promoted,
        reason=_reason(challenger_score, champion_score, metric, promoted, same_weights, checks),
        challenger_run=challenger_run,
        challenger_score=challenger_score,
        challenger_weights_sha256=challenger_sha,
        champion_run=champion.run_name if champion else None,
        champion_score=champion_score,
        champion_weights_sha256=champion.weights_sha256 if champion else None,
        eval_split=eval_split.name,
        eval_images=len(eval_split),
        decided_at=utc_timestamp(),
        data_changes=data_changes,
        checks=list(checks or []),
    )


def _prune(versions: Path, current: str) -> None:
    """Delete versions older than the current one and the KEEP_PREVIOUS before it."""
    done = sorted(p.name for p in versions.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in done[: max(0, done.index(current) - KEEP_PREVIOUS)]:
        shutil.rmtree(versions / name, ignore_errors=True)


def champion_data_changes(champion: Champion | None, layout: RunLayout) -> str | None:
    """What changed from the champion's data to the run's (`datachanges.summary_line`); None when
    either listing is missing."""
    if champion is None or not (champion.path / LISTING_NAME).is_file() or not layout.data_listing.is_file():
        return None
    return summary_line(diff_listings(read_listing(champion.path / LISTING_NAME), read_listing(layout.data_listing)))


def data_changes_report(run_dir: Path | str, output_dir: Path | str, slot: str | None) -> tuple[str, str]:
    """The run's data against the champion's in `slot` (when it has a data listing), else against
    the newest earlier run with one: (markdown, one-line description)."""
    layout = RunLayout(Path(run_dir))
    champion = read_champion(output_dir, slot) if slot else None
    if champion is not None and (champion.path / LISTING_NAME).is_file():
        baseline, listing = f"champion '{slot}' ({champion.run_name})", champion.path / LISTING_NAME
    else:
        runs = [RunLayout(Path(row["path"])) for row in list_runs(output_dir)]
        names = [run.name for run in runs]
        earlier = [run for run in runs[: names.index(layout.name)] if run.data_listing.is_file()]
        if not earlier:
            return "# Data changes\n\nNo champion or earlier run to compare with.\n", "No earlier data"
        baseline, listing = f"run {earlier[-1].name}", earlier[-1].data_listing
    changes = diff_listings(read_listing(listing), read_listing(layout.data_listing))
    return changes_markdown(changes, f"Data changes against {baseline}"), f"Against {baseline}: {summary_line(changes)}"


def promote(run_dir: Path, manifest: Manifest, decision: ChampionDecision, output_dir: Path | str) -> Path:
    """Install the run's export, manifest and decision as the slot's new version; swap the link atomically."""
    link = slot_path(output_dir, decision.slot)
    if link.exists() and not link.is_symlink():
        raise CheckpointError(
            f"Champion slot '{link}' is a plain folder: expected a link managed by visionflow; move it away"
        )
    versions = _versions_dir(output_dir, decision.slot)
    versions.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    version = f"{stamp}-{decision.challenger_weights_sha256[:12]}"
    staging = Path(tempfile.mkdtemp(dir=versions, prefix=".staging-"))
    try:
        for name in (EXPORT_WEIGHTS, EXPORT_SPEC):
            atomic_write_bytes(staging / name, (RunLayout(run_dir).export_dir / name).read_bytes())
        if RunLayout(run_dir).data_listing.is_file():  # what the next challengers' data is compared with
            atomic_write_bytes(staging / LISTING_NAME, RunLayout(run_dir).data_listing.read_bytes())
        manifest.save(staging)
        atomic_write_json(staging / DECISION, decision.to_dict())
        os.replace(staging, versions / version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    new_link = link.with_name(f".{decision.slot}.link-{version}")
    os.symlink(Path(versions.name) / version, new_link, target_is_directory=True)
    os.replace(new_link, link)
    _prune(versions, version)
    return link


def _challenger(layout: RunLayout) -> tuple[Manifest, str]:
    """The finished run's manifest and its export's weights sha256."""
    manifest = Manifest.load(layout.root)
    spec = _read_json(layout.export_spec, f"the run's export ({EXPORT_WEIGHTS} + {EXPORT_SPEC})")
    if manifest.metrics is None:
        raise CheckpointError(f"Manifest '{layout.manifest}' has no metrics: expected a completed run")
    return manifest, str(spec["weights_sha256"])


def _gated(
    layout: RunLayout,
    champion: Champion,
    metric: str,
    eval_split: Split,
    data: DataConfig,
    device: str,
    gates: GatesConfig,
    leaked: Sequence[Path] | None,
) -> tuple[float, float, list[GateCheck]]:
    """Both exports predict the eval split: their scores on all of it, the gate's checks (on the
    images without a near-duplicate in train, `leaked`, when so configured) and the reliability
    diagrams (RELIABILITY in the run folder)."""
    from visionflow.gates import Predictions, gate_checks, reliability_diagram, score  # torch: only when gated

    reports = [evaluate_export(path, eval_split, data, device) for path in (layout.export_dir, champion.path)]
    ours, theirs = (Predictions.of(report.probabilities, report.labels) for report in reports)
    left_out = None if leaked is None else set(leaked)
    mask = None if left_out is None else np.array([file in left_out for file in eval_split.files], dtype=bool)
    checks = gate_checks(ours, theirs, eval_split.classes, metric, gates, mask)
    reliability_diagram(ours, theirs, layout.root / RELIABILITY)
    return score(ours, metric), score(theirs, metric), checks


def judge(
    run_dir: Path | str,
    slot: str,
    champion: Champion | None,
    metric: str,
    eval_split: Split,
    data: DataConfig,
    device: str = "auto",
    gates: GatesConfig = UNGATED,
    leaked: Sequence[Path] | None = None,
) -> ChampionDecision:
    """The decision on the run in ``run_dir`` against ``champion`` (None: an empty slot), without
    promoting: with `gates` on, every check must pass; off, at least as good on `metric` wins."""
    layout = RunLayout(Path(run_dir))
    manifest, challenger_sha = _challenger(layout)
    ours, theirs, checks = float(getattr(manifest.metrics, metric)), None, None
    if champion is not None and champion.weights_sha256 != challenger_sha:
        if gates.enabled:
            ours, theirs, checks = _gated(layout, champion, metric, eval_split, data, device, gates, leaked)
        else:
            theirs = float(
                getattr(evaluate_export(champion.path, eval_split, data, device), metric_direction(metric)[0])
            )
    changes = champion_data_changes(champion, layout)
    return decide(slot, metric, layout.name, ours, challenger_sha, champion, theirs, eval_split, changes, checks)


def record_decision(run_dir: Path | str, decision: ChampionDecision, output_dir: Path | str) -> None:
    """Write the decision into the run's manifest and ``decision.json``; promote when it says so."""
    layout = RunLayout(Path(run_dir))
    manifest = Manifest.load(layout.root).model_copy(update={"champion": decision})
    if decision.promoted:
        promote(layout.root, manifest, decision, output_dir)
    atomic_write_json(layout.root / DECISION, decision.to_dict())
    manifest.save(layout.root)


def reviewed(
    decision: ChampionDecision, review: Review, judged: Champion | None, current: Champion | None
) -> ChampionDecision:
    """The decision to promote after its review: promoted only when approved and the slot still
    holds `judged`, the champion it was judged against (`current` is the slot's now)."""
    summary = review.summary()
    if not review.approved:
        kept = "rejected in review" if review.answered else "not reviewed"
        reason = f"{decision.reason}; {kept}: {review.reason or '(no reason given)'}"
        return decision.model_copy(update={"promoted": False, "reason": reason, "review": summary})
    if (judged and judged.version) != (current and current.version):
        now = f"run {current.run_name}" if current else "empty"
        reason = f"{decision.reason}; approved, but the slot's champion changed during the review (now {now})"
        return decision.model_copy(update={"promoted": False, "reason": reason, "review": summary})
    return decision.model_copy(update={"review": summary})


def challenge(
    run_dir: Path | str,
    slot: str,
    metric: str,
    eval_split: Split,
    output_dir: Path | str,
    data: DataConfig,
    device: str = "auto",
    gates: GatesConfig = UNGATED,
    leaked: Sequence[Path] | None = None,
    review: Reviewer | None = None,
) -> ChampionDecision:
    """Judge the run in ``run_dir`` against the champion in ``slot`` (`judge`), promote it when
    the decision says so (and, with `review`, the reviewer approves), and record the decision in
    the run's manifest (``champion``)."""
    # One challenger per slot from reading the champion to swapping it: two runs challenging one
    # slot at once (nightly and on-demand) queue, and the second is judged against the first.
    lock = Path(output_dir) / MODELS_SUBDIR / f".{slot}.lock"
    with locked(lock):
        champion = read_champion(output_dir, slot)
        decision = judge(run_dir, slot, champion, metric, eval_split, data, device, gates, leaked)
        if review is None or not decision.promoted:
            record_decision(run_dir, decision, output_dir)
            return decision
    answer = review(decision)  # unlocked: other challengers of the slot are judged meanwhile
    with locked(lock):
        decision = reviewed(decision, answer, champion, read_champion(output_dir, slot))
        record_decision(run_dir, decision, output_dir)
    return decision
