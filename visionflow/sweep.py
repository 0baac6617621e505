"""Hyperparameter sweeps: the sweep's typed config (a UI form), its search space checked against
`PipelineConfig` before any trial, deterministic trial proposals (grid, seeded random, seeded
optuna TPE), stable trial names, and the leaderboard. No Prefect here: flows/sweep.py fans the
trials out on Dask, each one an ordinary training run (`flows.train.train_pipeline`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from visionflow.config import (
    RUN_NAME_MAX,
    Monitor,
    PipelineConfig,
    SweepMethod,
    build_config,
    flatten,
    monitor_mode,
    name_pattern,
)
from visionflow.cores import usable_cores
from visionflow.errors import ConfigError, field_problem
from visionflow.fileio import atomic_write_json
from visionflow.hparams import log_hparams
from visionflow.manifest import ChampionDecision, Manifest
from visionflow.runs import TENSORBOARD_SUBDIR
from visionflow.tables import TEXT, Table, text_table

SWEEPS_SUBDIR = "sweeps"  # <output_dir>/sweeps/<name>/: validation, LEADERBOARD_NAME, TENSORBOARD_SUBDIR/
LEADERBOARD_NAME = "leaderboard.json"  # the ranked trials, rewritten as each one finishes
SAMPLED_TRIALS = 10  # max_trials of random and optuna when it is not given
# Sections a sweep may vary: `output` is the sweep's own (every trial writes its run beside the others).
SWEEPABLE_SECTIONS = ("data", "model", "optim", "training")
CONFIG_KEYS = tuple(flatten(PipelineConfig().model_dump()))  # every dotted config field
NAME_PATTERN = name_pattern(RUN_NAME_MAX - 20)  # + "-<nnnn>-<6 hex>" stays a valid run name
TrialState = Literal["completed", "cached", "failed"]


class SweepRange(BaseModel):
    """A numeric range to sample (random, optuna): floats, or integers when both ends are integers."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    low: float | int
    high: float | int
    log: bool = Field(False, description="Sample log-uniformly (learning rates, weight decay); needs low > 0.")

    @model_validator(mode="after")
    def _ordered(self) -> SweepRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low})")
        return self

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


class SweepConfig(BaseModel):
    """What a sweep tries and how: the Prefect UI renders it as the sweep's form."""

    model_config = ConfigDict(extra="forbid")
    space: dict[str, SweepRange | list[Any]] = Field(
        description="Dotted config field -> values to try (a list) or a range {low, high, log} (random, optuna); "
        "e.g. optim.lr: [0.001, 0.003], model.name: [tudui, resnet18]."
    )
    method: SweepMethod = Field("grid", description="grid (every combination of the lists), random or optuna (TPE).")
    seed: int = Field(0, ge=0, description="Seed of the random and optuna proposals: the same seed, the same trials.")
    max_trials: int | None = Field(
        None,
        ge=1,
        le=10000,
        description=f"Trials at most; None = every combination (grid), {SAMPLED_TRIALS} otherwise.",
    )
    parallel: int = Field(2, ge=1, le=1024, description="Trials at once (Dask worker processes of a local cluster).")
    metric: Monitor | None = Field(None, description="Metric that ranks the trials; None = training.monitor.")
    dask_address: str = Field(
        "",
        pattern=r"^$|^[a-z]+://\S+$",
        description="Scheduler of an existing Dask cluster (tcp://host:8786); empty = a local cluster of "
        "`parallel` worker processes, one thread each.",
    )
    name: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="Sweep name (trial runs are <name>-<nnn>-<hash>); None = from the space.",
    )


def build_sweep(values: Mapping[str, Any]) -> SweepConfig:
    """Validate a SweepConfig; a bad value raises ConfigError naming the field."""
    try:
        return SweepConfig.model_validate(values)
    except ValidationError as err:
        raise ConfigError(f"Invalid sweep field {field_problem(err, 'sweep')}") from None


def sweep_name(sweep: SweepConfig) -> str:
    """The given name, else `sweep-<8 hex>` of the space, method, seed and max_trials: rerunning
    the same sweep gets the same name, so its finished trials are cached."""
    if sweep.name is not None:
        return sweep.name
    material = sweep.model_dump(mode="json", include={"space", "method", "seed", "max_trials"})
    return f"sweep-{hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:8]}"


def sweep_metric(base: PipelineConfig, sweep: SweepConfig) -> str:
    return sweep.metric or base.training.monitor


def sweep_dir(base: PipelineConfig, sweep: SweepConfig) -> Path:
    """`<output_dir>/sweeps/<name>/`, absolute."""
    return (Path(base.output.output_dir) / SWEEPS_SUBDIR / sweep_name(sweep)).resolve()


def trial_threads(parallel: int, cores: int | None = None) -> int:
    """Torch threads of one trial: the usable cores shared by the trials running at once."""
    return max(1, (cores or usable_cores()) // parallel)


def with_params(base: PipelineConfig, params: Mapping[str, Any]) -> PipelineConfig:
    """`base` with each dotted field of `params` set; a refused value raises ConfigError naming it."""
    values = base.model_dump(mode="json")
    for key, value in params.items():
        section, field = key.split(".", 1)
        values[section][field] = value
    return build_config(values)


def check_space(base: PipelineConfig, sweep: SweepConfig) -> dict[str, list[Any] | SweepRange]:
    """The space with every list value as the config stores it (e.g. '1e-3' -> 0.001); ConfigError
    naming the key for a field that does not exist or may not be swept, an empty list, a value the
    config refuses, or a range where the method needs lists."""
    if not sweep.space:
        raise ConfigError("Sweep space is empty: give at least one dotted config field with values to try")
    checked: dict[str, list[Any] | SweepRange] = {}
    for key, values in sweep.space.items():
        section = key.split(".", 1)[0]
        if key not in CONFIG_KEYS:
            fields = [k for k in CONFIG_KEYS if k.startswith(f"{section}.")] or [f"{s}.*" for s in SWEEPABLE_SECTIONS]
            raise ConfigError(f"Invalid sweep key '{key}': no such config field. Choose from: {', '.join(fields)}")
        if section not in SWEEPABLE_SECTIONS:
            raise ConfigError(
                f"Invalid sweep key '{key}': the sweep sets the {section} fields; "
                f"sweep fields of {', '.join(SWEEPABLE_SECTIONS)}"
            )
        if isinstance(values, SweepRange):
            if sweep.method == "grid":
                raise ConfigError(f"Sweep key '{key}' is a range: grid needs a list of values (ranges: random, optuna)")
            for end in (values.low, values.high):
                _checked_value(base, key, end)
            checked[key] = values
            continue
        if not values:
            raise ConfigError(f"Sweep key '{key}' has no values to try")
        checked[key] = [_checked_value(base, key, value) for value in values]
    return checked


def _checked_value(base: PipelineConfig, key: str, value: Any) -> Any:
    try:
        config = with_params(base, {key: value})
    except ConfigError as err:
        raise ConfigError(f"Sweep space: {err}") from None
    return flatten(config.model_dump(mode="json"))[key]


def load_space(path: str | Path) -> dict[str, Any]:
    """Read a space file: YAML mapping dotted config fields to lists or {low, high, log} ranges."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"Sweep space file '{path}' cannot be read ({type(err).__name__})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"Sweep space file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"Sweep space file '{path}' must map dotted config fields to lists or ranges "
            f"(optim.lr: [0.001, 0.003]), got {type(values).__name__}"
        )
    return values


def trial_name(name: str, index: int, config: PipelineConfig) -> str:
    """`<sweep>-<nnn>-<6 hex>`: the index in proposal order and a digest of everything the trial
    trains with (not where its outputs go): the same sweep reruns into the same run directories, a
    changed base config into new ones."""
    material = config.model_dump(mode="json", exclude={"output"})
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:6]
    return f"{name}-{index:03d}-{digest}"


def trial_config(base: PipelineConfig, params: Mapping[str, Any], name: str, index: int) -> PipelineConfig:
    """The config trial `index` of sweep `name` trains with (resolved: recipe filled in): `base`
    with `params`, into run directory `trial_name(...)`, without champion or gc (the sweep's
    best trial challenges the champion)."""
    config = with_params(base, params).resolved()
    output = config.output.model_copy(
        update={"run_name": trial_name(name, index, config), "champion": None, "keep_last": None, "keep_days": None}
    )
    return config.model_copy(update={"output": output})


# ---------------------------------------------------------------------------------------------
# Proposals


class TrialProposer:
    """Proposes a sweep's trials in batches, deterministically: the same space, method, seed and
    reported results give the same trials. grid and random propose every trial in one batch;
    optuna (TPE) proposes `parallel` at a time and learns from each batch's results, told in
    proposal order (so the completion order of parallel trials does not change the proposals)."""

    def __init__(self, space: Mapping[str, list[Any] | SweepRange], sweep: SweepConfig, direction: str) -> None:
        self.space = dict(space)
        self.method = sweep.method
        self.parallel = sweep.parallel
        self.proposed = 0
        if sweep.method == "grid":
            combinations = itertools.product(*self.space.values())
            self.max_trials = sweep.max_trials or math.prod(len(v) for v in self.space.values())
            self._grid = [dict(zip(self.space, values)) for values in itertools.islice(combinations, self.max_trials)]
        else:
            self.max_trials = sweep.max_trials or SAMPLED_TRIALS
        if sweep.method == "random":
            self._rng = random.Random(sweep.seed)
        if sweep.method == "optuna":
            import optuna  # imported here: only this method needs it

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            sampler = optuna.samplers.TPESampler(seed=sweep.seed)
            direction = "maximize" if direction == "max" else "minimize"
            self._study = optuna.create_study(sampler=sampler, direction=direction)
            self._distributions = {key: _distribution(values) for key, values in self.space.items()}
            self._asked: list[Any] = []

    def next_batch(self) -> list[dict[str, Any]]:
        """The next trials' parameters (dotted field -> value); empty when the sweep is done."""
        size = min(self.max_trials - self.proposed, self.parallel if self.method == "optuna" else self.max_trials)
        if self.method == "grid":
            batch = self._grid[self.proposed : self.proposed + size]
        elif self.method == "random":
            batch = [{key: self._draw(values) for key, values in self.space.items()} for _ in range(size)]
        else:
            self._asked = [self._study.ask(self._distributions) for _ in range(size)]
            batch = [dict(trial.params) for trial in self._asked]
        self.proposed += len(batch)
        return batch

    def report(self, values: Sequence[float | None]) -> None:
        """The metric of each trial of the last batch, in proposal order (None: it failed)."""
        if self.method != "optuna":
            return
        from optuna.trial import TrialState as OptunaState

        for trial, value in zip(self._asked, values, strict=True):
            if value is None or not math.isfinite(value):
                self._study.tell(trial, state=OptunaState.FAIL)
            else:
                self._study.tell(trial, value)

    def _draw(self, values: list[Any] | SweepRange) -> Any:
        if isinstance(values, list):
            return self._rng.choice(values)
        if values.log:
            drawn = math.exp(self._rng.uniform(math.log(values.low), math.log(values.high)))
        else:
            drawn = self._rng.uniform(values.low, values.high)
        return min(max(round(drawn), values.low), values.high) if values.integer else drawn


def _distribution(values: list[Any] | SweepRange) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(values, list):
        return CategoricalDistribution(values)
    if values.integer:
        return IntDistribution(int(values.low), int(values.high), log=values.log)
    return FloatDistribution(float(values.low), float(values.high), log=values.log)


# ---------------------------------------------------------------------------------------------
# Leaderboard


class TrialRow(BaseModel):
    """One trial's line of the leaderboard."""

    model_config = ConfigDict(frozen=True)
    trial: str = Field(description="Trial name = its run directory's name.")
    params: dict[str, Any] = Field(description="The varied fields' values.")
    state: TrialState
    metric: float | None = None
    eval_loss: float | None = None
    eval_top5: float | None = None
    train_seconds: float | None = None
    images_per_second: float | None = None
    weights_sha256: str | None = None
    run_dir: str
    error: str | None = Field(None, description="One line: why the trial failed.")

    @classmethod
    def of(
        cls, trial: str, params: Mapping[str, Any], state: TrialState, run_dir: Path | str, metric: str,
        manifest: Manifest | None = None, error: str | None = None,
    ) -> TrialRow:  # fmt: skip
        """A finished trial's row from its manifest, or a failed one's with the error."""
        metrics, timing = (manifest.metrics, manifest.timing) if manifest is not None else (None, None)
        return cls(
            trial=trial,
            params=dict(params),
            state=state,
            metric=getattr(metrics, metric) if metrics else None,
            eval_loss=metrics.eval_loss if metrics else None,
            eval_top5=metrics.eval_top5 if metrics else None,
            train_seconds=timing.train_seconds if timing else None,
            images_per_second=timing.train_images_per_second if timing else None,
            weights_sha256=manifest.weights_sha256 if manifest is not None else None,
            run_dir=str(run_dir),
            error=error,
        )


def ranked(rows: Sequence[TrialRow], metric: str) -> list[TrialRow]:
    """Finished trials best first by `metric`'s direction (config.monitor_mode), then failed ones."""
    sign = -1.0 if monitor_mode(metric) == "max" else 1.0
    finished = sorted((r for r in rows if r.metric is not None), key=lambda r: (sign * r.metric, r.trial))
    return finished + sorted((r for r in rows if r.metric is None), key=lambda r: r.trial)


def leaderboard_records(rows: Sequence[TrialRow], metric: str) -> list[dict[str, Any]]:
    """The leaderboard table: rank, trial, one column per varied field, metric, eval loss, top-5,
    train seconds, images/s, state (with the error of a failed trial), weights sha256 prefix, run dir."""

    def number(value: float | None, digits: int) -> float | str:
        return "-" if value is None else round(value, digits)

    records = []
    for rank, row in enumerate(ranked(rows, metric), start=1):
        records.append(
            {
                "rank": rank if row.metric is not None else "-",
                "trial": row.trial,
                # 4 significant digits of a sampled float (leaderboard.json keeps every digit)
                **{k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.params.items()},
                metric: number(row.metric, 4),
                "eval_loss": number(row.eval_loss, 4),
                "eval_top5": number(row.eval_top5, 4),
                "train_seconds": number(row.train_seconds, 1),
                "images_per_second": number(row.images_per_second, 0),
                "state": row.state if row.error is None else f"{row.state}: {row.error}",
                "weights_sha256": (row.weights_sha256 or "-")[:12],
                "run_dir": row.run_dir,
            }
        )
    return records


def format_leaderboard(rows: Sequence[TrialRow], metric: str) -> str:
    """The leaderboard as an aligned text table (the run directory left out: one per trial name)."""
    records = [{k: v for k, v in r.items() if k != "run_dir"} for r in leaderboard_records(rows, metric)]
    if not records:
        return "no trials"
    return text_table(Table.of(dict.fromkeys(records[0], TEXT), records))  # leaderboard_records rounded them


def best_config_yaml(manifest: Manifest) -> str:
    """The best trial's config as it trained (recipe and normalization filled in), as YAML for
    `visionflow train --config`: without its run name, so the paste makes a new run."""
    values = manifest.config.model_dump(mode="json")
    values["output"] = {k: v for k, v in values["output"].items() if k not in ("run_name", "champion")}
    return yaml.safe_dump(values, sort_keys=False)


def summary_markdown(name: str, rows: Sequence[TrialRow], metric: str, best: Manifest | None) -> str:
    """The sweep's summary: trial counts, the best trial and its config as YAML."""
    states = [row.state for row in rows]
    counts = ", ".join(f"{states.count(s)} {s}" for s in ("completed", "cached", "failed") if s in states)
    lines = [f"# Sweep {name}", "", f"{len(rows)} trials ({counts}), ranked by {metric}.", ""]
    if best is None:
        return "\n".join([*lines, "No trial finished."])
    top = ranked(rows, metric)[0]
    params = ", ".join(f"{k}={v}" for k, v in top.params.items())
    lines += [
        f"Best: **{top.trial}** ({params}): {metric} {top.metric:.4f}, run directory `{top.run_dir}`.",
        "",
        "Its config, ready for `visionflow train --config best.yaml`:",
        "",
        "```yaml",
        best_config_yaml(best).rstrip(),
        "```",
    ]
    return "\n".join(lines)


def write_trial_hparams(sweep_root: Path | str, row: TrialRow, metric: str) -> Path:
    """Log a finished trial's varied fields and metrics under `<sweep>/tensorboard/<trial>/` (one
    log dir for the whole sweep: TensorBoard's HParams tab compares the trials). Rewritten, not
    appended, when the trial is reported again (a rerun of the sweep)."""
    log_dir = Path(sweep_root) / TENSORBOARD_SUBDIR / row.trial
    shutil.rmtree(log_dir, ignore_errors=True)
    metrics = {metric: row.metric, "eval_loss": row.eval_loss}
    log_hparams(log_dir, row.params, {k: v for k, v in metrics.items() if v is not None})
    return log_dir


def write_leaderboard(sweep_root: Path | str, rows: Sequence[TrialRow], metric: str) -> Path:
    """`<sweep>/leaderboard.json`: the ranked rows."""
    path = Path(sweep_root) / LEADERBOARD_NAME
    atomic_write_json(path, {"metric": metric, "rows": [row.model_dump(mode="json") for row in ranked(rows, metric)]})
    return path


def leaderboard_key(name: str) -> str:
    """The leaderboard's artifact key, `sweep-<name>` (artifact keys: lowercase, digits, dashes)."""
    return "sweep-" + "-".join(part for part in re.split(r"[^a-z0-9]+", name.lower()) if part)


class SweepResult(BaseModel):
    """What a sweep returns (and `visionflow sweep --json` prints)."""

    name: str
    metric: str
    sweep_dir: str
    rows: list[TrialRow] = Field(description="Ranked: finished trials best first, then failed ones.")
    best: str | None = Field(None, description="The best trial's name; None when none finished.")
    champion: ChampionDecision | None = Field(None, description="The champion decision, with a champion slot set.")
