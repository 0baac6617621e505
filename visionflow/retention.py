"""Retention (`visionflow gc`, output.keep_last / output.keep_days): which run directories under
`<output>/runs` to remove, and the cached task results only they referenced. No Prefect here.

What is kept:
- the newest `keep_last` runs (by the manifest's `started_at`) and every run younger than
  `keep_days` days;
- the run of every champion under `<output>/models/<slot>` (`visionflow.champion`);
- a run whose process still runs (`Manifest.apparent_status == "running"`), and any run
  directory modified in the last `BUSY_SECONDS` (a run that is just starting or resuming).

Runs share files through hard links (a cached run links the files of the run that computed
them), so removing a run frees only the files no kept run links; `freed_bytes` counts each
inode once, and only when every link of it goes.

A cached task result (`<output>/.prefect-results/<key>`, written by tasks/caching.py) refers to
files, all in the run that computed it; which files, the caller's `result_files` reads (the record
format is Prefect's: tasks/caching.py `result_files`). A record that refers to a file of a removed
run would be dropped as stale by its next lookup anyway (its files are gone), so gc removes it
too, under the key's lock. A record naming no run, or one `result_files` cannot read, is left
alone; without `result_files`, every record is.
Decoded caches (`<data_dir>/cache`) are left alone: a manifest records the dataset fingerprint,
not the per-split fingerprints the cache files are named after, so which run uses which cache
file cannot be decided from what runs record.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from visionflow.champion import MODELS_SUBDIR, read_champion
from visionflow.errors import ConfigError
from visionflow.fileio import try_lock, unlock
from visionflow.manifest import MANIFEST_NAME, Manifest
from visionflow.runs import list_runs

RESULTS_SUBDIR = ".prefect-results"  # cached task results of every run under an output directory
LOCKS_SUBDIR = "locks"  # one flock file per result key, inside RESULTS_SUBDIR
DEFAULT_KEEP_LAST = 10
DEFAULT_KEEP_DAYS = 30.0
BUSY_SECONDS = 60.0  # a run directory modified this recently is never removed
_REMOVING_PREFIX = ".gc-"  # a run directory is renamed to this (hidden) name, then deleted
# The absolute paths of the files a cached result record refers to; None when it cannot be read.
ResultFiles = Callable[[Path], Collection[str] | None]


@dataclass(frozen=True)
class Removal:
    """One path gc removes: a run directory or a cached task result."""

    path: str
    kind: str  # "run" | "result"
    bytes: int  # what removing it alone frees (files no other path links)


@dataclass
class GcPlan:
    """What gc keeps (run name -> why) and removes, and the bytes that frees."""

    output_dir: str
    keep_last: int | None
    keep_days: float | None
    kept: dict[str, str] = field(default_factory=dict)
    removals: list[Removal] = field(default_factory=list)
    freed_bytes: int = 0
    dry_run: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "removals": [asdict(r) for r in self.removals]}

    def format_text(self) -> str:
        """One line per removed path, then the total."""
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"{verb} {r.kind} {r.path} ({format_bytes(r.bytes)})" for r in self.removals]
        lines.append(
            f"{verb} {len(self.removals)} path(s), {'would free' if self.dry_run else 'freed'} "
            f"{format_bytes(self.freed_bytes)}; kept {len(self.kept)} run(s)"
        )
        return "\n".join(lines)


def format_bytes(count: int) -> str:
    """A byte count for people: 1.5 MB, 320 kB, 12 B (powers of 1000)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def check_retention(keep_last: int | None, keep_days: float | None) -> None:
    """ConfigError unless each setting is None or >= 0."""
    for name, value in (("keep-last", keep_last), ("keep-days", keep_days)):
        if value is not None and value < 0:
            raise ConfigError(f"Invalid --{name} {value}: expected a number >= 0 (0 keeps none by this rule)")


def _files(paths: list[Path]) -> list[os.stat_result]:
    stats = []
    for path in paths:
        candidates = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
        stats.extend(p.lstat() for p in candidates)
    return stats


def disk_usage(paths: list[Path]) -> int:
    """Bytes of the files under `paths`, each inode once (like `du`: hard links counted once)."""
    return sum({(s.st_dev, s.st_ino): s.st_size for s in _files(paths)}.values())


def freed_by(paths: list[Path]) -> int:
    """Bytes that deleting `paths` frees: inodes all of whose links are under `paths`, each once."""
    return _freed(_files(paths))


def _freed(stats: list[os.stat_result]) -> int:
    links: dict[tuple[int, int], list[os.stat_result]] = {}
    for stat in stats:
        links.setdefault((stat.st_dev, stat.st_ino), []).append(stat)
    return sum(found[0].st_size for found in links.values() if len(found) >= found[0].st_nlink)


def champion_runs(output_dir: Path | str) -> dict[str, str]:
    """Run name -> the champion slot(s) under `<output>/models/` it fills."""

    models = Path(output_dir) / MODELS_SUBDIR
    runs: dict[str, str] = {}
    for slot in sorted(models.iterdir()) if models.is_dir() else []:
        if slot.name.startswith(".") or not slot.is_symlink():
            continue
        champion = read_champion(output_dir, slot.name)
        if champion is not None:
            runs[champion.run_name] = ", ".join(filter(None, [runs.get(champion.run_name), slot.name]))
    return runs


def _age_days(started_at: str | None, run_dir: Path, now: float) -> float:
    try:
        started = datetime.fromisoformat(started_at).timestamp() if started_at else run_dir.stat().st_mtime
    except ValueError:
        started = run_dir.stat().st_mtime
    return (now - started) / 86400


def _busy(run_dir: Path, now: float) -> bool:
    """Modified in the last BUSY_SECONDS: the directory itself or its manifest."""
    paths = [run_dir, run_dir / MANIFEST_NAME]
    return any(now - p.stat().st_mtime < BUSY_SECONDS for p in paths if p.exists())


def _orphaned_results(output_dir: Path, removed_runs: list[Path], result_files: ResultFiles | None) -> list[Path]:
    """Result records that refer to a file of a removed run (see the module docstring)."""
    store = output_dir / RESULTS_SUBDIR
    removed = {run.resolve() for run in removed_runs}
    orphans = []
    for record in sorted(store.iterdir()) if store.is_dir() and removed and result_files else []:
        if not record.is_file() or record.name.startswith("."):
            continue
        files = result_files(record) or ()
        if any(not removed.isdisjoint(Path(file).parents) for file in files):
            orphans.append(record)
    return orphans


def plan_gc(
    output_dir: Path | str,
    keep_last: int | None,
    keep_days: float | None,
    keep: Collection[str] = (),
    result_files: ResultFiles | None = None,
) -> GcPlan:
    """Decide what gc removes under `output_dir`, never the runs named in `keep` (e.g. the run
    that is finishing), with the cached results `result_files` finds orphaned; removes nothing
    (see `collect_garbage`)."""

    check_retention(keep_last, keep_days)
    output = Path(output_dir)
    plan = GcPlan(output_dir=str(output), keep_last=keep_last, keep_days=keep_days)
    champions = champion_runs(output)
    rows = list_runs(output)  # oldest first
    newest = {row["name"] for row in rows[max(0, len(rows) - keep_last) :]} if keep_last else set()
    now = time.time()
    removed: list[Path] = []
    for row in rows:
        name, run_dir = row["name"], Path(row["path"])
        if name in keep:
            plan.kept[name] = "this run"
        elif name in champions:
            plan.kept[name] = f"champion ({champions[name]})"
        elif row["status"] == "running":
            plan.kept[name] = "running"
        elif _busy(run_dir, now):
            plan.kept[name] = f"modified in the last {BUSY_SECONDS:.0f} s"
        elif name in newest:
            plan.kept[name] = f"one of the newest {keep_last}"
        elif keep_days is not None and _age_days(row["date"], run_dir, now) < keep_days:
            plan.kept[name] = f"younger than {keep_days:g} days"
        else:
            removed.append(run_dir)
    results = _orphaned_results(output, removed, result_files)
    plan.removals = [Removal(str(p), "run", freed_by([p])) for p in removed]
    plan.removals += [Removal(str(p), "result", p.stat().st_size) for p in results]
    plan.freed_bytes = freed_by([*removed, *results])
    return plan


def _remove_run(run_dir: Path) -> bool:
    """Delete a run directory unless it came back to life since the plan (a resumed run): it is
    first renamed to a hidden name, so a run resuming it from now on starts a new directory."""
    try:
        if _busy(run_dir, time.time()) or Manifest.load(run_dir).apparent_status == "running":
            return False
    except ConfigError:
        pass  # no manifest: nothing can resume it
    hidden = run_dir.with_name(f"{_REMOVING_PREFIX}{run_dir.name}")
    try:
        os.replace(run_dir, hidden)
    except FileNotFoundError:
        return False
    shutil.rmtree(hidden)
    return True


def lock_file(locks_dir: Path | str, key: str) -> Path:
    """The flock file of the cached result `key` in a store's LOCKS_SUBDIR (one per key)."""
    return Path(locks_dir) / f"{key}.lock"


def _remove_result(record: Path) -> bool:
    """Delete a result record under its key's lock (tasks/caching.py: FlockLockManager); a key
    in use now is left for the next gc."""
    fd = try_lock(lock_file(record.parent / LOCKS_SUBDIR, record.name))
    if fd is None:
        return False
    try:
        record.unlink(missing_ok=True)
    finally:
        unlock(fd)
    return True


def collect_garbage(
    output_dir: Path | str,
    keep_last: int | None,
    keep_days: float | None,
    keep: Collection[str] = (),
    dry_run: bool = False,
    result_files: ResultFiles | None = None,
) -> GcPlan:
    """Plan gc and, unless `dry_run`, carry it out; the plan lists what was really removed (a run
    that came back to life or a result in use since the plan stays)."""
    plan = plan_gc(output_dir, keep_last, keep_days, keep, result_files)
    plan.dry_run = dry_run
    if dry_run:
        return plan
    stats = {r.path: _files([Path(r.path)]) for r in plan.removals}  # before they go
    plan.removals = [
        r for r in plan.removals if (_remove_run(Path(r.path)) if r.kind == "run" else _remove_result(Path(r.path)))
    ]
    plan.freed_bytes = _freed([stat for r in plan.removals for stat in stats[r.path]])
    return plan
