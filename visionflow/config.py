"""Typed pipeline configuration: one pydantic model, sections for data, model, optimization,
training and output. It is the flow's parameter (the Prefect UI renders it as a form), it is
saved resolved into every checkpoint and manifest, and bad values are rejected naming the field.
"""

from __future__ import annotations

import difflib
import math
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
Approval = Literal["auto", "manual"]  # champion.approval
OnLabelIssue = Literal["report", "drop-train"]  # label_issues.on_issue
ExportFormat = Literal[
    "onnx", "torchscript", "safetensors"
]  # visionflow export --format (visionflow.exports), torch-free
SweepMethod = Literal["grid", "random", "optuna"]  # a sweep's method (visionflow.sweep), here for the CLI's choices
# data.near_duplicate_threshold's default: re-encoded, resized and lightly cropped copies correlate
# above it, different photos of one scene below (rates: tests/core/data/test_near_duplicates.py).
NEAR_DUPLICATE_THRESHOLD = 0.9
# training.monitor -> whether a higher ("max") or a lower ("min") value is better: the one table
# (Lightning's `mode` per metric). The Monitor choices are its keys; `monitor_mode` reads it.
MONITOR_MODES: dict[str, Literal["max", "min"]] = {"eval_accuracy": "max", "eval_loss": "min"}
Monitor = Literal[tuple(MONITOR_MODES)]  # training.monitor, a sweep's metric
MODEL_NAMES = ("tudui", "resnet18_cifar")  # the keys of visionflow.models.MODELS (checked by a test), torch-free
TIMM_PREFIX = "timm/"  # model.name timm/<name>: a timm model; any other name not in MODEL_NAMES is torchvision's
# Model names that meant another model in files written before checkpoint format 2 / manifest schema 3:
# 'resnet18' was the CIFAR-stem net, now 'resnet18_cifar' ('resnet18' is torchvision's).
MODEL_RENAMES = {"resnet18": "resnet18_cifar"}
TrainCrop = Literal["pad", "random-resized"]  # data.train_crop
WEIGHTS_NONE, WEIGHTS_IMAGENET = "none", "imagenet"  # model.weights: random init, the model's default weights
WEIGHTS_RUN, WEIGHTS_CHAMPION = "run:", "champion:"  # model.weights prefixes: a run's best.pt, a champion's export
WEIGHTS_SUFFIXES = (".pt", ".pth", ".safetensors")  # model.weights as a local file


def one_of(kind: str, value: str, names: Iterable[str]) -> str:
    """`value` if it is one of `names`, else ValueError naming it and the valid ones."""
    if value not in names:
        raise ValueError(f"Invalid {kind} '{value}'. Choose from: {', '.join(sorted(names))}")
    return value


def close_matches(value: str, names: Iterable[str]) -> str:
    """' (did you mean a, b?)' with up to 3 names like `value`, or '' when none is close."""
    matches = difflib.get_close_matches(value, list(names), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(matches)}?)" if matches else ""


def decode_size(image_size: int, crop_pct: float | None) -> int:
    """Pixels of the square images a split is decoded (and cached) at for a model input of `image_size`
    center-cropped at `crop_pct`: floor(image_size / crop_pct), timm's rule (256 for 224 at 0.875, as
    torchvision's resize 256 / crop 224, 342 for 299 at 299 / 342: rounded to 6 digits first); the
    input size itself at crop_pct 1 or None (an unresolved config: no crop)."""
    return math.floor(round(image_size / (crop_pct or 1.0), 6))


def stored_config(values: Mapping[str, Any], renamed: bool) -> dict[str, Any]:
    """A config dict as a checkpoint or manifest stored it, with the model names of its time brought
    up to now when the file predates MODEL_RENAMES (`renamed` False); fields added since take their
    defaults when it is validated."""
    values = {section: dict(fields) if isinstance(fields, Mapping) else fields for section, fields in values.items()}
    model = values.get("model")
    if not renamed and isinstance(model, dict) and model.get("name") in MODEL_RENAMES:
        model["name"] = MODEL_RENAMES[model["name"]]
    return values


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
    image_size: int | None = Field(
        None,
        ge=8,
        le=1024,
        description="Square model input size in pixels; None = the pretrained weights' own (model.weights), else 32.",
    )
    crop_pct: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Images are resized to image_size / crop_pct and center-cropped to image_size for evaluation "
        "(1 = resized to image_size, no crop); None = the pretrained weights' own, else from the recipe.",
    )
    train_crop: TrainCrop | None = Field(
        None,
        description="Training crop when data.augment is on: 'pad' (random crop after data.crop_padding pixels of "
        "zero padding) or 'random-resized' (RandomResizedCrop, scale 0.08-1, aspect 3/4-4/3); None = from the recipe.",
    )
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
        "tudui",
        description="tudui (the tutorial's CIFAR-10 net), resnet18_cifar (ResNet-18 with a stem for 32 px images), "
        "any torchvision classification model (resnet50, convnext_tiny, ...) or timm/<name> (timm/resnet18.a1_in1k); "
        "the classifier head is made for the dataset's classes.",
    )
    weights: str = Field(
        WEIGHTS_NONE,
        pattern=rf"^({WEIGHTS_NONE}|{WEIGHTS_IMAGENET}|(run|champion):[A-Za-z0-9][{NAME_CHARS}]*|.+\.(pt|pth|safetensors))$",
        description="Initial weights: none (random), imagenet (the model's default pretrained weights, from the "
        "torch hub or Hugging Face cache, downloaded when online), a local .pt/.pth/.safetensors file, run:NAME "
        "(that run's best.pt) or champion:SLOT (that slot's champion); the head is left out.",
    )
    weights_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of the weights file; None = recorded when the run starts. Set (as a run records it), "
        "a file with other contents is refused: what reproduce relies on.",
    )
    freeze_epochs: int | None = Field(
        None,
        ge=0,
        description="Epochs training the classifier head only, the rest of the network frozen (its BatchNorm "
        "statistics too); None = from the recipe.",
    )
    whiten: bool | None = Field(
        None,
        description="Initialize the first convolution as a whitening of the train split's image patches "
        "(top eigenvectors of their covariance); None = from the recipe.",
    )

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value in MODEL_NAMES:
            return value
        from visionflow.models import model_names  # torchvision or timm: only for a name of theirs

        known = model_names(value.startswith(TIMM_PREFIX))
        if value.removeprefix(TIMM_PREFIX) not in known:
            hint = close_matches(value.removeprefix(TIMM_PREFIX), known)
            valid = f"{', '.join(MODEL_NAMES)}, a torchvision classification model or {TIMM_PREFIX}<a timm model>"
            raise ValueError(f"Invalid model '{value}'{hint}. Choose from: {valid}")
        return value


class OptimConfig(_Section):
    recipe: str | None = Field(
        None,
        description="Named preset filling the fields left empty: default, tutorial or finetune; "
        "None = finetune with pretrained model.weights, else default.",
    )
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
    backbone_lr_scale: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Learning rate of everything but the classifier head, as a fraction of optim.lr "
        "(1 = one rate for all); None = from the recipe.",
    )

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, value: str | None) -> str | None:
        return value if value is None else one_of("recipe", value, RECIPES)


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
        description="Champion slot under <output_dir>/models/: promote this run there when it passes "
        "champion.gates against the current champion; None = no promotion.",
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


class GatesConfig(_Section):
    """The checks a challenger must pass to replace a champion (visionflow.gates, docs/guides/promotion.md)."""

    enabled: bool = Field(
        True, description="False: promote when at least as good on training.monitor, without the checks below."
    )
    alpha: float = Field(
        0.05,
        gt=0.0,
        le=1.0,
        description="Significance level of McNemar's exact test (challenger right where the champion is wrong, "
        "more often than chance); 1 = no significance check.",
    )
    min_gain: float = Field(
        0.0, ge=0.0, description="Smallest gain on training.monitor (accuracy points as a fraction, or loss)."
    )
    max_recall_drop: float = Field(0.05, ge=0.0, le=1.0, description="Largest drop of any class's recall.")
    max_f1_drop: float = Field(0.05, ge=0.0, le=1.0, description="Largest drop of any class's F1.")
    max_ece_rise: float = Field(
        0.02, ge=0.0, le=1.0, description="Largest rise of the expected calibration error (15 bins)."
    )
    leak_free: bool = Field(
        True,
        description="With data.near_duplicates: judge on the eval images without a near-duplicate in train.",
    )


class ChampionConfig(_Section):
    """How the challenger is judged against the champion in output.champion."""

    gates: GatesConfig = Field(default_factory=GatesConfig, description="The checks of a promotion.")
    approval: Approval = Field(
        "auto",
        description="auto: promote when the gates pass; manual: then pause the flow run for a reviewer's "
        "approval in the Prefect UI (the first champion of an empty slot too).",
    )
    approval_timeout_minutes: float = Field(
        1440, gt=0, description="With manual approval: keep the champion when nobody answers within this time."
    )


class LabelIssuesConfig(_Section):
    """Suspected mislabelled training images (visionflow.label_issues): cleanlab on out-of-fold probabilities."""

    enabled: bool = Field(False, description="Search label issues before training (folds extra trainings).")
    folds: int = Field(
        5, ge=2, le=20, description="Cross-validation folds of the train split, each trained with the run's recipe."
    )
    on_issue: OnLabelIssue = Field(
        "report", description="report: list the suspects; drop-train: also train without them."
    )


class PipelineConfig(_Section):
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset and loading.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Architecture.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer, schedule and regularization.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Epochs, device, precision, seed.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where results go.")
    champion: ChampionConfig = Field(default_factory=ChampionConfig, description="Promotion gates and approval.")
    label_issues: LabelIssuesConfig = Field(
        default_factory=LabelIssuesConfig, description="Suspected mislabelled training images."
    )

    def resolved(self) -> "PipelineConfig":
        """Return a copy with every recipe-controlled field filled in (what a run really used); the
        recipe left empty is finetune with pretrained weights, default without. Fields the pretrained
        weights fill (`weights.with_weights`) come first; what they leave empty, the recipe fills."""
        name = self.optim.recipe or ("finetune" if self.model.weights != WEIGHTS_NONE else "default")
        recipe = {**RECIPES[name], "recipe": name}

        def filled(section: _Section) -> dict[str, Any]:
            values = section.model_dump()
            return {k: recipe[k] if v is None and k in recipe else v for k, v in values.items()}

        return self.model_copy(
            update={
                "optim": OptimConfig(**filled(self.optim)),
                "data": DataConfig(**filled(self.data)),
                "model": ModelConfig(**filled(self.model)),
            }
        )


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
        image_size=32,  # CIFAR-10's size, the default dataset's
        crop_pct=1.0,  # resized to the input size, no crop: small images have no border to spare
        train_crop="pad",  # shifts by a few pixels when augment is on
        freeze_epochs=0,  # nothing to freeze: training from scratch
        backbone_lr_scale=1.0,  # one rate for every layer
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
        image_size=32,  # CIFAR-10's size, as in the tutorial
        crop_pct=1.0,  # resized to the input size, no crop
        train_crop="pad",  # when augment is switched on
        freeze_epochs=0,  # nothing frozen
        backbone_lr_scale=1.0,  # one rate for every layer
    ),
    # Fine-tuning pretrained weights, as timm's and torchvision's transfer-learning recipes do.
    "finetune": dict(
        optimizer="adamw",  # robust across backbones without per-model tuning
        lr=1e-3,  # the head's rate (the backbone's is lr x backbone_lr_scale): timm's fine-tuning range
        momentum=0.9,  # used only when optim.optimizer is switched to sgd
        nesterov=True,  # likewise
        weight_decay=0.05,  # decoupled (AdamW), as timm's fine-tuning configs
        scheduler="cosine",  # no warm-up needed: the head-only epochs warm the new head up
        step_size=30,  # used only by the step scheduler
        gamma=0.1,  # likewise
        label_smoothing=0.1,  # small datasets: less overconfidence
        grad_clip=0.0,  # off: pretrained features give stable gradients
        augment=True,  # few images: random-resized crops and flips are most of the regularization
        crop_padding=0,  # unused by random-resized crops
        test_flip=False,  # one forward pass per image, as torchvision's and timm's evaluation
        whiten=False,  # would overwrite the pretrained first convolution
        image_size=224,  # ImageNet backbones' input size, when the weights do not say theirs
        crop_pct=0.875,  # resize 256, center crop 224: torchvision's and timm's ImageNet evaluation
        train_crop="random-resized",  # RandomResizedCrop + flip: the ImageNet training augmentation
        freeze_epochs=1,  # one head-only epoch first: a random head's large gradients would wreck the features
        backbone_lr_scale=0.1,  # pretrained layers move 10x slower than the new head (discriminative rates)
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


def _known_fields(values: Mapping[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """`values` without the keys `model` (and its sections, recursively) does not have."""
    known = {}
    for key, value in values.items():
        if key in model.model_fields:
            section = model.model_fields[key].annotation
            if isinstance(value, Mapping) and isinstance(section, type) and issubclass(section, BaseModel):
                value = _known_fields(value, section)
            known[key] = value
    return known


def stored_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved config as a checkpoint stored it, flattened, with the fields added since it was
    written at what they resolve to; fields of another version that this one does not have stay."""
    added = flatten(
        PipelineConfig.model_validate(_known_fields(values, PipelineConfig)).resolved().model_dump(mode="json")
    )
    return {**added, **flatten(values)}


def free_fields(use: Literal["resume", "cache"]) -> frozenset[str]:
    """The config fields (whole dotted names, as `flatten` spells them) that may differ between two
    trainings taken for one: a checkpoint and the run resuming it (`use` "resume"), or two calls of
    the training task sharing a cached result ("cache"). Every other field must be equal. Why each:

    For both uses:
    - output.*: where results are written, under which names, what is cleaned up and linked after.
    - champion.*: how a finished run is judged against the champion, decided after training.
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
    - label_issues.*: they change training only through the train images drop-train leaves out,
      which the training task's key holds (the validated exclusions); a checkpoint records the config,
      not the exclusions, so resuming compares these fields.
    - data.dataset: the cache key holds the dataset's content fingerprint instead of its spelling; a
      checkpoint records only the spelling, so resuming compares that.
    """
    decided_after = {
        *flatten(ChampionConfig().model_dump(), "champion."),
        *flatten(OutputConfig().model_dump(), "output."),
    }
    both = decided_after | {
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
        "cache": {"data.dataset", *flatten(LabelIssuesConfig().model_dump(), "label_issues.")},
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
