"""Batch scoring: classify a folder, a glob or a listed set of image files with one model, into a
table (one row per file: path, file sha256, status, top-k classes and probabilities, the model's
version).

Decisions:
- The model is resolved once (`resolve_model`): a checkpoint, an export folder, or
  `champion:SLOT`, whose link is followed once to its version folder; every row records the
  weights' sha256, so a promotion while scoring cannot mix two models in one table.
- Memory stays flat in the number of images: files are decoded by DataLoader workers batch by
  batch with the model's own preprocessing (`evaluation.input_pipeline`), and rows are written
  to Parquet shards (`<table folder>/.<table name>.shards/`), each written atomically and named
  by the sha256 of the model version, top-k and its files' paths and contents. A rerun (after
  Ctrl-C or kill -9) scores only the shards that are missing; the table is then assembled shard
  by shard (a Parquet row group each, or CSV rows).
- Shard boundaries are content-defined: a file ends its shard when the hash of its path falls in
  1 of `shard_size` values (`_ends_shard`), so adding, removing or changing one file rescores
  only the shard it falls in (its neighbours keep their boundaries); shards hold `shard_size`
  files on average.
- One bad file never stops the batch: it is a row with status `unreadable` and the reason.
- The table's suffix picks its format (`TABLE_FORMATS`): Parquet (typed: probabilities are
  floats, missing values null) or CSV, written from the same shards.
"""

from __future__ import annotations

import glob
import hashlib
import heapq
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from pydantic import BaseModel, ConfigDict, Field

from visionflow.errors import CheckpointError, ConfigError, DatasetError, check_directory, one_line, path_error
from visionflow.fileio import atomic_write, file_sha256

if TYPE_CHECKING:
    import pyarrow as pa
    import torch
    from torch import Tensor, nn

    from visionflow.train.records import ModelSpec

CHAMPION_PREFIX = "champion:"
PATH_COLUMN = "path"  # the column of a CSV/Parquet input listing the files to score
LIST_SUFFIXES = (".csv", ".parquet")  # an input file with one of these suffixes lists the images
# The table's formats, by its suffix; the first is the default: Parquet keeps the column types.
TABLE_FORMATS = (".parquet", ".csv")
SHARD_SUFFIX = ".parquet"  # shards are Parquet whatever the table's format: typed, read back exactly
OK, UNREADABLE = "ok", "unreadable"  # the status column's values
LOWEST_K = 16  # lowest-confidence images kept for the summary: one grid in the Prefect UI
GLOB_CHARACTERS = frozenset("*?[")  # inputs holding one of these (and naming no file or folder) are a glob
INPUTS_HELP = "a folder (searched recursively), a glob ('inbox/**/*.jpg'), or a .csv/.parquet file with a 'path' column"
MODEL_HELP = "a training checkpoint (.pt), an export folder, or champion:SLOT (the champion under the output folder)"


class ScoreConfig(BaseModel):
    """What to score, with which model, into which table: the `score-images` flow's parameter and
    the `visionflow score` command's options."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    inputs: str = Field(description=f"The images: {INPUTS_HELP}.")
    checkpoint: str = Field("champion:nightly", description=f"The model: {MODEL_HELP}.")
    table: str = Field(
        f"artifacts/scores/scores{TABLE_FORMATS[0]}",
        description=f"The table to write; its suffix picks the format: {' or '.join(TABLE_FORMATS)}.",
    )
    output_dir: str = Field("artifacts", description="Output folder whose models/<slot> champion:SLOT names.")
    top_k: int = Field(5, ge=1, description="Classes (and probabilities) per row, most probable first.")
    batch_size: int = Field(64, ge=1, description="Images per forward pass.")
    # 1024 rows: a shard's write costs well under 1% of scoring it; a kill loses about that much work.
    shard_size: int = Field(
        1024, ge=1, description="Rows per shard on average: what a killed run may have to score again."
    )
    num_workers: int | None = Field(None, ge=0, description="DataLoader decoding processes (None: cores, at most 8).")
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, mps, cuda or cuda:N.")


def score_config(values: dict[str, Any]) -> ScoreConfig:
    """A ScoreConfig from plain values; an invalid one -> one-line ConfigError naming the field."""
    from pydantic import ValidationError

    from visionflow.errors import field_problem

    try:
        return ScoreConfig.model_validate(values)
    except ValidationError as err:
        raise ConfigError(f"Invalid scoring option {field_problem(err, 'options')}") from None


@dataclass(frozen=True)
class ScoringModel:
    """A model resolved once for a whole scoring run."""

    model: nn.Module
    spec: ModelSpec
    version: str  # sha256 of its weights (checkpoints.weights_sha256): written in every row
    path: Path  # what it was loaded from (a champion's version folder, not the slot link)


@dataclass
class ScoreSummary:
    """What a scoring run wrote: counts, classes, and the least confident images."""

    table: str
    model_version: str
    images: int
    scored: int  # images scored by this call (the others came from shards of an earlier call)
    unreadable: int
    class_counts: dict[str, int]  # top-1 class -> images
    lowest: list[dict[str, Any]] = field(default_factory=list)  # {path, class, probability}, least confident first


# ---------------------------------------------------------------------------------------------
# The model and the inputs


def model_path(checkpoint: str, output_dir: Path | str) -> Path:
    """The file or folder `checkpoint` names; `champion:SLOT` -> that slot's current version folder."""
    from visionflow.champion import read_champion, slot_path

    if not checkpoint.startswith(CHAMPION_PREFIX):
        return Path(checkpoint)
    slot = checkpoint.removeprefix(CHAMPION_PREFIX)
    champion = read_champion(output_dir, slot)
    if champion is None:
        raise CheckpointError(
            f"Champion slot '{slot_path(output_dir, slot)}' is empty: expected {MODEL_HELP}; "
            f"train with output.champion={slot} to promote a model into it"
        )
    return champion.path


def resolve_model(checkpoint: str, output_dir: Path | str) -> ScoringModel:
    """Load the model `checkpoint` names (see `model_path`), once, with its weights' sha256."""
    from visionflow.checkpoints import load_model, weights_sha256

    path = model_path(checkpoint, output_dir)
    model, spec = load_model(path)
    return ScoringModel(model, spec, weights_sha256(model.state_dict()), path)


def _listed_paths(listing: Path) -> list[Path]:
    import pandas as pd
    from pyarrow import ArrowException

    try:
        frame = pd.read_csv(listing) if listing.suffix == ".csv" else pd.read_parquet(listing)
    except (ValueError, ArrowException) as err:  # not CSV or not Parquet
        raise DatasetError(f"Cannot read input listing '{listing}': {one_line(err)}") from None
    if PATH_COLUMN not in frame.columns:
        raise DatasetError(
            f"Input listing '{listing}' has no '{PATH_COLUMN}' column: it has {', '.join(map(str, frame.columns))}"
        )
    return [listing.parent / str(value) for value in frame[PATH_COLUMN]]  # relative to the listing


def resolve_inputs(inputs: str) -> list[Path]:
    """The image files `inputs` names (INPUTS_HELP), absolute, in a stable order; none is an error.
    A folder yields its image files (by extension); a glob or a listing yields every file it names."""
    from visionflow.data.images import is_image_file

    source = Path(inputs)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.is_file() and is_image_file(p))
    elif source.is_file() and source.suffix in LIST_SUFFIXES:
        paths = _listed_paths(source)
    elif GLOB_CHARACTERS & set(inputs):
        paths = sorted(Path(p) for p in glob.glob(inputs, recursive=True) if os.path.isfile(p))
    elif not source.exists():
        raise path_error(FileNotFoundError(2, "No such file or directory", inputs), INPUTS_HELP)
    else:
        raise DatasetError(f"Cannot score '{inputs}': expected {INPUTS_HELP}")
    if not paths:
        raise DatasetError(f"No image files in '{inputs}': expected {INPUTS_HELP}")
    return [p.absolute() for p in paths]


# ---------------------------------------------------------------------------------------------
# Shards


@dataclass(frozen=True)
class _Chunk:
    """Consecutive inputs up to a shard boundary (`_ends_shard`): scored and written as one shard."""

    paths: tuple[str, ...]
    hashes: tuple[str, ...]  # "" for a file that cannot be read
    shard: Path


def _hash_or_blank(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError:
        return ""  # the worker reports why it cannot be read


def shards_dir(table: Path) -> Path:
    """Where a table's shards live: `.<table name>.shards/` beside it."""
    return table.parent / f".{table.name}.shards"


def _ends_shard(path: str, shard_size: int) -> bool:
    """Whether the file `path` is the last of its shard: true for 1 in `shard_size` paths, by the
    path's hash alone, so a file added, removed or changed moves no boundary but its own."""
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") % shard_size == 0


def _chunks(paths: Sequence[Path], table: Path, version: str, config: ScoreConfig) -> list[_Chunk]:
    """The inputs cut at content-defined boundaries, each chunk with its shard file (named by the
    model version, the top-k and its files' paths and contents)."""
    from visionflow.data.images import thread_map

    names = [str(p) for p in paths]
    hashes = thread_map(_hash_or_blank, list(paths))
    ends = [index + 1 for index, name in enumerate(names[:-1]) if _ends_shard(name, config.shard_size)]
    chunks = []
    starts = [0, *ends] if names else []  # no inputs: no chunk
    for start, end in zip(starts, [*ends, len(names)]):
        key = hashlib.sha256(f"{version}\0{config.top_k}\0".encode())
        for name, sha in zip(names[start:end], hashes[start:end]):
            key.update(f"{name}\0{sha}\n".encode())
        shard = shards_dir(table) / f"{key.hexdigest()[:32]}{SHARD_SUFFIX}"
        chunks.append(_Chunk(tuple(names[start:end]), tuple(hashes[start:end]), shard))
    return chunks


def table_schema(top_k: int) -> pa.Schema:
    """The table's columns and their types, top-k pairs from the most probable class on. Null: the
    sha256 of a file that cannot be read, the reason of a scored file, the classes and
    probabilities of an unscored one."""
    import pyarrow as pa

    text = [(name, pa.string()) for name in (PATH_COLUMN, "sha256", "status", "reason", "model_version")]
    ranked = [(f"class_{rank}", pa.string()) for rank in range(1, top_k + 1)]
    probabilities = [(f"probability_{rank}", pa.float64()) for rank in range(1, top_k + 1)]
    return pa.schema(text + [column for pair in zip(ranked, probabilities) for column in pair])


def table_columns(top_k: int) -> list[str]:
    """The table's column names (`table_schema`)."""
    return table_schema(top_k).names


# ---------------------------------------------------------------------------------------------
# Decoding and scoring


class _ImageFiles:
    """A map-style dataset over image files: (model input, "" or why it cannot be read). No index:
    batches come back in order, and each tensor a worker returns costs a socket connection."""

    def __init__(self, paths: Sequence[str], spec: ModelSpec) -> None:
        from visionflow.evaluation import input_pipeline

        self.paths, self.pipeline, self.size = paths, input_pipeline(spec), spec.input_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        import torch

        from visionflow.data.images import UnreadableImage, load_rgb

        try:
            return self.pipeline(load_rgb(self.paths[index])), ""
        except UnreadableImage as err:
            reason = err.reason
        except OSError as err:  # missing, a folder, no permission
            reason = (err.strerror or type(err).__name__).lower()
        return torch.zeros(3, self.size, self.size), reason


def _shard_table(
    chunk: _Chunk, scored: dict[int, tuple], reasons: dict[int, str], model: ScoringModel, top_k: int
) -> pa.Table:
    """The chunk's rows in input order (`scored`: offset -> (top class indices, their probabilities);
    `reasons`: offset -> why it was not scored) as a pyarrow table of `table_schema(top_k)`."""
    import pyarrow as pa

    schema, classes = table_schema(top_k), model.spec.class_names
    rows = []
    for offset, (path, sha) in enumerate(zip(chunk.paths, chunk.hashes)):
        row: list[Any] = [
            path,
            sha or None,
            UNREADABLE if offset in reasons else OK,
            reasons.get(offset),
            model.version,
        ]
        if offset not in reasons:
            ranked, probabilities = scored[offset]
            row += [value for pair in zip((classes[i] for i in ranked), probabilities) for value in pair]
        rows.append(row + [None] * (len(schema) - len(row)))
    columns = [pa.array(values, kind) for values, kind in zip(zip(*rows), schema.types)]
    return pa.Table.from_arrays(columns, schema=schema)


def _batches(pending: Sequence[_Chunk], batch_size: int) -> list[list[int]]:
    """Positions in the pending chunks' concatenated files, `batch_size` at a time, never across two chunks."""
    batches, first = [], 0
    for chunk in pending:
        end = first + len(chunk.paths)
        batches += [list(range(start, min(start + batch_size, end))) for start in range(first, end, batch_size)]
        first = end
    return batches


def _score_chunk(
    batches: Iterator, chunk: _Chunk, model: ScoringModel, config: ScoreConfig, device: torch.device
) -> pa.Table:
    """The chunk's shard: the model run on its batches, the next ones `batches` yields."""
    import torch

    from visionflow.train.engine import collect_logits

    reasons: dict[int, str] = {}  # offset in the chunk -> why its file was not scored

    def inputs() -> Iterator[tuple[Tensor, Tensor]]:
        offset = 0
        for _ in range(-(-len(chunk.paths) // config.batch_size)):  # ceil: the chunk's batches
            images, why = next(batches)
            reasons.update({offset + i: reason for i, reason in enumerate(why) if reason})
            yield images, torch.arange(offset, offset + len(why))  # blank images of unreadable files too
            offset += len(why)

    # One call and one softmax per chunk, no masked copy of a batch: on cores busy decoding, each small
    # per-batch op waits for threads (docs/performance.md); a blank image's forward pass costs less.
    logits, offsets = collect_logits(model.model, inputs(), device, flip=model.spec.test_flip)
    best, ranked = logits.softmax(dim=1).topk(min(config.top_k, logits.shape[1]))  # (N, K) each
    scored = dict(zip(offsets.tolist(), zip(ranked.tolist(), best.tolist())))
    return _shard_table(chunk, scored, reasons, model, config.top_k)


def _score_chunks(model: ScoringModel, pending: Sequence[_Chunk], config: ScoreConfig) -> None:
    """Decode the pending chunks' files on DataLoader workers, run the model, write each chunk's shard."""
    import pyarrow.parquet as pq
    from torch.utils.data import DataLoader

    from visionflow.data.decoded import default_num_workers
    from visionflow.train.device import resolve_device

    device = resolve_device(config.device)
    model.model.to(device)
    files = _ImageFiles([path for chunk in pending for path in chunk.paths], model.spec)
    workers = config.num_workers if config.num_workers is not None else default_num_workers()
    batches = iter(DataLoader(files, batch_sampler=_batches(pending, config.batch_size), num_workers=workers))
    for chunk in pending:
        shard = _score_chunk(batches, chunk, model, config, device)
        atomic_write(chunk.shard, lambda handle, shard=shard: pq.write_table(shard, handle))


# ---------------------------------------------------------------------------------------------
# The table


def _table_writer(table: Path, handle: Any, schema: pa.Schema) -> Any:
    """A pyarrow writer of `table`'s format (its suffix, TABLE_FORMATS) onto `handle`."""
    import pyarrow.csv
    import pyarrow.parquet

    if table.suffix == ".csv":
        return pyarrow.csv.CSVWriter(handle, schema, write_options=pyarrow.csv.WriteOptions(quoting_style="needed"))
    return pyarrow.parquet.ParquetWriter(handle, schema)


def _count(shard: pa.Table, counts: Counter[str], summary: ScoreSummary) -> None:
    """Add a shard's top-1 classes to `counts`, its unreadable files and least confident images to `summary`."""
    frame = shard.select([PATH_COLUMN, "status", "class_1", "probability_1"]).to_pandas()
    ok = frame[frame["status"] == OK]
    counts.update(ok["class_1"])
    summary.unreadable += len(frame) - len(ok)
    least = ok.nsmallest(LOWEST_K, "probability_1")
    found = [{"path": p, "class": c, "probability": float(v)} for p, _, c, v in least.itertuples(index=False)]
    summary.lowest = heapq.nsmallest(LOWEST_K, summary.lowest + found, key=lambda row: row["probability"])


def _assemble(chunks: Sequence[_Chunk], table: Path, top_k: int, summary: ScoreSummary) -> None:
    """Write the table from the shards (a Parquet row group or CSV rows each), one shard in memory at
    a time, and count into `summary`."""
    import pyarrow.parquet as pq

    counts: Counter[str] = Counter()

    def write(handle: Any) -> None:
        with _table_writer(table, handle, table_schema(top_k)) as writer:
            for chunk in chunks:
                shard = pq.read_table(chunk.shard)
                writer.write_table(shard)
                _count(shard, counts, summary)

    atomic_write(table, write)
    summary.class_counts = dict(sorted(counts.items()))


def _prune(chunks: Sequence[_Chunk], table: Path) -> None:
    """Remove the table's shards that no chunk of this run names (other inputs, models or top-k)."""
    current = {chunk.shard for chunk in chunks}
    for stale in set(shards_dir(table).glob(f"*{SHARD_SUFFIX}")) - current:
        stale.unlink(missing_ok=True)


def score_images(model: ScoringModel, paths: Sequence[Path], config: ScoreConfig) -> ScoreSummary:
    """Score `paths` with `model` into `config.table`, reusing the shards an earlier call wrote."""
    table = Path(config.table)
    if table.suffix not in TABLE_FORMATS:
        raise ConfigError(f"Invalid table '{table}': expected a file name ending in {' or '.join(TABLE_FORMATS)}")
    check_directory(table.parent, "a folder for the scores table", writable=True)
    chunks = _chunks(paths, table, model.version, config)
    pending = [chunk for chunk in chunks if not chunk.shard.is_file()]
    if pending:
        _score_chunks(model, pending, config)
    summary = ScoreSummary(str(table), model.version, len(paths), sum(len(c.paths) for c in pending), 0, {})
    _assemble(chunks, table, config.top_k, summary)
    _prune(chunks, table)
    return summary


def inputs_fingerprint(paths: Sequence[Path]) -> str:
    """sha256 over every input's path and content: what a cached scoring result is keyed on."""
    from visionflow.data.images import thread_map

    digest = hashlib.sha256()
    for path, sha in zip(paths, thread_map(_hash_or_blank, list(paths))):
        digest.update(f"{path}\0{sha}\n".encode())
    return digest.hexdigest()


def write_lowest_png(summary: ScoreSummary) -> Path:
    """The least confident images as a captioned grid, `<table>.lowest.png` beside the table."""
    from visionflow.reports import render_misclassified, write_png

    examples = [
        {"file": row["path"], "true": "unlabelled", "predicted": row["class"], "probability": row["probability"]}
        for row in summary.lowest
    ]
    return write_png(render_misclassified(examples), Path(summary.table).with_suffix(".lowest.png"))
