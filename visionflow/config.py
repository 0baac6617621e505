"""Typed pipeline configuration: one pydantic model, sections for data, model, optimization,
training and output. It is the flow's parameter (the Prefect UI renders it as a form), it is
saved resolved into every checkpoint and manifest, and bad values are rejected naming the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from visionflow.errors import ConfigError, field_problem

Optimizer = Literal["sgd", "adam", "adamw"]
Scheduler = Literal["none", "step", "cosine", "onecycle"]
Loader = Literal["auto", "memory", "stream"]  # data.loader
OnInvalid = Literal["skip", "fail"]  # data.on_invalid
OnLeak = Literal["report", "drop-eval", "fail"]  # data.on_leak
SweepMethod = Literal["grid", "random", "optuna"]  # a sweep's method (visionflow.sweep), here for the CLI's choices
# data.near_duplicate_threshold's default: re-encoded, resized and lightly cropped copies correlate
# above it, different photos of one scene below (rates: tests/core/data/test_near_duplicates.py).
NEAR_DUPLICATE_THRESHOLD = 0.9
# training.monitor -> whether a higher ("max") or a lower ("min") value is better: the one table
# (Lightning's `mode` per metric). The Monitor choices are its keys; `monitor_mode` reads it.
MONITOR_MODES: dict[str, Literal["max", "min"]] = {"eval_accuracy": "max", "eval_loss": "min"}
Monitor = Literal[tuple(MONITOR_MODES)]  # training.monitor, a sweep's metric
MODEL_NAMES = ("tudui", "resnet18")  # the keys of visionflow.models.MODELS (checked by a test), torch-free


def one_of(kind: str, value: str, names: Iterable[str]) -> str:
    """`value` if it is one of `names`, else ValueError naming it and the valid ones."""
    if value not in names:
        raise ValueError(f"Invalid {kind} '{value}'. Choose from: {', '.join(sorted(names))}")
    return value


NAME_CHARS = "A-Za-z0-9._-"  # of run, champion slot and sweep names: safe in folder names and URLs
RUN_NAME_MAX = 100  # characters of a run's name (its directory's name)


def name_pattern(max_length: int = RUN_NAME_MAX) -> str:
    """The regex of a run, champion slot or sweep name: a letter or digit, then NAME_CHARS, at
    most `max_length` characters in all."""
    return f"^[A-Za-z0-9][{NAME_CHARS}]{{0,{max_length - 1}}}$"


class _Section(BaseModel):
    # extra="forbid": a misspelt key in a YAML file is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    dataset: str = Field(
        "sample", description="Dataset SPEC: 'sample', 'cifar10', or a folder path (ImageFolder layout)."
    )
    data_dir: str = Field("data", description="Where downloads, the bundled sample and the decoded-tensor cache live.")
    image_size: int = Field(32, ge=8, le=1024, description="Square input size in pixels; images are resized to it.")
    val_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Held-out fraction when a folder has no val/ or test/ split."
    )
    split_seed: int = Field(0, ge=0, description="Seed of that held-out split (independent of the training seed).")
    on_invalid: OnInvalid = Field(
        "skip", description="Unreadable images: leave them out and report ('skip') or stop ('fail')."
    )
    near_duplicates: bool = Field(
        False,
        description="Also search near-duplicates (re-encoded, resized, cropped, brightened or mirrored copies) "
        "within and across splits during validation (linear in the images; cost in docs/performance.md).",
    )
    near_duplicate_threshold: float = Field(
        NEAR_DUPLICATE_THRESHOLD,
        gt=0.0,
        le=1.0,
        description="Minimum pixel correlation (16x16 grayscale, best alignment) of a near-duplicate pair.",
    )
    on_leak: OnLeak = Field(
        "report",
        description="Eval images with a near-duplicate in train: only report them ('report'), evaluate without "
        "them and report both accuracies ('drop-eval'), or stop ('fail'). Needs near_duplicates.",
    )
    batch_size: int = Field(64, ge=1, le=65536, description="Images per optimizer step.")
    shuffle: bool = Field(True, description="Reshuffle the training set every epoch.")
    drop_last: bool = Field(False, description="Drop the last incomplete training batch.")
    loader: Loader = Field(
        "auto",
        description="memory (each split decoded once into a uint8 tensor in RAM, cached on disk), stream "
        "(DataLoader workers decode and resize each batch from the files: RAM flat in the dataset's size) or "
        "auto (memory while the decoded train and eval splits fit data.memory_budget_mb, else stream). "
        "Both give the same batches.",
    )
    memory_budget_mb: float | None = Field(
        None, gt=0, description="RAM (MiB) the memory loader may fill under auto; None = a quarter of this machine's."
    )
    num_workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Stream loader's decoding processes (per loader: train and eval each have theirs); "
        "None = the usable cores, at most 8; 0 = decode in the training process.",
    )
    augment: bool | None = Field(
        None,
        description="Random crop (after data.crop_padding pixels of zero padding) + horizontal flip on training "
        "batches; None = from the recipe.",
    )
    crop_padding: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Pixels of zero padding around each training image before its random crop, when data.augment "
        "is on: shifts of up to that many pixels (0: flips only); None = from the recipe.",
    )
    test_flip: bool | None = Field(
        None,
        description="Evaluate and predict on each image and its mirror image, averaging the two logits "
        "(twice the evaluation forward passes, recorded in the model spec); None = from the recipe.",
    )
    mean: list[float] | None = Field(
        None,
        min_length=3,
        max_length=3,
        description="Per-channel normalization mean; None = computed from the train split.",
    )
    std: list[float] | None = Field(
        None,
        min_length=3,
        max_length=3,
        description="Per-channel normalization std; None = computed from the train split.",
    )


class ModelConfig(_Section):
    name: str = Field(
        "tudui", description="Model name from the registry: tudui (the tutorial's CIFAR-10 net) or resnet18."
    )
    whiten: bool | None = Field(
        None,
        description="Initialize the first convolution as a whitening of the train split's image patches "
        "(top eigenvectors of their covariance); None = from the recipe.",
    )

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return one_of("model", value, MODEL_NAMES)


class OptimConfig(_Section):
    recipe: str = Field("default", description="Named preset filling the fields left empty below: default or tutorial.")
    optimizer: Optimizer | None = Field(None, description="sgd, adam or adamw; None = from the recipe.")
    lr: float | None = Field(None, gt=0.0, le=10.0, description="Peak learning rate; None = from the recipe.")
    momentum: float | None = Field(None, ge=0.0, lt=1.0, description="SGD momentum; None = from the recipe.")
    nesterov: bool | None = Field(None, description="SGD Nesterov momentum; None = from the recipe.")
    weight_decay: float | None = Field(None, ge=0.0, description="Weight decay; None = from the recipe.")
    scheduler: Scheduler | None = Field(None, description="none, step, cosine or onecycle; None = from the recipe.")
    step_size: int | None = Field(None, ge=1, description="Epochs between decays for the step scheduler.")
    gamma: float | None = Field(None, gt=0.0, le=1.0, description="Decay factor for the step scheduler.")
    label_smoothing: float | None = Field(
        None, ge=0.0, lt=1.0, description="Cross-entropy label smoothing; None = from the recipe."
    )
    grad_clip: float | None = Field(None, ge=0.0, description="Max gradient L2 norm, 0 = off; None = from the recipe.")

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, value: str) -> str:
        return one_of("recipe", value, RECIPES)


class DistributedConfig(_Section):
    """Data-parallel training through torchrun (docs/guides/distributed.md); the defaults train in one process."""

    nproc_per_node: int | Literal["gpu"] = Field(
        1,
        description="Ranks (processes) per node: an integer, or 'gpu' = one per visible CUDA device; 1 with "
        "nnodes 1 = a single process (no torchrun). data.batch_size is the global batch over all ranks.",
    )
    nnodes: int = Field(1, ge=1, description="Nodes taking part; more than 1 needs rdzv_endpoint.")
    rdzv_endpoint: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9.\-\[\]:]+:\d+$",
        description="HOST:PORT of the c10d rendezvous (several nodes); None = torchrun --standalone on one node.",
    )
    rdzv_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]{1,128}$",
        description="Rendezvous id shared by the nodes of one run; None = the run directory's name.",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend: auto (nccl on CUDA, gloo on CPU), gloo or nccl."
    )

    @field_validator("nproc_per_node", mode="before")
    @classmethod
    def _ranks_or_gpu(cls, value: Any) -> Any:
        if value == "gpu":
            return value
        if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
            raise ValueError("expected an integer >= 1 or 'gpu'")
        return int(value)

    @model_validator(mode="after")
    def _endpoint_for_nodes(self) -> "DistributedConfig":
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"nnodes {self.nnodes} needs rdzv_endpoint (HOST:PORT of the rendezvous)")
        return self


def world_size(config: DistributedConfig) -> int:
    """nproc_per_node x nnodes, with nproc_per_node 'gpu' counted on this machine."""
    per_node = config.nproc_per_node
    if per_node == "gpu":
        import torch  # only here: 'gpu' means a CUDA machine, which trains with torch anyway

        per_node = torch.cuda.device_count()
        if per_node == 0:
            raise ConfigError(
                "Invalid config field 'training.distributed.nproc_per_node': 'gpu' but this machine has no "
                "CUDA device; use an integer (ranks on the CPU, gloo backend)"
            )
    return per_node * config.nnodes


def check_global_batch(batch_size: int, ranks: int) -> None:
    """data.batch_size is the global batch: each of `ranks` ranks takes an equal share."""
    if batch_size % ranks:
        raise ConfigError(
            f"Invalid config field 'data.batch_size': {batch_size} does not divide by the world size {ranks} "
            f"(the global batch is split equally over the ranks): use a multiple of {ranks}"
        )


class TrainingConfig(_Section):
    epochs: int = Field(5, ge=1, le=10000, description="Passes over the training split.")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
        description="auto (cuda, then mps, then cpu), cpu, mps, cuda or cuda:N.",
    )
    # Trainings share a device through the Prefect global concurrency limit `device:<device>`
    # (visionflow.train.device_limits): a training waits for its slots, whatever started it (CLI,
    # deployment, sweep trial). This field only sizes a limit visionflow creates on first use;
    # an existing one keeps its size (`prefect gcl update device:cpu --limit N`). Not part of the
    # training cache key: it changes when a training runs, not what it computes.
    device_slots: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Slots of the device's concurrency limit when visionflow creates it: on a GPU or MPS "
        "trainings at once (None = 1), on the CPU cores, a training taking as many as its torch threads "
        "(None = the machine's cores: one plain run at a time, a sweep's parallel trials side by side).",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto (bf16 where the device computes it natively and it is faster, else fp32; "
        "decided once per machine), fp32, or bf16 autocast.",
    )
    channels_last: bool | Literal["auto"] = Field(
        "auto",
        description="channels_last memory format: auto (on for CUDA; on a CPU where it is faster for the model, "
        "measured once per machine), true or false.",
    )
    compile: bool = Field(False, description="Wrap the model in torch.compile.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Data-parallel ranks (torchrun); default one process."
    )
    sync_batchnorm: bool | None = Field(
        None,
        description="SyncBatchNorm across ranks (CUDA only: on CPU BN statistics are per rank); "
        "None = on when the world size is > 1 on CUDA.",
    )
    seed: int = Field(0, ge=0, description="One seed for Python, NumPy, torch, shuffling and augmentation.")
    monitor: Monitor = Field(
        "eval_accuracy", description="Metric that picks the best checkpoint and drives early stopping."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many epochs without improvement; None = never."
    )
    timeout_minutes: float | None = Field(
        None,
        gt=0,
        description="Stop training at a batch boundary after this many minutes of training in one process "
        "(the run ends timed_out; rerunning it resumes from last.pt); None = no limit.",
    )


class OutputConfig(_Section):
    output_dir: str = Field("artifacts", description="Root of run outputs: <output_dir>/runs/<run_name>/.")
    run_name: str | None = Field(
        None, pattern=name_pattern(), description="Run directory name; None = generated, unique."
    )
    refresh: bool = Field(False, description="Ignore cached task results and recompute everything.")
    champion: str | None = Field(
        None,
        pattern=name_pattern(),
        description="Champion slot under <output_dir>/models/: promote this run there when it scores at least "
        "as well as the current champion on training.monitor; None = no promotion.",
    )
    keep_last: int | None = Field(
        None,
        ge=0,
        description="After the run, gc keeps the newest N runs under <output_dir>/runs (and runs younger than "
        "keep_days, the champions' runs, running runs); None with keep_days None = no gc after the run.",
    )
    keep_days: float | None = Field(
        None, ge=0, description="After the run, gc keeps runs younger than this many days; None = no age rule."
    )
    tensorboard_url: str | None = Field(
        None,
        pattern=r"^https?://\S+$",
        description="A TensorBoard serving <output_dir>/runs (e.g. tensorboard --logdir artifacts/runs --bind_all): "
        "each run's Prefect artifacts link to its curves there; None = no such link.",
    )


class PipelineConfig(_Section):
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset and loading.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Architecture.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer, schedule and regularization.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Epochs, device, precision, seed.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where results go.")

    def resolved(self) -> "PipelineConfig":
        """Return a copy with every recipe-controlled field filled in (what a run really used)."""
        recipe = RECIPES[self.optim.recipe]
        optim = {k: (v if v is not None else recipe.get(k)) for k, v in self.optim.model_dump().items()}
        data = self.data.model_dump()
        for key in ("augment", "crop_padding", "test_flip"):
            if data[key] is None:
                data[key] = recipe[key]
        model = self.model.model_copy(
            update={"whiten": recipe["whiten"] if self.model.whiten is None else self.model.whiten}
        )
        return self.model_copy(update={"optim": OptimConfig(**optim), "data": DataConfig(**data), "model": model})


# Named presets filling the recipe fields left None; tuning history: docs/performance.md.
# `tutorial` is the seed tutorial's recipe, kept so users can compare; `default` is what we recommend.
RECIPES: dict[str, dict[str, Any]] = {
    "default": dict(
        optimizer="adamw",  # the tutorial's net has no activations or norm layers: SGD at ResNet rates diverges
        lr=3e-3,  # peak of the one-cycle schedule
        momentum=0.9,  # used only when optim.optimizer is switched to sgd
        nesterov=True,  # likewise (then lower weight_decay to ~5e-4: AdamW's is decoupled)
        weight_decay=0.05,  # decoupled (AdamW): per step x lr
        scheduler="onecycle",  # warm-up then cosine down: the most accuracy in the default few epochs
        step_size=30,  # used only by the step scheduler
        gamma=0.1,  # likewise
        label_smoothing=0.1,  # target mass spread over the other classes: less overconfidence on small data
        grad_clip=0.0,  # off: the one-cycle warm-up keeps the first steps stable
        augment=False,  # too few epochs to gain from random crops and flips
        crop_padding=2,  # when augment is switched on: small shifts, which suit 32 px images
        test_flip=True,  # each eval image and its mirror: more accuracy for twice the eval forward passes
        whiten=True,  # first conv starts as a whitening of image patches (airbench's trick): decorrelated inputs
    ),
    "tutorial": dict(
        optimizer="sgd",  # the tutorial's plain SGD
        lr=0.01,  # the tutorial's constant rate
        momentum=0.0,  # none in the tutorial
        nesterov=False,  # likewise
        weight_decay=0.0,  # likewise
        scheduler="none",  # constant learning rate, as in the tutorial
        step_size=30,  # used only by the step scheduler
        gamma=0.1,  # likewise
        label_smoothing=0.0,  # plain cross-entropy, as in the tutorial
        grad_clip=0.0,  # off, as in the tutorial
        augment=False,  # the tutorial trains on the images as they are
        crop_padding=4,  # when augment is switched on: the classic CIFAR-10 pad-4 crop
        test_flip=False,  # one forward pass per image, as in the tutorial
        whiten=False,  # the tutorial's default initialization
    ),
}


def monitor_mode(metric: str, kind: str = "metric") -> Literal["max", "min"]:
    """MONITOR_MODES[metric]; an unknown name is a ConfigError calling it a `kind`, naming the valid ones."""
    if metric not in MONITOR_MODES:
        raise ConfigError(f"Invalid {kind} '{metric}'. Choose from: {', '.join(sorted(MONITOR_MODES))}")
    return MONITOR_MODES[metric]


def is_improvement(value: float, reference: float | None, monitor: str, *, ties: bool = False) -> bool:
    """Whether ``value`` of metric ``monitor`` beats ``reference`` (None: nothing to beat yet);
    ``ties`` counts an equal value as an improvement."""
    higher_is_better = monitor_mode(monitor) == "max"
    if reference is None or (ties and value == reference):
        return True
    return value > reference if higher_is_better else value < reference


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys: {'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def free_fields(use: Literal["resume", "cache"]) -> frozenset[str]:
    """The config fields (whole dotted names, as `flatten` spells them) that may differ between two
    trainings taken for one: a checkpoint and the run resuming it (`use` "resume"), or two calls of
    the training task sharing a cached result ("cache"). Every other field must be equal. Why each:

    For both uses:
    - output.*: where results are written, under which names, what is cleaned up and linked after.
    - data.data_dir: where downloads and the decoded cache live, not what they hold.
    - data.loader, data.memory_budget_mb, data.num_workers: how batches are read; the memory and
      stream loaders yield the same batches.
    - training.device_slots: when a training may run (the size of its device's concurrency limit).
    - training.timeout_minutes: when training stops; a run that finishes within it trains the same
      weights, and a run it stops resumes to them.
    - training.distributed.nproc_per_node, .nnodes, .rdzv_endpoint, .rdzv_id: how the ranks are
      counted and where they meet; the world size they make is compared on its own (a checkpoint
      records it, the cache key holds it).
    For resuming only (a resumed run continues one computation; a cached result stands for an exact one):
    - training.device: resuming compares the device type on its own (the random streams continue only
      on it), so cuda:0 may resume on cuda:1; the cache key keeps it ('auto' is another device elsewhere).
    - training.compile: how fast the same model runs; compiled kernels may round differently.
    - training.distributed.backend: how the ranks exchange gradients; the reductions may round differently.
    For the cache key only:
    - data.dataset: the cache key holds the dataset's content fingerprint instead of its spelling; a
      checkpoint records only the spelling, so resuming compares that.
    """
    both = {f"output.{name}" for name in OutputConfig.model_fields} | {
        "data.data_dir",
        "data.loader",
        "data.memory_budget_mb",
        "data.num_workers",
        "training.device_slots",
        "training.timeout_minutes",
        "training.distributed.nproc_per_node",
        "training.distributed.nnodes",
        "training.distributed.rdzv_endpoint",
        "training.distributed.rdzv_id",
    }
    only = {
        "resume": {"training.device", "training.compile", "training.distributed.backend"},
        "cache": {"data.dataset"},
    }
    return frozenset(both | only[use])


def build_config(values: dict[str, Any] | None = None) -> PipelineConfig:
    """Validate a nested dict into a PipelineConfig; a bad value raises ConfigError naming the field."""
    try:
        return PipelineConfig.model_validate(values or {})
    except ValidationError as err:
        raise ConfigError(f"Invalid config field {field_problem(err, 'config')}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a YAML config (optional) and apply dotted overrides like {'training.epochs': 3} (any depth:
    'training.distributed.nproc_per_node')."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"Config file '{path}' not found: "
                "expected a YAML file with sections data, model, optim, training, output"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(
                f"Config file '{path}' cannot be read as UTF-8 text ({type(err).__name__}): "
                f"expected a YAML file with sections data, model, optim, training, output"
            ) from None
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"Config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"Config file '{path}' must hold a mapping of sections, got {type(values).__name__}")
    for dotted, value in (overrides or {}).items():
        *sections, key = dotted.split(".")
        target = values
        for depth, section in enumerate(sections, 1):
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"Invalid config field '{'.'.join(sections[:depth])}': expected a mapping")
        target[key] = value
    return build_config(values)
