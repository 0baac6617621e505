"""Batch scoring throughput and memory (not a test). Run from the repo root:

    .venv/bin/python bench/score.py [--images 20000] [--small 5000] [--pairs 3] [--model tudui]

Images: ../shared/data/cifar10-mini's 6,000 JPEGs (32x32) replicated by symbolic links to N files in
a temporary folder (the source is only read, once before any variant: all of them read it from the
page cache). Model: a seeded, untrained `--model` at 32 px, saved
as an export (throughput does not depend on the weights). Everything else is the product's
defaults (scoring.ScoreConfig: batch 64, shards of 1,024 rows, top-5, DataLoader workers = the
usable cores, at most 8, device cpu).

Variants, each in its own process (its peak RSS: os.wait4 of the child, Linux ru_maxrss, the
largest process of its tree):
- score: `scoring.score_images`, the core of `visionflow score` (listing and hashing every file,
  decoding on workers, the model, shards, the assembled Parquet table), at --small and at N
  images: the flat-RSS check;
- plain: a torchvision ImageFolder-style loop on the same --small files, model and batch: the
  files listed, a Dataset opening each file with PIL, torchvision Resize/ToTensor/Normalize, a
  DataLoader with as many workers, the model under inference_mode, top-5 kept in a list, a
  Parquet table written at the end.
score and plain run --pairs times in turn at --small (each pair's ratio, then their median), as
the load of shared cores changes between minutes; then score once at N.
Then onnxruntime against PyTorch on the CPU: the same model (its `exports` ONNX file) on the same
random batches of 64, forward passes only.
images/s are over one run each; on CPUs shared with other work they are noisy, so each variant's
CPU seconds (user + system, its DataLoader workers included) are printed too: within its clock,
and in all (the imports included).
The last line is `score_vs_plain=<median images/s ratio at --small> cpu_plain_vs_score=<median ratio of
CPU seconds within the clocks> onnx_vs_torch=<ratio> score_peak_rss_mb=<small>,<N>`.
"""

from __future__ import annotations

import argparse
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SOURCE = REPO.parent / "shared" / "data" / "cifar10-mini"
IMAGE_SIZE = 32
ONNX_BATCHES = 32  # forward passes per runtime: ~2,000 images, a few seconds on 2 cores


def replicate(target: Path, images: int) -> Path:
    """target/<class>/ with `images` symbolic links cycling over cifar10-mini's files."""
    files = sorted(SOURCE.glob("*/*/*.jpg"))
    for copy, file in zip(range(images), itertools.cycle(files)):
        link = target / file.parent.name / f"{copy:06d}-{file.name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(file)
    return target


def warm_page_cache() -> None:
    """Read every source file once: the first variant would otherwise read them from disk, the others
    from the page cache (every replica links to the same 6,000 files)."""
    for file in SOURCE.glob("*/*/*.jpg"):
        file.read_bytes()


def make_model(name: str, folder: Path) -> Path:
    import torch

    from visionflow.checkpoints import export_model
    from visionflow.train.records import ModelSpec

    torch.manual_seed(0)
    classes = sorted(p.name for p in (SOURCE / "train").iterdir())
    spec = ModelSpec(name, len(classes), IMAGE_SIZE, classes, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26])
    export_model(spec.build(), spec, folder)
    return folder


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have ended (the DataLoader
    workers, once the loader shuts them down)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def score_variant(folder: Path, model: Path, table: Path) -> dict:
    # What score_images imports on its first call, imported before the clock starts as the plain
    # loop's imports are (torchvision ~2 s, visionflow.train.engine ~0.2 s on an idle core).
    import pyarrow.parquet  # noqa: F401
    import torch.utils.data  # noqa: F401
    import torchvision  # noqa: F401

    import visionflow.data.decoded  # noqa: F401
    import visionflow.evaluation  # noqa: F401
    import visionflow.train.device  # noqa: F401
    import visionflow.train.engine  # noqa: F401
    from visionflow.scoring import ScoreConfig, resolve_inputs, resolve_model, score_images

    config = ScoreConfig(inputs=str(folder), checkpoint=str(model), table=str(table), device="cpu")
    scoring_model = resolve_model(config.checkpoint, config.output_dir)
    start, cpu = time.perf_counter(), cpu_seconds()
    summary = score_images(scoring_model, resolve_inputs(config.inputs), config)
    seconds = time.perf_counter() - start
    return {"images": summary.images, "seconds": seconds, "clock_cpu_seconds": cpu_seconds() - cpu}


def plain_variant(folder: Path, model: Path, table: Path) -> dict:
    """The loop users write by hand, on the same files, model and batch."""
    import pandas as pd
    import pyarrow.parquet  # noqa: F401 - to_parquet's, imported before the clock as every other import
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    from visionflow.checkpoints import load_model
    from visionflow.data.decoded import default_num_workers
    from visionflow.scoring import ScoreConfig

    network, spec = load_model(model)
    transform = T.Compose(
        [T.Resize((spec.input_size, spec.input_size)), T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    )
    start, cpu = time.perf_counter(), cpu_seconds()
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))

    class Files(Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, index: int):
            with Image.open(paths[index]) as image:
                return transform(image.convert("RGB"))

    batch = ScoreConfig.model_fields["batch_size"].default
    rows = []
    with torch.inference_mode():
        for images in DataLoader(Files(), batch_size=batch, num_workers=default_num_workers()):
            probabilities, ranked = network(images).softmax(dim=1).topk(5)
            rows += [[*r, *p] for r, p in zip(ranked.tolist(), probabilities.tolist())]
    pd.DataFrame(rows, columns=[f"{kind}_{rank}" for kind in ("class", "probability") for rank in range(1, 6)]).assign(
        path=paths
    ).to_parquet(table)
    return {"images": len(paths), "seconds": time.perf_counter() - start, "clock_cpu_seconds": cpu_seconds() - cpu}


def onnx_vs_torch(model: Path, work: Path) -> dict:
    import onnxruntime
    import torch

    from visionflow.checkpoints import load_model
    from visionflow.exports import Probabilities, write_format

    network, spec = load_model(model)
    file = write_format("onnx", network, spec, work)
    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    batches = [torch.randn(64, 3, spec.input_size, spec.input_size) for _ in range(ONNX_BATCHES)]
    wrapped = Probabilities(network, spec.test_flip)
    timings = {}
    with torch.inference_mode():
        for name, run in (("torch", wrapped), ("onnxruntime", lambda x: session.run(None, {"image": x.numpy()}))):
            run(batches[0])  # warm-up
            start = time.perf_counter()
            for images in batches:
                run(images)
            timings[name] = len(batches) * 64 / (time.perf_counter() - start)
    return timings


def measure(variant: str, folder: Path, model: Path, table: Path) -> dict:
    """`variant` in a child process; its result with the peak RSS (MB) and images/s."""
    argv = [sys.executable, __file__, "--child", variant, str(folder), str(model), str(table)]
    result_file = table.with_suffix(".json")
    with open(result_file, "w") as out:
        child = subprocess.Popen(argv, stdout=out)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the {variant} variant on {folder} failed")
    result = json.loads(result_file.read_text())
    cpu_seconds = usage.ru_utime + usage.ru_stime  # the child's and its reaped workers', the imports included
    per_second = result["images"] / result["seconds"]
    return {
        **result,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "images_per_second": per_second,
        "cpu_seconds": cpu_seconds,
    }


def report(variant: str, images: int, result: dict) -> None:
    print(
        f"{variant:5s} {images:>6,} images: {result['images_per_second']:,.0f} img/s "
        f"({result['seconds']:.1f} s; CPU {result['clock_cpu_seconds']:.1f} s, {result['cpu_seconds']:.1f} s in all), "
        f"peak RSS {result['peak_rss_mb']:,.0f} MB; load {os.getloadavg()[0]:.1f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000, help="replicated images (default 20,000)")
    parser.add_argument("--small", type=int, default=5_000, help="the smaller scoring run (default 5,000)")
    parser.add_argument("--pairs", type=int, default=3, help="score and plain runs in turn at --small (default 3)")
    parser.add_argument("--model", default="tudui", help="architecture (default tudui)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, folder, model, table = args.child
        run = score_variant if variant == "score" else plain_variant
        print(json.dumps(run(Path(folder), Path(model), Path(table))))
        return
    from visionflow.cores import usable_cores

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"cpu: {cpu}, {usable_cores()} usable cores; {args.model} at {IMAGE_SIZE} px", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        work = Path(tmp)
        model = make_model(args.model, work / "model")
        warm_page_cache()
        small, large = replicate(work / "inbox-small", args.small), replicate(work / "inbox-large", args.images)
        ratios, cpu_ratios, small_rss = [], [], 0.0
        for pair in range(args.pairs):
            results = {}
            for variant in ("score", "plain"):
                results[variant] = measure(variant, small, model, work / f"{variant}-small-{pair}.parquet")
                report(variant, args.small, results[variant])
            ratios.append(results["score"]["images_per_second"] / results["plain"]["images_per_second"])
            cpu_ratios.append(results["plain"]["clock_cpu_seconds"] / results["score"]["clock_cpu_seconds"])
            small_rss = max(small_rss, results["score"]["peak_rss_mb"])
            print(
                f"pair {pair + 1}: score_vs_plain={ratios[-1]:.2f} cpu_plain_vs_score={cpu_ratios[-1]:.2f}", flush=True
            )
        result = measure("score", large, model, work / "score-large.parquet")
        report("score", args.images, result)
        runtimes = onnx_vs_torch(model, work)
    print(
        f"forward only, batch 64: torch {runtimes['torch']:,.0f} img/s, "
        f"onnxruntime {runtimes['onnxruntime']:,.0f} img/s"
    )
    print(
        f"score_vs_plain={statistics.median(ratios):.2f} cpu_plain_vs_score={statistics.median(cpu_ratios):.2f} "
        f"onnx_vs_torch={runtimes['onnxruntime'] / runtimes['torch']:.2f} "
        f"score_peak_rss_mb={small_rss:.0f},{result['peak_rss_mb']:.0f}"
    )


if __name__ == "__main__":
    main()
