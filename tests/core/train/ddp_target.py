"""A torchrun target for tests/core/train/test_distributed.py: `python -m torch.distributed.run ... -m
tests.core.train.ddp_target WORK_DIR MODE`, each rank recording its exception like the product's worker
(`visionflow.train.ddp_worker.errors_recorded`).

MODE "train": every rank calls `engine.fit` on the same tiny synthetic data (`tiny_fit`, which the
test also calls in one process); after every epoch the ranks all-gather the sha256 of their
weights, and rank 0 appends them as an event and saves its weights (WORK_DIR/epoch<N>.pt).
MODE "fail": rank 1 raises ValueError while rank 0 waits for it in a collective.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from visionflow.checkpoints import weights_sha256
from visionflow.config import build_config
from visionflow.train.ddp_worker import errors_recorded, leave_group
from visionflow.train.engine import fit
from visionflow.train.launch import EVENTS_FILE
from visionflow.train.records import Callback, EpochMetrics, FitResult, ModelSpec
from visionflow.train.rng import seed_everything

TRAIN_IMAGES, EVAL_IMAGES, BATCH = 96, 32, 16  # 6 steps per epoch; a batch divides by 1, 2 and 4 ranks
EPOCHS = 2


def tiny_fit(callbacks: Sequence[Callback] = (), model_out: list[nn.Module] | None = None) -> FitResult:
    """fit tudui on seeded random 32x32 images, 2 classes: SGD (the tutorial recipe), fp32, shuffled,
    no augmentation, `EPOCHS` epochs; the model is appended to `model_out` before training."""
    data = torch.Generator().manual_seed(1)
    train = SimpleNamespace(
        images=torch.randint(0, 256, (TRAIN_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=data),
        labels=torch.randint(0, 2, (TRAIN_IMAGES,), generator=data),
    )
    evaluation = SimpleNamespace(
        images=torch.randint(0, 256, (EVAL_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=data),
        labels=torch.randint(0, 2, (EVAL_IMAGES,), generator=data),
    )
    config = build_config(
        {
            "data": {"batch_size": BATCH, "augment": False, "mean": [0.5] * 3, "std": [0.25] * 3},
            "optim": {"recipe": "tutorial"},
            "training": {"epochs": EPOCHS, "device": "cpu", "precision": "fp32", "channels_last": False},
        }
    )
    spec = ModelSpec("tudui", 2, 32, ["a", "b"])
    seed_everything(0)
    model = spec.build()
    if model_out is not None:
        model_out.append(model)
    return fit(model, train, evaluation, config, spec, callbacks=callbacks)


class ReplicaDigests(Callback):
    """After every epoch: all ranks' weight digests (gathered), rank 0 writes them and its weights."""

    def __init__(self, work_dir: Path, models: list[nn.Module]) -> None:
        self.work_dir, self.models = work_dir, models

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        state = self.models[0].state_dict()
        digests: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(digests, weights_sha256(state))
        if dist.get_rank() == 0:
            torch.save(state, self.work_dir / f"epoch{metrics.epoch}.pt")
            with open(self.work_dir / EVENTS_FILE, "a") as handle:
                handle.write(json.dumps({"event": "replicas", "epoch": metrics.epoch, "digests": digests}) + "\n")


def main() -> None:
    work_dir, mode = Path(sys.argv[1]), sys.argv[2]
    with errors_recorded(work_dir):
        dist.init_process_group("gloo")
        if mode == "train":
            models: list[nn.Module] = []
            tiny_fit([ReplicaDigests(work_dir, models)], models)
        elif dist.get_rank() == 1:
            raise ValueError("bad label 7 in batch 3")
        else:
            dist.barrier()  # waits for rank 1, which never comes: torchrun has to stop this rank
        leave_group()


if __name__ == "__main__":
    main()
