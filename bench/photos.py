"""Photos at 224 px: visionflow's fine-tuning path against torchvision's reference loop (not a test).
Run from the repo root:

    .venv/bin/python bench/photos.py [--epochs 2] [--batch 32] [--stem-rounds 1] [--device auto]

Dataset: ../shared/data/hymenoptera_data (244 train JPEGs of ~500x375, read in place), model
torchvision's ResNet-18 (`resnet18`) with a 2-class head, batch 32 (the finetune recipe sets no
batch; data.batch_size's default, 64, is the CIFAR default), trained at 224 px with the precision and
memory format `auto` picks for resnet18 at 224 px on this machine
(`visionflow.train.autotune.fast_settings`, printed) and the finetune recipe's optimizer (AdamW),
learning rate, weight decay and label smoothing:

  reference   torchvision's reference-style loop: ImageFolder + RandomResizedCrop(224) +
              RandomHorizontalFlip + ToTensor + Normalize(ImageNet) in DataLoader(shuffle, num_workers =
              the usable cores, pin_memory on CUDA, persistent_workers), the whole network trained
  visionflow  `steps.train_run` (the flow's training step) with model.name resnet18 and model.weights a
              torchvision resnet18 state dict saved here (the pretrained stand-in: no hub on these
              machines), everything else the product's defaults: the finetune recipe (decoded cache at
              256 px, random-resized crops on the device, 1 head-only epoch, then the whole network)

The two alternate: a callback of visionflow's run trains one reference epoch after each of
visionflow's epochs but the last, so both see the same neighbours on a shared machine. Timed: the
`--epochs` unfrozen epochs after the first (which pays the backward kernels' set-up) against as many
reference epochs after its first (its workers' start): images/s of each epoch's training loop
(visionflow: its history's images_per_second, evaluation excluded), the medians compared; and, as
the machine is shared, each side's fastest full-batch step in those epochs (end to end, data
included; visionflow's timed between its step callbacks): the speed each reaches when it has the
cores. The decoded cache is written before anything is timed.

Then, in a child process, the standard and the CIFAR-stem ResNet-18 (`resnet18_cifar`: 3x3
stride-1 stem, no max-pool: ~16x the compute per image at 224 px) through the engine's training
loop on the same decoded batches, same precision, layout, batch and recipe: steps taking turns each
round (resnet18, resnet18_cifar, resnet18 again: the standard net's steps on both sides of the
long one), one untimed round then `--stem-rounds` timed ones; and their FLOPs per training image.
Peak RSS: the main process (both loops: ru_maxrss) and the child's (os.wait4).
The last line is `reference_ips=... visionflow_ips=... ratio=<visionflow/reference epoch medians>
best_step_ratio=<of the fastest steps> head_only_ips=... cifar_stem_ips=...
standard_vs_cifar_stem=<resnet18 / resnet18_cifar img/s in the child> peak_rss_mb=<main process>`.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visionflow.config import RECIPES, PipelineConfig, build_config  # noqa: E402
from visionflow.cores import usable_cores  # noqa: E402
from visionflow.data.decoded import open_split  # noqa: E402
from visionflow.data.splits import resolve_folder  # noqa: E402
from visionflow.steps import train_run  # noqa: E402
from visionflow.train import engine  # noqa: E402
from visionflow.train.autotune import FastSettings, cpu_name, fast_settings  # noqa: E402
from visionflow.train.device import resolve_device  # noqa: E402
from visionflow.train.distributed import Ranks  # noqa: E402
from visionflow.train.records import Callback, EpochMetrics, FitStart, ModelSpec  # noqa: E402
from visionflow.train.rng import seed_everything  # noqa: E402
from visionflow.weights import locate, with_weights  # noqa: E402

SOURCE = REPO.parent / "shared" / "data" / "hymenoptera_data"
MODEL, CIFAR_STEM = "resnet18", "resnet18_cifar"
IMAGE_SIZE = 224  # the finetune recipe's input size
FINETUNE = RECIPES["finetune"]  # the reference loop takes its optimizer settings from it
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Durations of full-batch training steps, end to end (data, forward, backward, optimizer), per
    epoch; each epoch's first step is left out (it starts after an evaluation or a worker start)."""

    def __init__(self, batch: int):
        self.batch, self.epochs, self.last = batch, [], None

    def epoch_start(self) -> None:
        self.epochs.append([])
        self.last = None

    def step_end(self, images: int) -> None:
        now = time.perf_counter()
        if self.last is not None and images == self.batch:
            self.epochs[-1].append(now - self.last)
        self.last = now

    def images_per_second(self, first_epoch: int) -> tuple[float, float]:
        """(median, best) full-step img/s over the epochs from index `first_epoch` on."""
        steps = [s for epoch in self.epochs[first_epoch:] for s in epoch]
        return self.batch / statistics.median(steps), self.batch / min(steps)


class Reference:
    """torchvision's reference-style training loop; `epoch()` trains one epoch and returns its img/s."""

    def __init__(self, device: torch.device, batch: int, precision: str, channels_last: bool):
        transform = T.Compose(
            [
                T.RandomResizedCrop(IMAGE_SIZE),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        dataset = torchvision.datasets.ImageFolder(str(SOURCE / "train"), transform=transform)
        self.loader = DataLoader(
            dataset,
            batch_size=batch,
            shuffle=True,
            num_workers=usable_cores(),
            pin_memory=device.type == "cuda",
            persistent_workers=True,
        )
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.model = torchvision.models.resnet18(num_classes=len(dataset.classes)).to(device, memory_format=self.layout)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=FINETUNE["lr"], weight_decay=FINETUNE["weight_decay"]
        )
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=FINETUNE["label_smoothing"])
        self.device, self.bf16, self.clock = device, precision == "bf16", StepClock(batch)

    def epoch(self) -> float:
        self.model.train()
        self.clock.epoch_start()
        start, images = time.perf_counter(), 0
        for inputs, labels in self.loader:
            inputs = inputs.to(self.device, non_blocking=True, memory_format=self.layout)
            labels = labels.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.loss_fn(self.model(inputs), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss.item()  # a sync per step, as visionflow's step callback (below) reads its loss
            images += len(labels)
            self.clock.step_end(len(labels))
        _sync(self.device)
        return images / (time.perf_counter() - start)


class Alternate(Callback):
    """After each of visionflow's epochs but the last, one reference epoch: the two take turns.
    Also times visionflow's steps (between step callbacks: the whole step, as the reference's)."""

    def __init__(self, reference: Reference, epochs: int, batch: int):
        self.reference, self.epochs, self.figures, self.clock = reference, epochs, [], StepClock(batch)
        self.train_images = self.steps_per_epoch = 0

    def on_fit_start(self, state: FitStart) -> None:
        self.train_images, self.steps_per_epoch = state.train_images, state.steps_per_epoch
        self.clock.epoch_start()

    def on_step_end(self, step: int, loss: float, lr: float) -> None:
        done = (step - 1) % self.steps_per_epoch * self.clock.batch  # images before this step in its epoch
        self.clock.step_end(min(self.clock.batch, self.train_images - done))

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        if metrics.epoch < self.epochs:
            self.figures.append(self.reference.epoch())
            print(
                f"epoch {metrics.epoch}: visionflow {metrics.images_per_second:.2f} img/s, "
                f"then reference {self.figures[-1]:.2f} img/s",
                flush=True,
            )
            self.clock.epoch_start()


def _config(weights: Path, work: Path, batch: int, epochs: int, device: str) -> PipelineConfig:
    """The product defaults for fine-tuning `weights` (recipe finetune), but the batch and epochs."""
    return build_config(
        {
            "model": {"name": MODEL, "weights": str(weights)},
            "data": {"dataset": str(SOURCE), "data_dir": str(work / "data"), "batch_size": batch},
            "training": {"epochs": epochs, "device": device},
            "output": {"output_dir": str(work / "out")},
        }
    )


def warm_cache(config: PipelineConfig) -> float:
    """Decode both splits into the decoded cache as train_run will read them; returns the seconds."""
    start = time.perf_counter()
    info = resolve_folder(SOURCE)
    data = with_weights(config, locate(config.model, config.output.output_dir, download=False)).resolved().data
    for split in (info.train, info.eval_split):
        open_split(split, data, "memory")
    return time.perf_counter() - start


def _engine_run(name: str, work: Path, batch: int, device: torch.device, precision: str, channels_last: bool):
    """The engine's training run of model `name` (random init) on the decoded batches: recipe finetune
    at 224 px, nothing frozen; returns (run, an endless iterator over its training batches)."""
    config = build_config(
        {
            "model": {"name": name, "freeze_epochs": 0},
            "optim": {"recipe": "finetune"},
            "data": {
                "dataset": str(SOURCE),
                "data_dir": str(work / "data"),
                "batch_size": batch,
                "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD,
            },
            "training": {"epochs": 1, "device": str(device), "precision": precision, "channels_last": channels_last},
        }
    ).resolved()
    info = resolve_folder(SOURCE)
    train, evaluation = (open_split(split, config.data, "memory") for split in (info.train, info.eval_split))
    seed_everything(0)
    run = engine._build_run(
        ModelSpec.of(config, info.classes).build(), train, evaluation, config, device, Ranks.current()
    )
    return run, itertools.cycle(run.train_batches)


def stems(work: Path, batch: int, rounds: int, device_name: str, precision: str, channels_last: bool) -> dict:
    """In the child: resnet18 and resnet18_cifar through the engine's training loop, per round a step
    of resnet18, one of resnet18_cifar, another of resnet18 (one untimed round first); img/s of each
    over the timed rounds, and their FLOP ratio."""
    device = resolve_device(device_name)
    runs = {name: _engine_run(name, work, batch, device, precision, channels_last) for name in (MODEL, CIFAR_STEM)}
    images, seconds = dict.fromkeys(runs, 0), dict.fromkeys(runs, 0.0)
    for round_ in range(rounds + 1):
        for name in (MODEL, CIFAR_STEM, MODEL):  # the standard net's steps on both sides of the long one
            run, batches = runs[name]
            stats = engine.train_one_epoch(
                run.train_forward,
                run.criterion,
                run.optimizer,
                run.scheduler,
                itertools.islice(batches, 1),
                device,
                precision=precision,
            )
            if round_:  # round 0: the untimed warm-up
                images[name] += stats.images
                seconds[name] += stats.seconds
    return {**{name: images[name] / seconds[name] for name in runs}, "flop_ratio": _flop_ratio(runs)}


def _flop_ratio(runs: dict) -> float:
    """FLOPs of a CIFAR-stem training image over a standard one (forward + backward, torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for name, (run, _) in runs.items():
        with FlopCounterMode(display=False) as counter:
            run.model(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)).sum().backward()
        flops[name] = counter.get_total_flops()
    return flops[CIFAR_STEM] / flops[MODEL]


def run_stems(work: Path, args: argparse.Namespace, precision: str, channels_last: bool) -> dict:
    """`stems` in a child process; adds its peak RSS (MB)."""
    argv = [sys.executable, __file__, "--child", str(work), str(args.batch), str(args.stem_rounds), args.device]
    argv += [precision, str(channels_last).lower()]
    out_file = work / "stems.json"
    with open(out_file, "w") as out:
        child = subprocess.Popen(argv, stdout=out)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the stem child failed (exit {os.waitstatus_to_exitcode(status)})")
    result = json.loads(out_file.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    return result


def compare_loops(work: Path, args: argparse.Namespace, device: torch.device, chosen: FastSettings) -> dict:
    """visionflow's train_run and the reference loop, alternating epochs; prints both and returns
    the medians, the head-only epoch's img/s, the settings and the peak RSS."""
    epochs = 1 + 1 + args.epochs  # head-only, unfrozen warm-up, timed
    seed_everything(0)
    weights = work / "resnet18-standin.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    config = _config(weights, work, args.batch, epochs, args.device)
    print(f"decoded cache written in {warm_cache(config):.1f} s (untimed)", flush=True)
    alternate = Alternate(Reference(device, args.batch, chosen.precision, chosen.channels_last), epochs, args.batch)
    result = train_run(
        work / "run", resolve_folder(SOURCE), config, callbacks=[alternate], progress_stream=io.StringIO()
    )
    history, phases = result.history, result.phase_seconds
    print(
        f"visionflow epoch {history[-1].epoch}: {history[-1].images_per_second:.2f} img/s "
        f"(precision {result.precision}, channels_last {result.channels_last}, loader {result.loader}); "
        f"final eval accuracy {history[-1].eval_accuracy:.3f} (random-init stand-in weights)",
        flush=True,
    )
    loop = ("data", "forward", "backward", "optimizer")
    busy = sum(phases[p] for p in loop)
    print("visionflow training-loop phases, all epochs: " + ", ".join(f"{p} {phases[p] / busy:.1%}" for p in loop))
    timed_vf, timed_ref = [m.images_per_second for m in history[2:]], alternate.figures[1:]
    steps_vf, steps_ref = alternate.clock.images_per_second(2), alternate.reference.clock.images_per_second(1)
    print(
        f"timed unfrozen epochs, img/s: visionflow {', '.join(f'{x:.2f}' for x in timed_vf)}; "
        f"reference {', '.join(f'{x:.2f}' for x in timed_ref)}; their full steps (median / best): "
        f"visionflow {steps_vf[0]:.2f} / {steps_vf[1]:.2f}, reference {steps_ref[0]:.2f} / {steps_ref[1]:.2f}",
        flush=True,
    )
    return {
        "visionflow": statistics.median(timed_vf),
        "reference": statistics.median(timed_ref),
        "best_step_ratio": steps_vf[1] / steps_ref[1],
        "head_only": history[0].images_per_second,
        "precision": result.precision,
        "channels_last": result.channels_last,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="timed unfrozen epochs per side (default 2)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--stem-rounds", type=int, default=1, help="timed steps of each stem (default 1)")
    parser.add_argument("--device", default="auto", help="training.device (default auto)")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        work, batch, rounds, device, precision, channels_last = args.child
        print(json.dumps(stems(Path(work), int(batch), int(rounds), device, precision, channels_last == "true")))
        return
    device = resolve_device(args.device)
    chosen = fast_settings(device, MODEL, IMAGE_SIZE)
    print(
        f"cpu: {cpu_name()}, {usable_cores()} usable cores, {torch.get_num_threads()} threads; device {device}; "
        f"{MODEL} at {IMAGE_SIZE} px, batch {args.batch}; auto: {chosen.precision}, channels_last "
        f"{chosen.channels_last} ({chosen.reason})",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-photos-") as tmp:
        loops = compare_loops(Path(tmp), args, device, chosen)
        stem = run_stems(Path(tmp), args, loops["precision"], loops["channels_last"])
    standard_vs_cifar = stem[MODEL] / stem[CIFAR_STEM]
    print(
        f"engine loop, {args.stem_rounds} step(s) of {args.batch} each, alternating: {MODEL} {stem[MODEL]:.2f} img/s, "
        f"{CIFAR_STEM} {stem[CIFAR_STEM]:.2f} img/s ({stem['flop_ratio']:.1f}x the FLOPs per image); "
        f"that process's peak RSS {stem['peak_rss_mb']:,.0f} MB",
        flush=True,
    )
    print(
        f"reference_ips={loops['reference']:.2f} visionflow_ips={loops['visionflow']:.2f} "
        f"ratio={loops['visionflow'] / loops['reference']:.2f} best_step_ratio={loops['best_step_ratio']:.2f} "
        f"head_only_ips={loops['head_only']:.2f} "
        f"cifar_stem_ips={stem[CIFAR_STEM]:.2f} standard_vs_cifar_stem={standard_vs_cifar:.1f} "
        f"peak_rss_mb={loops['peak_rss_mb']:.0f}"
    )


if __name__ == "__main__":
    main()
