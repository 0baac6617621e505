"""examples/tutorial.py runs end to end, offline: ants/bees label folders copied from the real data,
CIFAR-10 downloaded from a 127.0.0.1 mirror serving a small archive in CIFAR-10's format built here
from real cifar10-mini images; its TensorBoard events and both saved models are read back."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import threading
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from visionflow.checkpoints import load_state_dict, load_whole_module
from visionflow.data.download import CIFAR10_ARCHIVE
from visionflow.models import build_model

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PER_CLASS = 1  # images of each class in every batch: 10 per batch, 50 train and 10 test images
BATCH_SIZE = 8
STEPS = 3
LABEL_FILES = 3  # ants and bees copied per label


def cifar_batch(files: list[Path], labels: list[int]) -> bytes:
    """One batch as CIFAR-10 pickles it: rows of 1024 red, 1024 green, 1024 blue values, bytes keys."""
    rows = [np.asarray(Image.open(file).convert("RGB")).transpose(2, 0, 1).reshape(-1) for file in files]
    return pickle.dumps({b"data": np.stack(rows), b"labels": labels}, protocol=2)


def cifar_archive(cifar_mini: Path, path: Path) -> Path:
    """A CIFAR-10 tar.gz of real 32x32 cifar10-mini images: 5 train batches and a test batch."""
    by_class = [sorted((cifar_mini / "train" / name).iterdir())[: 6 * PER_CLASS] for name in CLASSES]
    labels = [y for y in range(len(CLASSES)) for _ in range(PER_CLASS)]
    members = {"batches.meta": pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}, protocol=2)}
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        files = [by_class[y][b * PER_CLASS + k] for y in range(len(CLASSES)) for k in range(PER_CLASS)]
        members[name] = cifar_batch(files, labels)
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mirror(tmp_path: Path, cifar_mini: Path) -> Iterator[tuple[str, str]]:
    """(URL, md5) of the small archive on a 127.0.0.1 HTTP server on an ephemeral port."""
    served = tmp_path / "mirror"
    served.mkdir()
    archive = cifar_archive(cifar_mini, served / CIFAR10_ARCHIVE)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/{CIFAR10_ARCHIVE}", hashlib.md5(archive.read_bytes()).hexdigest()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def label_folders(tmp_path: Path, hymenoptera: Path) -> Path:
    """train/{ants,bees} with LABEL_FILES real photos each."""
    root = tmp_path / "hymenoptera" / "train"
    for label in ("ants", "bees"):
        (root / label).mkdir(parents=True)
        for file in sorted((hymenoptera / "train" / label).iterdir())[:LABEL_FILES]:
            shutil.copy(file, root / label / file.name)
    return root


def test_tutorial_example_runs_every_step(tmp_path, repo_root, mirror, label_folders):
    url, md5 = mirror
    out = tmp_path / "out"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "TORCH_HOME": str(tmp_path / "torch")}
    command = [sys.executable, "examples/tutorial.py", "--folders", str(label_folders), "--data-dir"]
    command += [str(tmp_path / "data"), "--cifar-url", url, "--cifar-md5", md5, "--out", str(out)]
    command += ["--batch-size", str(BATCH_SIZE), "--steps", str(STEPS)]
    done = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()

    def line(prefix: str) -> str:
        return next(text for text in lines if text.startswith(prefix))

    assert line("[1 folders]").startswith(f"[1 folders] ants {LABEL_FILES}, bees {LABEL_FILES}; concatenated 6;")
    assert "label 'bees'" in line("[1 folders]")
    assert line("[2 cifar10]") == f"[2 cifar10] 10 classes: {', '.join(CLASSES)}; train 50, test 10"
    assert len(list((tmp_path / "data" / "cifar10" / "images" / "train").rglob("*.png"))) == 50
    assert line("[3 transforms]").endswith("photo becomes a (3, 32, 32) tensor")
    assert line("[4 dataloader]").startswith(f"[4 dataloader] {50 // BATCH_SIZE} batches of {BATCH_SIZE};")
    assert f"images ({BATCH_SIZE}, 3, 32, 32)" in line("[4 dataloader]")
    # The tutorial's three results of F.conv2d.
    assert [text for text in lines if text.startswith("[6 conv2d]")] == [
        "[6 conv2d] {'stride': 1}: [[10, 12, 12], [18, 16, 16], [13, 9, 6]]",
        "[6 conv2d] {'stride': 2}: [[10, 12], [13, 6]]",
        "[6 conv2d] {'stride': 1, 'padding': 1}: "
        "[[1, 3, 4, 10, 8], [5, 10, 12, 12, 9], [7, 18, 16, 16, 11], [11, 13, 9, 6, 10], [14, 13, 9, 7, 4]]",
    ]
    assert line("[6 train]").startswith(f"[6 train] {STEPS} SGD steps")
    assert line("[7 save/load]").endswith(f"same predictions on {BATCH_SIZE} images: True")

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [event.step for event in events.Images("cifar10/train")] == list(range(10))
    assert [(e.step, e.value) for e in events.Scalars("y=2x")] == [(i, 2.0 * i) for i in range(100)]
    assert [event.step for event in events.Scalars("loss/train")] == list(range(STEPS))
    assert events.Tags()["graph"]

    x = torch.rand(2, 3, 32, 32)
    whole = load_whole_module(out / "tudui_whole.pth", trust=True)
    weights = load_state_dict(build_model("tudui", len(CLASSES)), out / "tudui_state_dict.pth")
    torch.testing.assert_close(whole(x), weights(x))
